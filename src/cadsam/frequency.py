"""The FFT high-pass that CAD and SAM-Adapter both feed to their adapters.

:func:`high_pass` is the reference (``torch.fft``, as the authors' code). ONNX has no FFT that
every exporter translates, so :class:`MatrixHighPass` computes the same function as a few real
matrix products, and :func:`high_pass_replaced` makes :func:`high_pass` use it while a graph is
traced for export (:mod:`cadsam.export`); training and evaluation never do.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

HighPass = Callable[[torch.Tensor, float], torch.Tensor]
_REPLACEMENT: contextvars.ContextVar[HighPass | None] = contextvars.ContextVar(
    "high_pass_replacement", default=None
)


@torch.no_grad()
def high_pass(images: torch.Tensor, area: float = 0.25) -> torch.Tensor:
    """``|real(ifft2(fft2(x) with a centred low-frequency square zeroed))|`` per channel.

    The square's side is ``2 * int(sqrt(H * W * area) // 2)`` (256 at 512 x 512: a quarter of
    the spectrum). ``norm="forward"`` both ways, as the authors' code does, so the result is
    on the scale of the input. Computed in float32 (float64 input stays float64), without
    gradient.
    """
    replacement = _REPLACEMENT.get()
    if replacement is not None:
        return replacement(images, area)
    x = images if images.dtype == torch.float64 else images.float()
    height, width = x.shape[-2:]
    half = _half_side(height, width, area)
    spectrum = torch.fft.fftshift(torch.fft.fft2(x, norm="forward"), dim=(-2, -1))
    cy, cx = height // 2, width // 2
    spectrum[..., cy - half : cy + half, cx - half : cx + half] = 0
    spectrum = torch.fft.ifftshift(spectrum, dim=(-2, -1))
    return torch.fft.ifft2(spectrum, norm="forward").real.abs()


def _half_side(height: int, width: int, area: float) -> int:
    return int(math.sqrt(height * width * area) // 2)


@contextlib.contextmanager
def high_pass_replaced(replacement: HighPass) -> Iterator[None]:
    """Within the block, :func:`high_pass` calls ``replacement(images, area)`` instead."""
    token = _REPLACEMENT.set(replacement)
    try:
        yield
    finally:
        _REPLACEMENT.reset(token)


def high_pass_operators(
    height: int, width: int, area: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`high_pass` as ``|x - L_h x L_w^T|`` (real part): the per-axis low-pass operators
    ``L_h`` (H x H) and ``L_w`` (W x W), complex128.

    The zeroed square is the product of a set of rows and a set of columns of the shifted
    spectrum, so the part removed is ``IDFT_2(m_h m_w^T * DFT_2(x))``, which is ``L_h x L_w^T``
    with ``L = IDFT diag(m) DFT`` per axis.
    """
    half = _half_side(height, width, area)
    rows = slice(height // 2 - half, height // 2 + half)
    cols = slice(width // 2 - half, width // 2 + half)
    return _low_pass_operator(height, rows), _low_pass_operator(width, cols)


def _low_pass_operator(size: int, centre: slice) -> torch.Tensor:
    """``L = IDFT diag(m) DFT`` along one axis, ``m`` being 1 on the entries ``centre`` of the
    shifted spectrum (Python's slice semantics, as :func:`high_pass` indexes), i.e. on the
    frequencies ``j - size // 2`` for ``j`` in it. With the forward transform scaled by
    ``1 / size`` and the inverse unscaled (``norm="forward"``),
    ``L[r, c] = (1 / size) sum_k exp(2 pi i k (r - c) / size)``: a function of ``r - c``.
    It is complex: the zeroed frequencies run from ``-half`` to ``half - 1``, so ``-half`` has
    no ``+half`` to cancel its sine.
    """
    shifted = torch.zeros(size, dtype=torch.float64)
    shifted[centre] = 1
    frequencies = (torch.nonzero(shifted).flatten() - size // 2) % size
    offsets = torch.arange(size)
    turns = (frequencies[:, None] * offsets[None, :]) % size  # exact: one rounding below
    angles = (2 * math.pi / size) * turns.to(torch.float64)
    by_offset = torch.complex(angles.cos().sum(0), angles.sin().sum(0)) / size
    return by_offset[(offsets[:, None] - offsets[None, :]) % size]


class MatrixHighPass(nn.Module):
    """:func:`high_pass` for H x W inputs as real matrix products, which ONNX expresses:
    ``|x - (A_h x A_w^T - B_h x B_w^T)|`` with ``L = A + iB`` (the real part of ``L_h x L_w^T``
    for real ``x``). The input is cast to the buffers' dtype (``dtype``, or where moved)."""

    def __init__(
        self, height: int, width: int, area: float = 0.25, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.size, self.area = (height, width), area
        low_h, low_w = high_pass_operators(height, width, area)
        self.register_buffer("real_h", low_h.real.to(dtype))
        self.register_buffer("imag_h", low_h.imag.to(dtype))
        self.register_buffer("real_w_t", low_w.real.T.to(dtype).contiguous())
        self.register_buffer("imag_w_t", low_w.imag.T.to(dtype).contiguous())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.real_h.dtype)
        low = self.real_h @ x @ self.real_w_t - self.imag_h @ x @ self.imag_w_t
        return (x - low).abs()
