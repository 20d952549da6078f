import os

import pytest
import torch

# One intra-op thread: the tests run tiny models, where a second thread buys nothing, and an
# oversubscribed machine (2 cores, subprocess tests alongside) makes OpenMP spin-waits ~10x slower.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses the tests start
# The CLI's --dtype auto is bf16 on CPUs with native bf16 (AVX512-BF16, AMX) and fp32 elsewhere; the
# tests compare CLI and server images with the library's (fp32) bit for bit, so they pin fp32 on every
# machine. Tests of auto itself pass --dtype and the cpuinfo they mean.
os.environ.setdefault("MARBLE_DTYPE", "fp32")

from marble.checkpoints.resolve import LoadedModel, random_model


@pytest.fixture(scope="session", autouse=True)
def hash_cache_in_tmp(tmp_path_factory):
    """The model-hash cache (marble.checkpoints.file_hashes) of the whole run, and of the
    subprocesses it starts, lives in a temporary folder: tests never write to the real ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARBLE_CACHE_DIR", str(tmp_path_factory.mktemp("marble-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_loaded() -> LoadedModel:
    """The seeded random tiny model (SD-shaped U-Net + VAE + tiny CLIP), shared by the tests."""
    from marble.checkpoints.checkpoint import state_hash
    model = random_model()
    return LoadedModel(model, "tiny-random", state_hash(model))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_loaded):
    from marble.pipeline import Pipeline
    return Pipeline(tiny_loaded)


@pytest.fixture
def stop_after_checkpoint(monkeypatch):
    """stop(run, step): run() with the trainer stopping (KeyboardInterrupt) right after it has
    saved the checkpoint of `step`, as a kill at that moment would leave the run; then the trainer
    saves normally again."""
    from marble.train.loop import TrainLoop
    real_save = TrainLoop.save

    def stop(run, step: int) -> None:
        def save_then_die(self):
            real_save(self)
            if self.step == step:
                raise KeyboardInterrupt
        monkeypatch.setattr(TrainLoop, "save", save_then_die)
        try:
            with pytest.raises(KeyboardInterrupt):
                run()
        finally:
            monkeypatch.setattr(TrainLoop, "save", real_save)
    return stop


# A trainer process held right after it has written the checkpoint of one step, so that a test can
# SIGKILL it there: a kill raced against a run that is fast on a quiet machine can come too late.
_HOLD_AFTER_CHECKPOINT = """
import sys, time
from marble.train.loop import TrainLoop
real_save = TrainLoop.save
def save(self):
    real_save(self)
    if self.step == {step}:
        time.sleep(3600)   # the checkpoint is written; the test kills the process here
TrainLoop.save = save
sys.argv = ["marble", *sys.argv[1:]]
from marble.cli import main
main()
"""


@pytest.fixture
def sigkill_after_checkpoint():
    """kill(args, checkpoint, step): run `marble ARGS` in a subprocess, SIGKILL it once it has written
    `checkpoint` at `step` (or after four minutes, or when it ends by itself), and wait for it."""
    import signal
    import subprocess
    import sys
    import time

    from marble.train.checkpoint import load_checkpoint

    def kill(args, checkpoint, step: int, timeout: float = 240) -> None:
        p = subprocess.Popen([sys.executable, "-c", _HOLD_AFTER_CHECKPOINT.format(step=step), *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline and p.poll() is None:
            if checkpoint.exists() and load_checkpoint(checkpoint)["step"] == step:
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.communicate()
    return kill
