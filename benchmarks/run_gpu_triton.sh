#!/usr/bin/env bash
# The GPU session behind the first block's Triton kernels. checks: the kernels against the
# banded torch passes and float64, and the adapter's GPU time with and without them. bench:
# the CUDA-graph step against the eager one with them (graph_checks.py), the training step's
# speed with and without them, and where the graphed step's time goes.
# more: the graphed step of sam-adapter-paper, the fast paths' checks against float64, ViT-H's
# cached step, and ViT-B's step with the encoder.
# tables PRECISION: ViT-B's rows of the memory and speed tables (benchmarks/summarize.py).
# nockpt: the graphed cached step without recomputing whole blocks (train's default).
# Usage: benchmarks/run_gpu_triton.sh OUT_DIR [checks|bench|more|tables fp32|tables bf16|nockpt]
set -uo pipefail
out=${1:?output folder}
mode=${2:-checks}
source "$(dirname "$0")/gpu_session.sh"
start_session "$out"
python3 -c "import triton; print('triton', triton.__version__)" | tee -a "$out/gpu.txt"
if [ "$mode" = checks ]; then
    python3 benchmarks/triton_block.py 2>&1 | grep -v -i warn > "$out/triton_block.txt"
    echo "triton block: rc $?"; head -20 "$out/triton_block.txt"
elif [ "$mode" = bench ]; then
    python3 benchmarks/graph_checks.py > "$out/graph_checks.json"; echo "graph checks: rc $?"
    # the kernels are the default on CUDA; the second run turns them off
    bench_into "$out/vit_b_triton.json" \
        --backbones vit_b --methods cad-cache cad-cache-graph sam-adapter-paper \
        --precision bf16 fp32 --steps 10
    bench_into "$out/vit_b_no_triton.json" --backbones vit_b --methods cad-cache cad-cache-graph \
        --precision bf16 fp32 --steps 10 --set triton_kernels=false
    python3 benchmarks/profile_step.py cad-cache-graph bf16 2>&1 | grep -v -i warn \
        > "$out/profile_graph_bf16.txt"
elif [ "$mode" = more ]; then
    python3 benchmarks/graph_checks.py "sam-adapter-paper bf16 (checkpointed blocks)" \
        > "$out/graph_checks_sam_adapter.json"; echo "graph checks: rc $?"
    python3 benchmarks/gpu_checks.py > "$out/gpu_checks.json"; echo "gpu checks: rc $?"
    bench_into "$out/vit_h_triton.json" \
        --backbones vit_h --methods cad-cache cad-cache-graph sam-adapter-paper \
        --precision bf16 --steps 5
    bench_into "$out/vit_b_encoder_triton.json" \
        --backbones vit_b --methods cad cad-fast --precision bf16 --steps 10
elif [ "$mode" = tables ]; then
    precision=${3:?precision}
    bench_into "$out/vit_b_tables_$precision.json" \
        --backbones vit_b --methods decoder-plain decoder cad-plain cad cad-fast \
        cad-cache sam-adapter-paper-plain sam-adapter-paper sam-adapter-paper-ckpt \
        sam-adapter-ckpt --precision "$precision" --steps 8
elif [ "$mode" = nockpt ]; then
    bench_into "$out/vit_b_triton_nockpt.json" \
        --backbones vit_b --methods cad-cache-graph cad-cache-nockpt-graph \
        sam-adapter-paper --precision bf16 fp32 --steps 10
fi
