#!/bin/bash
# Measure a built-in model candidate (issue 20) the way docs/results/v2-candidates.md reports it:
# both eval splits side by side (200 prompts x 4 seeds, one thread each, one per core), the layout
# probe, the speed bench, and with --curve the held-out learning curve of its EMA snapshots.
#   benchmarks/eval_candidate.sh builtin-v2-grounding [--curve]
# Reads runs/NAME/model.safetensors (and runs/NAME/snapshots/), writes docs/results/NAME/.
# About 20 minutes on the 2-core EPYC, 5 more with --curve. Run it alone: it uses both cores.
set -euo pipefail
name=${1:?usage: benchmarks/eval_candidate.sh NAME [--curve]}
curve=${2:-}
cd "$(dirname "$0")/.."
model=runs/$name/model.safetensors
out=docs/results/$name
logs=runs/$name/eval-logs
[ -f "$model" ] || { echo "error: no $model" >&2; exit 2; }
mkdir -p "$out" "$logs"
marble=.venv/bin/marble
export OMP_NUM_THREADS=1
# fp32 unless told: the shipped model's and earlier candidates' evals ran in fp32, and `--dtype auto`
# is bf16 on CPUs with native bf16, which moves a few verdicts (docs/controlnet-training.md)
export MARBLE_DTYPE=${MARBLE_DTYPE:-fp32}

for split in heldout seen; do
  echo "$marble eval --model $model --split $split --seeds 4 --prompts 200 --threads 1 --probe \
--json $out/eval-$split.json --sheet $out/sheet-$split.png"
done
taskset -c 0 $marble eval --model "$model" --split heldout --seeds 4 --prompts 200 --threads 1 --probe \
  --json "$out/eval-heldout.json" --sheet "$out/sheet-heldout.png" > "$logs/heldout.log" 2>&1 &
taskset -c 1 $marble eval --model "$model" --split seen --seeds 4 --prompts 200 --threads 1 --probe \
  --json "$out/eval-seen.json" --sheet "$out/sheet-seen.png" > "$logs/seen.log" 2>&1 &
wait
echo "evals done $(date -u)"

if [ "$curve" = --curve ]; then    # is position still rising when the budget ends?
  snaps=(runs/"$name"/snapshots/step-*.safetensors)
  for ((i = 0; i < ${#snaps[@]}; i++)); do
    s=${snaps[$i]}
    taskset -c $((i % 2)) $marble eval --model "$s" --split heldout --seeds 2 --prompts 60 --threads 1 \
      --json "$out/curve-$(basename "$s" .safetensors).json" > "$logs/curve-$i.log" 2>&1 &
    if (( i % 2 == 1 )); then wait; fi
  done
  wait
  echo "curve done $(date -u)"
fi

export OMP_NUM_THREADS=2
.venv/bin/python benchmarks/layout_source.py --model "$model" > "$out/layout-source.md" 2> "$logs/layout.err"
$marble bench --model "$model" --runs 9 --cold-runs 5 --json "$out/speed.json" > "$logs/speed.log" 2>&1
cp runs/"$name"/loss.png "$out/loss.png"
cp runs/"$name"/samples/final.png "$out/samples-final.png"
echo "all done $(date -u)"
