"""The FFT high-pass that CAD and SAM-Adapter both feed to their adapters."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def high_pass(images: torch.Tensor, area: float = 0.25) -> torch.Tensor:
    """``|real(ifft2(fft2(x) with a centred low-frequency square zeroed))|`` per channel.

    The square's side is ``2 * int(sqrt(H * W * area) // 2)`` (256 at 512 x 512: a quarter of
    the spectrum). ``norm="forward"`` both ways, as the authors' code does, so the result is
    on the scale of the input. Computed in float32, without gradient.
    """
    x = images.float()
    height, width = x.shape[-2:]
    half = int(math.sqrt(height * width * area) // 2)
    spectrum = torch.fft.fftshift(torch.fft.fft2(x, norm="forward"), dim=(-2, -1))
    cy, cx = height // 2, width // 2
    spectrum[..., cy - half : cy + half, cx - half : cx + half] = 0
    spectrum = torch.fft.ifftshift(spectrum, dim=(-2, -1))
    return torch.fft.ifft2(spectrum, norm="forward").real.abs()
