"""ControlNet through the A1111 API as sd-webui-controlnet takes it: alwayson_scripts.controlnet.args
(and its legacy aliases), GET /controlnet/model_list and /module_list, POST /controlnet/detect;
bad units answer 400 with a JSON error and run nothing; names resolve only inside the ControlNet folder."""
import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from marble.checkpoints.checkpoint import file_hash
from marble.checkpoints.controlnet_files import ControlNetFile, write_controlnet
from marble.checkpoints.resolve import load_model
from marble.models.controlnet import ControlNet, controlnet_config
from marble.models.latent_diffusion import tiny_config
from marble.pipeline import Pipeline
from marble.server.app import create_app
from marble.server.state import ServerConfig
from sd_fixtures import randomize_
from server_support import png_array, png_text

BASE = {"prompt": "a circle", "steps": 3, "width": 32, "height": 32, "seed": 5, "cfg_scale": 5}


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn-server")
    folder = root / "controlnet"
    folder.mkdir()
    config = controlnet_config(tiny_config().unet, 2)
    net = randomize_(ControlNet(config), seed=4)
    path = write_controlnet(ControlNetFile(config, net.state_dict(), root, "", "marble"),
                            folder / "sketch.safetensors", "single-file")
    write_controlnet(ControlNetFile(config, net.state_dict(), root, "", "marble"), root / "outside.safetensors",
                     "single-file")
    pipe = Pipeline(load_model("tiny-random"), control_dir=folder, max_control_units=2)
    app = create_app([pipe], ServerConfig(outputs=root / "served"))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, f"sketch [{file_hash(path)}]", root


def sketch() -> Image.Image:
    im = Image.new("RGB", (32, 32), "black")
    im.paste((255, 255, 255), (6, 6, 26, 14))
    return im


def unit(model, **kw) -> dict:
    return {"enabled": True, "module": "none", "model": model, "weight": 1.5, "image": b64(sketch()),
            "resize_mode": "Just Resize", "processor_res": 512, "threshold_a": -1, "threshold_b": -1,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": 0, "pixel_perfect": False, **kw}


def txt2img(c, units, **kw):
    body = {**BASE, **kw}
    if units is not None:
        body["alwayson_scripts"] = {"controlnet": {"args": units}}
    return c.post("/sdapi/v1/txt2img", json=body)


def test_lists(client):
    c, name, _ = client
    assert c.get("/controlnet/model_list").json() == {"model_list": [name]}
    modules = c.get("/controlnet/module_list").json()
    assert {"none", "canny", "invert", "scribble", "seg"} <= set(modules["module_list"])
    assert modules["module_detail"]["depth"]["available"] is False


def test_a_unit_controls_the_image_and_is_recorded(client):
    c, name, _ = client
    plain = txt2img(c, None)
    controlled = txt2img(c, [unit(name)])
    assert plain.status_code == controlled.status_code == 200, controlled.text
    a, b = png_array(plain.json()["images"][0]), png_array(controlled.json()["images"][0])
    assert np.abs(a.astype(int) - b.astype(int)).max() > 10
    info = json.loads(controlled.json()["info"])
    assert f'ControlNet 0: "Module: none, Model: {name}, Weight: 1.5, Resize Mode: Just Resize' in info["infotexts"][0]
    assert "ControlNet 0" in png_text(controlled.json()["images"][0])["parameters"]
    # the bare name, legacy aliases (input_image, guidance) and a disabled unit give the same image
    legacy = unit("sketch")
    legacy["input_image"] = legacy.pop("image")
    del legacy["guidance_end"]
    again = txt2img(c, [legacy, unit(name, enabled=False)])
    assert again.status_code == 200, again.text
    assert np.array_equal(png_array(again.json()["images"][0]), b)
    # `guidance` is guidance_end: half the steps differ from the whole
    legacy["guidance"] = 0.5
    half = txt2img(c, [legacy])
    assert np.array_equal(png_array(half.json()["images"][0]),
                          png_array(txt2img(c, [unit(name, guidance_end=0.5)]).json()["images"][0]))
    assert not np.array_equal(png_array(half.json()["images"][0]), b)


def test_img2img_without_a_unit_image_controls_with_the_init_image(client):
    c, name, _ = client
    body = {**BASE, "init_images": [b64(sketch())], "denoising_strength": 0.8}
    with_image = dict(unit(name))
    without = {k: v for k, v in with_image.items() if k != "image"}
    r1 = c.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [with_image]}}})
    r2 = c.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [without]}}})
    assert r1.status_code == r2.status_code == 200, r2.text
    assert np.array_equal(png_array(r1.json()["images"][0]), png_array(r2.json()["images"][0]))


