"""How much arithmetic a training step is, counted on PyTorch's meta device (no GPU, no weights),
per image at the bench's settings (512-pixel images, the encoder at its square, the adapter at
512), two per multiply-add as ``torch.utils.flop_counter`` counts:

* the frozen encoder's forward, as the function is written (the fused attention's folded bias
  adds to it as it runs);
* the step from cached embeddings (CAD's adapter and the decoder, forward, loss, backward),
  as written (``plain``) and as ``auto`` runs it at the bench's batch in bf16: CAD's first
  block in bands, its ``conv_up`` folded into the convolution (8 channels read instead of
  256), the bands recomputed in backward. Triton's kernels do the bands' arithmetic with their
  matrix products padded (72 to 128), which is not counted; nor are attention kernels
  (the decoder's, a few GFLOP).

Divided into a measured images/s, the count says how far a row runs from the card's arithmetic
peak: near it, only less arithmetic helps; far from it, the time goes elsewhere (memory
traffic, launches, small kernels) and a profile says where.

    python benchmarks/experiments/step_flops.py > benchmarks/experiments/cpu_step_flops.jsonl

A line per backbone (TFLOP per image), then one per bf16 speed row ``cadsam plan`` quotes
(``src/cadsam/plan_constants.json``) with the TFLOP/s the as-run count implies.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from cadsam import planning  # noqa: E402
from cadsam.backbones import DEFAULT_BATCH, backbone_config  # noqa: E402
from cadsam.commands.bench import IMAGE_SIZE  # noqa: E402
from cadsam.fast.runner import fit  # noqa: E402
from cadsam.methods import build_model  # noqa: E402
from cadsam.planning import PlanRequest  # noqa: E402
from cadsam.provenance import provenance  # noqa: E402
from cadsam.step import forward_backward  # noqa: E402

BACKBONES = ("vit_b", "vit_h", "sam2.1_hiera_b+", "sam2.1_hiera_l")
TERA = 1e12


def step_from_cache(method: str, backbone: str, as_run: bool) -> float:
    """TFLOP per image of the training step from cached embeddings: as written (one image,
    fp32, the plain path), or as ``auto`` runs it in bf16 at the bench's batch."""
    batch = DEFAULT_BATCH[backbone] if as_run else 1
    request = PlanRequest(method, backbone, batch, cache=True, precision="bf16")
    with torch.device("meta"):
        model = build_model(method, backbone, with_encoder=False).train()
    if as_run:  # what the meta device can run: the same structure, nothing compiled
        model = fit(model, planning._counted_runtime(planning.plan_runtime(request)))
    images = torch.empty(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device="meta")
    masks = torch.empty(batch, 1, IMAGE_SIZE, IMAGE_SIZE, device="meta")
    embeddings = torch.empty(batch, *model.layout.shape, device="meta")
    precision = "bf16" if as_run else "fp32"
    with planning._meta_autocast(), planning._Autocast(), FlopCounterMode(display=False) as flops:
        forward_backward(model, images, masks, embeddings, precision)
    return flops.get_total_flops() / TERA / batch


def encoder_forward(backbone: str) -> float:
    """TFLOP of the frozen encoder's forward on one image at its square, as written."""
    with torch.device("meta"):
        model = build_model("zero-shot", backbone).eval()
    size = backbone_config(backbone).image_size
    image = torch.empty(1, 3, size, size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        model.decoder_input(model.sam.image_encoder(image))
    return flops.get_total_flops() / TERA


def counts(backbone: str) -> dict[str, float]:
    encoder = encoder_forward(backbone)
    steps = {
        f"{method}_from_cache_{how}": step_from_cache(method, backbone, how == "as_run")
        for method in ("cad", "decoder")
        for how in ("plain", "as_run")
    }
    return {"encoder_forward": encoder, **steps}


def implied_rate(row: dict, per_backbone: dict[str, dict[str, float]]) -> dict | None:
    """The TFLOP/s a bf16 speed row implies, from the as-run counts (the encoder as written)."""
    count = per_backbone.get(row["backbone"])
    if count is None or row["precision"] != "bf16" or row.get("classes", 1) != 1:
        return None
    if row["method"] not in ("cad", "decoder") or row["runtime"] != "auto":
        return None
    work = count[f"{row['method']}_from_cache_as_run"]
    work += 0.0 if row["cache"] else count["encoder_forward"]
    rate = row["images_per_second"]
    return {
        "backbone": row["backbone"],
        "variant": row["variant"],
        "images_per_second": rate,
        "gpu": row["gpu"],
        "source": row["source"],
        "tflop_per_image": round(work, 4),
        "tflop_per_second": round(work * rate, 1),
    }


def main() -> None:
    source = provenance()
    per_backbone = {}
    for backbone in BACKBONES:
        per_backbone[backbone] = counts(backbone)
        rounded = {k: round(v, 4) for k, v in per_backbone[backbone].items()}
        print(json.dumps({"backbone": backbone, "tflop_per_image": rounded, **source}), flush=True)
    for row in planning.load_constants().get("speeds", []):
        implied = implied_rate(row, per_backbone)
        if implied is not None:
            print(json.dumps(implied))


if __name__ == "__main__":
    main()
