"""The scripts under benchmarks/: their measures on exact cases, and that they run."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module      # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_centred_correlation_is_exact_on_known_cases():
    layout = load_script("layout_source")
    a = torch.randn(3, 4, 8, 8)
    assert layout.centred_correlation(a, a) == pytest.approx(1.0, abs=1e-6)
    assert layout.centred_correlation(a, -2 * a + 5) == pytest.approx(-1.0, abs=1e-6)  # per-channel offsets removed
    b = torch.zeros(1, 1, 2, 2)
    b[0, 0, 0, 0], b[0, 0, 1, 1] = 1.0, -1.0
    c = torch.zeros(1, 1, 2, 2)
    c[0, 0, 0, 1], c[0, 0, 1, 0] = 1.0, -1.0
    assert layout.centred_correlation(b, c) == pytest.approx(0.0, abs=1e-7)


def test_eval_table_position_splits_axis_from_direction_on_known_cases():
    axis = load_script("eval_table")
    req = {"relation": "left of", "objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}]}

    def det(shape, color, x, y):
        return {"shape": shape, "color": color, "center": [x, y]}
    C = axis.Counts
    # red circle left of blue square: on the axis, the right way
    assert axis.image_counts(req, [det("circle", "red", 10, 30), det("square", "blue", 50, 32)]) == C(1, 1, 1, 1)
    # mirrored: on the axis, the wrong way
    assert axis.image_counts(req, [det("circle", "red", 50, 30), det("square", "blue", 10, 32)]) == C(1, 1, 1, 0)
    # stacked vertically: off the axis whatever the sign
    assert axis.image_counts(req, [det("circle", "red", 10, 5), det("square", "blue", 12, 50)]) == C(1, 1, 0, 0)
    # the prompt's colour is preferred over the first detection of the shape; a missing shape counts the image only
    assert axis.image_counts(req, [det("circle", "green", 60, 30), det("circle", "red", 10, 30),
                                   det("square", "blue", 50, 30)]) == C(1, 1, 1, 1)
    assert axis.image_counts(req, [det("circle", "red", 10, 30)]) == C(1, 0, 0, 0)
    above = {**req, "relation": "above"}    # image y grows downwards
    assert axis.image_counts(above, [det("circle", "red", 30, 5), det("square", "blue", 32, 50)]) == C(1, 1, 1, 1)
    result = {"prompts": [{"category": "position", "requirement": req, "images": [
        {"detected": [det("circle", "red", 10, 30), det("square", "blue", 50, 32)]},
        {"detected": [det("circle", "red", 50, 30), det("square", "blue", 10, 32)]}]},
        {"category": "counting", "requirement": {}, "images": [{"detected": []}]}]}
    assert axis.position_counts(result) == {"left of": C(2, 2, 2, 1)}
    assert "| m | **all** | 2 | 2 | 2/2 (1.00) | 1/2 (0.50) |" in axis.position_table([("m", result)])


def test_layout_source_runs_on_the_tiny_model(tiny_loaded):
    layout = load_script("layout_source")
    leak = layout.leak_table(tiny_loaded, scenes=3, timesteps=(999, 600))
    assert [r["t"] for r in leak] == [999, 600] and leak[0]["sigma"] > leak[1]["sigma"]
    assert all(-1 <= r[k] <= 1 for r in leak for k in ("training", "other_scene", "pure_noise"))
    relations = layout.relation_table(tiny_loaded, seeds=1)
    assert [r["relation"] for r in relations] == ["above", "below", "to the left of", "to the right of"]
    assert all(0 <= r["first_above_or_left"] <= r["found"] <= r["images"] == len(layout.PAIRS) for r in relations)
    assert "| relation word |" in layout.markdown(leak, relations)


def test_role_probe_reads_a_linear_code_and_not_noise():
    roles = load_script("text_roles")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (800,), generator=g)
    code = torch.nn.functional.one_hot(y, 4).float() @ torch.randn(4, 16, generator=g)
    x = code + 0.1 * torch.randn(800, 16, generator=g)
    probe = roles.fit_probe(x[:400], y[:400], 4)
    assert roles.accuracy(probe, x[400:], y[400:]) == 1.0
    noise = torch.randn(800, 16, generator=g)
    probe = roles.fit_probe(noise[:400], y[:400], 4)
    assert roles.accuracy(probe, noise[400:], y[400:]) < 0.35      # chance is 0.25; 400 test labels


def test_role_captions_point_at_each_objects_words_and_roles():
    roles = load_script("text_roles")
    from marble.data.scene import RELATIONS
    from marble.models.text import load_minilm
    tokenizer = load_minilm().tokenizer
    rows = roles.captions(tokenizer)
    assert len(rows) == 8 * 7 * 6 * 5 * 4 and len({r["text"] for r in rows}) == len(rows)
    first = rows[0]
    ids = tokenizer.encode(first["text"])
    words = first["text"].split()          # "a C1 S1 left of a C2 S2": one piece per word, after [CLS]
    a, b = first["objects"]
    assert [words[a["color"] - 1], words[a["shape"] - 1], words[b["color"] - 1], words[b["shape"] - 1]] == \
        [words[1], words[2], words[-2], words[-1]]
    assert ids[a["shape"]] == tokenizer.encode(words[2])[1]
    assert {(RELATIONS[r["objects"][0]["role"]], RELATIONS[r["objects"][1]["role"]]) for r in rows} == \
        {("left of", "right of"), ("right of", "left of"), ("above", "below"), ("below", "above")}


def test_lora_curve_heart_drawn_judges_the_heart_alone():
    heart_drawn = load_script("lora_curve").heart_drawn
    two = {"category": "two_objects", "objects": [{"shape": "heart", "color": "red"}, {"shape": "star", "color": "blue"}]}
    count = {"category": "counting", "objects": [{"shape": "heart", "count": 3}]}
    red_heart, blue_heart = {"shape": "heart", "color": "red"}, {"shape": "heart", "color": "blue"}
    assert heart_drawn(two, [red_heart])                                  # the partner is not judged
    assert not heart_drawn(two, [blue_heart, {"shape": "star", "color": "blue"}])   # the colour is
    assert heart_drawn(two, [blue_heart], colour=False)
    assert not heart_drawn(two, [{"shape": "diamond", "color": "red"}])
    assert heart_drawn(count, [red_heart, blue_heart, red_heart, {"shape": "star", "color": "red"}])
    assert not heart_drawn(count, [red_heart, blue_heart])
    assert not heart_drawn(count, [red_heart] * 4)


def test_preview_cost_measures_a_step_and_a_preview():
    cost = load_script("preview_cost")
    r = cost.measure("tiny-random", repeats=1)
    assert r["model"] == "tiny-random" and r["previewer"] == "LatentRGB"
    assert all(r[k] > 0 for k in ("step", "preview", "vae preview"))
    assert cost.sd_sized_linear_preview(1) > 0


def test_profile_unet_counts_attention_flops_and_sorts_operators():
    prof = load_script("profile_unet")
    q, k = torch.randn(2, 8, 16, 40), torch.randn(2, 8, 7, 40)
    total, per = prof.flops_by_category(lambda: (torch.nn.functional.scaled_dot_product_attention(q, k, k),
                                                 torch.nn.functional.conv2d(torch.randn(1, 3, 5, 5),
                                                                            torch.randn(4, 3, 3, 3))))
    assert per["attention"] == 2 * (2 * 2 * 8 * 16 * 7 * 40)          # Q·Kᵀ and P·V
    assert per["convolution"] == 2 * 4 * 3 * 9 * 3 * 3                 # 'valid' 3×3: 3×3 outputs
    assert total == per["attention"] + per["convolution"]
    assert [prof.CATEGORY_OF[op] for op in ("mkldnn_convolution", "addmm", "native_group_norm", "copy_", "silu")] \
        == ["convolution", "matmul", "GroupNorm", "copies/layout", "elementwise"]


def test_regions_sweep_tables_every_point_it_finds(tmp_path, capsys):
    """--table-only reads every OUT/s*-d*.json, ordered by the settings, one row each with its numbers."""
    import json
    sweep = load_script("regions_sweep")

    def report(strength, decay, weight=1.0, cfg=4.0, **flags):
        cats = {c: {"accuracy": a, "strict_accuracy": a} for c, a in
                (("counting", 0.5 + strength / 10), ("position", 0.25), ("color_attr", strength / 4))}
        return {"with_control": {"categories": cats, "overall": 0.5, "overall_strict": 0.4, "images": 6, "seconds": 2.0},
                "control_settings": {"regions": strength, "weight": weight, "mode": "Balanced"},
                "cfg": cfg, "regions_decay": decay, **flags}
    for name, r in [("s1-d0", report(1, 0)), ("s0.5-d0", report(0.5, 0)), ("s0.5-d2", report(0.5, 2)),
                    ("s0.5-d0-self", report(0.5, 0, regions_self_attention=True))]:
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    assert sweep.main(["--out", str(tmp_path), "--table-only"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0") or line.startswith("| 1")]
    assert [r.split(" | ")[:4] for r in rows] == [["| 0.5", "0", "no", "no"], ["| 1", "0", "no", "no"],
                                                    ["| 0.5", "2", "no", "no"], ["| 0.5", "0", "no", "yes"]]
    assert "0.600 / 0.600 | 0.250 / 0.250 | 0.250 / 0.250" in rows[1]
    assert (tmp_path / "table.md").read_text().count("\n") == 6


def test_regions_speed_times_both_variants(capsys):
    speed = load_script("regions_speed")
    assert speed.main(["--runs", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    times = [float(line.rsplit(": ", 1)[1].split()[0]) for line in lines[1:]]
    assert lines[1].startswith("  ControlNet: ") and lines[2].startswith("  ControlNet + regions 0.5: ")
    assert times[0] > 0 and times[1] > 0 and abs(times[2] - times[1] / times[0]) < 0.01   # printed to 3 decimals


def test_few_step_speed_alternates_models_and_writes_each_ones_row(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))     # it reads trace_overheads' medians
    speed = load_script("few_step_speed")
    out = tmp_path / "speed.json"
    assert speed.main(["--models", "tiny-random,tiny-random", "--rounds", "1", "--threads", "1",
                       "--json", str(out)]) == 0
    import json
    record = json.loads(out.read_text())
    assert [r["model"] for r in record["rows"]] == ["tiny-random", "tiny-random"]
    assert all(r["eager_s"] > 0 and r["traced_s"] > 0 for r in record["rows"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny-random")]
    assert len(table) == 2 and table[0].endswith("| 1.000 |")


def test_cpu_targets_dry_run_lists_every_step_and_writes_nothing(tmp_path):
    import subprocess
    script = ROOT / "benchmarks" / "cpu_targets.sh"
    before = set((ROOT / "docs" / "results").rglob("*"))
    p = subprocess.run([str(script), "--dry-run", "--with-sdcpp"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    steps = [line.split(":")[0] for line in p.stdout.splitlines() if line.startswith("== ")]
    assert steps == ["== few-step-speed", "== bench-builtin-lcm", "== bench-builtin", "== profile-sd15",
                     "== bench-sd15", "== sdcpp-compare"]
    assert set((ROOT / "docs" / "results").rglob("*")) == before
    bad = subprocess.run([str(script), "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr and len(bad.stderr.splitlines()) == 1