def test_bad_units_are_400_with_a_json_error(client):
    c, name, root = client
    cases = [([unit(name, weight=5)], "weight"), ([unit(name, guidance_start=0.8, guidance_end=0.2)], "start"),
             ([unit("missing")], "unknown ControlNet"), ([unit("../outside")], "unknown ControlNet"),
             ([unit(str(root / "outside.safetensors"))], "unknown ControlNet"),
             ([unit(name, module="openpose_full")], "weights"), ([unit(name, module="blur")], "unknown preprocessor"),
             ([unit(name, image="bm90IGFuIGltYWdl")], "image"), ([unit(name, control_mode=7)], "control mode"),
             ([unit(name)] * 3, "at most 2"), ([unit(None)], "model"), ("nope", "list")]
    for units, message in cases:
        r = txt2img(c, units)
        assert r.status_code == 400, (units if isinstance(units, str) else message, r.text)
        assert message in r.json()["detail"], r.json()


def test_detect(client):
    c, _, _ = client
    # the map comes back at the processor resolution (short side; 512 when not given), as the extension's
    r = c.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [b64(sketch())],
                                           "controlnet_threshold_a": 100, "controlnet_threshold_b": 200,
                                           "controlnet_processor_res": 64})
    assert r.status_code == 200, r.text
    edges = png_array(r.json()["images"][0])
    assert edges.shape == (64, 64, 3) and edges[12:28, 10:14].any() and not edges[40:].any()
    r = c.post("/controlnet/detect", json={"controlnet_module": "depth", "controlnet_input_images": [b64(sketch())]})
    assert r.status_code == 400 and "weights" in r.json()["detail"]


def test_a_transformer_denoiser_refuses_a_controlnet(client):
    """ControlNets steer U-Nets: an MMDiT model says so (400), before any work."""
    from marble.checkpoints.resolve import LoadedModel
    from marble.errors import ModelLoadError
    from marble.request import GenerationRequest, resolve
    from test_mmdit import flow_model
    _, _, root = client
    pipe = Pipeline(LoadedModel(flow_model(), "tiny-mmdit", "test"), control_dir=root / "controlnet")
    from marble.adapters.controlnet import ControlSpec
    request = resolve(GenerationRequest(prompt="x", steps=1, controls=(ControlSpec(image=sketch(), model="sketch"),)),
                      pipe.defaults)
    with pytest.raises(ModelLoadError, match="ControlNets steer U-Nets"):
        pipe.generate(request)


def test_regions_through_the_api(client):
    """marble's `regions` beside the unit: recorded in the PNG; without a unit or out of range, 400."""
    c, name, _ = client
    im = Image.new("RGB", (32, 32), "white")
    im.paste((220, 30, 30), (4, 4, 14, 14))
    body = {**BASE, "prompt": "a red circle", "regions": 1.5,
            "alwayson_scripts": {"controlnet": {"args": [unit(name, image=b64(im))]}}}
    r = c.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert "Regions: 1.5" in png_text(r.json()["images"][0])["parameters"]
    for bad, message in [({"regions": 1.5, "alwayson_scripts": {}}, "needs a control image"),
                         ({**body, "regions": 11}, "regions must be a number in [0, 10]")]:
        r = c.post("/sdapi/v1/txt2img", json={**BASE, **bad})
        assert r.status_code == 400 and message in r.json()["detail"], r.text
