"""Why ``train`` on a CPU gives CAD's adapter a small input: the adapter's forward and backward
at each input size, batch 2, on this machine's CPU (the plain path, fp32).

    python benchmarks/experiments/cpu_adapter_size.py --out benchmarks/experiments/cpu_adapter_size.jsonl

A line per size: the median of ``--steps`` timed steps after one warm-up, with the machine's
core count, torch's version and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from cadsam.methods.cad import ConvAdapter


def step_seconds(size: int, batch: int, steps: int) -> float:
    adapter = ConvAdapter(64).train()
    images = torch.rand(batch, 3, size, size) * 255
    times = []
    for _ in range(steps + 1):  # the first warms up
        start = time.perf_counter()
        adapter(images).square().mean().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 128, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="a JSON-lines file to append to")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    context = {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": commit.stdout.strip(),
    }
    for size in args.sizes:
        seconds = step_seconds(size, args.batch, args.steps)
        row = {"adapter_size": size, "batch": args.batch, "seconds_per_step": round(seconds, 3)}
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps({**row, **context}) + "\n")


if __name__ == "__main__":
    main()
