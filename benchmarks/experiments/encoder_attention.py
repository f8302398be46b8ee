"""Which SDPA backend the frozen ViT encoder's fused attention can use, and how fast each is.

The fused attention folds SAM's relative-position bias into q and k (head dim 64 + 64 + 64 =
192 in ViT-B's global blocks, 64 + 14 + 14, padded to 96, in the windowed ones) while v
keeps 64. Flash attention needs one head dim for all three, so SDPA cannot choose it. Padding
v with zeros to q's head dim, and dropping those columns of the output, is the same function
and lets it. This times the encoder's forward (bf16 autocast, no autograd, as a ``cad`` step
runs it) under each backend, with v as it is and padded, eager and compiled, and measures
each against the plain attention in float32. ``flex`` keeps every head dim at 64 and adds the
bias inside FlexAttention's compiled kernel (``score_mod``), where the folded q/k triple the
global blocks' score work; ``flex-global`` does so in the global blocks only.

Run from the repository root on a CUDA machine; one JSON line per setting:

    python benchmarks/experiments/encoder_attention.py [--backbone vit_b] [--batch 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

import cadsam.sam.image_encoder as image_encoder
from cadsam.sam import build_sam

FUSED = image_encoder._fused_rel_pos_attention
BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def fused_with_padded_v(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The fused attention with v zero-padded to the augmented q/k head dim."""
    width = q.shape[-1] + rel_h.shape[-1] + rel_w.shape[-1]
    width += -width % 8
    out = FUSED(q, k, F.pad(v, (0, width - v.shape[-1])), rel_h, rel_w, scale)
    return out[..., : v.shape[-1]]


def flex_rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
    global_only: bool = False,
) -> torch.Tensor:
    """The bias added to each score inside FlexAttention's kernel: q, k and v keep head dim 64."""
    height, width = rel_h.shape[-1], rel_w.shape[-1]
    if global_only and height * width < 1024:
        return FUSED(q, k, v, rel_h, rel_w, scale)
    rel_h, rel_w = rel_h.to(q.dtype), rel_w.to(q.dtype)

    def bias(score, b, h, q_index, k_index):
        return (
            score + rel_h[b, h, q_index, k_index // width] + rel_w[b, h, q_index, k_index % width]
        )

    return flex_attention(q, k, v, score_mod=bias, scale=scale)


def flex_global(*args: torch.Tensor | float) -> torch.Tensor:
    return flex_rel_pos_attention(*args, global_only=True)


FORMULATIONS = {
    "fused": FUSED,
    "fused-padded-v": fused_with_padded_v,
    "flex": flex_rel_pos_attention,
    "flex-global": flex_global,
}


@contextlib.contextmanager
def attention(formulation: str, backend: str) -> Iterator[None]:
    image_encoder._fused_rel_pos_attention = FORMULATIONS[formulation]
    chosen = BACKENDS[backend]
    try:
        with sdpa_kernel([chosen]) if chosen is not None else contextlib.nullcontext():
            yield
    finally:
        image_encoder._fused_rel_pos_attention = FUSED


def timed(forward: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    for _ in range(3):
        out = forward()
    torch.cuda.synchronize(out.device) if out.is_cuda else None
    start = time.perf_counter()
    for _ in range(repeats):
        out = forward()
    torch.cuda.synchronize(out.device) if out.is_cuda else None
    return out, (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = build_sam(args.backbone).image_encoder.to(args.device).eval()
    size = encoder.img_size
    images = torch.randn(args.batch, 3, size, size, device=args.device)
    with torch.no_grad():
        encoder.set_fused_attention(False)
        exact = encoder(images).double()
        encoder.set_fused_attention(True)
    settings = [(f, b, False) for f in ("fused", "fused-padded-v") for b in BACKENDS]
    compiled = ("flex", "fused", "flex-global", "fused-padded-v")  # the question first
    settings += [(f, "default", True) for f in compiled]
    for formulation, backend, compiled in settings:
        row = {"formulation": formulation, "backend": backend, "compiled": compiled}
        torch._dynamo.reset()
        run = torch.compile(encoder) if compiled else encoder
        try:
            bf16 = torch.autocast(images.device.type, dtype=torch.bfloat16)
            with attention(formulation, backend), torch.no_grad(), bf16:
                out, seconds = timed(lambda: run(images), args.repeats)  # noqa: B023
            error = (out.double() - exact).norm() / exact.norm()
            row |= {
                "ms": round(seconds * 1e3, 2),
                "images_per_second": round(args.batch / seconds, 1),
            }
            row["relative_error"] = float(f"{error.item():.2e}")
        except RuntimeError as failure:  # a backend that cannot take these inputs
            row["error"] = str(failure).strip().splitlines()[0][:200]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
