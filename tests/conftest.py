import os

import pytest
import torch

# One intra-op thread: the tests run tiny models, where a second thread buys nothing, and an
# oversubscribed machine (2 cores, subprocess tests alongside) makes OpenMP spin-waits ~10x slower.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses the tests start

from marble.checkpoints.resolve import LoadedModel, random_model


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
