"""Data: the shapes world (procedural, captioned) and image-folder data sets."""
