"""The server's routes through FastAPI's TestClient: every image is checked bit for bit against the
pipeline run directly with the same request, so a wrong default, a lost field or an inverted mask
fails; errors are checked for status, shape and message."""
import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from marble.request import GenerationRequest, resolve
from marble.server.app import create_app
from marble.server.limits import ServerLimits
from marble.server.state import ServerConfig
from server_support import noise_image, png_array, png_b64, png_text, renamed

PROMPT = "two red circles above a blue square"
LIMITS = ServerLimits(max_pixels=64 * 64, max_steps=50, max_n=4, max_prompt_chars=200)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def client(tiny_pipe, outputs):
    second = renamed(tiny_pipe, "tiny-b", "0123456789")
    app = create_app([tiny_pipe, second], ServerConfig(outputs=outputs, max_queue=4, limits=LIMITS))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def direct(pipe, **kw):
    return pipe.generate(resolve(GenerationRequest(**kw), pipe.defaults))


def arrays(images):
    return [np.asarray(im.convert("RGB")) for im in images]


# ---- OpenAI Images API ----------------------------------------------------------------------
def test_openai_generations_b64_equal_the_pipeline_bit_for_bit(client, tiny_pipe):
    r = client.post("/v1/images/generations", json={
        "prompt": PROMPT, "n": 2, "size": "32x32", "response_format": "b64_json",
        "seed": 5, "steps": 3, "quality": "hd", "style": "vivid", "user": "someone"})  # unknown fields ignored
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    want = direct(tiny_pipe, prompt=PROMPT, n=2, width=32, height=32, seed=5, steps=3)
    got = [png_array(d["b64_json"]) for d in body["data"]]
    for g, w in zip(got, arrays(want.images)):
        assert np.array_equal(g, w)
    # each PNG carries its own record (seed, seed+1)
    texts = [png_text(d["b64_json"]) for d in body["data"]]
    assert [t["parameters"] for t in texts] == [rec.to_parameters() for rec in want.records]
    assert [json.loads(t["marble"])["seed"] for t in texts] == [5, 6]


def test_openai_url_points_at_the_saved_file(client, outputs):
    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "size": "32x32", "response_format": "url",
                                                     "steps": 2, "seed": 9})
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    assert url.startswith("http://testserver/outputs/marble-")
    name = url.rsplit("/", 1)[1]
    served = client.get(f"/outputs/{name}")
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert served.content == (outputs / name).read_bytes()
    assert json.loads(png_text(served.content)["marble"])["seed"] == 9


