"""benchmarks/sd15_memory.py on tiny SD- and SDXL-shaped models: it runs end to end (file written
streaming in the original layout, one fresh process per row, markdown and JSON), its phases come in
order and cover the run, --low-memory's image equals the in-RAM one bit for bit, the RssAnon /
RssFile split at each phase's sampled peak adds up, and the U-Net phase's peak does not grow with
the steps."""
import json

import pytest
import torch

from marble.checkpoints.resolve import load_model
from marble.config import config_to_dict
from sd_fixtures import tiny_sd, tiny_sdxl
from test_benchmarks import load_script

SIZE = 256   # the tiny U-Net's activations at 32² latents: tens of MB above the text phase, well above RSS noise


@pytest.fixture(scope="module")
def script():
    return load_script("sd15_memory")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_written_file_is_an_fp16_sd_single_file_of_the_config(script, tmp_path, family):
    """Original key names (recognised as an SD single file; SDXL's bigG tower with OpenCLIP's fused
    in_proj and x @ P text_projection), every tensor fp16, values those drawn."""
    config = tiny_sd("sd1") if family == "sd1" else tiny_sdxl()
    path = tmp_path / "m.safetensors"
    nbytes = script.write_fp16_single_file(config, path, seed=3, with_config=True)
    from marble.checkpoints.sd_single_file import is_sd_single_file
    from marble.tensor_file import read_header
    header = read_header(path)
    assert is_sd_single_file(header.entries) and "marble_config" in header.metadata
    if family == "sdxl":
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in header.entries
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in header.entries
    loaded = load_model(str(path), storage=torch.float16).model
    assert loaded.config.unet == config.unet and loaded.config.vae == config.vae
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    assert nbytes == sum(p.numel() * 2 for p in loaded.parameters())
    per_network = {name: sum(p.numel() * 2 for p in getattr(loaded, name).parameters())
                   for name in ("unet", "text_encoder", "vae")}
    assert script.network_bytes(config) == per_network
    again = tmp_path / "again.safetensors"
    script.write_fp16_single_file(config, again, seed=3, with_config=True)
    assert again.read_bytes() == path.read_bytes()   # seeded


def test_runs_end_to_end_with_ordered_phases_and_the_same_image(script, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(config_to_dict(tiny_sd("sd1"))))
    out = tmp_path / "report.json"
    script.main(["--config", str(config), "--size", str(SIZE), "--steps", "2", "--threads", "1", "--json", str(out)])
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert list(report["rows"]) == ["in RAM", "--low-memory"]
    for label, row in report["rows"].items():
        assert [p["phase"] for p in row["phases"]] == list(script.PHASES)
        assert row["threads"] == 1 and row["image_shape"] == [SIZE, SIZE, 3]
        peaks = [p["peak_gb"] for p in row["phases"]]
        assert row["peak_gb"] == max(peaks) and all(p > row["after_imports_gb"] for p in peaks)
        # each phase's peak starts where the one before ended (VmHWM reset to the RSS then)
        for before, phase in zip(row["phases"], row["phases"][1:]):
            assert phase["peak_gb"] >= before["end_rss_gb"] - 1e-3, (label, before, phase)
        assert row["phases"][-1]["seconds"] > 0 and row["phases"][2]["seconds"] > 0
    plain, low = report["rows"]["in RAM"], report["rows"]["--low-memory"]
    assert plain["mapped_gb"] == 0 and low["mapped_gb"] >= 0.99 * report["weights_gb"]
    assert report["same_image"] and plain["image_sha256"] == low["image_sha256"]
    assert report["file_gb"] > report["weights_gb"] > 0.005
    # the table shows every phase of both rows, to the MB
    for phase in script.PHASES:
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {phase} |"))
        assert line == f"| {phase} | " + " | ".join(f"{r['phases'][script.PHASES.index(phase)]['peak_gb']:.3f}"
                                                    for r in (plain, low)) + " |"
    assert "Images bit for bit equal across rows: yes" in table and "target" not in table
    with pytest.raises(SystemExit):   # never over a file
        script.main(["--config", str(config), "--json", str(out)])

    # one step instead of two, the same size: the U-Net phase's peak grows by less than half of what
    # the first step's activations and kernels took above the text phase's end (measured: 0-11 MB
    # between processes, against ~40 MB for that growth); a sampler that kept each step's
    # activations would add the whole growth again
    one = script.measure(SIZE, 1, 7.5, 1, tiny_sd("sd1"), rows={"in RAM": False}, log=lambda _: None)["rows"]["in RAM"]
    growth = one["phases"][2]["peak_gb"] - one["phases"][1]["end_rss_gb"]
    assert growth > 0.02, growth
    assert plain["phases"][2]["peak_gb"] - one["phases"][2]["peak_gb"] < 0.5 * growth, (plain["phases"], one["phases"])


