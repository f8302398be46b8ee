"""The CUDA-graph training step against the eager one, on a CUDA GPU.

Ran on the API before cadsam.fast.runtime (runtime options as build_model keywords): kept
for reference until tests/gpu/ covers these checks.

Three runs of the same seven steps (six batches of 4, then a short one of 3, with a cosine
schedule), from the same weights:

* ``eager``: the plain step (multi-tensor AdamW with a float learning rate, the mask decoder
  not compiled), the reference;
* ``eager_capturable``: the step with the graph's optimiser (fused AdamW, ``capturable``, a
  tensor learning rate) and the decoder compiled, as training on CUDA compiles it, not
  captured: what the graph computes, launched one by one;
* ``graphed``: :class:`cadsam.graphs.GraphedStep`: three eager steps on a side stream,
  captured on the fourth, replayed on the fifth and sixth, the short batch eager.

``graphed`` must equal ``eager_capturable`` up to the order of float atomics in cuDNN's
weight gradients, and ``eager`` up to AdamW's arithmetic (bias corrections in float32 on the
GPU instead of float64 on the CPU) and the compiler's order of float operations.

Run: python benchmarks/experiments/graph_checks.py [LABEL ...]  (the cases with those labels, default all;
prints one JSON object; exits 1 if a check fails)
"""

from __future__ import annotations

import json
import sys

import torch

from cadsam import build_model
from cadsam.fast.graphs import adamw
from cadsam.step import training_step
from cadsam.training import lr_factor

STEPS = [4] * 6 + [3]


def run(kind: str, method: str, precision: str, from_cache: bool, **options) -> dict:
    torch.manual_seed(0)
    if kind == "eager":
        options = {**options, "compile_decoder": False}
    with torch.device("cuda"):
        model = build_model(method, "vit_b", with_encoder=not from_cache, **options)
    model.train()
    parameters = model.trainable_parameters()
    optimizer = adamw(parameters, lr=2e-4, weight_decay=0.01, graphed=kind != "eager")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor("cosine", s, len(STEPS))
    )
    step = training_step(model, optimizer, precision, graphed=kind == "graphed")
    generator = torch.Generator("cuda").manual_seed(1)
    losses = []
    for batch in STEPS:
        images = torch.rand(batch, 3, 512, 512, device="cuda", generator=generator) * 255
        masks = torch.rand(batch, 1, 512, 512, device="cuda", generator=generator) > 0.5
        embeddings = None
        if from_cache:
            embeddings = torch.randn(batch, 256, 64, 64, device="cuda", generator=generator)
        losses.append(step(images, masks.float(), embeddings))
        scheduler.step()
    torch.cuda.synchronize()
    return {
        "losses": [loss.item() for loss in losses],
        "state": {k: v.detach().clone() for k, v in model.trainable_state_dict().items()},
        "lr": float(optimizer.param_groups[0]["lr"]),
    }


def compare(a: dict, b: dict) -> dict:
    """Largest difference of any trainable tensor relative to its norm, and whose."""
    worst, worst_name, total, norm = 0.0, None, 0.0, 0.0
    for name, x in b["state"].items():
        y = a["state"][name]
        if not x.is_floating_point():
            assert torch.equal(x, y), name
            continue
        diff = (y.double() - x.double()).norm().item()
        relative = diff / max(x.double().norm().item(), 1e-12)
        total += diff**2
        norm += x.double().norm().item() ** 2
        if relative > worst:
            worst, worst_name = relative, name
    return {
        "all_tensors_rel": (total / norm) ** 0.5,
        "worst_tensor_rel": worst,
        "worst_tensor": worst_name,
        "loss_max_abs_diff": max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True)),
        "lr": (a["lr"], b["lr"]),
    }


def main() -> int:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    report, ok = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}, True
    cases = [
        ("cad-cache fp32", "cad", "fp32", True, {"checkpoint_adapter": True}),
        ("cad-cache bf16", "cad", "bf16", True, {"checkpoint_adapter": True}),
        ("cad-cache-nockpt bf16", "cad", "bf16", True, {}),
        ("cad-cache-untiled bf16", "cad", "bf16", True, {"adapter_tile_mib": 0}),
        ("cad bf16 (encoder)", "cad", "bf16", False, {}),
        ("decoder fp32 (encoder)", "decoder", "fp32", False, {}),
        (
            "sam-adapter-paper bf16 (checkpointed blocks)",
            "sam-adapter-paper",
            "bf16",
            False,
            {"checkpoint_blocks": True},
        ),
    ]
    chosen = sys.argv[1:]  # labels to run (default: all)
    for label, method, precision, from_cache, options in cases:
        if chosen and label not in chosen:
            continue
        runs = {
            kind: run(kind, method, precision, from_cache, **options)
            for kind in ("eager", "eager_capturable", "graphed")
        }
        same_arithmetic = compare(runs["graphed"], runs["eager_capturable"])
        against_plain = compare(runs["graphed"], runs["eager"])
        tolerance = 1e-3 if precision == "fp32" else 1e-2
        passed = same_arithmetic["all_tensors_rel"] < tolerance
        passed &= against_plain["all_tensors_rel"] < tolerance
        passed &= abs(runs["graphed"]["lr"] - runs["eager"]["lr"]) < 1e-12
        ok &= passed
        report[label] = {
            "passed": passed,
            "graphed_vs_eager_capturable": same_arithmetic,
            "graphed_vs_eager": against_plain,
            "losses": {kind: r["losses"] for kind, r in runs.items()},
        }
        print(label, "passed" if passed else "FAILED", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
