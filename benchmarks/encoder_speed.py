"""Frozen-encoder forward rate (bf16, no autograd) by attention path and SDPA backend.

Run: python benchmarks/encoder_speed.py vit_b [vit_h]  (prints JSON lines)
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cadsam.sam import build_sam


def rate(fn, x: torch.Tensor, steps: int = 8) -> float:
    times = []
    for i in range(3 + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return len(x) / statistics.median(times)


@torch.no_grad()
def main(backbone: str, batch: int = 16) -> None:
    with torch.device("cuda"):
        encoder = build_sam(backbone).image_encoder.eval()
    x = torch.randn(batch, 3, 1024, 1024, device="cuda")
    cases = {
        "plain": (False, contextlib.nullcontext),
        "fused-default": (True, contextlib.nullcontext),
        "fused-efficient": (True, lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)),
        "fused-cudnn": (True, lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)),
    }
    for name, (fused, backend) in cases.items():
        encoder.set_fused_attention(fused)
        try:
            with backend(), torch.autocast("cuda", dtype=torch.bfloat16):
                value = rate(encoder, x)
        except RuntimeError as exc:
            value = f"failed: {str(exc).splitlines()[0][:80]}"
        print(
            json.dumps(
                {"backbone": backbone, "case": name, "batch": batch, "images_per_second": value}
            ),
            flush=True,
        )
    encoder.set_fused_attention(True)
    compiled = torch.compile(encoder)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        start = time.perf_counter()
        compiled(x)
        torch.cuda.synchronize()
        warm = time.perf_counter() - start
        value = rate(compiled, x)
    print(
        json.dumps(
            {
                "backbone": backbone,
                "case": "fused-compiled",
                "batch": batch,
                "images_per_second": value,
                "compile_seconds": round(warm, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    for name in sys.argv[1:] or ["vit_b"]:
        main(name)
