#!/usr/bin/env bash
# The GPU session behind the fused AdamW of the graphed step, the compiled mask decoder and
# the compiled whole adapter blocks.
# levers: what each gains in the graphed step from the cache (step_levers.py; blocks: the
# adapter's later blocks compiled as well, with and without recomputing them); bench: ViT-B's
# cached steps against sam-adapter-paper as cadsam bench runs them now (PRECISION, default
# bf16); checks: the graphed step (fused AdamW, compiled decoder and blocks) against the plain
# eager one (graph_checks.py), and where the graphed step's time goes now.
# pooled: after the later blocks took over pooling their input (the previous block's output):
# the graphed step's time, the graph checks, where the time goes (the graphed step, and the
# same step eager by operator), and the bench's ViT-B bf16 rows.
# compiled PRECISION: the rows of the memory and speed tables that the compiled decoder and
# blocks change (the plain rows stay from run_gpu_triton.sh's tables), with the graphed cached
# step that train runs by default with --cuda-graph.
# repeat: the cached graphed step against sam-adapter-paper, ViT-B bf16 twice, then ViT-H.
# grads: the launch settings of the first block's weight-gradient kernel (triton_block.py).
# Usage: benchmarks/run_gpu_decoder.sh OUT_DIR [levers|blocks|bench [PRECISION]|checks|pooled|grads|compiled PRECISION|repeat]
set -uo pipefail
out=${1:?output folder}
mode=${2:-levers}
source "$(dirname "$0")/gpu_session.sh"
start_session "$out"
if [ "$mode" = levers ]; then
    python3 benchmarks/step_levers.py "cad-nockpt" "cad-nockpt fused-adamw" \
        "cad-nockpt compiled-decoder" "cad-nockpt both" 2>&1 | grep -v -i warn |
        tee "$out/step_levers.jsonl"
elif [ "$mode" = blocks ]; then
    python3 benchmarks/step_levers.py "cad-nockpt both compiled-blocks" "cad-ckpt both" \
        "cad-ckpt both compiled-blocks" 2>&1 | grep -v -i warn | tee "$out/step_levers_blocks.jsonl"
elif [ "$mode" = bench ]; then
    precision=${3:-bf16}
    bench_into "$out/vit_b_decoder_$precision.json" --backbones vit_b \
        --methods cad-cache cad-cache-graph cad-cache-nockpt-graph sam-adapter-paper \
        --precision "$precision" --steps 10
    cat "$out/vit_b_decoder_$precision.json"
elif [ "$mode" = checks ]; then
    python3 benchmarks/graph_checks.py "cad-cache bf16" "cad-cache-nockpt bf16" \
        > "$out/graph_checks.json"
    echo "graph checks: rc $?"
    python3 benchmarks/profile_step.py cad-cache-nockpt-graph bf16 2>&1 | grep -v -i warn \
        > "$out/profile_nockpt_graph_bf16.txt"
elif [ "$mode" = pooled ]; then
    python3 benchmarks/step_levers.py "cad-nockpt both compiled-blocks" 2>&1 | grep -v -i warn |
        tee "$out/step_levers_pooled.jsonl"
    python3 benchmarks/graph_checks.py "cad-cache-nockpt bf16" > "$out/graph_checks_pooled.json"
    echo "graph checks: rc $?"
    python3 benchmarks/profile_step.py cad-cache-nockpt-graph bf16 2>&1 | grep -v -i warn \
        > "$out/profile_nockpt_graph_pooled_bf16.txt"
    python3 benchmarks/profile_step.py cad-cache bf16 checkpoint_adapter=false 2>&1 |
        grep -v -i warn > "$out/profile_ops_nockpt_pooled_bf16.txt"
    bench_into "$out/vit_b_pooled_bf16.json" --backbones vit_b \
        --methods cad-cache cad-cache-nockpt-graph sam-adapter-paper --precision bf16 --steps 10
    grep -h -o '"images_per_second": [0-9.]*' "$out/vit_b_pooled_bf16.json"
elif [ "$mode" = grads ]; then
    python3 benchmarks/triton_block.py grads 2>&1 | grep -v -i warn | tee "$out/grads_settings.jsonl"
elif [ "$mode" = compiled ]; then
    precision=${3:?precision}
    bench_into "$out/vit_b_compiled_$precision.json" --backbones vit_b --methods decoder cad \
        cad-fast cad-cache cad-cache-nockpt-graph sam-adapter-paper sam-adapter-paper-ckpt \
        sam-adapter-ckpt --precision "$precision" --steps 8
    grep -h -o '"variant": "[a-z-]*"\|"peak_allocated_mib": [0-9.]*\|"images_per_second": [0-9.]*' \
        "$out/vit_b_compiled_$precision.json"
elif [ "$mode" = repeat ]; then
    for run in 1 2; do
        bench_into "$out/vit_b_repeat$run.json" --backbones vit_b \
            --methods cad-cache-nockpt-graph sam-adapter-paper --precision bf16 --steps 10
        grep -h -o '"images_per_second": [0-9.]*' "$out/vit_b_repeat$run.json"
    done
    bench_into "$out/vit_h_compiled_bf16.json" --backbones vit_h \
        --methods cad-cache-nockpt-graph sam-adapter-paper --precision bf16 --steps 5
    grep -h -o '"peak_allocated_mib": [0-9.]*\|"images_per_second": [0-9.]*' \
        "$out/vit_h_compiled_bf16.json"
fi
