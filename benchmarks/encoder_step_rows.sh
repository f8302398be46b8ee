#!/usr/bin/env bash
# One device call, alone on the GPU: CAD's bf16 training step through the frozen encoder with
# its attention as it is (fused) and with flex_attention, ViT-B then ViT-H, each bench call
# under its own limit; then a kernel profile of the graphed step from the cache
# (profile_step.py). Everything lands in $OUT as results.tgz, with the calls' summary printed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
work=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$work/gpu.txt"
bench() {  # name limit args...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 -m cadsam bench --out "$work/$name" --variants cad --precisions bf16 \
        "$@" > "$work/$name.log" 2>&1
    echo "$name: exit $? at ${SECONDS}s (cadsam bench --variants cad --precisions bf16 $*)" \
        | tee -a "$work/calls.txt"
}
bench vit_b-fused 75 --backbones vit_b
bench vit_b-flex 75 --backbones vit_b --set flex_attention=true
bench vit_h-fused 90 --backbones vit_h
bench vit_h-flex 90 --backbones vit_h --set flex_attention=true
timeout 90 python3 benchmarks/profile_step.py cad-cache bf16 > "$work/profile_cad_cache_bf16.txt" 2>&1
echo "profile: exit $? at ${SECONDS}s" | tee -a "$work/calls.txt"
tar czf "$out/results.tgz" -C "$work" --exclude='*.png' .
for f in "$work"/*/bench.json; do
    python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['results'][0]
print(sys.argv[1].split('/')[-2], r['peak_allocated_mib'], r['images_per_second'])" "$f"
done
