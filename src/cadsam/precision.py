"""Mixed precision: fp32 (the reference) or bf16 autocast over fp32 weights."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def autocast(
    device: torch.device, precision: str, cache: bool = True
) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in; a no-op for fp32. ``cache=False``: no cache of the
    weights' bf16 copies, which a CUDA graph's capture must not keep."""
    assert precision in PRECISIONS, precision
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)
