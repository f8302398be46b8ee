"""What the graphed training step from the cache (ViT-B, batch 4, bf16) gains from levers
outside the adapter's first block: AdamW's fused kernel in place of its multi-tensor one, the
mask decoder through ``torch.compile`` (``compile_decoder``), and the adapter's later blocks
(those that run whole, not in bands) through it (``compile_blocks``); and the step of the
decoder alone (``decoder`` from the cache, graphed), the floor the adapter's part stands on.

Each case is the training step (:func:`cadsam.train.training_step`, graphed) at the bench's
settings, with its own AdamW (fused or not), captured after its warm-up;
its time is the median of 30 replays, timed by CUDA events. Prints one JSON line per case.

Run: python benchmarks/step_levers.py [CASE ...]   (default: every case)
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

import torch

from cadsam.bench import PAPER_BATCH, variant_options
from cadsam.methods import build_model
from cadsam.train import training_step

# case -> (bench variant, fused AdamW, compiled mask decoder, compiled later adapter blocks)
CASES: dict[str, tuple[str, bool, bool, bool]] = {
    "cad-nockpt": ("cad-cache-nockpt-graph", False, False, False),
    "cad-nockpt fused-adamw": ("cad-cache-nockpt-graph", True, False, False),
    "cad-nockpt compiled-decoder": ("cad-cache-nockpt-graph", False, True, False),
    "cad-nockpt both": ("cad-cache-nockpt-graph", True, True, False),
    "cad-nockpt both compiled-blocks": ("cad-cache-nockpt-graph", True, True, True),
    "cad-ckpt": ("cad-cache-graph", False, False, False),
    "cad-ckpt both": ("cad-cache-graph", True, True, False),
    "cad-ckpt both compiled-blocks": ("cad-cache-graph", True, True, True),
    "decoder": ("decoder", False, False, False),
    "decoder both": ("decoder", True, True, False),
}


def step_ms(
    variant: str, fused_adamw: bool, compiled_decoder: bool, compiled_blocks: bool
) -> dict[str, Any]:
    method, options, _, _ = variant_options(variant)
    torch.manual_seed(0)
    options["compile_decoder"] = compiled_decoder
    if method == "cad":  # (bf16 at batch 4: the first block runs in bands, the others whole)
        options["compile_blocks"] = compiled_blocks
    with torch.device("cuda"):
        model = build_model(method, "vit_b", with_encoder=False, **options)
    model.train()
    parameters = model.trainable_parameters()
    optimizer = torch.optim.AdamW(
        parameters,
        lr=torch.tensor(2e-4, device="cuda"),
        weight_decay=0.01,
        capturable=True,
        fused=True if fused_adamw else None,  # (False would choose the per-tensor AdamW)
    )
    batch = PAPER_BATCH["vit_b"]
    generator = torch.Generator("cuda").manual_seed(0)
    images = torch.rand(batch, 3, 512, 512, device="cuda", generator=generator) * 255
    masks = (torch.rand(batch, 1, 512, 512, device="cuda", generator=generator) > 0.5).float()
    embeddings = torch.randn(batch, 256, 64, 64, device="cuda", generator=generator)
    graphed = training_step(model, optimizer, "bf16", graphed=True)
    losses = [graphed(images, masks, embeddings).item() for _ in range(4)]  # warm-up, capture
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = graphed(images, masks, embeddings)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    return {
        "variant": variant,
        "fused_adamw": fused_adamw,
        "compiled_decoder": compiled_decoder,
        "compiled_blocks": compiled_blocks,
        "step_ms": round(ms, 3),
        "images_per_second": round(batch / ms * 1000, 1),
        "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "first_losses": [round(x, 5) for x in losses],
        "last_loss": round(loss.item(), 5),
    }


def main(cases: list[str]) -> None:
    for case in cases or list(CASES):
        torch.cuda.reset_peak_memory_stats()
        print(json.dumps({"case": case, **step_ms(*CASES[case])}), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
