"""What is alive at a training step's peak of GPU memory, grouped by the line that allocated it.

Records the CUDA allocator's history from before the model is built, runs a few training
steps of a ``cadsam bench`` variant (ViT-B, the paper's batch), replays the allocations and
frees to the moment of the highest total, and prints the live bytes there by allocating line.

Run: python benchmarks/memory_peak.py VARIANT [PRECISION] [OPTION=VALUE ...]
     e.g. python benchmarks/memory_peak.py cad-cache fp32
"""

from __future__ import annotations

import collections
import sys

import torch

from cadsam.commands.bench import warmed_step
from cadsam.fast.runtime import parse_setting

MIB = 2**20


def where(frames: list[dict]) -> str:
    """The innermost frame in this project's code (else the innermost one)."""
    own = [f for f in frames if "cadsam" in f["filename"] or "benchmarks" in f["filename"]]
    frame = (own or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{frame['filename'].rsplit('/', 2)[-1]}:{frame['line']} {frame['name']}"


def peak_breakdown(trace: list[dict]) -> tuple[int, dict[str, int]]:
    alive: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for event in trace:
        if event["action"] == "alloc":
            alive[event["addr"]] = (event["size"], where(event["frames"]))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(alive)
        elif event["action"] == "free_requested" and event["addr"] in alive:
            total -= alive.pop(event["addr"])[0]
    groups: dict[str, int] = collections.Counter()
    for size, line in at_peak.values():
        groups[line] += size
    return peak, groups


def main(variant: str, precision: str = "fp32", *settings: str) -> None:
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    _, options = warmed_step(variant, precision, dict(map(parse_setting, settings)))
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    peak, groups = peak_breakdown(trace)
    print(f"== {variant} {precision} {options}")
    print(
        f"max allocated {torch.cuda.max_memory_allocated() / MIB:,.0f} MiB; replayed peak {peak / MIB:,.0f} MiB"
    )
    for line, size in sorted(groups.items(), key=lambda kv: -kv[1])[:20]:
        print(f"{size / MIB:9,.1f} MiB  {line}")


if __name__ == "__main__":
    main(*sys.argv[1:])
