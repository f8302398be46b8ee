"""Embedding-cache build rate of ``cadsam cache``'s builder on a GPU (random SAM weights).

Makes N 512 x 512 image files (256 synthetic images, repeated under new names) and saves a random checkpoint per backbone, then builds
one cache per backbone and encoder (eager, compiled) and reports two figures: the startup
(from the call to the first batch handed to the writer: loading the checkpoint, starting the
loader workers, compiling) and the steady rate (images per second from the end of the third
batch to the return of the call, the last flush included). Prints one JSON line per case.

Run: python benchmarks/cache_speed.py OUT_DIR [N] [BACKBONE ...]
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

BATCH = {"vit_b": 32, "vit_l": 16, "vit_h": 16}
WARM_BATCHES = 3


def image_files(out: Path, count: int, distinct: int = 256) -> list[Path]:
    made = sorted(
        (make_synthetic_set(out / "data", distinct, 0, size=512) / "train" / "images").iterdir()
    )
    folder = out / "images"
    folder.mkdir(exist_ok=True)
    files = [folder / f"{i:05d}.png" for i in range(count)]
    for i, file in enumerate(files):
        if not file.exists():
            file.hardlink_to(made[i % distinct])
    return files


def main(out: Path, count: int, backbones: list[str]) -> None:
    images = image_files(out, count)
    for backbone in backbones:
        checkpoint = out / f"{backbone}.pth"
        torch.save(build_sam(backbone).state_dict(), checkpoint)
        for compiled in (False, True):
            marks: list[tuple[float, int]] = []  # (time, images) of each batch
            start = time.perf_counter()
            done = build_cache(
                images,
                out / f"cache-{backbone}-{compiled}",
                backbone,
                checkpoint,
                batch_size=BATCH[backbone],
                precision="bf16",
                compile_encoder=compiled,
                num_workers=12,
                progress=False,
                on_batch=lambda n, marks=marks: marks.append((time.perf_counter(), n)),
            )
            end = time.perf_counter()
            warm_time = marks[WARM_BATCHES - 1][0]
            warm_images = sum(n for _, n in marks[:WARM_BATCHES])
            record = {
                "backbone": backbone,
                "compiled": compiled,
                "batch": BATCH[backbone],
                "precision": "bf16",
                "images": count,
                "startup_seconds": round(marks[0][0] - start, 1),
                "steady_images": count - warm_images,
                "steady_images_per_second": round((count - warm_images) / (end - warm_time), 1),
                "overall_images_per_second": round(count / (end - start), 1),
                "complete": done.complete(),
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(
        Path(sys.argv[1]),
        int(sys.argv[2]) if len(sys.argv) > 2 else 1536,
        sys.argv[3:] or ["vit_b", "vit_h"],
    )
