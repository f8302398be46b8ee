"""Why the compiled mask decoder's bf16 gradients were farther from float64 than eager's.

The GPU tier's ``test_compiled_decoder_equals_the_plain_decoder[bf16]``, under several
inductor settings: one JSON line each, with how many gradients fail the test's bound, the
worst three (distance ratio compiled / eager) and the median distances. Run from the
repository root on a CUDA machine (its output at b524d1c on an H200:
``h200_compiled_decoder_bf16.jsonl``).
"""

from __future__ import annotations

import json
import sys
import types

import torch
import torch.nn.functional as F

import cadsam.methods.model as model_module
from cadsam import build_model
from cadsam.fast.runtime import Runtime
from cadsam.step import segmentation_loss

sys.path.insert(0, "tests/gpu")
import test_fast_paths as T

SETTINGS = (  # inductor options, whether the upsampling stays eager
    ({}, False),
    ({}, True),
    ({"emulate_precision_casts": True}, False),
    ({"pattern_matcher": False}, False),
)


def eager_interpolate() -> types.SimpleNamespace:
    """``torch.nn.functional`` with ``interpolate`` left out of compiled graphs."""
    names = {n: getattr(F, n) for n in dir(F) if not n.startswith("__")}
    return types.SimpleNamespace(**names | {"interpolate": torch.compiler.disable(F.interpolate)})


def gradients(precision: str) -> dict:
    torch.manual_seed(5)
    plain = build_model("decoder", "vit_b", with_encoder=False).to(T.DEVICE)
    compiled = T.twin(plain, Runtime(compile_decoder=True))
    exact = T.float64_twin(plain)
    images, masks = T.images_and_masks(2, 256, seed=6)
    embeddings = T.embeddings_for(plain, 2, seed=7)
    found = {}
    for name, model in (("plain", plain), ("compiled", compiled), ("exact", exact)):
        given = embeddings.double() if name == "exact" else embeddings
        with T.autocast("fp32" if name == "exact" else precision):
            logits = model(images, given)
        segmentation_loss(logits.double(), masks.double()).backward()
        found[name] = {"logits": logits.detach()} | T.grads(model)
        found[f"{name} dtype"] = str(logits.dtype)
    return found


def compare(found: dict, precision: str) -> dict:
    exact = found["exact"]
    largest = max(e.abs().max().item() for e in exact.values() if e is not None)
    rows = []
    for name, reference in exact.items():
        if reference is None or name.endswith(T.VANISHING):
            continue
        floor = 0.0 if name == "logits" else T.FLOOR * largest
        d_compiled = T.distance(found["compiled"][name], reference, floor)
        d_plain = T.distance(found["plain"][name], reference, floor)
        rows.append((d_compiled / max(d_plain, 1e-12), name, d_compiled, d_plain))
    rows.sort(reverse=True)
    failing = [r for r in rows if r[2] > 2 * r[3] + T.GRAD_SLACK[precision]]
    middle = len(rows) // 2
    return {
        "dtypes": [found["plain dtype"], found["compiled dtype"]],  # of the logits
        "failing": len(failing),
        "of": len(rows),
        "worst": [(round(r, 1), n, f"{c:.2e}", f"{p:.2e}") for r, n, c, p in rows[:3]],
        "median_compiled": sorted(r[2] for r in rows)[middle],
        "median_plain": sorted(r[3] for r in rows)[middle],
    }


def run(options: dict, eager_upsampling: bool, precision: str = "bf16") -> dict:
    torch._dynamo.reset()
    functional = model_module.F
    try:
        if eager_upsampling:
            model_module.F = eager_interpolate()
        with torch._inductor.config.patch(options):
            found = gradients(precision)
    finally:
        model_module.F = functional
    setting = {"config": options, "eager_upsampling": eager_upsampling, "precision": precision}
    return setting | compare(found, precision)


if __name__ == "__main__":
    with T.tf32(False):
        for options, eager_upsampling in SETTINGS:
            print(json.dumps(run(options, eager_upsampling)), flush=True)
