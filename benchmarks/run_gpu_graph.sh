#!/usr/bin/env bash
# The GPU session behind the CUDA-graph step's figures: the graphed step against the eager
# one (in-process and through cadsam train), then its speed beside sam-adapter-paper's.
# Usage: benchmarks/run_gpu_graph.sh OUT_DIR [checks|bench]
# (checks also times the adapter's kernels as they stand and as they were, and reruns the
# fast paths' checks against float64)
set -uo pipefail
out=${1:?output folder}
mode=${2:-checks}
source "$(dirname "$0")/gpu_session.sh"
start_session "$out"
if [ "$mode" = checks ]; then
    python3 benchmarks/adapter_kernels.py 2>&1 | grep -v -i warn > "$out/adapter_kernels.txt"
    python3 benchmarks/gpu_checks.py > "$out/gpu_checks.json"; echo "gpu checks: rc $?"
    python3 benchmarks/graph_checks.py > "$out/graph_checks.json"; echo "graph checks: rc $?"
    python3 benchmarks/graph_train_cli.py /tmp/graph-cli > "$out/graph_train_cli.json" \
        2> "$out/graph_train_cli.log"; echo "train cli: rc $?"
    tail -3 "$out/graph_train_cli.log"
    bench_into "$out/vit_b_graph_bf16.json" --backbones vit_b \
        --methods cad-cache cad-cache-graph cad-cache-untiled-graph sam-adapter-paper \
        --precision bf16 --steps 10
    python3 benchmarks/profile_step.py cad-cache-graph bf16 2>&1 | grep -v -i warn \
        > "$out/profile_graph_bf16.txt"
elif [ "$mode" = bench ]; then
    bench_into "$out/vit_b_graph.json" --backbones vit_b \
        --methods cad-cache cad-cache-untiled cad-cache-graph cad-cache-untiled-graph \
        sam-adapter-paper --precision fp32 bf16 --steps 10
    bench_into "$out/vit_h_graph.json" \
        --backbones vit_h --methods cad-cache cad-cache-graph sam-adapter-paper \
        --precision bf16 --steps 5
fi
