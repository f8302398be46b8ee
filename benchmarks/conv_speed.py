"""Where CAD's adapter spends its time: the dilated 3x3 convolution and its alternatives.

A 3x3 convolution with dilation 2 equals an ordinary 3x3 convolution on each of the image's
four polyphase components (even/odd rows x even/odd columns), so it can run as one
non-dilated convolution over a four-times larger batch. This measures both, in both memory
layouts, at the sizes of CAD's first two blocks (ViT-B's batch 4), forward alone and forward
plus backward, and the same convolution in row tiles.

Run: python benchmarks/conv_speed.py  (prints JSON lines; needs a CUDA GPU)
"""

from __future__ import annotations

import json
import statistics

import torch
import torch.nn.functional as F


def median_ms(fn, steps: int = 10) -> float:
    times = []
    for i in range(3 + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def polyphase(x: torch.Tensor) -> torch.Tensor:
    """B x C x H x W (H, W even) -> 4B x C x H/2 x W/2, phase-major."""
    b, c, h, w = x.shape
    return (
        x.view(b, c, h // 2, 2, w // 2, 2)
        .permute(3, 5, 0, 1, 2, 4)
        .reshape(4 * b, c, h // 2, w // 2)
    )


def measure(dtype: torch.dtype, size: int, layout: torch.memory_format) -> None:
    a = torch.randn(4, 256, size, size, device="cuda", dtype=dtype)
    a = a.contiguous(memory_format=layout).requires_grad_()
    weight = torch.randn(256, 256, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    phases = polyphase(a.detach()).contiguous(memory_format=layout).requires_grad_()
    grad = torch.randn(4, 256, size, size, device="cuda", dtype=dtype)
    grad = grad.contiguous(memory_format=layout)
    grad_phases = polyphase(grad).contiguous(memory_format=layout)

    def dilated() -> torch.Tensor:
        return F.conv2d(a, weight, padding=2, dilation=2)

    def plain_phases() -> torch.Tensor:
        return F.conv2d(phases, weight, padding=1)

    @torch.no_grad()
    def tiles(rows: int = 64) -> None:
        for image in range(4):
            for r0 in range(0, size, rows):
                lo, hi = max(r0 - 2, 0), min(r0 + rows + 2, size)
                part = F.pad(
                    a[image : image + 1, :, lo:hi], (0, 0, 2 - (r0 - lo), 2 - (hi - r0 - rows))
                )
                F.conv2d(part, weight, padding=(0, 2), dilation=2)

    cases = {
        "dilated fwd": dilated,
        "dilated fwd+bwd": lambda: dilated().backward(grad),
        "polyphase fwd": plain_phases,
        "polyphase fwd+bwd": lambda: plain_phases().backward(grad_phases),
        "to polyphase": lambda: polyphase(a.detach()).contiguous(memory_format=layout),
        "dilated fwd, 64-row tiles": tiles,
    }
    with torch.no_grad():
        check = (polyphase(dilated()) - plain_phases()).abs().max().item()
    for name, fn in cases.items():
        record = {
            "case": name,
            "dtype": str(dtype).removeprefix("torch."),
            "size": size,
            "channels_last": layout == torch.channels_last,
            "ms": round(median_ms(fn), 3),
            "polyphase_max_abs_diff": check,
        }
        print(json.dumps(record), flush=True)


def main() -> None:
    torch.backends.cudnn.benchmark = False
    for dtype in (torch.float32, torch.bfloat16):
        for size in (512, 256):
            for layout in (torch.contiguous_format, torch.channels_last):
                measure(dtype, size, layout)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
