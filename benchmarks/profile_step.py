"""Where one training step's GPU time goes: a torch.profiler table of the costliest kernels;
for an eager step (an ``-eager`` variant, or ``cuda_graph=false``) also of the costliest
operators, by input shape, which names what a graph replay shows only as kernels.

Run: python benchmarks/profile_step.py VARIANT [PRECISION] [OPTION=VALUE ...]
     e.g. python benchmarks/profile_step.py cad-cache fp32 adapter_tile_mib=64
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from cadsam.commands.bench import warmed_step
from cadsam.fast.runtime import parse_setting


def main(variant: str, precision: str = "fp32", *settings: str) -> None:
    step, options = warmed_step(variant, precision, dict(map(parse_setting, settings)))
    with profile(
        activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True
    ) as prof:
        step()
        torch.cuda.synchronize()
    print(f"== {variant} {precision} {options}")
    print(
        prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70
        )
    )
    if not options.get("cuda_graph"):  # a replay shows kernels, not the operators behind them
        print(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cuda_time_total",
                row_limit=40,
                max_name_column_width=40,
                max_shapes_column_width=90,
            )
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
