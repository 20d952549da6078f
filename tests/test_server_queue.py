"""The worker and its bounded queue: one job at a time, 429 past the bound, cancellation frees the slot
(waiting: at once; running: at the next step), progress with an exact preview. A gated pipeline
holds a job at a chosen step, so "running" and "queued" are states, not races."""
import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from marble.pipeline import pixels_to_pil
from marble.request import GenerationRequest, resolve
from marble.server.app import create_app
from marble.server.state import ServerConfig
from marble.server.outputs import OutputStore
from marble.server.thread import ServerThread
from marble.server.worker import DISCONNECTED, INTERRUPTED, STOPPING, Cancelled, QueueFull, Worker, wait_for
from server_support import GatedPipeline, png_array

SMALL = dict(prompt="queue", steps=4, width=32, height=32)


def resolved(pipe, **kw):
    return resolve(GenerationRequest(**{**SMALL, **kw}), pipe.defaults)


@pytest.fixture
def gated(tiny_pipe):
    return GatedPipeline(tiny_pipe, at=1)


@pytest.fixture
def worker(gated, tmp_path):
    w = Worker(gated, OutputStore(tmp_path), max_queue=2, preview_interval=0.0)
    w.start()
    yield w
    gated.gate.set()
    w.stop()


def test_one_job_runs_at_a_time_and_the_queue_is_bounded(worker, gated, tmp_path):
    a = worker.submit(resolved(gated, seed=1))
    assert gated.reached.wait(10)
    b = worker.submit(resolved(gated, seed=2))
    c = worker.submit(resolved(gated, seed=3))
    with pytest.raises(QueueFull) as full:
        worker.submit(resolved(gated, seed=4))
    assert full.value.retry_after >= 1 and "2 waiting" in str(full.value)

    worker.cancel(b, DISCONNECTED)                    # a waiting job leaves at once ...
    with pytest.raises(Cancelled):
        b.future.result(timeout=1)
    e = worker.submit(resolved(gated, seed=5))        # ... and its slot is free again
    gated.gate.set()
    seeds = [job.future.result(timeout=30).records[0].seed for job in (a, c, e)]
    assert seeds == [1, 3, 5]
    assert gated.calls == 3                           # the cancelled job never ran
    assert len(list(tmp_path.glob("marble-*.png"))) == 3


@pytest.mark.parametrize("how", ["cancel", "interrupt"])
def test_a_running_job_stops_at_its_next_step_and_saves_nothing(worker, gated, tmp_path, how):
    a = worker.submit(resolved(gated, seed=1, steps=50))
    assert gated.reached.wait(10)
    if how == "cancel":
        worker.cancel(a, DISCONNECTED)
    else:
        assert worker.interrupt() is True
        assert worker.progress().interrupted
    gated.gate.set()
    with pytest.raises(Cancelled) as stopped:
        a.future.result(timeout=10)
    assert stopped.value.reason == (DISCONNECTED if how == "cancel" else INTERRUPTED)
    assert gated.steps == [0, 1]                      # stopped at step 1 of 50
    assert not list(tmp_path.glob("marble-*.png"))
    # the worker goes on with the next job
    assert worker.submit(resolved(gated, seed=2)).future.result(timeout=30).records[0].seed == 2


def test_progress_reports_the_step_and_an_exact_preview(tiny_pipe, tmp_path):
    gated = GatedPipeline(tiny_pipe, at=3)
    w = Worker(gated, OutputStore(tmp_path), max_queue=1, preview_interval=0.0)
    w.start()
    try:
        assert w.progress().total == 0 and w.progress().preview_png is None  # idle; and now someone watches
        req = resolved(gated, seed=7, steps=6)
        job = w.submit(req)
        assert gated.reached.wait(10)
        p = w.progress()
        assert (p.step, p.total, p.fraction, p.preview_step, p.waiting) == (3, 6, 0.5, 3, 0)
        assert p.job_id == job.id and p.eta_seconds(time.monotonic()) >= 0

        seen = {}
        tiny_pipe.generate(req, callback=lambda step, total, x0: seen.setdefault(step, x0.clone()))
        # the x0 estimate after step 3, drawn by the default previewer (the linear latent→RGB map,
        # enlarged to the image's size), not by the VAE
        linear = tiny_pipe.previewer(seen[2][:1])
        want = np.asarray(pixels_to_pil(linear)[0].resize((32, 32), 0))
        assert linear.shape == (1, 3, 16, 16) and tiny_pipe.previewer is not tiny_pipe.model.vae.decode
        assert np.array_equal(png_array(p.preview_png), want)
        gated.gate.set()
        job.future.result(timeout=30)
    finally:
        gated.gate.set()
        w.stop()


