"""Property-based fuzzing of every input route (hypothesis): malformed JSON, wrong types, huge and
negative numbers, bad base64, broken and oversize images, random multipart. A bad request is
always answered 4xx, never 5xx; a good one 200; and the server keeps answering afterwards."""
import base64
import io
import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from marble.server.app import create_app
from marble.server.limits import ServerLimits
from marble.server.state import ServerConfig

LIMITS = ServerLimits(max_pixels=32 * 32, max_steps=3, max_n=2, max_prompt_chars=300,
                      max_input_pixels=64 * 64, max_body_bytes=256 * 1024)
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
ALLOWED = {200, 400, 404, 413, 422}


@pytest.fixture(scope="module")
def client(tiny_pipe, tmp_path_factory):
    app = create_app([tiny_pipe], ServerConfig(outputs=tmp_path_factory.mktemp("fuzz"), max_queue=4, limits=LIMITS))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
        # the server is still up and still generates
        assert c.get("/health").status_code == 200
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "after", "steps": 1, "width": 32, "height": 32})
        assert r.status_code == 200 and len(r.json()["images"]) == 1


def png(w, h, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
INTS = st.integers() | st.sampled_from([-(2**63), -2, -1, 0, 1, 2, 3, 31, 32, 33, 2**31, 2**64, 10**40])
SIZES = st.sampled_from([2, 4, 16, 32]) | INTS
TEXT = (st.text(max_size=60) | st.text(min_size=290, max_size=320)          # around the prompt limit
        | st.text(st.characters(categories=["Cc", "Lo"]), max_size=6))   # controls, other scripts
FLOATS = st.floats() | st.sampled_from([0.0, 0.5, 1.0, 7.0, -1.0, 1e308])
IMAGE_BYTES = st.sampled_from([png(32, 32), png(16, 16, "RGBA"), png(32, 32, "L"), png(2000, 2000)]) | \
    st.binary(max_size=200) | st.sampled_from([png(32, 32)[:50], b"", b"GIF89a" + b"\0" * 20])
B64_IMAGES = IMAGE_BYTES.map(lambda b: base64.b64encode(b).decode()) | \
    IMAGE_BYTES.map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()) | st.text(max_size=40)


def values(strategy):
    return strategy | JSON


# Valid values (so that generation itself is exercised), and wild ones for one field at a time.
LONE_SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc80 x"])   # JSON can carry them; UTF-8 cannot
PROMPTS = st.text(max_size=40) | st.text(st.characters(categories=["Cc", "Lo", "So"]), max_size=6) | LONE_SURROGATES
A1111_VALID = {
    "prompt": PROMPTS, "negative_prompt": PROMPTS, "seed": st.integers(-1, 2**32 - 1), "steps": st.integers(1, 3),
    "cfg_scale": st.floats(0, 20), "width": st.sampled_from([2, 16, 32]), "height": st.sampled_from([2, 16, 32]),
    "sampler_name": st.sampled_from(["Euler", "Euler a", "DDIM", "LCM", "DPM++ 2M Karras"]),
    "batch_size": st.integers(1, 2), "denoising_strength": st.floats(0.01, 1),
    "override_settings": st.just({"sd_model_checkpoint": "tiny-random"}),
}
A1111_WILD = {
    "prompt": values(TEXT), "negative_prompt": values(TEXT), "seed": values(INTS), "steps": values(INTS),
    "cfg_scale": values(FLOATS), "width": values(SIZES), "height": values(SIZES),
    "sampler_name": values(st.sampled_from(["nope", "", "euler_a"])), "batch_size": values(INTS),
    "n_iter": values(INTS), "denoising_strength": values(FLOATS),
    "override_settings": values(st.fixed_dictionaries({"sd_model_checkpoint": values(st.sampled_from(["x", ""]))})),
}
GOOD_B64 = st.sampled_from([png(32, 32), png(16, 16, "RGBA")]).map(lambda b: base64.b64encode(b).decode())
IMG2IMG_VALID = {**A1111_VALID, "init_images": st.lists(GOOD_B64, min_size=1, max_size=1),
                 "inpainting_mask_invert": st.integers(0, 1)}
IMG2IMG_WILD = {**A1111_WILD, "init_images": values(st.lists(B64_IMAGES, max_size=2)), "mask": values(B64_IMAGES),
                "inpainting_mask_invert": values(INTS)}
