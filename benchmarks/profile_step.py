"""Where one training step's GPU time goes: a torch.profiler table of the costliest kernels.

Run: python benchmarks/profile_step.py VARIANT [PRECISION] [OPTION=VALUE ...]
     e.g. python benchmarks/profile_step.py cad-cache fp32 adapter_tile_mib=64
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from cadsam import build_model
from cadsam.bench import PAPER_BATCH, VARIANTS
from cadsam.cli import _option_value  # --set OPTION=VALUE, as cadsam bench reads it
from cadsam.precision import autocast
from cadsam.train import segmentation_loss


def main(variant: str, precision: str = "fp32", *settings: str) -> None:
    method, options = VARIANTS[variant]
    options = {**options, **dict(_option_value(text) for text in settings)}
    from_cache = options.pop("_cache", False)
    device = torch.device("cuda")
    with device:
        model = build_model(method, "vit_b", with_encoder=not from_cache, **options)
    batch = PAPER_BATCH["vit_b"]
    images = torch.rand(batch, 3, 512, 512, device=device) * 255
    masks = (torch.rand(batch, 1, 512, 512, device=device) > 0.5).float()
    embeddings = torch.randn(batch, 256, 64, 64, device=device) if from_cache else None
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=2e-4)

    def step() -> None:
        with autocast(device, precision):
            logits = model(images, embeddings)
        segmentation_loss(logits.float(), masks).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"== {variant} {precision} {options}")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
