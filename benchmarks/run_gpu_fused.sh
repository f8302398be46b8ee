#!/usr/bin/env bash
# The GPU session behind the fused first block's figures: correctness on the GPU, the first
# block alone, memory at the peak, then banded against whole blocks in the same runs.
# Usage: benchmarks/run_gpu_fused.sh OUT_DIR [vit_b|vit_h|bands|budgets|final]
# (vit_h also times the cache build, ViT-B, onto the machine's disk and a RAM disk)
set -uo pipefail
out=${1:?output folder}
backbone=${2:-vit_b}
source "$(dirname "$0")/gpu_session.sh"
start_session "$out"
if [ "$backbone" = vit_b ]; then
    python3 benchmarks/tiles_speed.py 2>&1 | grep -v -i warn > "$out/tiles_speed.txt"
    for precision in fp32 bf16; do
        python3 benchmarks/memory_peak.py cad-cache $precision 2>&1 | grep -v -i warn
    done > "$out/memory_peak.txt"
    bench_into "$out/vit_b_fused.json" --backbones vit_b \
        --methods cad-untiled cad cad-cache-untiled cad-cache sam-adapter-paper \
        --precision fp32 bf16 --steps 8
    # the same pair again: processes differ by up to 20 % in a CPU-bound step
    bench_into "$out/vit_b_fused_repeat.json" \
        --backbones vit_b --methods cad-cache cad-cache-untiled \
        --precision fp32 bf16 --steps 8
elif [ "$backbone" = bands ]; then  # the cached step by band budget, and where it spends
    python3 benchmarks/gpu_checks.py > "$out/gpu_checks.json"; echo "checks: rc $?"
    for precision in fp32 bf16; do
        python3 benchmarks/memory_peak.py cad-cache $precision adapter_tile_mib=128 2>&1 |
            grep -v -i warn
    done > "$out/memory_peak_128mib.txt"
    python3 benchmarks/profile_step.py cad-cache bf16 2>&1 | grep -v -i warn > "$out/profile.txt"
    bench_into "$out/vit_b_bands_64mib.json" \
        --backbones vit_b --methods cad-cache-untiled cad-cache \
        --precision fp32 bf16 --steps 8
    for mib in 96 128; do
        bench_into "$out/vit_b_bands_${mib}mib.json" \
            --backbones vit_b --methods cad-cache cad --precision fp32 bf16 \
            --steps 8 --set adapter_tile_mib=$mib
    done
elif [ "$backbone" = budgets ]; then  # even bands: the cached step by band budget
    # (--set overrides cad-cache-untiled's budget of 0 too: each budget runs twice, in two
    # processes, which shows how far two processes of the same step differ; cadsam bench
    # now refuses such a contradiction, so this mode no longer runs as it stands)
    for mib in 64 96 128; do
        bench_into "$out/vit_b_even_${mib}mib.json" \
            --backbones vit_b --methods cad-cache-untiled cad-cache \
            --precision fp32 bf16 --steps 8 --set adapter_tile_mib=$mib
    done
elif [ "$backbone" = final ]; then  # the default of 128 MiB bands, ViT-B and ViT-H
    for precision in fp32 bf16; do
        python3 benchmarks/memory_peak.py cad-cache $precision 2>&1 | grep -v -i warn
    done > "$out/memory_peak.txt"
    bench_into "$out/vit_b_128mib.json" \
        --backbones vit_b --methods cad-untiled cad cad-cache-untiled cad-cache \
        --precision fp32 bf16 --steps 8
    bench_into "$out/vit_h_128mib.json" \
        --backbones vit_h --methods cad-untiled cad cad-cache-untiled cad-cache \
        --precision fp32 --steps 5
    # the cached pair again: processes differ by up to 20 % in a CPU-bound step
    bench_into "$out/vit_b_128mib_repeat.json" \
        --backbones vit_b --methods cad-cache cad-cache-untiled \
        --precision fp32 bf16 --steps 8
else
    bench_into "$out/vit_h_fused.json" \
        --backbones vit_h --methods cad-untiled cad cad-cache-untiled cad-cache \
        --precision fp32 --steps 5
    python3 benchmarks/cache_speed.py /tmp/cache-disk 1536 vit_b > "$out/cache_disk.jsonl"
    python3 benchmarks/cache_speed.py /dev/shm/cache 1536 vit_b > "$out/cache_ramdisk.jsonl"
fi
