#!/usr/bin/env bash
# The GPU session behind the fused first block's figures: correctness on the GPU, the first
# block alone, memory at the peak, then banded against whole blocks in the same runs.
# Usage: benchmarks/run_gpu_fused.sh OUT_DIR [vit_b|vit_h]
set -uo pipefail
out=${1:?output folder}
backbone=${2:-vit_b}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
export PYTHONUNBUFFERED=1
if [ "$backbone" = vit_b ]; then
    python3 benchmarks/gpu_checks.py > "$out/gpu_checks.json"; echo "checks: rc $?"
    python3 benchmarks/tiles_speed.py 2>&1 | grep -v -i warn > "$out/tiles_speed.txt"
    for precision in fp32 bf16; do
        python3 benchmarks/memory_peak.py cad-cache $precision 2>&1 | grep -v -i warn
    done > "$out/memory_peak.txt"
    cadsam bench --backbones vit_b \
        --methods cad-untiled cad cad-cache-untiled cad-cache sam-adapter-paper \
        --precision fp32 bf16 --steps 8 --out /tmp/bench-b > /dev/null
    cp /tmp/bench-b/bench.json "$out/vit_b_fused.json"
else
    cadsam bench --backbones vit_h --methods cad-untiled cad cad-cache-untiled cad-cache \
        --precision fp32 --steps 5 --out /tmp/bench-h > /dev/null
    cp /tmp/bench-h/bench.json "$out/vit_h_fused.json"
fi