def test_sdxl_runs_end_to_end_with_the_split_at_each_peak_and_the_same_image(script, tmp_path, capsys, monkeypatch):
    """--arch sdxl on a tiny SDXL (both text towers, size conditioning): CFG 5 by default, both rows'
    images equal bit for bit, and at each phase's largest sampled VmRSS the kernel's split adds up:
    RssAnon + RssFile + RssShmem is VmRSS (one read of /proc/self/status), and the sample is no
    higher than the phase's VmHWM beyond the kernel's counter slack (its RSS counters are batched
    per CPU: observed 0.1 MB over)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tmp_path / "tiny-sdxl.json"
    config.write_text(json.dumps(config_to_dict(tiny_sdxl())))
    out = tmp_path / "report.json"
    script.main(["--arch", "sdxl", "--config", str(config), "--size", "128", "--threads", "1", "--json", str(out)])
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["settings"]["arch"] == "sdxl" and report["settings"]["cfg"] == 5.0
    assert report["same_image"] and report["rows"]["in RAM"]["image_shape"] == [128, 128, 3]
    assert sum(report["networks_gb"].values()) == pytest.approx(report["weights_gb"], rel=1e-12)
    assert report["target_ratio"] == 1.2 and report["target_gb"] == pytest.approx(1.2 * report["weights_gb"])
    assert report["rows"]["--low-memory"]["mapped_gb"] > 0.9 * report["weights_gb"]
    for label, row in report["rows"].items():
        assert [p["phase"] for p in row["phases"]] == list(script.PHASES)
        for p in row["phases"]:
            assert set(p["sampled_peak_gb"]) == set(script.SPLIT)
            split = {k: round(v * 1e9) for k, v in p["sampled_peak_gb"].items()}   # whole bytes: exact sums
            assert split["RssAnon"] > 0 and split["RssFile"] > 0
            assert split["RssAnon"] + split["RssFile"] <= split["VmRSS"]
            assert split["RssAnon"] + split["RssFile"] + split["RssShmem"] == split["VmRSS"]
            assert split["VmRSS"] <= (p["peak_gb"] + 0.002) * 1e9, (label, p)
            assert split["VmRSS"] >= (row["after_imports_gb"] - 0.002) * 1e9, (label, p)
    # the ratio table: each phase's peak over the weights and the split, as in the JSON
    plain, low = report["rows"]["in RAM"], report["rows"]["--low-memory"]
    for i, phase in enumerate(script.PHASES):
        cells = [c for r in (plain, low) for c in (
            f"{r['phases'][i]['peak_gb'] / report['weights_gb']:.2f}×",
            f"{r['phases'][i]['sampled_peak_gb']['RssAnon']:.3f} + {r['phases'][i]['sampled_peak_gb']['RssFile']:.3f}")]
        assert f"| {phase} | " + " | ".join(cells) + " |" in table.splitlines()
    assert "U-Net 0.004 GB" in table and "Images bit for bit equal across rows: yes" in table
    assert "target" not in table   # a tiny model at 128²: not the target


def test_width_divisor_narrows_only_the_unet(script):
    from marble.models.stable_diffusion import sd_config
    full = sd_config("sdxl-base")
    narrow = script.reduced(full, 5)
    assert narrow.unet.model_channels == 64 and narrow.unet.channel_mult == full.unet.channel_mult
    assert narrow.text == full.text and narrow.vae == full.vae and narrow.name != full.name
    with pytest.raises(SystemExit):   # 320 / 3 is not a whole channel count
        script.reduced(full, 3)


def test_vae_tiling_runs_every_row_tiled_and_says_so(script, tmp_path, capsys, monkeypatch):
    """--vae-tile-size: the rows decode in tiles (tiny VAE, factor 4: a 128² image is 32 latent
    cells, 3 × 3 tiles of 64 px), the phases still close in order (the decode's phase starts at
    the first tile), the report and its header state the tile, and bad sizes stop before any work."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(config_to_dict(tiny_sd("sd1"))))
    out = tmp_path / "report.json"
    script.main(["--config", str(config), "--size", "128", "--steps", "1", "--threads", "1", "--only", "in RAM",
                 "--vae-tile-size", "64", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["settings"]["vae_tile_size"] == 64
    assert [p["phase"] for p in report["rows"]["in RAM"]["phases"]] == list(script.PHASES)
    assert "VAE tiles of 64 px" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="multiple of 32"):
        script.main(["--config", str(config), "--vae-tile-size", "40"])
