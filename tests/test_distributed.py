"""Evaluation and cache building shared by two processes (gloo) equal one process."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import SHARED_DATA, join_as_rank, randomize_

from cadsam import build_model, build_sam
from cadsam.cache import build_cache, open_cache
from cadsam.data import SegmentationDataset, pair_folders
from cadsam.distributed import setup, teardown
from cadsam.evaluation import evaluate

ISBI = SHARED_DATA / "isbi2012-membrane"
CACHE_OPTIONS = dict(
    views=["identity", "vflip"],
    image_size=64,
    batch_size=3,
    precision="fp32",
    dtype="float32",
    num_workers=0,
    progress=False,
)


def _model():
    torch.manual_seed(0)
    model = build_model("cad", "vit_tiny", adapter_size=32)
    randomize_(model.sam.mask_decoder, seed=3)  # a decoder that predicts something
    return model.eval()


def _eval_worker(rank, world, port, out):
    join_as_rank(rank, world, port)
    dist = setup("cpu")
    try:
        dataset = SegmentationDataset(pair_folders(ISBI / "images", ISBI / "masks")[:7], 64)
        metrics = evaluate(_model(), dataset, batch_size=2, dist=dist, progress=False)
        (out / f"eval{rank}.json").write_text(json.dumps(metrics))
    finally:
        teardown(dist)


def test_sharded_evaluation_equals_one_process(tmp_path):
    torch.multiprocessing.spawn(_eval_worker, args=(2, 29581, tmp_path), nprocs=2)
    dataset = SegmentationDataset(pair_folders(ISBI / "images", ISBI / "masks")[:7], 64)
    single = evaluate(_model(), dataset, batch_size=2, progress=False)
    for rank in (0, 1):  # every rank ends with the merged result
        shared = json.loads((tmp_path / f"eval{rank}.json").read_text())
        assert shared["images"] == single["images"] == 7
        for key, value in single.items():
            assert np.isclose(shared[key], value, rtol=1e-6), key


def _cache_worker(rank, world, port, images, out, checkpoint):
    join_as_rank(rank, world, port)
    build_cache(images, out, "vit_tiny", checkpoint, **CACHE_OPTIONS)


def test_cache_built_by_two_processes_equals_one(tmp_path):
    images = sorted((ISBI / "images").iterdir())[:5]
    sam = build_sam("vit_tiny")
    randomize_(sam, seed=4)
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    torch.multiprocessing.spawn(
        _cache_worker, args=(2, 29583, images, tmp_path / "two", tmp_path / "sam.pth"), nprocs=2
    )
    single = build_cache(
        images, tmp_path / "one", "vit_tiny", tmp_path / "sam.pth", **CACHE_OPTIONS
    )
    shared = open_cache(tmp_path / "two")
    assert shared.complete() and shared.manifest == single.manifest
    assert np.allclose(shared.embeddings, single.embeddings, atol=1e-5)
