"""sd-webui-controlnet's processor_res and pixel_perfect: the preprocessor runs on the control image
with its short side at processor_res (default 512), and pixel perfect picks that resolution from the
image and output sizes; in the library, the CLI, the A1111 API, /controlnet/detect and the record."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from marble.adapters.controlnet import ControlSpec, hint_tensor, pixel_perfect_resolution, resize_control
from marble.adapters.preprocess import at_resolution, canny, preprocess
from marble.checkpoints.resolve import load_model
from marble.pipeline import Pipeline
from marble.png import read_record
from marble.request import GenerationRequest, RequestError, resolve
from marble.server.app import create_app
from marble.server.state import ServerConfig
from server_support import png_array
from test_controlnet_cli import FAST, files, generate  # noqa: F401 (files: a fixture)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def blocks(seed=0, w=48, h=36) -> np.ndarray:
    """A random image of flat grey/colour patches (so Canny finds edges) as uint8 (h, w, 3)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (h // 6, w // 6, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 6, 0), 6, 1)


# golden values worked by hand from the extension's rule: k = (target_H / raw_H, target_W / raw_W);
# estimation = (min(k) for Resize and Fill, else max(k)) · min(raw_H, raw_W), rounded half to even
@pytest.mark.parametrize("image, width, height, mode, want", [
    ((1024, 768), 512, 512, "Crop and Resize", 512),    # max(512/768, 512/1024) · 768
    ((1024, 768), 512, 512, "Just Resize", 512),
    ((1024, 768), 512, 512, "Resize and Fill", 384),    # min(0.667, 0.5) · 768
    ((300, 200), 768, 512, "Resize and Fill", 512),     # both scales 2.56: · 200
    ((100, 50), 64, 96, "Crop and Resize", 96),         # max(96/50, 64/100) · 50 = 1.92 · 50
    ((100, 50), 64, 96, "Resize and Fill", 32),         # 0.64 · 50
    ((4, 8), 2, 9, "Crop and Resize", 4),               # 9/8 · 4 = 4.5 -> 4 (half to even, as np.round)
    ((4, 8), 2, 9, "Resize and Fill", 2),               # 0.5 · 4
    ((64, 64), 64, 64, "Crop and Resize", 64),
])
def test_pixel_perfect_resolution(image, width, height, mode, want):
    assert pixel_perfect_resolution(image, width, height, mode) == want


def test_processor_res_resizes_the_short_side_before_the_preprocessor():
    base = blocks()                                     # 48 × 36
    twice = np.repeat(np.repeat(base, 2, 0), 2, 1)      # 96 × 72: every pixel a 2×2 block
    image = Image.fromarray(twice)
    # at processor_res 36 the short side halves: area averaging of 2×2 equal blocks gives `base` exactly
    assert np.array_equal(np.asarray(at_resolution(image, 36)), base)
    grey = np.asarray(Image.fromarray(base).convert("L"), dtype=np.float32)
    want = canny(torch.from_numpy(grey), 100, 200).numpy()
    got = np.asarray(preprocess(image, "canny", resolution=36))
    assert got.shape == (36, 48, 3) and np.array_equal(got[:, :, 0] > 0, want) and want.any()
    # the long side follows, rounded; enlarging is bicubic; none, invert and seg keep the image's size
    assert at_resolution(Image.new("RGB", (50, 30)), 64).size == (107, 64)          # 50 · 64/30 = 106.7
    assert preprocess(image, "threshold", resolution=144).size == (192, 144)
    assert preprocess(image, "scribble", resolution=144).size == (192, 144)
    for module in ("none", "invert", "seg"):
        assert preprocess(image, module, resolution=144).size == (96, 72)


@pytest.fixture(scope="module")
def pipe(files):  # noqa: F811
    root, _ = files
    return Pipeline(load_model("tiny-random"), control_dir=root)


def hint_of(pipe, **spec) -> torch.Tensor:
    request = GenerationRequest(prompt="x", steps=2, width=32, height=32,
                                controls=(ControlSpec(model="edges", **spec),))
    req = resolve(request, pipe.defaults)
    return pipe.control_units(req, pipe.control_images(req, 32, 32))[0].hint


def test_the_pipeline_preprocesses_at_the_processor_res_then_fits_the_output(pipe):
    image = Image.fromarray(blocks(1, 96, 72))
    fit = lambda res, mode="Crop and Resize": hint_tensor(resize_control(  # noqa: E731
        preprocess(image, "canny", resolution=res), 32, 32, mode))
    for res in (72, 256):
        got = hint_of(pipe, image=image, module="canny", processor_res=res)
        assert torch.equal(got, fit(res))
    assert torch.equal(hint_of(pipe, image=image, module="canny"), fit(512))       # the default
    assert not torch.equal(fit(72), fit(256))
    # pixel perfect: 96 × 72 into 32 × 32 is max(32/72, 32/96) · 72 = 32 (Crop), min(..) · 72 = 24 (Fill)
    assert torch.equal(hint_of(pipe, image=image, module="canny", pixel_perfect=True, processor_res=256), fit(32))
    assert torch.equal(hint_of(pipe, image=image, module="canny", pixel_perfect=True, resize="Resize and Fill"),
                       fit(24, "Resize and Fill"))


@pytest.mark.parametrize("spec, message", [
    (dict(processor_res=0), "processor_res"), (dict(processor_res=63), "processor_res"),
    (dict(processor_res=4096), "processor_res"), (dict(processor_res=100.5), "processor_res"),
    (dict(processor_res=True), "processor_res"), (dict(pixel_perfect="yes"), "pixel_perfect"),
])
def test_bad_values_are_refused(pipe, spec, message):
    request = GenerationRequest(prompt="x", steps=2, controls=(ControlSpec(image=Image.new("RGB", (8, 8)),
                                                                           model="edges", **spec),))
    with pytest.raises(RequestError, match=message):
        resolve(request, pipe.defaults)


@pytest.fixture(scope="module")
def client(pipe, tmp_path_factory):
    app = create_app([pipe], ServerConfig(outputs=tmp_path_factory.mktemp("served")))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_the_api_takes_processor_res_and_pixel_perfect(client):
    image = Image.fromarray(blocks(2, 96, 72))
    unit = {"module": "canny", "model": "edges", "image": b64(image), "resize_mode": "Just Resize"}
    body = {"prompt": "a circle", "steps": 2, "width": 32, "height": 32, "seed": 1}

    def run(**kw):
        return client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
            {**unit, **kw}]}}})

    pixels = lambda r: png_array(r.json()["images"][0])  # noqa: E731
    r64, r256 = run(processor_res=64), run(processor_res=256)
    assert r64.status_code == r256.status_code == 200, r64.text
    assert not np.array_equal(pixels(r64), pixels(r256))
    assert np.array_equal(pixels(run(processor_res=-1)), pixels(run(processor_res=512)))
    # pixel perfect for 96 × 72 -> 32 × 32, Just Resize: max(32/72, 32/96) · 72 = 32
    perfect = run(pixel_perfect=True, processor_res=256)      # pixel perfect wins over processor_res
    assert perfect.status_code == 200 and not np.array_equal(pixels(perfect), pixels(r256))
    info = json.loads(perfect.json()["info"])
    assert "Processor Res: 256, Pixel Perfect: True" in info["infotexts"][0]
    for bad, message in ((dict(processor_res=9999), "processor_res"), (dict(processor_res=12.5), "processor_res"),
                         (dict(processor_res="512"), "processor_res"), (dict(pixel_perfect="on"), "pixel_perfect")):
        r = run(**bad)
        assert r.status_code == 400 and message in r.json()["detail"], (bad, r.text)


