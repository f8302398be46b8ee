"""How much arithmetic a training step is, counted on PyTorch's meta device (no GPU, no weights):
the frozen encoder's forward, CAD's adapter forward and backward, the decoder's forward and
backward with the loss, per image at the bench's settings (512-pixel images, the encoder at
its square, the adapter at 512). Divided into a measured images/s, it says how close a row
runs to the card's arithmetic peak, which no profile of launches can say.

    python benchmarks/experiments/step_flops.py > benchmarks/experiments/cpu_step_flops.jsonl

Each line: a backbone's counts (TFLOP per image, two per multiply-add, as
``torch.utils.flop_counter`` counts), then one line per bf16 speed row ``cadsam plan`` quotes
(``src/cadsam/plan_constants.json``) with the TFLOP/s it implies.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from cadsam.backbones import backbone_config  # noqa: E402
from cadsam.commands.bench import IMAGE_SIZE  # noqa: E402
from cadsam.methods import build_model  # noqa: E402
from cadsam.planning import load_constants  # noqa: E402
from cadsam.provenance import provenance  # noqa: E402
from cadsam.step import forward_backward  # noqa: E402

BACKBONES = ("vit_b", "vit_h", "sam2.1_hiera_b+", "sam2.1_hiera_l")
TERA = 1e12


def _counted(run) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / TERA


def step_from_cache(method: str, backbone: str) -> float:
    """TFLOP of one image's training step from cached embeddings: forward, loss, backward."""
    with torch.device("meta"):
        model = build_model(method, backbone, with_encoder=False).train()
    images = torch.empty(1, 3, IMAGE_SIZE, IMAGE_SIZE, device="meta")
    masks = torch.empty(1, 1, IMAGE_SIZE, IMAGE_SIZE, device="meta")
    embeddings = torch.empty(1, *model.layout.shape, device="meta")
    return _counted(lambda: forward_backward(model, images, masks, embeddings, "fp32"))


def encoder_forward(backbone: str) -> float:
    """TFLOP of the frozen encoder's forward on one image at its square, to what the decoder
    reads."""
    with torch.device("meta"):
        model = build_model("zero-shot", backbone).eval()
    size = backbone_config(backbone).image_size
    image = torch.empty(1, 3, size, size, device="meta")
    with torch.no_grad():
        return _counted(lambda: model.decoder_input(model.sam.image_encoder(image)))


def counts(backbone: str) -> dict[str, float]:
    encoder = encoder_forward(backbone)
    decoder = step_from_cache("decoder", backbone)
    cad_cached = step_from_cache("cad", backbone)
    return {
        "encoder_forward": encoder,
        "adapter_forward_backward": cad_cached - decoder,
        "decoder_forward_backward": decoder,
        # per variant family: what one image's step does
        "cad-cache": cad_cached,
        "cad": encoder + cad_cached,
        "decoder": encoder + decoder,
    }


def main() -> None:
    source = provenance()
    per_backbone = {}
    for backbone in BACKBONES:
        per_backbone[backbone] = counts(backbone)
        rounded = {k: round(v, 4) for k, v in per_backbone[backbone].items()}
        print(json.dumps({"backbone": backbone, "tflop_per_image": rounded, **source}))
    for row in load_constants().get("speeds", []):
        family = "cad-cache" if row["cache"] and row["method"] == "cad" else row["method"]
        tflop = per_backbone.get(row["backbone"], {}).get(family)
        if tflop is None or row["precision"] != "bf16" or row.get("classes", 1) != 1:
            continue
        rate = row["images_per_second"]
        print(
            json.dumps(
                {
                    "backbone": row["backbone"],
                    "variant": row["variant"],
                    "images_per_second": rate,
                    "gpu": row["gpu"],
                    "source": row["source"],
                    "tflop_per_second": round(tflop * rate, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