OPENAI_VALID = {
    "prompt": PROMPTS, "n": st.integers(1, 2), "model": st.just("tiny-random"),
    "size": st.sampled_from(["32x32", "16x16", "2x32"]), "response_format": st.sampled_from(["b64_json", "url"]),
    "seed": st.integers(-1, 2**32 - 1), "steps": st.integers(1, 3), "cfg_scale": st.floats(0, 20),
    "quality": JSON, "style": JSON, "user": JSON,
}
OPENAI_WILD = {
    "prompt": values(TEXT), "n": values(INTS), "model": values(st.sampled_from(["dall-e-3", ""])),
    "size": values(st.sampled_from(["auto", "1024x1024", "0x0", "x", "33x32", "-2x4"]) | st.text(max_size=12)),
    "response_format": values(st.sampled_from(["jpeg", ""])), "seed": values(INTS), "steps": values(INTS),
    "cfg_scale": values(FLOATS), "stream": JSON, "output_format": JSON,
}


def bodies(valid: dict, wild: dict):
    """A valid body, a valid body with one field made wild, or any JSON at all."""
    required = ("prompt", "init_images")
    base = st.fixed_dictionaries({k: v for k, v in valid.items() if k in required},
                                 optional={k: v for k, v in valid.items() if k not in required})
    one_wild = st.tuples(base, st.sampled_from(sorted(wild))).flatmap(
        lambda pair: wild[pair[1]].map(lambda value: {**pair[0], pair[1]: value}))
    return base | one_wild | one_wild | JSON


def post_json(client, path, body):
    """Python's JSON, NaN and Infinity included (some clients send them; the server must cope)."""
    return client.post(path, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})


def check(r):
    event(f"status {r.status_code}")           # shown by --hypothesis-show-statistics
    assert r.status_code in ALLOWED, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        assert ("detail" in body) or ("message" in body.get("error", {})), body


@FUZZ
@given(body=bodies(A1111_VALID, A1111_WILD))
def test_fuzz_a1111_txt2img(client, body):
    r = post_json(client, "/sdapi/v1/txt2img", body)
    check(r)
    if r.status_code == 200:
        info = json.loads(r.json()["info"])
        assert len(r.json()["images"]) == len(info["all_seeds"]) >= 1


@FUZZ
@given(body=bodies(IMG2IMG_VALID, IMG2IMG_WILD))
def test_fuzz_a1111_img2img(client, body):
    check(post_json(client, "/sdapi/v1/img2img", body))


@FUZZ
@given(body=bodies(OPENAI_VALID, OPENAI_WILD))
def test_fuzz_openai_generations(client, body):
    r = post_json(client, "/v1/images/generations", body)
    check(r)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@FUZZ
@given(image=st.none() | IMAGE_BYTES, mask=st.none() | IMAGE_BYTES,
       fields=st.dictionaries(st.sampled_from(["prompt", "n", "size", "seed", "steps", "strength", "response_format", "x"]),
                              st.text(max_size=20), max_size=6))
def test_fuzz_openai_edits(client, image, mask, fields):
    files = {}
    if image is not None:
        files["image"] = ("i.png", image, "image/png")
    if mask is not None:
        files["mask"] = ("m.png", mask, "image/png")
    r = client.post("/v1/images/edits", files=files or None, data=fields)
    check(r)


@FUZZ
@given(path=st.sampled_from(["/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info",
                             "/v1/images/generations", "/v1/images/edits"]),
       raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       content_type=st.sampled_from(["application/json", "multipart/form-data", "multipart/form-data; boundary=x",
                                     "text/plain", "application/x-www-form-urlencoded"]))
def test_fuzz_raw_bodies(client, path, raw, content_type):
    check(client.post(path, content=raw, headers={"content-type": content_type}))


@FUZZ
@given(image=B64_IMAGES | JSON)
def test_fuzz_png_info(client, image):
    check(post_json(client, "/sdapi/v1/png-info", {"image": image}))


@pytest.mark.parametrize("path", ["/sdapi/v1/txt2img", "/v1/images/generations", "/v1/images/edits"])
def test_oversize_upload_is_413(client, path):
    big = b"0" * (LIMITS.max_body_bytes + 1)
    r = client.post(path, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