def _edit_files(image: Image.Image, mask: Image.Image | None):
    files = {"image": ("image.png", base64.b64decode(png_b64(image)), "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", base64.b64decode(png_b64(mask)), "image/png")
    return files


def test_openai_edit_transparent_mask_pixels_are_the_ones_repainted(client, tiny_pipe):
    init = noise_image(32, seed=1)
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[8:24, 8:24] = 0                                   # OpenAI: transparent = edit
    mask = Image.fromarray(np.dstack([np.zeros((32, 32, 3), np.uint8), alpha]), "RGBA")
    r = client.post("/v1/images/edits", files=_edit_files(init, mask),
                    data={"prompt": PROMPT, "seed": "4", "steps": "3", "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    got = png_array(r.json()["data"][0]["b64_json"])

    white = np.zeros((32, 32), np.uint8)
    white[8:24, 8:24] = 255                                 # marble: white = repaint
    want = direct(tiny_pipe, prompt=PROMPT, seed=4, steps=3, init_image=init, mask=Image.fromarray(white))
    assert np.array_equal(got, arrays(want.images)[0])
    assert np.array_equal(got[:8], np.asarray(init)[:8])    # kept rows are the init's, exactly
    assert not np.array_equal(got[8:24, 8:24], np.asarray(init)[8:24, 8:24])


def test_openai_edit_without_mask_uses_the_images_own_transparency(client, tiny_pipe):
    init = noise_image(32, seed=2, mode="RGBA")
    arr = np.asarray(init).copy()
    arr[..., 3] = 255
    arr[16:, :, 3] = 0                                      # bottom half transparent
    init = Image.fromarray(arr, "RGBA")
    r = client.post("/v1/images/edits", files=_edit_files(init, None), data={"prompt": PROMPT, "seed": "3", "steps": "2"})
    assert r.status_code == 200, r.text
    white = np.zeros((32, 32), np.uint8)
    white[16:] = 255
    want = direct(tiny_pipe, prompt=PROMPT, seed=3, steps=2, init_image=init.convert("RGB"), mask=Image.fromarray(white))
    assert np.array_equal(png_array(r.json()["data"][0]["b64_json"]), arrays(want.images)[0])


@pytest.mark.parametrize("mask, message", [
    (Image.new("RGB", (32, 32), "white"), "alpha channel"),
    (Image.new("RGBA", (32, 32), (0, 0, 0, 255)), "no fully transparent pixels"),
    (Image.new("RGBA", (16, 16), (0, 0, 0, 0)), "same size"),
])
def test_openai_edit_bad_masks_are_400_with_openai_shape(client, mask, message):
    r = client.post("/v1/images/edits", files=_edit_files(noise_image(32, 0), mask), data={"prompt": "x", "steps": "2"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and message in err["message"]


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": 5}, 400, "prompt: Input should be a valid string"),
    ({"prompt": "x", "n": 0}, 400, "n must be an integer in [1, 64]"),
    ({"prompt": "x", "n": 5, "size": "32x32"}, 400, "5 images is over this server's limit of 4"),
    ({"prompt": "x", "size": "big"}, 400, "size must look like WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "96x96"}, 400, "over this server's limit of 4096 pixels"),
    ({"prompt": "x", "steps": -1}, 400, "steps must be an integer in [1, 1000]"),
    ({"prompt": "x", "response_format": "jpeg"}, 400, "response_format"),
    ({"prompt": "x", "stream": True}, 400, "streaming is not supported"),
    ({"prompt": "x", "model": "dall-e-3"}, 404, "'dall-e-3' is not loaded here; this server has: tiny-random, tiny-b"),
    ({}, 400, "prompt: Field required"),
])
def test_openai_invalid_requests_get_openai_shaped_errors(client, body, status, message):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and message in err["message"]


def test_openai_malformed_json_is_400(client):
    r = client.post("/v1/images/generations", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "the body is not valid JSON"


# ---- A1111 API ------------------------------------------------------------------------------
def test_a1111_txt2img_equals_the_pipeline_and_reports_seeds_and_infotexts(client, tiny_pipe):
    body = {"prompt": PROMPT, "negative_prompt": "green", "seed": 11, "steps": 3, "cfg_scale": 5,
            "width": 32, "height": 32, "sampler_name": "DPM++ 2M", "batch_size": 2, "n_iter": 2,
            "denoising_strength": 0.7, "enable_hr": False, "restore_faces": False}  # ignored, as A1111 does
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    want = direct(tiny_pipe, prompt=PROMPT, negative_prompt="green", seed=11, steps=3, cfg=5.0, width=32,
                  height=32, sampler="DPM++ 2M", n=4)
    assert [png_array(b).tolist() for b in out["images"]] == [a.tolist() for a in arrays(want.images)]
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    assert info["infotexts"] == [rec.to_parameters() for rec in want.records]
    assert info["sampler_name"] == "DPM++ 2M" and info["sd_model_name"] == "tiny-random"
    assert out["parameters"]["prompt"] == PROMPT and out["parameters"]["batch_size"] == 2


def test_a1111_random_seed_is_recorded_and_reproduces(client):
    r1 = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": -1, "steps": 2, "width": 32, "height": 32})
    seed = json.loads(r1.json()["info"])["seed"]
    assert 0 <= seed < 2**32
    r2 = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": seed, "steps": 2, "width": 32, "height": 32})
    assert np.array_equal(png_array(r1.json()["images"][0]), png_array(r2.json()["images"][0]))


def test_a1111_img2img_and_inpaint_equal_the_pipeline(client, tiny_pipe):
    init = noise_image(32, seed=5)
    r = client.post("/sdapi/v1/img2img", json={
        "prompt": PROMPT, "seed": 2, "steps": 4, "init_images": ["data:image/png;base64," + png_b64(init)],
        "denoising_strength": 0.5})
    assert r.status_code == 200, r.text
    want = direct(tiny_pipe, prompt=PROMPT, seed=2, steps=4, init_image=init, strength=0.5)
    assert np.array_equal(png_array(r.json()["images"][0]), arrays(want.images)[0])
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.5
    assert r.json()["parameters"]["init_images"] is None   # not echoed unless include_init_images

    black_left = np.zeros((32, 32), np.uint8)
    black_left[:, 16:] = 255                               # A1111 and marble: white = repaint
    for invert, mask in ((0, black_left), (1, 255 - black_left)):
        r = client.post("/sdapi/v1/img2img", json={
            "prompt": PROMPT, "seed": 2, "steps": 4, "init_images": [png_b64(init)],
            "mask": png_b64(Image.fromarray(mask)), "inpainting_mask_invert": invert})
        assert r.status_code == 200, r.text
        want = direct(tiny_pipe, prompt=PROMPT, seed=2, steps=4, init_image=init, mask=Image.fromarray(black_left))
        got = png_array(r.json()["images"][0])
        assert np.array_equal(got, arrays(want.images)[0]), f"invert={invert}"
        assert np.array_equal(got[:, :16], np.asarray(init)[:, :16])


def test_a1111_model_choice_by_override_settings(client):
    for name in ("tiny-b", "tiny-b [0123456789]"):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 32, "height": 32,
                                                   "override_settings": {"sd_model_checkpoint": name}})
        assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "tiny-b"
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"sd_model_checkpoint": "sd15"}})
    assert r.status_code == 404 and "this server has: tiny-random, tiny-b" in r.json()["detail"]


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "x", "steps": "many"}, 422, "steps: Input should be a valid integer"),
    ({"prompt": "x", "batch_size": -1, "n_iter": -1}, 400, "batch_size and n_iter must be >= 1"),
    ({"prompt": "x", "sampler_name": "Nope"}, 400, "unknown sampler 'Nope'; choose from: DDPM"),
    ({"prompt": "x", "width": 33, "height": 32}, 400, "width 33 is not a multiple of the model's latent factor 2"),
    ({"prompt": "x", "steps": 51, "width": 32, "height": 32}, 400, "steps 51 is over this server's limit of 50"),
    ({"prompt": "x" * 201}, 400, "the prompt is 201 characters; this server's limit is 200"),
    ({"prompt": "x", "seed": 2**40}, 400, "seed must be an integer in [0, 4294967295]"),
    ({"prompt": "x", "cfg_scale": -1}, 400, "cfg must be a finite number in [0, 100]"),
])
def test_a1111_txt2img_rejects_bad_values_with_a_clear_message(client, body, status, message):
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == status
    assert message in r.json()["detail"]


