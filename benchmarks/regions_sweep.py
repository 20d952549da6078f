"""Regions (marble.adapters.regions) over a grid of (strength, decay): the sketch ControlNet's eval
with the caption's colour phrases bound to the sketch's colours, on chosen categories, and one
table. How the default decay and the documented strength were picked
(docs/controlnet-training.md#regions).

    python benchmarks/regions_sweep.py --out runs/regions-sweep --threads 2
    python benchmarks/regions_sweep.py --out runs/regions-sweep --table-only     # every point in OUT

Each point runs in this process (so that it can set regions.DECAY, CONTROLNETS and SELF_ATTENTION) as `marble eval --control
sketch --control-only --regions S` does, on seeds --first-seed.. (default 4, 5: not the 0..3 that
`marble eval --seeds 4` reports, so the pick and the report use different images) and writes
OUT/s{strength}-d{decay}[-cn][-self][-w{weight}-{mode}][-cfg{cfg}].json; a point whose JSON exists is read, not run (a sweep resumes).
Strength 0 is the ControlNet alone. Rows: per category GenEval / strict, their mean.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from marble.adapters import regions
from marble.cli.eval import control_eval
from marble.eval.control import BAR
from marble.eval.prompts import build_prompts, pick_categories, scale_counts

CONTROLNET = Path("models/controlnet/builtin-sketch.safetensors")


def point_name(strength: float, decay: float, args) -> str:
    extra = ("-cn" if args.controlnets else "") + ("-self" if args.self_attention else "")
    if args.weight is not None or args.mode is not None:
        extra += f"-w{args.weight or 1:g}-{args.mode or 'balanced'}"
    if args.cfg is not None:
        extra += f"-cfg{args.cfg:g}"
    if args.scenes != "prompt":
        extra += f"-scenes-{args.scenes}"
    return f"s{strength:g}-d{decay:g}{extra}"


def table(rows: list[tuple[str, dict]], categories: tuple[str, ...]) -> str:
    heads = [f"{c} (bar {BAR[c]:g})" if c in BAR else c for c in categories]
    lines = ["| strength | decay | ControlNets' attention | self-attention | ControlNet weight, mode, CFG | "
             + " | ".join(heads) + " | mean | images | s |", "|---:|---:|---|---|---|" + "---:|" * (len(categories) + 3)]
    for _, report in rows:
        result, unit = report["with_control"], report["control_settings"]
        cats = result["categories"]
        cells = [f"{cats[c]['accuracy']:.3f} / {cats[c]['strict_accuracy']:.3f}" for c in categories]
        cn = "yes" if report.get("regions_controlnets") else "no"
        sa = "yes" if report.get("regions_self_attention") else "no"
        lines.append(f"| {unit['regions']:g} | {report['regions_decay']:g} | {cn} | {sa} | {unit['weight']:g}, {unit['mode']}, {report['cfg'] or 'default'} | "
                     + " | ".join(cells)
                     + f" | **{result['overall']:.3f} / {result['overall_strict']:.3f}** | {result['images']} "
                     f"| {result['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--strengths", default="0,0.5,1,2")
    ap.add_argument("--decays", default="0,1,2")
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--categories", default="counting,position,color_attr")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--controlnets", action="store_true", help="also modulate the ControlNet's own cross-attention")
    ap.add_argument("--self-attention", action="store_true", help="also modulate the U-Net's self-attention")
    ap.add_argument("--weight", type=float, default=None, help="the ControlNet unit's weight (default 1)")
    ap.add_argument("--mode", default=None, help="its control mode (default balanced)")
    ap.add_argument("--cfg", type=float, default=None, help="the CFG scale (default: the model's)")
    ap.add_argument("--control-model", type=Path, default=CONTROLNET, help="the ControlNet (default: the shipped one)")
    ap.add_argument("--scenes", default="prompt", choices=("prompt", "image"),
                    help="one scene a prompt (default) or one an image (marble eval --scenes)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    categories = tuple(c.strip() for c in args.categories.split(","))
    pick_categories(",".join(categories))
    full = build_prompts(args.split, scale_counts(args.prompts))   # the whole run's, for each text's scene
    prompts = [p for p in full if p.category in categories]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table_only:                       # every point in OUT, whatever grid made it
        rows = sorted(((f.stem, json.loads(f.read_text())) for f in args.out.glob("s*-d*.json")),
                      key=lambda r: (r[1].get("regions_controlnets", False), r[1].get("regions_self_attention", False),
                                     r[1]["control_settings"]["weight"], r[1]["cfg"] or 0,
                                     r[1]["regions_decay"], r[1]["control_settings"]["regions"]))
        text = table(rows, categories)
        print(text)
        (args.out / "table.md").write_text(text + "\n")
        return 0
    rows = []
    for decay in (float(d) for d in args.decays.split(",")):
        for strength in (float(s) for s in args.strengths.split(",")):
            if strength == 0 and rows and any(r[1]["control_settings"]["regions"] == 0 for r in rows):
                continue                      # strength 0 does not depend on the decay: once
            path = args.out / f"{point_name(strength, 0 if strength == 0 else decay, args)}.json"
            if not path.exists():
                regions.DECAY, regions.CONTROLNETS, regions.SELF_ATTENTION = decay, args.controlnets, args.self_attention
                unit = {k: v for k, v in (("weight", args.weight), ("mode", args.mode)) if v is not None}
                report, _ = control_eval("builtin", args.control_model.resolve(), prompts, seeds, args.split, None, None, args.cfg,
                                         args.threads, [], args.dtype, False, False, unit=unit, baseline=False,
                                         regions=strength, scenes_per=args.scenes,
                                         full_prompts=full)
                report["regions_decay"], report["regions_controlnets"] = decay, args.controlnets
                report["regions_self_attention"] = args.self_attention
                tmp = path.with_suffix(".part")
                tmp.write_text(json.dumps(report, indent=1) + "\n")
                tmp.rename(path)
            rows.append((path.stem, json.loads(path.read_text())))
    text = table(rows, categories)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
