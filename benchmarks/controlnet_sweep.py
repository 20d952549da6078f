"""The sketch ControlNet at sampling time: `marble eval --control sketch` over a grid of (weight,
control mode) on chosen categories, and one table of the results. No retraining: every point is
the shipped ControlNet with other unit settings (docs/controlnet-training.md#a-sweep-at-sampling-time).

    python benchmarks/controlnet_sweep.py --out runs/cn-sweep --threads 2
    python benchmarks/controlnet_sweep.py --out runs/cn-sweep --table-only     # the table again

Each grid point is one `marble eval --control sketch --control-only --categories ...` writing
OUT/w{weight}-{mode}.json (-s{start}-e{end} added when not 0..1); a point whose JSON exists is not run again (an interrupted sweep resumes
where it stopped), since marble never overwrites a file. The run without the ControlNet does not
depend on the grid, so it runs once, as a plain `marble eval --categories ...` (OUT/without.json).
The table (stdout and OUT/table.md) gives per category GenEval / strict accuracy as
benchmarks/eval_table.py does, the mean over the chosen categories, and each run's seconds.
`--dry-run` prints the commands and the estimated wall time, and runs nothing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from marble.eval.control import BAR
from marble.eval.prompts import build_prompts, pick_categories, scale_counts

MODES = {"balanced": "Balanced", "prompt": "My prompt is more important", "control": "ControlNet is more important"}
# seconds per generated image, built-in model, DPM++ 2M Karras 15 steps, 2 threads (session 10's held-out
# eval with control: 612 distinct images in 573.7 s with the ControlNet, 612 in 417.6 s without)
S_CONTROLLED, S_PLAIN = 0.94, 0.68


def point_name(weight: float, mode: str, start: float = 0.0, end: float = 1.0) -> str:
    span = "" if (start, end) == (0.0, 1.0) else f"-s{start:g}-e{end:g}"
    return f"w{weight:g}-{mode}{span}"


def eval_command(args, categories: str, weight: float | None = None, mode: str | None = None) -> list[str]:
    """The `marble eval` command of one grid point (weight None: the run without the ControlNet)."""
    name = "without" if weight is None else point_name(weight, mode, args.start, args.end)
    cmd = [sys.executable, "-m", "marble", "eval", "--model", args.model, "--split", args.split, "--seeds",
           str(args.seeds), "--prompts", str(args.prompts), "--threads", str(args.threads), "--categories", categories,
           "--json", str(args.out / f"{name}.json")]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if weight is not None:
        cmd += ["--control", "sketch", "--control-only", "--control-weight", f"{weight:g}", "--control-mode", mode,
                "--control-start", f"{args.start:g}", "--control-end", f"{args.end:g}"]
        if args.control_model is not None:
            cmd += ["--control-model", str(args.control_model)]
    return cmd


def generated_images(split: str, prompts: int, categories: tuple[str, ...], seeds: int) -> int:
    """Images one eval generates: a prompt text that recurs is drawn once per seed (run_benchmark)."""
    counts = {c: n for c, n in scale_counts(prompts).items() if c in categories}
    return len({p.text for p in build_prompts(split, counts)}) * seeds


def scored(report: dict) -> dict:
    """The scored part of an eval JSON: with_control for a controlled run, else the report itself."""
    return report["with_control"] if report.get("control") else report


def table(rows: list[tuple[str, dict]], categories: tuple[str, ...]) -> str:
    """rows: (label, eval JSON). Per category GenEval / strict, their means, images and seconds."""
    heads = [f"{c} (bar {BAR[c]:g})" if c in BAR else c for c in categories]
    lines = ["| run | weight | mode | start–end | " + " | ".join(heads) + " | mean | images | s |",
             "|---|---:|---|---|" + "---:|" * (len(categories) + 3)]
    for label, report in rows:
        result, unit = scored(report), report.get("control_settings")
        cats = result["categories"]
        cells = [f"{cats[c]['accuracy']:.3f} / {cats[c]['strict_accuracy']:.3f}" if c in cats else ""
                 for c in categories]
        setting = ([f"{unit['weight']:g}", unit["mode"], f"{unit['start']:g}–{unit['end']:g}"] if unit
                   else ["—", "no ControlNet", "—"])
        lines.append(f"| {label} | " + " | ".join(setting) + " | " + " | ".join(cells)
                     + f" | **{result['overall']:.3f} / {result['overall_strict']:.3f}** | {result['images']} "
                     f"| {result['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON files and table.md")
    ap.add_argument("--weights", default="1,1.5,2", help="comma-separated ControlNet weights, 0..2")
    ap.add_argument("--modes", default="balanced,prompt,control", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--categories", default="position,color_attr")
    ap.add_argument("--start", type=float, default=0.0, help="guidance start for every point")
    ap.add_argument("--end", type=float, default=1.0, help="guidance end for every point")
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--control-model", type=Path, default=None, help="default: eval's (the shipped sketch ControlNet)")
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=200, help="as eval's --prompts: the full run's size")
    ap.add_argument("--steps", type=int, default=None, help="default: the model's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-without", action="store_true", help="skip the run without the ControlNet")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and the time estimate only")
    ap.add_argument("--table-only", action="store_true", help="only the table, from the JSON files in --out")
    args = ap.parse_args(argv)
    try:
        keep = pick_categories(args.categories)
        weights = [float(w) for w in args.weights.split(",")]
        modes = [m.strip() for m in args.modes.split(",")]
    except ValueError as e:
        ap.error(str(e))
    if any(m not in MODES for m in modes):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    categories = ",".join(keep)
    points = [(w, m) for w in weights for m in modes]
    runs = ([] if args.no_without else [("without", eval_command(args, categories))]) + [
        (point_name(w, m, args.start, args.end), eval_command(args, categories, w, m)) for w, m in points]
    if not args.table_only:
        todo = [(name, cmd) for name, cmd in runs if not (args.out / f"{name}.json").exists()]
        n = generated_images(args.split, args.prompts, keep, args.seeds)
        estimate = sum(n * (S_PLAIN if name == "without" else S_CONTROLLED) for name, _ in todo)
        print(f"{len(todo)} of {len(runs)} evals to run, {n} images each: about {estimate / 60:.0f} min "
              "(built-in model, 2 threads)", file=sys.stderr)
        for name, cmd in todo:
            print(" ".join(cmd), file=sys.stderr)
            if not args.dry_run:
                args.out.mkdir(parents=True, exist_ok=True)
                subprocess.run(cmd, check=True)
        if args.dry_run:
            return
    rows = [(name, json.loads((args.out / f"{name}.json").read_text())) for name, _ in runs
            if (args.out / f"{name}.json").exists()]
    text = table(rows, keep)
    print(text)
    if rows:
        (args.out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