@pytest.mark.parametrize("init, message", [
    ("not base64!", "the init image is not valid base64"),
    (base64.b64encode(b"hello, not an image").decode(), "the init image is not a readable image"),
    (base64.b64encode(base64.b64decode(png_b64(Image.new("RGB", (32, 32))))[:60]).decode(), "not a readable image"),
])
def test_a1111_img2img_rejects_bad_images(client, init, message):
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [init]})
    assert r.status_code == 400 and message in r.json()["detail"]


def test_a1111_decompression_bomb_is_refused_from_its_header(client):
    # a small PNG that decodes to 5000x5000 (over the default 4096² limit): refused from its header
    bomb = Image.new("L", (5000, 5000))
    buf = io.BytesIO()
    bomb.save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 100_000
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [base64.b64encode(buf.getvalue()).decode()]})
    assert r.status_code == 400 and "5000x5000; this server's limit is 16777216 pixels" in r.json()["detail"]


def test_a1111_png_info_reads_back_the_record(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "negative_prompt": "blur", "seed": 3, "steps": 2,
                                               "width": 32, "height": 32})
    infotext = json.loads(r.json()["info"])["infotexts"][0]
    r = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + r.json()["images"][0]})
    assert r.status_code == 200
    out = r.json()
    assert out["info"] == infotext
    assert out["parameters"]["Prompt"] == PROMPT and out["parameters"]["Negative prompt"] == "blur"
    assert out["parameters"]["Seed"] == "3" and json.loads(out["items"]["marble"])["seed"] == 3
    assert client.post("/sdapi/v1/png-info", json={"image": "@@@"}).status_code == 400


