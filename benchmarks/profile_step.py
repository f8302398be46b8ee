"""Where one training step's GPU time goes: a torch.profiler table of the costliest kernels.

Run: python benchmarks/profile_step.py VARIANT [PRECISION] [OPTION=VALUE ...]
     e.g. python benchmarks/profile_step.py cad-cache fp32 adapter_tile_mib=64
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from cadsam import build_model
from cadsam.bench import training_step, variant_options
from cadsam.cli import _option_value  # --set OPTION=VALUE, as cadsam bench reads it


def main(variant: str, precision: str = "fp32", *settings: str) -> None:
    method, options, from_cache = variant_options(variant, dict(map(_option_value, settings)))
    with torch.device("cuda"):
        model = build_model(method, "vit_b", with_encoder=not from_cache, **options)
    step = training_step(model, precision, from_cache)
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
