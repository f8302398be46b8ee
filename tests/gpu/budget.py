"""The GPU tier's memory: how much it may use, how many processes share it, and each one's part.

The tier runs its tests in several processes on one GPU (pytest-xdist). Each process gets an
equal part of the tier's budget, enforced by ``torch.cuda.set_per_process_memory_fraction``
(tests/gpu/conftest.py), so that a test fails or skips by what it needs itself, never by what
the others happen to hold at the time; and ``CADSAM_GPU_MEMORY_GIB`` caps the budget, so that
a large card stands in for a small one. scripts/test runs this file to size the tier:
``python tests/gpu/budget.py [most workers]`` prints the worker count and the budget in GiB.

Arithmetic only, tested on the CPU (tests/test_gpu_budget.py); :func:`main` alone reads the GPU.
"""

from __future__ import annotations

import math
import os
import sys

GIB = 2**30
CAP_VARIABLE = "CADSAM_GPU_MEMORY_GIB"
# What one process of the tier needs: room for its heaviest test (the @pytest.mark.gpu_memory
# values, measured as the peaks the tier's summary lists) and its CUDA context.
WORKER_GIB = 12.0
# What a process holds outside PyTorch's allocator, which the fraction does not limit: the
# CUDA context with its kernels, cuBLAS's and cuDNN's handles, Triton's compiled modules.
CONTEXT_GIB = 1.0
MAX_WORKERS = 6  # beyond, the tests wait on the host (compiling, checking), not the GPU


def parse_cap(text: str | None) -> float | None:
    """``CADSAM_GPU_MEMORY_GIB``'s value: GiB (a positive number), or None where it is unset
    or empty. Anything else is a ValueError whose message names the variable."""
    if text is None or not text.strip():
        return None
    try:
        cap = float(text)
    except ValueError:
        cap = math.nan
    if not (cap > 0 and math.isfinite(cap)):
        raise ValueError(f"{CAP_VARIABLE}={text!r}: give the GPU memory in GiB, e.g. 24")
    return cap


def tier_budget(free_bytes: int, cap_gib: float | None) -> float:
    """GiB the tier may use: the cap where one is given, but never more than is free."""
    free_gib = free_bytes / GIB
    return free_gib if cap_gib is None else min(cap_gib, free_gib)


def worker_count(budget_gib: float, most: int = MAX_WORKERS) -> int:
    """One process for each WORKER_GIB of the budget, at least one and at most ``most``."""
    return max(1, min(most, int(budget_gib // WORKER_GIB)))


def process_share(budget_gib: float, workers: int) -> float:
    """GiB each process's allocator may hold: its part of the budget less its CUDA context."""
    return max(budget_gib / workers - CONTEXT_GIB, 0.0)


def memory_fraction(share_gib: float, total_bytes: int) -> float:
    """``share_gib`` as ``torch.cuda.set_per_process_memory_fraction`` takes it: a fraction of
    the whole card, at most 1."""
    return min(share_gib * GIB / total_bytes, 1.0)


def main(argv: list[str]) -> int:
    """Print the worker count and the budget (GiB) for this machine's GPU: ``4 52.3``."""
    import torch

    most = int(argv[0]) if argv else MAX_WORKERS
    try:
        cap = parse_cap(os.environ.get(CAP_VARIABLE))
    except ValueError as error:
        print(f"scripts/test --gpu: {error}", file=sys.stderr)
        return 2
    free, _ = torch.cuda.mem_get_info()
    budget = tier_budget(free, cap)
    print(worker_count(budget, most), f"{budget:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
