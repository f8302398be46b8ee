"""CAD's adapter alone, forward and backward at the bench's size (batch 4, 512 x 512, bf16,
128 MiB bands): its GPU time (the sum of its kernels' times, from the profiler: the step is
launch-bound when eager) as the code stands, as it was, and with the band functions compiled
for any band height; each checked against the code as it stands.

``before``: the code until the CUDA-graph step: a pooled gradient spread over its cells by
expand + reshape, pooling by a mean over a view of the cells, the band functions compiled for
any height (now a nearest-neighbour upsampling, ``F.avg_pool2d``, and fixed shapes).
``dynamic shapes``: the code as it stands, the band functions compiled for any height.

Run: python benchmarks/adapter_kernels.py  (prints JSON lines, then a profile of each case)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from cadsam.methods import tiling
from cadsam.methods.cad import ConvAdapter

CURRENT = {"unpool": tiling._unpool, "compile": torch.compile, "cell_mean": tiling._CellMean}


def unpool_before(grad_out: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, c, h, w = grad_out.shape
    g = grad_out[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
    return F.pad(g * 0.25, (0, width - 2 * w, 0, height - 2 * h))


class CellMeanBefore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cell):
        ctx.cell, ctx.shape = cell, x.shape
        ctx.channels_last = x.dim() == 4 and not x.is_contiguous()
        ctx.channels_last &= x.is_contiguous(memory_format=torch.channels_last)
        return tiling._cells(x, cell).mean((3, 5))

    @staticmethod
    def backward(ctx, grad):
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        out = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=layout)
        if ctx.shape[-2] % ctx.cell or ctx.shape[-1] % ctx.cell:
            out.zero_()
        tiling._cells(out, ctx.cell).copy_((grad / ctx.cell**2)[:, :, :, None, :, None])
        return out, None


def compile_dynamic(f, dynamic=None, **kwargs):
    return CURRENT["compile"](f, dynamic=True, **kwargs)


def patch(case: str) -> None:
    before = case == "before"
    tiling._unpool = unpool_before if before else CURRENT["unpool"]
    tiling._CellMean = CellMeanBefore if before else CURRENT["cell_mean"]
    torch.compile = compile_dynamic if case in ("before", "dynamic shapes") else CURRENT["compile"]
    tiling._band_functions.cache_clear()
    torch._dynamo.reset()


def adapter_step(adapter: ConvAdapter, images: torch.Tensor, upstream: torch.Tensor):
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = adapter(images)
        out.backward(upstream)
        grads = [p.grad.clone() for p in adapter.parameters()]
        adapter.zero_grad(set_to_none=True)
        return out.detach(), grads

    return run


def gpu_ms(run, steps: int = 5) -> tuple[float, str]:
    """Kernel time per run, and the profiler's table of the costliest kernels."""
    for _ in range(4):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1000 / steps
    table = events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=90)
    return total, table


def bench_adapter() -> tuple[ConvAdapter, Callable, dict[str, torch.Tensor]]:
    """The adapter at the bench's size, a run of its forward and backward (adapter_step), and
    its state before any run."""
    torch.manual_seed(0)
    adapter = ConvAdapter(64, tile_mib=128).cuda()
    images = torch.rand(4, 3, 512, 512, device="cuda") * 255
    upstream = torch.randn(4, 256, 64, 64, device="cuda")
    state = {k: v.clone() for k, v in adapter.state_dict().items()}
    return adapter, adapter_step(adapter, images, upstream), state


def rel_diffs(adapter: ConvAdapter, result: tuple, reference: tuple) -> dict[str, float]:
    """The output's and each gradient's distance from the reference's, relative to its norm;
    the convolutions' biases (zero gradient in exact arithmetic, before BatchNorm) left out."""
    named = ["output", *(n for n, _ in adapter.named_parameters())]
    pairs = zip(named, [result[0], *result[1]], [reference[0], *reference[1]], strict=True)
    return {
        name: ((a.float() - b.float()).norm() / b.float().norm()).item()
        for name, a, b in pairs
        if not name.endswith("conv.bias")
    }


def main() -> None:
    adapter, run, state = bench_adapter()
    reference, tables = None, {}
    for case in ("as it stands", "before", "dynamic shapes"):
        patch(case)
        out, grads = run()
        if reference is None:
            reference = (out, grads)
        diffs = rel_diffs(adapter, (out, grads), reference)
        ms, tables[case] = gpu_ms(run)
        adapter.load_state_dict(state)
        print(
            json.dumps({"case": case, "gpu_ms": round(ms, 2), "max_rel_diff": max(diffs.values())})
        )
        sys.stdout.flush()
    for case, table in tables.items():
        print(f"== {case}\n{table}")


if __name__ == "__main__":
    main()
