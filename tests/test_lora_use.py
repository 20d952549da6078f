"""LoRA at the edges: `marble generate` with tags and --lora, the record and --from, the server's
A1111 and OpenAI APIs (switching LoRAs per request with no leak), GET /sdapi/v1/loras, and
`marble convert --lora`; bad input as one line + exit 2, or a 400 JSON error, nothing written."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from marble.adapters.lora import LoraUse, fuse
from marble.adapters.lora_files import Lora, LoraLayer, lora_hash, read_lora, save_kohya
from marble.adapters.lora_loader import LoraSpec
from marble.adapters.lora_table import module_table
from marble.checkpoints.checkpoint import from_model
from marble.checkpoints.detect import open_checkpoint
from marble.checkpoints.marble_format import write_marble
from marble.checkpoints.resolve import LoadedModel, random_model
from marble.cli import app
from marble.pipeline import Pipeline
from marble.request import GenerationRequest, resolve
from marble.server.app import create_app
from marble.server.state import ServerConfig
from sd_fixtures import tiny_sd
from server_support import png_array, png_text

runner = CliRunner()
FAST = ["--model", "tiny-random", "--steps", "3", "--size", "32x32", "--seed", "5"]


def random_lora(model, name: str, seed: int, kinds=("attention", "conv", "text"), rank: int = 2) -> Lora:
    """Strong enough to change a 3-step tiny image visibly."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for t in module_table(model).select(list(kinds)):
        w = t.module.weight
        down = torch.randn((rank, *w.shape[1:]) if w.ndim == 4 else (rank, w.shape[1]), generator=g)
        up = torch.randn((w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank), generator=g)
        layers[t.name] = LoraLayer(down / w[0].numel() ** 0.5, up * 0.5, rank * 1.5)
    return Lora(name, layers)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A LoRA folder for the tiny-random model: a.safetensors, styles/b.safetensors, and files that must fail."""
    root = tmp_path_factory.mktemp("loras")
    model = random_model()
    table = module_table(model)
    save_kohya(root / "a.safetensors", random_lora(model, "a", 1), table, {"ss_output_name": "style-a"})
    save_kohya(root / "styles" / "b.safetensors", random_lora(model, "b", 2), table)
    (root / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    torch.save({"x": torch.zeros(1)}, root / "pickled.safetensors")
    other = random_model(lambda: tiny_sd("sd1"))   # another architecture
    save_kohya(root / "other.safetensors", random_lora(other, "other", 3, kinds=("attention",)), module_table(other))
    (root.parent / "outside.safetensors").write_bytes((root / "a.safetensors").read_bytes())
    (root / "escape.safetensors").symlink_to(root.parent / "outside.safetensors")
    return root


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.exists() else []


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


# --- the CLI ----------------------------------------------------------------------------------------

def test_generate_with_tags_records_them_and_from_replays(folder, tmp_path):
    out = tmp_path / "out"
    base = run("generate", "a red circle", "--out", out / "base", *FAST)
    tagged = run("generate", "a red circle <lora:a:0.8> <lora:styles/b:0.5:1.2>", "--lora-dir", folder,
                 "--out", out / "tagged", *FAST)
    assert base.exit_code == 0 and tagged.exit_code == 0, base.output + tagged.output
    base_png, tagged_png = pngs(out / "base")[0], pngs(out / "tagged")[0]
    assert np.abs(pixels(base_png) - pixels(tagged_png)).max() > 20        # the LoRAs change the image
    params = Image.open(tagged_png).info["parameters"]
    hash_a, hash_b = lora_hash(folder / "a.safetensors"), lora_hash(folder / "styles" / "b.safetensors")
    assert params.split("\n")[0] == "a red circle <lora:a:0.8> <lora:styles/b:0.5:1.2>"   # as typed, A1111's way
    assert f'Lora hashes: "a: {hash_a}, styles/b: {hash_b}"' in params
    record = json.loads(run("info", tagged_png, "--json").stdout)
    assert record["loras"] == [{"name": "a", "hash": hash_a, "te": 0.8, "unet": 0.8},
                               {"name": "styles/b", "hash": hash_b, "te": 0.5, "unet": 1.2}]
    again = run("generate", "--from", tagged_png, "--lora-dir", folder, "--out", out / "again")
    assert again.exit_code == 0, again.output
    assert pngs(out / "again")[0].read_bytes() == tagged_png.read_bytes()
    # the tags are cut from the text the encoder reads: a zero-weight tag draws the base image
    zero = run("generate", "a red circle <lora:a:0>", "--lora-dir", folder, "--out", out / "zero", *FAST)
    assert zero.exit_code == 0 and np.array_equal(pixels(pngs(out / "zero")[0]), pixels(base_png))


def test_generate_with_lora_paths_and_from(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("MARBLE_LORA_DIR", str(tmp_path / "empty"))   # paths do not need the folder
    r = run("generate", "a blue square", "--lora", f"{folder / 'a.safetensors'}:0.7", "--out", out / "one", *FAST)
    assert r.exit_code == 0, r.output
    first = pngs(out / "one")[0]
    record = json.loads(run("info", first, "--json").stdout)
    assert record["loras"] == [{"name": "a", "hash": lora_hash(folder / "a.safetensors"), "te": 0.7, "unet": 0.7,
                                "path": str(folder / "a.safetensors")}]
    again = run("generate", "--from", first, "--out", out / "again")
    assert again.exit_code == 0, again.output
    assert pngs(out / "again")[0].read_bytes() == first.read_bytes()
    # the same LoRA by tag with the same weight is the same image
    monkeypatch.setenv("MARBLE_LORA_DIR", str(folder))
    tag = run("generate", "a blue square <lora:a:0.7>", "--out", out / "tag", *FAST)
    assert tag.exit_code == 0 and np.array_equal(pixels(pngs(out / "tag")[0]), pixels(first))


@pytest.mark.parametrize("args, message", [
    (["a <lora:../outside:1>"], "not a path out of it"),
    (["a <lora:/etc/passwd:1>"], "not a path out of it"),
    (["a <lora:escape:1>"], "link out of the LoRA folder"),
    (["a <lora:missing:1>"], "no LoRA named 'missing'"),
    (["a <lora:a:heavy>"], "'heavy' is not a number"),
    (["a <lora:corrupt>"], "not a valid safetensors file"),
    (["a <lora:pickled>"], "pickle"),
    (["a <lora:other>"], "another model architecture"),
    (["a", "--negative", "<lora:a:1>"], "not the negative prompt"),
    (["a", "--lora", "nowhere.safetensors"], "no such file"),
    (["a", "--lora", "x.safetensors:strong"], "'strong' is not a number"),
])
def test_bad_loras_fail_with_one_line_and_write_nothing(folder, tmp_path, args, message):
    out = tmp_path / "out"
    r = run("generate", *args, "--lora-dir", folder, "--out", out, *FAST)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marble: error:") and message in lines[0], r.stderr
    assert pngs(out) == []


def test_lenient_skips_what_the_model_lacks_with_a_warning(folder, tmp_path):
    r = run("generate", "a <lora:other>", "--lora-dir", folder, "--lora-lenient", "--out", tmp_path / "o0", *FAST)
    assert r.exit_code == 0 and "warning: LoRA other: skipped" in r.stderr   # the layers whose shapes fit apply
    model = random_model()
    table = module_table(model)
    mixed = random_lora(model, "mixed", 4, kinds=("attention",))
    path = save_kohya(tmp_path / "mixed.safetensors", mixed, table)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path))
    tensors["lora_unet_nowhere.lora_down.weight"] = torch.zeros(2, 4)
    tensors["lora_unet_nowhere.lora_up.weight"] = torch.zeros(4, 2)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    strict = run("generate", "a", "--lora", tmp_path / "extra.safetensors", "--out", tmp_path / "o1", *FAST)
    assert strict.exit_code == 2 and "lora_unet_nowhere" in strict.stderr
    lenient = run("generate", "a", "--lora", tmp_path / "extra.safetensors", "--lora-lenient",
                  "--out", tmp_path / "o2", *FAST)
    plain = run("generate", "a", "--lora", path, "--out", tmp_path / "o3", *FAST)
    assert lenient.exit_code == 0 and "warning: LoRA extra: skipped" in lenient.stderr
    assert np.array_equal(pixels(pngs(tmp_path / "o2")[0]), pixels(pngs(tmp_path / "o3")[0]))


# --- the pipeline and the server ------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline(LoadedModel(random_model(), "tiny-random", "0000000000"), lora_dir=folder)


def test_requests_switch_loras_without_leaking(pipe):
    """Base, then A, then B, then A+B, then none: the last image equals the first bit for bit, and
    the weights are the same tensors, unchanged."""
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    params = dict(seed=3, steps=3, width=32, height=32)

    def image(prompt):
        return np.asarray(pipe.generate(resolve(GenerationRequest(prompt=prompt, **params), pipe.defaults)).images[0])
    base = image("a cat")
    a, b, ab = image("a cat <lora:a>"), image("a cat <lora:styles/b:0.9>"), image("a cat <lora:a><lora:styles/b:0.9>")
    after = image("a cat")
    assert np.array_equal(after, base)
    assert len({x.tobytes() for x in (base, a, b, ab)}) == 4
    state = pipe.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())


@pytest.fixture(scope="module")
def client(pipe, tmp_path_factory):
    app_ = create_app([pipe], ServerConfig(outputs=tmp_path_factory.mktemp("served")))
    with TestClient(app_, raise_server_exceptions=False) as c:
        yield c


def a1111(client, prompt, **extra):
    return client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "seed": 3, "steps": 3, "width": 32,
                                                   "height": 32, **extra})


def test_server_a1111_and_openai_apply_tags_per_request(client, pipe, folder):
    base = a1111(client, "a cat")
    with_a = a1111(client, "a cat <lora:a:0.8>")
    with_b = a1111(client, "a cat <lora:styles/b>")
    none = a1111(client, "a cat")
    assert all(r.status_code == 200 for r in (base, with_a, with_b, none)), with_a.text
    images = [png_array(r.json()["images"][0]) for r in (base, with_a, with_b, none)]
    assert np.array_equal(images[3], images[0])                                  # nothing leaked
    assert not np.array_equal(images[1], images[0]) and not np.array_equal(images[2], images[1])
    info = json.loads(with_a.json()["info"])
    assert f'Lora hashes: "a: {lora_hash(folder / "a.safetensors")}"' in info["infotexts"][0]
    assert "Lora hashes" in png_text(with_a.json()["images"][0])["parameters"]
    # the same request through the library gives the same pixels
    direct = pipe.generate(resolve(GenerationRequest(prompt="a cat <lora:a:0.8>", seed=3, steps=3, width=32,
                                                     height=32), pipe.defaults)).images[0]
    assert np.array_equal(np.asarray(direct), images[1])
    openai = client.post("/v1/images/generations", json={"prompt": "a cat <lora:a:0.8>", "size": "32x32",
                                                         "response_format": "b64_json", "seed": 3, "steps": 3})
    assert openai.status_code == 200, openai.text
    assert "Lora hashes" in png_text(openai.json()["data"][0]["b64_json"])["parameters"]


@pytest.mark.parametrize("prompt, message", [
    ("a <lora:../outside:1>", "not a path out of it"), ("a <lora:escape>", "link out of"),
    ("a <lora:missing>", "no LoRA named"), ("a <lora:a:x>", "not a number"), ("a <lora:other>", "another model"),
    ("a <lora:pickled>", "pickle"),
])
def test_server_refuses_bad_loras_with_400(client, pipe, prompt, message):
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    r = a1111(client, prompt)
    assert r.status_code == 400 and message in r.json()["detail"], r.text
    o = client.post("/v1/images/generations", json={"prompt": prompt, "size": "32x32"})
    assert o.status_code == 400 and message in o.json()["error"]["message"], o.text
    state = pipe.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_server_lists_the_folder_as_a1111(client, folder):
    listed = client.get("/sdapi/v1/loras").json()
    names = [e["name"] for e in listed]
    assert "a" in names and "styles/b" in names and "escape" not in names and "corrupt" not in names
    a = listed[names.index("a")]
    assert a["alias"] == "style-a" and a["path"] == str((folder / "a.safetensors").resolve())
    assert a["metadata"]["ss_network_module"] == "networks.lora"
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200


# --- merging --------------------------------------------------------------------------------------

def test_convert_fuses_loras_into_a_new_checkpoint(folder, tmp_path):
    model = random_model()
    src = write_marble(from_model(model), tmp_path / "base.safetensors")
    dst = tmp_path / "merged.safetensors"
    r = run("convert", src, dst, "--to", "marble", "--lora", f"{folder / 'a.safetensors'}:0.7",
            "--lora", folder / "styles" / "b.safetensors")
    assert r.exit_code == 0, r.output
    merged = open_checkpoint(dst).state
    want = random_model()
    table = module_table(want)
    fuse(want, [LoraUse(read_lora(folder / "a.safetensors", table), 0.7, 0.7),
                LoraUse(read_lora(folder / "styles" / "b.safetensors", table))], table)
    expected = from_model(want).state
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    key = table.select(["attention"])[0].name + ".weight"
    assert not torch.equal(merged[key], from_model(random_model()).state[key])
    # the merged model draws what the base model with the LoRAs unfused draws (to float rounding)
    fused_pipe = Pipeline(LoadedModel(want, "m", "h"))
    base_pipe = Pipeline(LoadedModel(random_model(), "m", "h"))
    request = GenerationRequest(prompt="a cat", seed=1, steps=3, width=32, height=32)
    unfused_request = GenerationRequest(prompt="a cat", seed=1, steps=3, width=32, height=32, loras=(
        LoraSpec(str(folder / "a.safetensors"), 0.7, 0.7, is_path=True),
        LoraSpec(str(folder / "styles" / "b.safetensors"), 1.0, 1.0, is_path=True)))
    x = np.asarray(fused_pipe.generate(resolve(request, fused_pipe.defaults)).images[0]).astype(int)
    y = np.asarray(base_pipe.generate(resolve(unfused_request, base_pipe.defaults)).images[0]).astype(int)
    assert np.abs(x - y).max() <= 1


@pytest.mark.parametrize("lora, message", [
    ("corrupt.safetensors", "not a valid safetensors file"), ("other.safetensors", "another model architecture"),
    ("pickled.safetensors", "pickle"), ("a.safetensors:much", "'much' is not a number"),
])
def test_convert_with_a_bad_lora_writes_nothing(folder, tmp_path, lora, message):
    src = write_marble(from_model(random_model()), tmp_path / "base.safetensors")
    r = run("convert", src, tmp_path / "merged.safetensors", "--to", "marble", "--lora", f"{folder}/{lora}")
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "merged.safetensors").exists()


def test_builtin_model_takes_loras_on_its_minilm_text_encoder(tmp_path):
    """The built-in model: a LoRA on U-Net and MiniLM layers changes its image and goes away after;
    merging one with text-encoder layers into its file is refused (the encoder is not stored)."""
    from marble.checkpoints.resolve import builtin_path, load_model
    if not builtin_path().is_file():
        pytest.skip("no built-in model file")
    loaded = load_model("builtin")
    table = module_table(loaded.model)
    folder = tmp_path / "loras"
    save_kohya(folder / "both.safetensors", random_lora(loaded.model, "both", 5, kinds=("attention", "text")), table)
    save_kohya(folder / "unet.safetensors", random_lora(loaded.model, "unet", 5, kinds=("attention",)), table)
    from safetensors.torch import load_file
    assert any(k.startswith("lora_te_encoder_layer_") for k in load_file(str(folder / "both.safetensors")))
    pipe = Pipeline(loaded, lora_dir=folder)

    def image(prompt):
        request = GenerationRequest(prompt=prompt, seed=2, steps=2, width=32, height=32)
        return np.asarray(pipe.generate(resolve(request, pipe.defaults)).images[0])
    base, te_only, after = image("a red circle"), image("a red circle <lora:both:1:0>"), image("a red circle")
    assert not np.array_equal(base, te_only) and np.array_equal(base, after)
    refused = run("convert", builtin_path(), tmp_path / "m.safetensors", "--to", "marble", "--lora",
                  folder / "both.safetensors")
    assert refused.exit_code == 2 and "patches the text encoder" in refused.stderr
    assert not (tmp_path / "m.safetensors").exists()
    merged = run("convert", builtin_path(), tmp_path / "m.safetensors", "--to", "marble", "--lora",
                 f"{folder / 'unet.safetensors'}:0.5")
    assert merged.exit_code == 0, merged.output
    assert open_checkpoint(tmp_path / "m.safetensors").state["unet.time_embed.0.weight"].dtype == torch.float16


def test_tags_mix_with_prompt_syntax(pipe, folder):
    """A1111 weights and a hires pass around a tag: the same image as the tag-free prompt with the
    LoRA given as a path (the tag is cut before the prompt syntax is read, and both passes use it)."""
    from marble.hires import HiresFix
    params = dict(seed=4, steps=3, width=32, height=32, hires=HiresFix(scale=2.0, steps=2, denoise=0.6))
    tagged = GenerationRequest(prompt="(a red:1.3) circle <lora:a:0.8>, [blue] square", **params)
    plain = GenerationRequest(prompt="(a red:1.3) circle , [blue] square", **params,
                              loras=(LoraSpec(str(folder / "a.safetensors"), 0.8, 0.8, is_path=True),))
    x = pipe.generate(resolve(tagged, pipe.defaults))
    y = pipe.generate(resolve(plain, pipe.defaults))
    assert x.images[0].size == (64, 64) and np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0]))
    assert x.records[0].loras[0]["name"] == "a" and y.records[0].loras[0]["path"].endswith("a.safetensors")
