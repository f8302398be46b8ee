"""CAD's first block (conv_up included) at the bench's size, plain against banded: time of a
forward and backward and peak memory, channels_last, the band arithmetic compiled; then the
fused block's narrow convolution, 7 input channels against 8.

Run: python benchmarks/tiles_speed.py  (prints JSON lines; needs a CUDA GPU)
"""

from __future__ import annotations

import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

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


def compare(block: torch.nn.Module, conv_up: torch.nn.Module) -> None:
    layout = torch.channels_last
    x = torch.rand(4, 6, 512, 512, device="cuda").contiguous(memory_format=layout)
    upstream = torch.randn(4, 256, 256, 256, device="cuda").contiguous(memory_format=layout)

    def plain() -> None:
        block(conv_up(x)).backward(upstream)

    def banded(rows: int) -> None:
        tiling.tiled_residual_block(x, block, conv_up, rows, compiled=True).backward(upstream)

    cases = {"plain": plain}
    for rows in (64, 128, 256):  # 32, 64 and 128 MiB bands
        cases[f"banded rows={rows} compiled=True"] = lambda r=rows: banded(r)
    for name, run in cases.items():
        print(json.dumps({"channels_last": True, **measure(name, run)}), flush=True)


def narrow_convolution() -> None:
    """The fused first block convolves [x, 1], 7 channels: against 8 (tensor-core friendly)."""
    for dtype in (torch.float32, torch.bfloat16):
        for channels in (7, 8):
            x = torch.rand(1, channels, 136, 512, device="cuda", dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            w = torch.randn(256, channels, 3, 3, device="cuda", dtype=dtype)
            grad = torch.randn(1, 256, 128, 512, device="cuda", dtype=dtype)
            grad = grad.contiguous(memory_format=torch.channels_last)

            def run(x=x, w=w, grad=grad) -> None:
                F.conv2d(x, w, padding=(0, 2), dilation=2)
                conv2d_weight(x[:, :, 4:], w.shape, grad, padding=(0, 2), dilation=2)

            case = f"conv {channels}->256 forward + weight gradient, {dtype}, 128 x 512 band"
            print(json.dumps(measure(case, run, steps=20)), flush=True)


def main() -> None:
    torch.manual_seed(0)
    block = ResidualDilatedBlock(256).cuda()
    conv_up = torch.nn.Conv2d(6, 256, 1).cuda()
    compare(block, conv_up)
    narrow_convolution()
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
