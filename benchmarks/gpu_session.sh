# Sourced by the run_gpu*.sh scripts: what every GPU session starts with.
# start_session OUT_DIR: make OUT_DIR, install the project (no dependencies: the GPU machine
# has them), record the GPU and its driver in OUT_DIR/gpu.txt, unbuffer Python's output.
start_session() {
    mkdir -p "$1"
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
        tee "$1/gpu.txt"
    export PYTHONUNBUFFERED=1
}

# bench_into FILE ARGS...: cadsam bench ARGS, its bench.json kept as FILE (its table and chart
# are left in a scratch folder).
bench_into() {
    local file=$1 scratch
    shift
    scratch=$(mktemp -d)
    cadsam bench "$@" --out "$scratch" > /dev/null && cp "$scratch/bench.json" "$file"
}