def test_a1111_listing_routes(client, tiny_pipe):
    from marble.diffusion.samplers import SAMPLERS
    assert [s["name"] for s in client.get("/sdapi/v1/samplers").json()] == list(SAMPLERS)
    models = client.get("/sdapi/v1/sd-models").json()
    assert [(m["model_name"], m["title"]) for m in models] == [
        ("tiny-random", f"tiny-random [{tiny_pipe.loaded.hash}]"), ("tiny-b", "tiny-b [0123456789]")]
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["current_image"] is None and idle["state"]["job_count"] == 0
    assert client.post("/sdapi/v1/interrupt").json() == {}


# ---- outputs, gallery, health, docs --------------------------------------------------------
def test_outputs_are_saved_never_overwritten_and_listed_newest_first(client, outputs):
    squatter = outputs / "marble-90000.png"
    squatter.write_bytes(b"not ours to overwrite")
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "gallery", "seed": 1, "steps": 1, "width": 32, "height": 32,
                                               "batch_size": 2})
    assert r.status_code == 200
    assert squatter.read_bytes() == b"not ours to overwrite"
    listing = client.get("/api/outputs", params={"limit": 3}).json()
    names = [item["name"] for item in listing["items"]]
    assert names[:2] == ["marble-90002.png", "marble-90001.png"] and names[2] == "marble-90000.png"
    newest = listing["items"][1]
    assert newest["record"]["prompt"] == "gallery" and newest["record"]["seed"] == 1
    assert newest["parameters"].startswith("gallery\nSteps: 1")
    assert (outputs / "marble-90001.png").read_bytes() == base64.b64decode(r.json()["images"][0])
    assert listing["total"] == len(list(outputs.glob("marble-*.png")))
    assert not list(outputs.glob(".*.tmp"))                 # no temp file left behind


@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "marble-1.txt", "other.png", "marble-99999.png"])
def test_output_route_serves_only_our_files(client, name):
    assert client.get(f"/outputs/{name}").status_code == 404


def test_health_docs_and_ui_exist(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and set(h["models"]) == {"tiny-random", "tiny-b"}
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/v1/images/generations", "/v1/images/edits", "/sdapi/v1/txt2img", "/sdapi/v1/img2img",
                 "/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/png-info", "/health"):
        assert path in spec["paths"], path
    assert "multipart/form-data" in spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="prompt"' in page.text
    assert client.get("/ui/app.js").status_code == 200 and client.get("/ui/nope.js").status_code == 404


# ---- API key and body size -----------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tiny_pipe, tmp_path_factory):
    app = create_app([tiny_pipe], ServerConfig(outputs=tmp_path_factory.mktemp("keyed"), api_key="s3cret",
                                               limits=ServerLimits(max_body_bytes=4096)))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_api_key_is_required_everywhere_but_health(keyed):
    assert keyed.get("/health").status_code == 200
    for path in ("/", "/docs", "/openapi.json", "/sdapi/v1/samplers", "/api/outputs"):
        r = keyed.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Basic")
    r = keyed.post("/v1/images/generations", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"].startswith("a valid API key is required")
    basic = base64.b64encode(b"anyone:s3cret").decode()
    for headers in ({"Authorization": "Bearer s3cret"}, {"Authorization": f"Basic {basic}"}, {"X-API-Key": "s3cret"}):
        assert keyed.get("/sdapi/v1/samplers", headers=headers).status_code == 200, headers


def test_oversize_bodies_are_413_before_parsing(keyed):
    auth = {"Authorization": "Bearer s3cret"}
    big = {"prompt": "x" * 5000}
    r = keyed.post("/sdapi/v1/txt2img", json=big, headers=auth)
    assert r.status_code == 413 and "over this server's limit of 4096 bytes" in r.json()["detail"]
    r = keyed.post("/v1/images/generations", json=big, headers=auth)
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]

    def chunks():                                          # no Content-Length: counted while read
        for _ in range(10):
            yield b"x" * 1000
    r = keyed.post("/sdapi/v1/txt2img", content=chunks(), headers={**auth, "content-type": "application/json"})
    assert r.status_code == 413
