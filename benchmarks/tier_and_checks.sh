#!/usr/bin/env bash
# One device call of about nine minutes, each job alone on the GPU and under its own limit:
#   1. the GPU tier capped at 24 GiB (CADSAM_GPU_MEMORY_GIB=24);
#   2. CAD's bf16 ViT-B row with the frozen encoder held in bf16 (auto's choice) and, in the
#      same run, in float32 (--set frozen_bf16=false);
#   3. a kernel profile of the graphed ViT-B step from the cache (profile_step.py);
#   4. the prompted steps, 8 boxes an image (decoder-box8, cad-box8): plan's speed for --prompt.
# The limits sum to 660 s, past a call's 600; the tier alone took 192 s of its 280
# (results/2026-12-08_H100_827faa9/). Where a call runs slow, the last job is the one cut.
# Jobs beside the tier slowed it past its limit (results/2026-12-08_H100_e72c878/), hence one
# at a time. Everything lands in $OUT: gpu_tier.log, gpu.txt and results.tgz (a device call
# returns few files), packed again after each job so that a call cut short keeps its results.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
work=$(mktemp -d)
pack() { tar czf "$out/results.tgz" -C "$work" --exclude='*.png' .; }
CADSAM_GPU_MEMORY_GIB=24 timeout 280 benchmarks/gpu_tier.sh > /dev/null 2>&1
echo "tier capped at 24 GiB: exit $?" >> "$out/gpu.txt"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
bench() {  # name limit args...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 -m cadsam bench --out "$work/$name" --backbones vit_b \
        --precisions bf16 "$@" > "$work/$name.log" 2>&1
    echo "$name: exit $? at ${SECONDS}s (cadsam bench ... $*)" >> "$work/calls.txt"
    pack
}
bench held 100 --variants cad
bench unheld 100 --variants cad --set frozen_bf16=false
timeout 80 python3 benchmarks/profile_step.py cad-cache bf16 > "$work/profile_cad_cache_bf16.txt" 2>&1
echo "profile: exit $? at ${SECONDS}s" >> "$work/calls.txt"
pack
bench boxes 100 --variants decoder-box8 cad-box8
grep -E "^(FAILED|ERROR)|passed|failed" "$out/gpu_tier.log" | tail -n 12
cat "$work/calls.txt"
