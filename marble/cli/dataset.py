"""`marble dataset export`: a procedural world written as an image folder (PNGs + metadata.jsonl)."""
from __future__ import annotations

from pathlib import Path

import typer

from marble.cli.app import app, fail, info

dataset_app = typer.Typer(help="Data sets: export the shapes world as an image folder.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")

WORLDS = ("shapes",)


@dataset_app.command("export")
def export(
    world: str = typer.Option("shapes", "--world", help="The procedural world: shapes."),
    n: int = typer.Option(..., "--n", help="Number of images (samples 0..N-1 of the split)."),
    out: Path = typer.Option(..., "--out", help="New folder to write (must not exist, or be empty)."),
    split: str = typer.Option("train", "--split", help="train (held-out compositions excluded) | heldout | "
                              "concept (the heart, for training a LoRA; 48 images make a small folder) | concept-new."),
    seed: int = typer.Option(0, "--seed", help="World seed: sample i of (split, seed) is always the same image."),
    size: int = typer.Option(64, "--size", help="Image side in pixels, 16..1024."),
) -> None:
    """Write N captioned images of a world in the common image-folder layout: NNNNN.png plus
    metadata.jsonl with file_name, text and the structured truth (objects with colour, shape, size,
    centre, bbox). The folder appears complete or not at all."""
    from marble.data.image_folder import write_image_folder
    from marble.data.shapes import SPLITS, ShapesDataset

    if world not in WORLDS:
        fail(f"--world must be one of {', '.join(WORLDS)}, got {world!r}")
    if split not in SPLITS:
        fail(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n < 1:
        fail(f"--n must be >= 1, got {n}")
    if not 16 <= size <= 1024:
        fail(f"--size must be in 16..1024, got {size}")
    if seed < 0:
        fail(f"--seed must be >= 0, got {seed}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"--out {out} already exists and is not an empty folder; marble never overwrites")
    data = ShapesDataset(n, split=split, seed=seed, size=size)
    items = ((image, text, {k: v for k, v in record.items() if k != "text"}) for image, text, record in
             (data[i] for i in range(n)))
    try:
        written = write_image_folder(out, items)
    except FileExistsError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror or e}")
    info(f"wrote {written} images and metadata.jsonl to {out}")
