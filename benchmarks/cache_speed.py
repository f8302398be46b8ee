"""Embedding-cache build rate of ``cadsam cache``'s builder on a GPU (random SAM weights).

Builds N synthetic 512 x 512 images, saves a random checkpoint per backbone, then for eager
and compiled encoders: a short first pass (warm-up and compilation), then the rest of the same
cache (it resumes), timed. Prints one JSON line per case.

Run: python benchmarks/cache_speed.py OUT_DIR [N]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from cadsam.cache import build_cache
from cadsam.data.synthetic import make_synthetic_set
from cadsam.sam import build_sam


def main(out: Path, count: int) -> None:
    images = sorted(
        (make_synthetic_set(out / "data", count, 0, size=512) / "train" / "images").iterdir()
    )
    for backbone, batch in (("vit_b", 32), ("vit_h", 16)):
        checkpoint = out / f"{backbone}.pth"
        torch.save(build_sam(backbone).state_dict(), checkpoint)
        for compiled in (False, True):
            cache = out / f"cache-{backbone}-{compiled}"
            common = dict(
                batch_size=batch,
                precision="bf16",
                compile_encoder=compiled,
                num_workers=12,
                progress=False,
            )
            start = time.perf_counter()
            build_cache(images, cache, backbone, checkpoint, stop_after=2, **common)
            warm = time.perf_counter() - start
            start = time.perf_counter()
            done = build_cache(images, cache, backbone, checkpoint, **common)
            seconds = time.perf_counter() - start
            timed = count - 2 * batch
            print(
                json.dumps(
                    {
                        "backbone": backbone,
                        "compiled": compiled,
                        "batch": batch,
                        "precision": "bf16",
                        "images": count,
                        "warmup_seconds": round(warm, 1),
                        "timed_images": timed,
                        "images_per_second": round(timed / seconds, 1),
                        "complete": done.complete(),
                        "gpu": torch.cuda.get_device_name(),
                        "torch": torch.__version__,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1024)
