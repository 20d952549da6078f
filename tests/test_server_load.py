"""`marble serve` as a real process under load, on loopback only: bursts of 50 concurrent requests
against --max-queue 8 each get 200 or 429 (with Retry-After), nothing else; the server survives,
saves exactly the images it answered with, and its memory does not grow from burst to burst."""
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
BURSTS = 5
CONCURRENT = 50


def init_b64() -> str:
    """A 256x256 noise PNG (~260 kB as base64): each request carries real weight, so a leak of
    request bodies or decoded images (~0.45 MB a request, ~23 MB a burst) shows in RSS."""
    import base64
    import io

    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# img2img at 32x32, 8 steps (~0.1 s a job): the 50 requests of a burst arrive while the first jobs
# still run, so the queue (8) overflows.
BODY = {"prompt": "burst", "steps": 8, "width": 32, "height": 32, "seed": 1, "init_images": [init_b64()],
        "denoising_strength": 1.0}


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not Path("/proc/self/status").exists():
        pytest.skip("RSS is read from /proc (Linux)")
    tmp = tmp_path_factory.mktemp("served")
    log = (tmp / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "marble", "serve", "--model", "tiny-random", "--port", "0", "--max-queue", "8",
         "--outputs", str(tmp / "outputs"), "--log-level", "warning"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        url, deadline = None, time.monotonic() + 90
        while url is None:
            assert proc.poll() is None, (tmp / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server did not start"
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", (tmp / "serve.log").read_text())
            url = m.group(1) if m else time.sleep(0.1)
        yield url, proc, tmp / "outputs"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def burst(url: str) -> list[httpx.Response]:
    """CONCURRENT requests released together, each on its own connection."""
    start = threading.Barrier(CONCURRENT)
    out: list = [None] * CONCURRENT
    payload = json.dumps(BODY).encode()
    limits = httpx.Limits(max_connections=CONCURRENT, max_keepalive_connections=0)

    with httpx.Client(timeout=60, limits=limits) as client:   # one client: its TLS set-up is paid once
        def one(i):
            start.wait()
            out[i] = client.post(f"{url}/sdapi/v1/img2img", content=payload,
                                 headers={"content-type": "application/json"})
        threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    return out


def test_bursts_get_200_or_429_and_memory_stays_flat(served):
    url, proc, outputs = served
    rss, answered = [], 0
    t0 = time.monotonic()
    for _ in range(BURSTS):
        responses = burst(url)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(200) >= 9 and codes.count(429) >= 1, codes   # 1 running + 8 queued at least
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["detail"].startswith("the queue is full (8 waiting)")
        answered += codes.count(200)
        assert proc.poll() is None
        rss.append(rss_mib(proc.pid))
    elapsed = time.monotonic() - t0
    assert httpx.get(f"{url}/health").json()["models"]["tiny-random"]["waiting"] == 0
    assert len(list(outputs.glob("marble-*.png"))) == answered       # every 200 saved once, nothing else
    # RSS after a burst lies in a band ~45 MiB wide (live memory plus what the allocator has not
    # given back of the burst's transient ~40 MB of bodies and images), wherever the burst falls.
    # Measured over 13 runs: max(later) - max(first two) was at most +20 MiB. A leak of what the
    # requests carry (~23 MB a burst) moved it by +83 MiB. 40 MiB separates the two.
    assert max(rss[2:]) - max(rss[:2]) < 40, f"RSS by burst (MiB): {[round(x, 1) for x in rss]}"
    print(f"\n{BURSTS} bursts of {CONCURRENT} in {elapsed:.1f} s; {answered} answered 200; "
          f"RSS MiB {[round(x, 1) for x in rss]}")
