"""Merge image folders (metadata.jsonl layout) into a new one, each file name given a prefix: a LoRA's
own images plus regularisation images of the base world (prior preservation) in one training folder.

    python benchmarks/merge_folders.py OUT PREFIX=FOLDER [PREFIX=FOLDER ...]
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    if out.exists():
        raise SystemExit(f"{out} already exists; not overwritten")
    out.mkdir(parents=True)
    lines = []
    for arg in sys.argv[2:]:
        prefix, _, folder = arg.partition("=")
        for line in (Path(folder) / "metadata.jsonl").read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                shutil.copyfile(Path(folder) / record["file_name"], out / (prefix + record["file_name"]))
                lines.append(json.dumps({**record, "file_name": prefix + record["file_name"]}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} images to {out}")


if __name__ == "__main__":
    main()
