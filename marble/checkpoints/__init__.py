"""Model files: marble's own format, and (later) diffusers folders and SD single files."""
from marble.checkpoints.errors import ModelLoadError

__all__ = ["ModelLoadError"]
