"""``torch.compile`` as every fast path uses it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def compile_as_eager(function: Callable, **kwargs: Any) -> Callable:
    """``torch.compile`` that rounds to bfloat16 or float16 wherever eager autocast does.
    Inductor otherwise keeps float32 inside a fused kernel where eager rounds: the compiled
    mask decoder's bf16 gradients were then many times farther from float64 than eager's; with
    the rounding emulated, as close (``tests/gpu``; compiled_decoder_bf16.py in
    benchmarks/experiments/README.md)."""
    return torch.compile(function, options={"emulate_precision_casts": True}, **kwargs)
