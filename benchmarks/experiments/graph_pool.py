"""How much GPU memory capturing CAD's training step as a CUDA graph takes, against what the
eager step allocates: what lets ``auto`` graph the step on a GPU with less memory free than
a roomy one, and how much to ask for first (``cadsam.fast.graphs.CAPTURE_POOL_FACTOR``).

For each configuration: ``auto``'s runtime on this GPU (the graph forced on), three eager
warm-up steps, then the capture and three replays, recording the allocator's counters between
them: the eager step's growth over what was allocated before it (its peak allocated minus the
weights), what the warm-up left reserved, and the memory the capture reserved beyond what was
reserved before it, with the warm-up's cached blocks released to the driver first or kept.
One JSON line per configuration and mode.

``--stand-in GIB``: instead, ``cadsam bench``'s ``cad`` row (what ``cadsam train`` runs by
default) on a GPU stood in for with GIB of memory: the driver reports GIB less what this
process has reserved, which is what ``auto`` and the capture's check read.

    python benchmarks/experiments/graph_pool.py --out graph_pool.jsonl [--configs 0 1]
    python benchmarks/experiments/graph_pool.py --out graph_pool.jsonl --stand-in 12
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import time

import torch

from cadsam.commands import bench
from cadsam.methods import build_model

MIB = 2**20
# (backbone, precision, from the cache, batch; None: the bench's default)
CONFIGS = [
    ("vit_b", "bf16", False, None),
    ("vit_b", "bf16", True, None),
    ("vit_b", "fp32", False, None),
    ("sam2.1_hiera_b+", "fp32", False, None),
    ("sam2.1_hiera_b+", "fp32", True, None),
    ("vit_h", "fp32", False, None),
    ("vit_h", "bf16", False, None),
    ("vit_b", "bf16", False, 16),
    ("sam2.1_hiera_b+", "bf16", False, 16),
]


def _counters() -> dict[str, float]:
    free = torch.cuda.mem_get_info()[0]
    return {
        "allocated": torch.cuda.memory_allocated() / MIB,
        "reserved": torch.cuda.memory_reserved() / MIB,
        "peak_allocated": torch.cuda.max_memory_allocated() / MIB,
        "peak_reserved": torch.cuda.max_memory_reserved() / MIB,
        "free": free / MIB,
    }


def measure(backbone: str, precision: str, from_cache: bool, batch: int | None, release: bool):
    default_batch = dict(bench.DEFAULT_BATCH)
    if batch:
        bench.DEFAULT_BATCH[backbone] = batch
    try:
        variant = "cad-cache" if from_cache else "cad"
        method, runtime, from_cache = bench.variant_runtime(variant, backbone, {"cuda_graph": True})
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = build_model(method, backbone, with_encoder=not from_cache, runtime=runtime)
        step = bench.bench_step(model, precision, from_cache)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = _counters()
        for _ in range(bench.WARMUP):
            step()
        torch.cuda.synchronize()
        warm = _counters()
        if release:
            torch.cuda.empty_cache()
        released = _counters()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()  # the capture
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - start
        captured = _counters()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        replayed = _counters()
        growth = warm["peak_allocated"] - before["allocated"]
        pool = replayed["peak_reserved"] - released["reserved"]
        return {
            "backbone": backbone,
            "precision": precision,
            "from_cache": from_cache,
            "batch": bench.DEFAULT_BATCH[backbone],
            "release_before_capture": release,
            "eager_step_growth_mib": round(growth, 1),
            "eager_cache_mib": round(warm["reserved"] - before["reserved"], 1),
            "capture_reserved_mib": round(pool, 1),
            "capture_over_growth": round(pool / growth, 2),
            "whole_run_peak_reserved_mib": round(
                max(warm["peak_reserved"], replayed["peak_reserved"]), 1
            ),
            "capture_s": round(capture_s, 2),
            "counters": {
                "before": before,
                "warm": warm,
                "released": released,
                "captured": captured,
                "replayed": replayed,
            },
        }
    finally:
        bench.DEFAULT_BATCH.clear()
        bench.DEFAULT_BATCH.update(default_batch)


# (backbone, precision) for --stand-in
STAND_IN = [("vit_b", "bf16"), ("vit_h", "fp32"), ("sam2.1_hiera_b+", "bf16")]


def on_a_smaller_gpu(gib: float, backbone: str, precision: str) -> dict:
    """``cadsam bench``'s ``cad`` row where the driver reports a GPU of ``gib`` GiB."""
    size = int(gib * 2**30)
    real = torch.cuda.mem_get_info
    torch.cuda.mem_get_info = lambda *device: (max(0, size - torch.cuda.memory_reserved()), size)
    try:
        return {"stand_in_gib": gib, **bench.measure_training(backbone, "cad", precision, steps=5)}
    finally:
        torch.cuda.mem_get_info = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", type=int, nargs="+", help="indices into CONFIGS")
    parser.add_argument("--releases", choices=("both", "kept"), default="both")
    parser.add_argument("--stand-in", type=float, help="GiB of the GPU stood in for")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    context = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit}
    if args.stand_in:
        runs = [lambda b=b, p=p: on_a_smaller_gpu(args.stand_in, b, p) for b, p in STAND_IN]
    else:
        chosen = [CONFIGS[i] for i in args.configs] if args.configs else CONFIGS
        releases = (True, False) if args.releases == "both" else (False,)
        runs = [lambda c=c, r=r: measure(*c, release=r) for c in chosen for r in releases]
    for run in runs:
        row = {**run(), **context}
        with open(args.out, "a") as file:
            file.write(json.dumps(row) + "\n")
        print({k: v for k, v in row.items() if k != "counters"}, flush=True)
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
