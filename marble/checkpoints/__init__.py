"""Model files: marble's own format, diffusers folders and SD single files, read into one
Checkpoint and written from it (errors: marble.errors.ModelLoadError)."""
