"""Spreading a pooled gradient back over its cells (``pool_cells``' backward) on a GPU: as a
nearest-neighbour upsampling and padding (``tiling._unpool``, what the backward did before)
against a broadcast copy into a view of the cells (what it does now), for the adapter's shapes
at batch 4 (bf16, channels_last). Each is checked against the other.

Run: python benchmarks/unpool_speed.py  (prints JSON lines)
"""

from __future__ import annotations

import json
import types

import torch

from cadsam.methods.tiling import _CellMean, _unpool


def by_copy(grad: torch.Tensor, height: int, width: int, cell: int) -> torch.Tensor:
    """``pool_cells``' own backward, given what its forward would have saved."""
    saved = types.SimpleNamespace(cell=cell, shape=(*grad.shape[:2], height, width))
    saved.channels_last = True
    return _CellMean.backward(saved, grad)[0]


def by_upsampling(grad: torch.Tensor, height: int, width: int, cell: int) -> torch.Tensor:
    return _unpool(grad, height, width, cell).contiguous(memory_format=torch.channels_last)


def time_ms(f, *args, repeats: int = 50) -> float:
    for _ in range(5):
        f(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        f(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


if __name__ == "__main__":
    for size, cell in [(256, 4), (256, 2), (128, 2), (64, 1)]:
        grad = torch.randn(4, 256, size // cell, size // cell, device="cuda", dtype=torch.bfloat16)
        grad = grad.contiguous(memory_format=torch.channels_last)
        a, b = by_upsampling(grad, size, size, cell), by_copy(grad, size, size, cell)
        report = {"input": size, "cell": cell, "equal": torch.equal(a, b)}
        for name, f in (("upsampling", by_upsampling), ("copy", by_copy)):
            report[f"{name}_ms"] = round(time_ms(f, grad, size, size, cell), 4)
        print(json.dumps(report))
