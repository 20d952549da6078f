"""What the environment must not hold."""
import importlib.util
import subprocess
import sys

import pytest


def test_torchvision_is_not_installed():
    """It fails to import beside torch 2.13 here and breaks diffusers' and transformers' imports with
    it; constraints.txt keeps every Makefile install from pulling it in."""
    assert importlib.util.find_spec("torchvision") is None


def test_marble_never_advises_installing_torchvision():
    """`marble bench` imports diffusers' SD pipeline, whose import makes transformers say "Install
    torchvision"; following that advice would break this environment."""
    pytest.importorskip("diffusers")
    code = "from marble.eval.sd_bench import import_diffusers; import_diffusers()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torchvision" not in r.stdout + r.stderr
