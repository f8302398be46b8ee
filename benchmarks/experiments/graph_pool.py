"""How much GPU memory capturing CAD's training step as a CUDA graph takes, against what the
eager step allocates: what lets ``auto`` graph the step on a GPU with less memory free than
a roomy one, and how much to ask for first.

For each configuration: ``auto``'s runtime on this GPU (the graph forced on), three eager
warm-up steps, then the capture and three replays, recording the allocator's counters between
them: the eager step's growth over what was allocated before it (its peak allocated minus the
weights and optimiser state), and the memory the capture reserved beyond what was reserved
before it, with the warm-up's cached blocks released to the driver first or kept. One JSON
line per configuration and mode.

    python benchmarks/experiments/graph_pool.py --out graph_pool.jsonl [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import time

import torch

from cadsam import bench
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="the first two configurations")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    context = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit}
    for config in CONFIGS[:2] if args.quick else CONFIGS:
        for release in (True, False):
            row = {**measure(*config, release=release), **context}
            with open(args.out, "a") as file:
                file.write(json.dumps(row) + "\n")
            print({k: v for k, v in row.items() if k != "counters"}, flush=True)
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
