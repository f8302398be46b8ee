"""CAD's first block (conv_up included) at the bench's size, plain against banded: time of a
forward and backward, peak memory, by memory layout and how the band arithmetic runs.

Run: python benchmarks/tiles_speed.py  (prints JSON lines; needs a CUDA GPU)
"""

from __future__ import annotations

import json
import statistics

import torch

from cadsam.methods import tiling
from cadsam.methods.cad import ResidualDilatedBlock


def measure(name: str, run, steps: int = 8) -> dict:
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"case": name, "ms": round(statistics.median(times), 2), "peak_mib": round(peak)}


def compare(block: torch.nn.Module, conv_up: torch.nn.Module, channels_last: bool) -> None:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(4, 6, 512, 512, device="cuda").contiguous(memory_format=layout)
    upstream = torch.randn(4, 256, 256, 256, device="cuda").contiguous(memory_format=layout)

    def plain() -> None:
        block(conv_up(x)).backward(upstream)

    def banded(rows: int, compiled: bool) -> None:
        tiling.tiled_residual_block(x, block, conv_up, rows, compiled).backward(upstream)

    cases = {"plain": plain}
    for rows in (64, 128):  # 32 and 64 MiB bands
        for compiled in (False, True):
            cases[f"banded rows={rows} compiled={compiled}"] = lambda r=rows, c=compiled: banded(
                r, c
            )
    for name, run in cases.items():
        print(json.dumps({"channels_last": channels_last, **measure(name, run)}), flush=True)


def main() -> None:
    torch.manual_seed(0)
    block = ResidualDilatedBlock(256).cuda()
    conv_up = torch.nn.Conv2d(6, 256, 1).cuda()
    for channels_last in (True, False):
        compare(block, conv_up, channels_last)
    # where a banded step's time goes, channels_last, compiled
    x = torch.rand(4, 6, 512, 512, device="cuda").contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(4, 256, 256, 256, device="cuda")
    upstream = upstream.contiguous(memory_format=torch.channels_last)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        tiling.tiled_residual_block(x, block, conv_up, 128, True).backward(upstream)
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=90)
    )


if __name__ == "__main__":
    main()