def test_detect_runs_at_the_processor_res(client):
    image = Image.fromarray(blocks(3, 96, 72))

    def detect(**kw):
        return client.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                       "controlnet_input_images": [b64(image)], **kw})
    for res, size in ((64, (64, 85)), (-1, (512, 683)), (None, (512, 683))):
        r = detect(**({} if res is None else {"controlnet_processor_res": res}))
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        assert got.shape[:2] == size
        assert np.array_equal(got, np.asarray(preprocess(image, "canny", resolution=size[0])))
    for bad in (0, 63, 5000):
        r = detect(controlnet_processor_res=bad)
        assert r.status_code == 422 and "controlnet_processor_res" in r.json()["detail"], r.text


def test_cli_flags_record_and_replay(files, tmp_path):  # noqa: F811
    root, model = files
    control = root / "wide.png"
    Image.fromarray(blocks(4, 96, 72)).save(control)
    args = ["a circle", *FAST, "--control", control, "--control-model", model, "--control-module", "canny"]
    code, out, (a,) = generate(*args, "--out", tmp_path / "a", "--control-processor-res", "64")
    assert code == 0, out
    record = read_record(a)
    unit, = record.controlnets
    assert unit["processor_res"] == 64 and unit["pixel_perfect"] is False
    assert "Processor Res: 64, Pixel Perfect: False" in record.to_parameters()
    code, out, (b,) = generate(*args, "--out", tmp_path / "b", "--control-pixel-perfect", "on")
    assert code == 0, out
    assert read_record(b).controlnets[0]["pixel_perfect"] is True
    # --from replays them: the same image
    code, out, (c,) = generate("--from", a, "--control", control, "--out", tmp_path / "c")
    assert code == 0, out
    assert np.array_equal(np.asarray(Image.open(c)), np.asarray(Image.open(a)))
    assert read_record(c).controlnets[0]["processor_res"] == 64
    for extra, message in ((["--control-processor-res", "5000"], "processor_res"),
                           (["--control-processor-res", "10"], "processor_res"),
                           (["--control-pixel-perfect", "maybe"], "--control-pixel-perfect")):
        out_dir = tmp_path / "bad"
        code, output, _ = generate(*args, "--out", out_dir, *extra)
        assert code == 2 and message in output and len(output.strip().splitlines()) == 1, (extra, output)
        assert not out_dir.exists()