def test_a_waiter_whose_client_disconnects_cancels_its_job(worker, gated):
    a = worker.submit(resolved(gated, seed=1))
    assert gated.reached.wait(10)
    b = worker.submit(resolved(gated, seed=2))

    async def gone():
        return True
    with pytest.raises(Cancelled):
        asyncio.run(wait_for(worker, b, gone, poll=0.01))
    assert worker.waiting() == 0 and b.cancel_reason == DISCONNECTED
    gated.gate.set()
    assert a.future.result(timeout=30).records[0].seed == 1


def test_stop_cancels_waiting_jobs(tiny_pipe, tmp_path):
    gated = GatedPipeline(tiny_pipe, at=0)
    w = Worker(gated, OutputStore(tmp_path), max_queue=2)
    w.start()
    running = w.submit(resolved(gated))
    assert gated.reached.wait(10)
    waiting = w.submit(resolved(gated))
    threading.Timer(0.2, gated.gate.set).start()
    w.stop()
    for job in (running, waiting):
        with pytest.raises(Cancelled) as e:
            job.future.result(timeout=10)
        assert e.value.reason == STOPPING
    with pytest.raises(Cancelled):
        w.submit(resolved(gated))


# ---- over HTTP: 429 with Retry-After, and a disconnect frees the slot --------------------------
def test_http_queue_full_is_429_and_disconnects_free_slots(tiny_pipe, tmp_path):
    gated = GatedPipeline(tiny_pipe, at=1)
    app = create_app([gated], ServerConfig(outputs=tmp_path, max_queue=1))
    body = {"prompt": "http", "steps": 4, "width": 32, "height": 32}
    results = {}

    def post(key, seed, timeout=30.0):
        try:
            results[key] = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, "seed": seed}, timeout=timeout)
        except httpx.TimeoutException:
            results[key] = "gave up"

    with ServerThread(app) as url:
        threads = {"a": threading.Thread(target=post, args=("a", 1))}
        threads["a"].start()
        assert gated.reached.wait(10)                               # a is running, held at step 1
        threads["b"] = threading.Thread(target=post, args=("b", 2, 1.0))  # b waits, then its client gives up
        threads["b"].start()
        _wait_until(lambda: httpx.get(f"{url}/health").json()["models"]["tiny-random"]["waiting"] == 1)

        full = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, "seed": 3})
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert full.json()["detail"].startswith("the queue is full (1 waiting); retry in")
        full = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "size": "32x32"})
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"

        threads["b"].join(10)
        assert results["b"] == "gave up"
        _wait_until(lambda: httpx.get(f"{url}/health").json()["models"]["tiny-random"]["waiting"] == 0)
        threads["d"] = threading.Thread(target=post, args=("d", 4))  # b's slot is free again
        threads["d"].start()
        _wait_until(lambda: httpx.get(f"{url}/health").json()["models"]["tiny-random"]["waiting"] == 1)
        gated.gate.set()
        for key in ("a", "d"):
            threads[key].join(30)
            assert results[key].status_code == 200
        import json
        assert [json.loads(results[k].json()["info"])["seed"] for k in ("a", "d")] == [1, 4]
    assert gated.calls == 2                                          # b never ran
    assert len(list(tmp_path.glob("marble-*.png"))) == 2


def test_http_disconnect_stops_the_running_job(tiny_pipe, tmp_path):
    gated = GatedPipeline(tiny_pipe, at=1)
    app = create_app([gated], ServerConfig(outputs=tmp_path, max_queue=1))
    with ServerThread(app) as url:
        def give_up():
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 50, "width": 32, "height": 32},
                           timeout=1.0)
        t = threading.Thread(target=give_up)
        t.start()
        assert gated.reached.wait(10)
        t.join(10)
        state = app.state.marble.workers["tiny-random"]
        _wait_until(lambda: state._current is not None and state._current.cancel_reason == DISCONNECTED)
        gated.gate.set()
        _wait_until(lambda: state.progress().job_id is None)
        assert not list(tmp_path.glob("marble-*.png"))               # stopped before the end: nothing saved
        ok = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 32, "height": 32})
        assert ok.status_code == 200


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
