"""The live mode's protocol over real HTTP: an SSE stream per page, requests that replace each
other ("latest wins": a queued stale job is dropped, a running one stops at its next step), images
equal to a direct generate, keep-in-gallery, and the per-client stream limit (429, never a crash)."""
import json
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from marble.cli import app as cli
from marble.request import GenerationRequest, ModelDefaults, resolve
from marble.pipeline import load_pipeline
from marble.server.app import create_app
from marble.server.limits import ServerLimits
from marble.server.live import FAST_CFG, FAST_SAMPLER, FAST_STEPS, LiveConfig, check_live
from marble.server.state import ServerConfig
from marble.server.thread import ServerThread
from server_support import GatedPipeline, png_array, png_text

PROMPT = "two red circles above a blue square"


class Events:
    """Server-Sent Events read from an open httpx stream, one (event, data) at a time."""

    def __init__(self, response):
        self.lines = response.iter_lines()

    def next(self) -> tuple[str, dict]:
        event, data = None, []
        for line in self.lines:
            if line == "":
                if event is not None:
                    return event, json.loads("\n".join(data))
                continue
            if line.startswith(":"):          # a ping comment
                continue
            field, _, value = line.partition(": ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        raise EOFError("the stream ended")


@pytest.fixture
def gated(tiny_pipe):
    g = GatedPipeline(tiny_pipe, at=1)
    g.gate.set()
    return g


def serve(pipe, tmp_path, **live):
    return ServerThread(create_app([pipe], ServerConfig(outputs=tmp_path, live=LiveConfig(**live))))


def open_stream(client: httpx.Client):
    return client.stream("GET", "/api/live/stream")


def direct(pipe, prompt, seed, **settings):
    options = dict(steps=FAST_STEPS, sampler=FAST_SAMPLER, cfg=FAST_CFG, width=32, height=32) | settings
    return np.asarray(pipe.generate(resolve(GenerationRequest(prompt=prompt, seed=seed, **options),
                                            pipe.defaults)).images[0])


def test_a_live_image_equals_a_direct_generate_and_can_be_kept(tiny_pipe, tmp_path):
    with serve(tiny_pipe, tmp_path) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/api/live").json()["steps"] == FAST_STEPS
        with open_stream(c) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = Events(r)
            kind, ready = events.next()
            assert kind == "ready" and (ready["steps"], ready["sampler"], ready["cfg"]) == (4, "DPM++ 2M", 1.0)
            sid = ready["stream"]
            res = c.post(f"/api/live/{sid}", json={"seq": 0, "prompt": PROMPT, "seed": 5, "width": 32, "height": 32})
            assert res.status_code == 202 and res.json()["seed"] == 5
            kind, image = events.next()
            assert kind == "image" and image["seq"] == 0
            assert np.array_equal(png_array(image["png"]), direct(tiny_pipe, PROMPT, 5))
            assert png_text(image["png"])["parameters"] == image["parameters"]
            assert image["record"]["steps"] == 4 and image["record"]["seed"] == 5
            assert not list(tmp_path.iterdir())                  # live images are not saved...
            kept = c.post(f"/api/live/{sid}/keep", json={"seq": 0}).json()   # ...unless kept
            items = c.get("/api/outputs").json()["items"]
            assert [i["name"] for i in items] == [kept["name"]] and items[0]["record"]["prompt"] == PROMPT
            assert np.array_equal(png_array(c.get(kept["url"]).content), direct(tiny_pipe, PROMPT, 5))
            miss = c.post(f"/api/live/{sid}/keep", json={"seq": 7})
            assert miss.status_code == 404 and miss.json()["code"] == "not_held"


def test_latest_wins_a_running_job_stops_and_a_queued_one_is_dropped(gated, tmp_path):
    gated.gate.clear()
    with serve(gated, tmp_path) as url, httpx.Client(base_url=url, timeout=60) as c, open_stream(c) as r:
        events = Events(r)
        sid = events.next()[1]["stream"]
        body = {"seed": 3, "width": 32, "height": 32, "steps": 3, "sampler_name": "Euler"}
        assert c.post(f"/api/live/{sid}", json={"seq": 1, "prompt": "a", **body}).status_code == 202
        assert gated.reached.wait(30)                         # seq 1 runs, held before its step 1
        assert c.post(f"/api/live/{sid}", json={"seq": 2, "prompt": "ab", **body}).status_code == 202
        assert c.post(f"/api/live/{sid}", json={"seq": 3, "prompt": "abc", **body}).status_code == 202
        gated.gate.set()
        kind, image = events.next()
        assert kind == "image" and image["seq"] == 3 and image["record"]["prompt"] == "abc"
        # seq 1 stopped at its next step (1 of 3), seq 2 never ran, seq 3 ran whole
        assert gated.calls == 2 and gated.steps == [0, 1, 0, 1, 2]
        assert np.array_equal(png_array(image["png"]), direct(gated.pipe, "abc", 3, steps=3, sampler="Euler"))
        stale = c.post(f"/api/live/{sid}", json={"seq": 2, "prompt": "x", **body})
        assert stale.status_code == 409 and stale.json()["code"] == "stale"
        assert c.post(f"/api/live/{sid}", json={"seq": 3, "prompt": "x", **body}).status_code == 409


def test_bad_live_requests_get_4xx_and_the_stream_goes_on(tiny_pipe, tmp_path):
    with serve(tiny_pipe, tmp_path) as url, httpx.Client(base_url=url, timeout=60) as c, open_stream(c) as r:
        events = Events(r)
        sid = events.next()[1]["stream"]
        bad = c.post(f"/api/live/{sid}", json={"seq": 0, "prompt": "a", "sampler_name": "nope"})
        assert bad.status_code == 400 and "unknown sampler 'nope'" in bad.json()["detail"]
        assert c.post(f"/api/live/{sid}", json={"seq": 1, "prompt": "a", "width": 33}).status_code == 400
        assert c.post(f"/api/live/{sid}", json={"seq": -1, "prompt": "a"}).status_code == 422
        missing = c.post("/api/live/nosuchstream", json={"seq": 0, "prompt": "a"})
        assert missing.status_code == 404 and missing.json()["code"] == "no_stream"
        # a refused request does not claim its number: seq 1 may still come
        assert c.post(f"/api/live/{sid}", json={"seq": 1, "prompt": "a", "seed": 1, "width": 32,
                                                "height": 32}).status_code == 202
        assert events.next()[1]["seq"] == 1


def test_streams_are_limited_per_client_with_429(tiny_pipe, tmp_path):
    with serve(tiny_pipe, tmp_path, streams_per_client=2) as url, httpx.Client(base_url=url, timeout=60) as c:
        with open_stream(c) as a, open_stream(c) as b:
            held = Events(a), Events(b)          # held: a dropped line iterator closes its connection
            assert held[0].next()[0] == held[1].next()[0] == "ready"
            for _ in range(3):
                with open_stream(c) as third:
                    assert third.status_code == 429
                    third.read()
                assert third.json() == {"error": "Too Many Requests", "code": "too_many_live_streams",
                                        "detail": "this client already has 2 live streams open, the server's "
                                                  "limit per client (--live-streams-per-client); close one first"}
            assert c.get("/health").status_code == 200
        for _ in range(200):          # closing frees the places: the server sees the disconnects
            with open_stream(c) as r:
                if r.status_code == 200:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("a closed stream still counts against the client's limit")


def test_live_defaults_come_from_the_flags_then_the_model_card_then_the_stand_in():
    model = ModelDefaults(steps=15, cfg=7.0, sampler="Euler a", width=64, height=64, latent_factor=8,
                          max_pixels=4096)
    d = LiveConfig().defaults(model)
    assert (d.steps, d.sampler, d.cfg, d.width) == (FAST_STEPS, FAST_SAMPLER, FAST_CFG, 64)
    own = LiveConfig(own_model=True).defaults(model)            # a few-step file: its card's settings
    assert (own.steps, own.sampler, own.cfg) == (15, "Euler a", 7.0)
    given = LiveConfig(steps=2, sampler="LCM", cfg=1.5, own_model=True).defaults(model)
    assert (given.steps, given.sampler, given.cfg) == (2, "LCM", 1.5)
    with pytest.raises(ValueError, match="streams per client must be >= 1"):
        LiveConfig(streams_per_client=0)


def test_bad_live_settings_stop_the_server_at_start_with_one_line(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="the live settings: unknown sampler 'nope'"):
        check_live(tiny_pipe, LiveConfig(sampler="nope"))
    with pytest.raises(ValueError, match="the live settings: .*missing.lora"):
        check_live(tiny_pipe, LiveConfig(lora=tmp_path / "missing.lora"))
    runner = CliRunner()
    for args, text in ((["--live-streams-per-client", "0"], "streams per client must be >= 1"),
                       (["--live-debounce-ms", "-5"], "debounce must be in 0..10000 ms"),
                       (["--model", "tiny-random", "--port", "0", "--live-steps", "0"], "steps must be")):
        r = runner.invoke(cli, ["serve", *args])
        assert r.exit_code == 2 and r.stderr.strip().startswith("marble: error: ") and text in r.stderr, r.output


@pytest.fixture(scope="module")
def fuzz_client(tiny_pipe, tmp_path_factory):
    limits = ServerLimits(max_pixels=32 * 32, max_steps=4, max_n=1, max_prompt_chars=300)
    app = create_app([tiny_pipe], ServerConfig(outputs=tmp_path_factory.mktemp("livefuzz"), max_queue=2, limits=limits))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, app.state.marble.live.open("fuzzer").id
        assert c.get("/health").status_code == 200


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
FIELDS = {"seq": st.integers() | JSON, "prompt": st.text(max_size=40) | JSON, "seed": st.integers() | JSON,
          "steps": st.integers(-2, 6) | JSON, "cfg_scale": st.floats() | JSON,
          "sampler_name": st.sampled_from(["Euler", "LCM", "nope", ""]) | JSON,
          "width": st.sampled_from([8, 32, 33, 4096]) | JSON, "height": st.sampled_from([8, 32, -8]) | JSON}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({}, optional=FIELDS) | JSON, keep=JSON)
def test_fuzz_live_requests_only_ever_get_2xx_or_4xx(fuzz_client, body, keep):
    c, sid = fuzz_client
    as_json = {"content-type": "application/json"}    # json.dumps writes NaN and Infinity, as some clients do
    r = c.post(f"/api/live/{sid}", content=json.dumps(body), headers=as_json)
    assert r.status_code in (202, 400, 409, 422, 429), (r.status_code, r.text)
    assert c.post(f"/api/live/{sid}/keep", content=json.dumps(keep), headers=as_json).status_code in (200, 404, 422)


def test_a_live_model_of_its_own_serves_the_live_mode(tiny_pipe, tmp_path):
    """create_app(..., live_pipe=) gives the live mode its own model and worker; the default model
    keeps serving the other routes (the benchmark and `marble serve --live-model` rely on it)."""
    live_pipe = load_pipeline("tiny-random")
    live_pipe.loaded.name = "live-tiny"
    app = create_app([tiny_pipe], ServerConfig(outputs=tmp_path, live=LiveConfig(own_model=True)), live_pipe=live_pipe)
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/api/live").json()["model"] == "live-tiny"
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith(tiny_pipe.name)
