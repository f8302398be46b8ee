#!/usr/bin/env bash
# One device call of about nine minutes:
#   1. the GPU tier capped at 24 GiB (CADSAM_GPU_MEMORY_GIB=24), and beside it what needs only
#      memory figures, which other processes on the GPU leave as they are: plan_check.py
#      (plan against bench where no recorded row is) and ViT-B `cad` bf16 with the frozen
#      encoder held in bf16 and, in the same run, in fp32;
#   2. then, alone on the GPU, the frozen encoder's attention formulations timed
#      (experiments/encoder_attention.py), whose speeds need the GPU to themselves.
# Everything lands in $OUT: gpu_tier.log, gpu.txt and results.tgz (a device call returns few files).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
work=$(mktemp -d)
mkdir -p "$work/plan_check" "$work/frozen_bf16"
bench() {  # name limit args...: one bench run under its own limit
    local name=$1 limit=$2
    shift 2
    timeout "$limit" env PYTHONPATH="$PWD/src" python3 -m cadsam bench --out "$work/frozen_bf16/$name" \
        --backbones vit_b --variants cad --precisions bf16 "$@" > "$work/frozen_bf16/$name.log" 2>&1
    echo "$name: exit $? (cadsam bench ... $*)" >> "$work/frozen_bf16/calls.txt"
}
{
    PYTHONPATH=$PWD/src timeout 200 python3 benchmarks/plan_check.py --out "$work/plan_check" \
        --within 190 --limit 90 > "$work/plan_check/stdout.txt" 2>&1
    bench held 65
    bench unheld 65 --set frozen_bf16=false
} &
CADSAM_GPU_MEMORY_GIB=24 timeout 330 benchmarks/gpu_tier.sh > /dev/null 2>&1
echo "tier capped at 24 GiB: exit $?" >> "$out/gpu.txt"
wait
tar czf "$out/results.tgz" -C "$work" --exclude='*.png' .  # kept if the call ends here
PYTHONPATH=$PWD/src timeout 200 python3 benchmarks/experiments/encoder_attention.py --batch 4 \
    > "$work/encoder_attention_b4.jsonl" 2> "$work/encoder_attention.err"
tar czf "$out/results.tgz" -C "$work" --exclude='*.png' .
grep -E "^(FAILED|ERROR)|passed|failed" "$out/gpu_tier.log" | tail -n 12
cat "$work/plan_check/plan_check.md" "$work/frozen_bf16/calls.txt" "$work/encoder_attention_b4.jsonl"
