"""What the environment must not hold."""
import importlib.util


def test_torchvision_is_not_installed():
    """It fails to import beside torch 2.13 here and breaks diffusers' and transformers' imports with
    it; constraints.txt keeps every Makefile install from pulling it in."""
    assert importlib.util.find_spec("torchvision") is None
