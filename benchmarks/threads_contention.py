"""The built-in model's warm image under thread and OpenMP wait settings, quiet and with one busy
process beside it (issue 18, item 7).

Each setting runs in its own process, because libgomp reads its environment once, when torch is
imported. The busy process is a Python loop on one core, as another user's job would be.

    python benchmarks/threads_contention.py --steps 8 --runs 5
    python benchmarks/threads_contention.py --env GOMP_SPINCOUNT=300000 --env GOMP_SPINCOUNT=10000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CHILD = """
import statistics, sys, time, torch
threads, steps, runs = (int(a) for a in sys.argv[1:4])
torch.set_num_threads(threads)
from marble.pipeline import load_pipeline
from marble.request import GenerationRequest, resolve
pipe = load_pipeline("builtin")
def request(seed):
    return resolve(GenerationRequest(prompt="two red circles above a blue square", seed=seed, steps=steps),
                   pipe.defaults)
pipe.generate(request(0))
times = []
for i in range(runs):
    t0 = time.perf_counter(); pipe.generate(request(i)); times.append(time.perf_counter() - t0)
print(statistics.median(times), max(times))
"""
DEFAULT_SETTINGS = ("", "OMP_WAIT_POLICY=PASSIVE")   # "" = libgomp's defaults


def timed_setting(threads: int, env_setting: str, steps: int, runs: int) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    if env_setting:
        key, value = env_setting.split("=", 1)
        env[key] = value
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps), str(runs)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, action="append", default=None, help="repeatable; default 2 and 1")
    parser.add_argument("--env", action="append", default=None,
                        help="NAME=VALUE settings to compare (repeatable); default: libgomp's and PASSIVE")
    args = parser.parse_args()
    settings = args.env or list(DEFAULT_SETTINGS)
    rows = []
    for busy in (False, True):
        other = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            time.sleep(0.5 if busy else 0)
            for threads in args.threads or [2, 1]:
                for setting in settings:
                    median, worst = timed_setting(threads, setting, args.steps, args.runs)
                    rows.append((busy, threads, setting or "libgomp default", median, worst))
        finally:
            if other is not None:
                other.kill()
    print(f"| beside it | threads | environment | median of {args.runs} | slowest |\n|---|---|---|---|---|")
    for busy, threads, setting, median, worst in rows:
        print(f"| {'one busy process' if busy else 'nothing'} | {threads} | {setting} | {median:.3f} s | {worst:.3f} s |")
    print(f"\n(the built-in model, {args.steps} steps, default CFG, 64×64, warm images)")


if __name__ == "__main__":
    main()
