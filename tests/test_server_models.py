"""The server's models folder: A1111's checkpoint list and switch (GET /sdapi/v1/sd-models,
GET/POST /sdapi/v1/options with sd_model_checkpoint) and OpenAI's `model` field, across SD1.x,
SD2.x, SDXL single files and the built-in model; every image is checked bit for bit against the
pipeline loaded directly from the same file."""
import hashlib
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from marble.checkpoints.checkpoint import from_model
from marble.checkpoints.resolve import builtin_path, random_model
from marble.checkpoints.sd_single_file import write_single_file
from marble.pipeline import load_pipeline
from marble.request import GenerationRequest, resolve
from marble.server.app import create_app
from marble.server.state import ServerConfig
from sd_fixtures import tiny_sd, tiny_sdxl
from server_support import png_array

NAMES = ["builtin", "sd1", "sd2", "xl"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    write_single_file(from_model(random_model(lambda: tiny_sd("sd1"), seed=1)), d / "sd1.safetensors")
    write_single_file(from_model(random_model(lambda: tiny_sd("sd2"), seed=2)), d / "sd2.safetensors")
    write_single_file(from_model(random_model(tiny_sdxl, seed=3)), d / "xl.safetensors")
    shutil.copy(builtin_path(), d / "builtin.safetensors")
    (d / "broken.safetensors").write_bytes(b"not a safetensors file")
    (d / "notes.txt").write_text("not a model")
    return d


@pytest.fixture()
def client(tiny_pipe, folder, tmp_path):
    app = create_app([tiny_pipe], ServerConfig(outputs=tmp_path, models_dir=folder))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def short(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def direct(path, **kw) -> np.ndarray:
    pipe = load_pipeline(str(path))
    request = GenerationRequest(prompt="a red cat", seed=4, steps=2, width=32, height=32, **kw)
    return np.asarray(pipe.generate(resolve(request, pipe.defaults)).images[0])


def test_a1111_lists_the_folder_and_switches_between_sd1_sd2_sdxl_and_the_builtin(client, folder, tiny_pipe):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["broken", *NAMES, "tiny-random"]
    assert all(m["hash"] is None and m["sha256"] is None for m in models[:-1])
    assert models[1] == {"title": "builtin.safetensors", "model_name": "builtin", "hash": None, "sha256": None,
                         "filename": str((folder / "builtin.safetensors").resolve()), "config": None}
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == f"tiny-random [{tiny_pipe.loaded.hash}]"
    for name in NAMES:
        path = folder / f"{name}.safetensors"
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name, "some_other_setting": 1})
        assert r.status_code == 200, r.text
        sha = short(path)
        options = client.get("/sdapi/v1/options").json()
        assert options == {"sd_model_checkpoint": f"{name}.safetensors [{sha[:10]}]", "sd_checkpoint_hash": sha}
        listed = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
        assert (listed[name]["hash"], listed[name]["sha256"]) == (sha[:10], sha)
        assert list(client.get("/health").json()["models"]) == [name]   # the switch replaced the served model
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red cat", "seed": 4, "steps": 2, "width": 32,
                                                   "height": 32})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert (info["sd_model_name"], info["sd_model_hash"]) == (name, sha[:10])
        assert np.array_equal(png_array(r.json()["images"][0]), direct(path)), name
    # a title with its hash selects the loaded model; A1111's SDXL crop setting reaches the image
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": f"xl.safetensors [{short(folder / 'xl.safetensors')[:10]}]"})
    assert r.status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red cat", "seed": 4, "steps": 2, "width": 32, "height": 32,
                                               "override_settings": {"sdxl_crop_top": 8, "sdxl_crop_left": 4}})
    from marble.models.conditioning import MicroConditioning
    want = direct(folder / "xl.safetensors", micro=MicroConditioning(crop_top_left=(8, 4)))
    assert np.array_equal(png_array(r.json()["images"][0]), want)


def test_openai_model_field_selects_a_folder_model_and_names_resolve_only_inside_it(client, folder):
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["tiny-random", "broken", *NAMES]
    r = client.post("/v1/images/generations", json={"prompt": "a red cat", "seed": 4, "steps": 2, "size": "32x32",
                                                    "model": "sd2"})
    assert r.status_code == 200, r.text
    assert np.array_equal(png_array(r.json()["data"][0]["b64_json"]), direct(folder / "sd2.safetensors"))
    outside = folder.parent / "outside.safetensors"
    shutil.copy(folder / "sd1.safetensors", outside)
    for name in ("nope", "../outside", str(outside), str(folder / "sd1.safetensors"), "sd1/../sd1", "notes",
                 "notes.txt"):
        r = client.post("/v1/images/generations", json={"prompt": "x", "steps": 1, "size": "32x32", "model": name})
        assert r.status_code == 404, name
        assert "is not loaded here; this server has: sd2, broken, builtin, sd1, xl" in r.json()["error"]["message"]
    r = client.post("/v1/images/generations", json={"prompt": "x", "steps": 1, "size": "32x32", "model": "broken"})
    assert r.status_code == 400 and "the model broken cannot be loaded" in r.json()["error"]["message"]
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": ["sd1"]})
    assert r.status_code == 400 and "sd_model_checkpoint must be" in r.json()["detail"]
    assert list(client.get("/health").json()["models"]) == ["sd2"]   # a failed switch keeps the served model
