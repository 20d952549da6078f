#!/usr/bin/env bash
# Every measurement that issues 16 and 18 still need, in one command, on whatever CPU this is: the
# few-step bar (<= 60 ms, AVX2 EPYC), the built-in image (<= 0.4 s, AVX2 EPYC), the SD1.5 exact path
# against diffusers (<= 0.7x on the AVX2 EPYC, <= 0.3x with AMX) with the approximations beside it
# (<= 0.5x at >= 30 dB), and the SD1.5 step profile against the machine's GEMM rate (80%).
#
#   benchmarks/cpu_targets.sh [--with-sdcpp]      # alone on the CPU; about 45 min on the AVX2 EPYC
#   benchmarks/cpu_targets.sh --dry-run           # print the commands, run and write nothing
#
# Results go to docs/results/cpu-targets/<cpu kind>-<date>/ (a new folder; it never overwrites),
# one JSON or markdown file per step and a log of every command. The ratios that decide each target
# are read inside one file, measured in one process: read them there, not across files.
set -euo pipefail
cd "$(dirname "$0")/.."

sdcpp=0 dry=0
for arg in "$@"; do
    case "$arg" in
        --with-sdcpp) sdcpp=1 ;;
        --dry-run) dry=1 ;;
        *) echo "cpu_targets.sh: unknown option $arg (it takes --with-sdcpp and --dry-run)" >&2; exit 2 ;;
    esac
done

(( dry )) || make -s .venv/.installed-test >/dev/null     # marble with its test extras: diffusers is the oracle
py=.venv/bin/python
flags=$(grep -m1 '^flags' /proc/cpuinfo)
if [[ $flags == *amx_bf16* ]]; then kind=amx; dtype=bf16
elif [[ $flags == *avx512_bf16* ]]; then kind=avx512-bf16; dtype=bf16
else kind=avx2; dtype=fp32; fi
out=docs/results/cpu-targets/$kind-$(date -u +%Y%m%d-%H%M)
log=$out/commands.log
if (( dry )); then
    log=/dev/null
else
    mkdir -p "$(dirname "$out")"
    mkdir "$out"                             # fails if it exists: never over earlier results
    $py -c "from marble.cpu_features import cpu_label; print(cpu_label())" | tee "$out/cpu.txt"
fi

step() {    # step NAME COMMAND...: run it, its output in NAME.md, its time in the log
    local name=$1; shift
    echo "== $name: $*" | tee -a "$log"
    (( dry )) && return
    local start=$SECONDS
    "$@" > "$out/$name.md" 2>> "$log"
    echo "   $((SECONDS - start)) s" | tee -a "$log"
}

# issue 16: the 4-step image; issue 18: the built-in 15-step image (both fp32, traced and eager)
step few-step-speed $py benchmarks/few_step_speed.py --models builtin,builtin-lcm --rounds 30 --threads 2 \
    --json "$out/few-step-speed.json"
for model in builtin-lcm builtin; do
    step "bench-$model" .venv/bin/marble bench --model $model --runs 15 --cold-runs 0 --trace --threads 2 \
        --dtype fp32 --json "$out/bench-$model.json"
done
# issue 18: where an SD1.5 step goes, against this machine's own GEMM rate
step profile-sd15 $py benchmarks/profile_unet.py --size 512 --threads 2 --calls 2
# issue 18: SD1.5 at 512², 20 Euler steps, CFG 7.5: marble fp32 and diffusers fp32 (and marble bf16
# where it is native), and the approximations (ToMe 0.5 + int8) beside them, in one process
bf16=(); [[ $dtype == fp32 ]] && bf16=(--no-bf16)
step bench-sd15 .venv/bin/marble bench --threads 2 --tome 0.5 --quantize int8 "${bf16[@]}" \
    --json "$out/bench-sd15.json"
if (( sdcpp )); then
    step sdcpp-compare make -s bench-sdcpp BENCH_SDCPP_ARGS="--size 512 --steps 3 --cfg 7.5 --threads 2 \
        --json $out/sdcpp-compare.json --logs $out/sdcpp-logs"
fi
(( dry )) || echo "results in $out"
