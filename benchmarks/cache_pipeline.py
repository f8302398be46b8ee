"""Where the cache builder's time goes: each stage of its pipeline alone, at its batch size.

Prints JSON lines, images per second: the loader alone (decode, resize, view, pin), the
frozen encoder alone on batches already on the GPU (SAM's preprocessing included, compiled),
and the whole builder with its writes to disk switched off.

Run: python benchmarks/cache_pipeline.py OUT_DIR [BACKBONE]  (after cache_speed.py made
OUT_DIR/images and OUT_DIR/BACKBONE.pth)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cadsam import cache
from cadsam.methods import build_model
from cadsam.precision import autocast

BATCH = {"vit_b": 32, "vit_l": 16, "vit_h": 16}


def report(stage: str, backbone: str, images: int, seconds: float) -> None:
    print(
        json.dumps(
            {"stage": stage, "backbone": backbone, "images_per_second": round(images / seconds, 1)}
        ),
        flush=True,
    )


def main(out: Path, backbone: str = "vit_b") -> None:
    images = sorted((out / "images").iterdir())
    batch = BATCH[backbone]
    loader = DataLoader(
        cache._ViewImages(images, ["identity"], 512, list(range(len(images)))),
        batch_size=batch,
        num_workers=12,
        pin_memory=True,
    )
    start, seen = time.perf_counter(), 0
    for _, batch_images in loader:
        seen += len(batch_images)
    report("loader", backbone, seen, time.perf_counter() - start)

    model = build_model(
        "zero-shot", backbone, out / f"{backbone}.pth", encoder_chunk=0, compile_encoder=True
    )
    model.cuda().eval()
    x = batch_images.cuda()
    with torch.no_grad(), autocast(torch.device("cuda"), "bf16"):
        for steps in (3, 10):  # warm-up (compilation), then timed
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                model.frozen_embeddings(x)
            torch.cuda.synchronize()
    report("encoder", backbone, steps * len(x), time.perf_counter() - start)

    marks: list[float] = []
    cache._EntryWriter._write = lambda self, rows, embeddings: None  # no disk
    cache.build_cache(
        images,
        out / f"cache-nowrite-{backbone}",
        backbone,
        out / f"{backbone}.pth",
        batch_size=batch,
        compile_encoder=True,
        num_workers=12,
        progress=False,
        on_batch=lambda n: marks.append(time.perf_counter()),
    )
    end = time.perf_counter()
    report("builder without writes", backbone, len(images) - 3 * batch, end - marks[2])


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
