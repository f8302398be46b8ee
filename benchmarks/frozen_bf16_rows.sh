#!/usr/bin/env bash
# One device call: CAD's bf16 training rows with the frozen encoder held in bf16 (frozen_bf16,
# auto's choice) and, in the same run, held in fp32; then ViT-L, which no recorded row holds,
# to check `cadsam plan` against. Each bench call under its own limit, so a slow one costs
# only its rows. Results in $OUT (or /tmp): one folder per call and bench_calls.txt. Arguments
# name the calls to make (default: held unheld vit_l).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
wanted=${*:-held unheld vit_l}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
bench() {
    local limit=$1 name=$2
    shift 2
    [[ " $wanted " == *" $name "* ]] || return 0
    timeout "$limit" python3 -m cadsam bench --out "$out/$name" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? in ${SECONDS}s (cadsam bench $*)" | tee -a "$out/bench_calls.txt"
}
bench 200 held --backbones vit_b vit_h --variants cad --precisions bf16
bench 180 unheld --backbones vit_b vit_h --variants cad --precisions bf16 --set frozen_bf16=false
bench 110 vit_l --backbones vit_l --variants cad --precisions bf16
