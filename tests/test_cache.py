"""The embedding cache: equal training steps, resumable builds, and every refusal."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, randomize_, rel_err

from cadsam import build_model, build_sam
from cadsam.cache import build_cache, check_cache_for_training, open_cache
from cadsam.config import TrainConfig
from cadsam.data import Pair, SegmentationDataset, pair_folders
from cadsam.data.io import read_image, read_mask
from cadsam.data.transforms import apply_view, resize_pair
from cadsam.errors import CadsamError
from cadsam.sam.image_encoder import ImageEncoderViT
from cadsam.sam2 import build_sam2
from cadsam.step import segmentation_loss
from cadsam.training import train
from cadsam.weights import base_checkpoint_record

ISBI = SHARED_DATA / "isbi2012-membrane"
SIZE = 64


@pytest.fixture()
def data(tmp_path):
    for kind in ("images", "masks"):
        (tmp_path / kind).mkdir()
        for path in sorted((ISBI / kind).iterdir())[:6]:
            (tmp_path / kind / path.name).write_bytes(path.read_bytes())
    return tmp_path


def _build(data, out, sam_file, **kwargs):
    images = sorted((data / "images").iterdir())
    options = dict(
        views=["identity", "hflip"],
        image_size=SIZE,
        batch_size=4,
        precision="fp32",
        dtype="float32",
        num_workers=0,
        progress=False,
    )
    return build_cache(images, out, "vit_tiny", sam_file, **{**options, **kwargs})


def test_a_step_from_the_cache_equals_a_step_with_the_encoder(data, tmp_path, sam_file):
    cache = _build(data, tmp_path / "cache", sam_file)
    pair = pair_folders(data / "images", data / "masks")[2]
    image, mask = resize_pair(read_image(pair.image), read_mask(pair.mask), SIZE)
    image, mask = apply_view(image, "hflip"), apply_view(mask, "hflip")  # the same view in both
    images = torch.from_numpy(image).permute(2, 0, 1)[None]
    target = torch.from_numpy(mask).float()[None, None]
    embedding = torch.from_numpy(np.array(cache.embeddings[cache.entry(2, "hflip")]))[None]

    torch.manual_seed(0)
    full = build_model("cad", "vit_tiny", sam_file, adapter_size=32)
    cached = build_model("cad", "vit_tiny", sam_file, with_encoder=False, adapter_size=32)
    cached.load_trainable_state_dict(full.trainable_state_dict())
    losses = []
    for model, given in ((full, None), (cached, embedding)):
        loss = segmentation_loss(model(images, given), target)
        loss.backward()
        losses.append(loss)
    assert abs(losses[0].item() - losses[1].item()) <= 1e-5 * abs(losses[0].item())
    # over the whole gradient vector: a conv bias right before BatchNorm has a gradient of
    # zero in exact arithmetic, so its own relative error would compare rounding noise
    grads = [
        torch.cat([p.grad.flatten() for p in m.trainable_parameters() if p.grad is not None])
        for m in (full, cached)
    ]
    assert rel_err(grads[1], grads[0]) < 1e-5


def test_an_interrupted_build_resumes_without_recomputing(data, tmp_path, sam_file, monkeypatch):
    partial = _build(data, tmp_path / "cache", sam_file, stop_after=1)
    assert int(partial.done.sum()) == 4 and not partial.complete()
    seen = []
    forward = ImageEncoderViT.forward
    monkeypatch.setattr(
        ImageEncoderViT, "forward", lambda self, x: seen.append(len(x)) or forward(self, x)
    )
    finished = _build(data, tmp_path / "cache", sam_file)
    assert sum(seen) == 12 - 4 and finished.complete()
    monkeypatch.undo()
    fresh = _build(data, tmp_path / "fresh", sam_file)
    assert np.allclose(finished.embeddings, fresh.embeddings, atol=1e-6)


def test_a_cache_does_not_run_without_a_checkpoint(data, tmp_path):
    with pytest.raises(CadsamError, match="a cache needs --checkpoint"):
        build_cache(sorted((data / "images").iterdir()), tmp_path / "c", "vit_tiny", None)


def test_a_refused_checkpoint_writes_nothing(data, tmp_path, sam_file):
    """The corrected command must then run: a manifest left behind would refuse it."""
    wrong = tmp_path / "sam2.pt"
    torch.save({"model": build_sam2("sam2.1_hiera_tiny_test").state_dict()}, wrong)
    with pytest.raises(CadsamError, match="SAM 2"):
        _build(data, tmp_path / "cache", wrong)
    assert not (tmp_path / "cache").exists()
    assert _build(data, tmp_path / "cache", sam_file).complete


def test_refusals(data, tmp_path, sam_file):
    cache = _build(data, tmp_path / "cache", sam_file)
    pairs = pair_folders(data / "images", data / "masks")
    base = base_checkpoint_record(sam_file)
    assert check_cache_for_training(cache, pairs, "vit_tiny", base, SIZE) == list(range(6))

    other = tmp_path / "other.pth"
    sam = build_sam("vit_tiny")
    randomize_(sam, seed=99)
    torch.save(sam.state_dict(), other)
    with pytest.raises(CadsamError, match="sha256 differs"):
        check_cache_for_training(cache, pairs, "vit_tiny", base_checkpoint_record(other), SIZE)
    with pytest.raises(CadsamError, match="image_size: cache has 64, wanted 128"):
        check_cache_for_training(cache, pairs, "vit_tiny", base, 128)
    original = (data / "images" / "00.png").read_bytes()  # an image changed since
    (data / "images" / "00.png").write_bytes((ISBI / "images" / "19.png").read_bytes())
    with pytest.raises(CadsamError, match=r"holds other images: 1 image\(s\) changed since"):
        check_cache_for_training(cache, pairs, "vit_tiny", base, SIZE)
    (data / "images" / "00.png").write_bytes(original)
    stranger = Pair("19", ISBI / "images" / "19.png", ISBI / "masks" / "19.png")  # never cached
    with pytest.raises(
        CadsamError, match=r"holds other images: 1 image\(s\) not in it \(e.g. 19\)"
    ):
        check_cache_for_training(cache, [*pairs, stranger], "vit_tiny", base, SIZE)
    with pytest.raises(CadsamError, match="holds a cache made differently"):
        _build(data, tmp_path / "cache", sam_file, image_size=128)
    with pytest.raises(CadsamError, match="cannot be cached: shift-scale-rotate"):
        _build(data, tmp_path / "ssr", sam_file, views=["identity", "shift_scale_rotate"])


def test_incomplete_truncated_and_missing_caches(data, tmp_path, sam_file):
    partial = _build(data, tmp_path / "partial", sam_file, stop_after=1)
    pairs = pair_folders(data / "images", data / "masks")
    with pytest.raises(CadsamError, match=r"is incomplete \(4 of 12 entries\)"):
        check_cache_for_training(partial, pairs, "vit_tiny", base_checkpoint_record(sam_file), SIZE)
    whole = _build(data, tmp_path / "whole", sam_file)
    path = whole.root / "embeddings.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CadsamError, match="truncated or corrupt"):
        open_cache(whole.root)
    with pytest.raises(CadsamError, match="not an embedding cache"):
        open_cache(tmp_path / "nothing")


def test_training_from_the_cache_has_no_encoder(data, tmp_path, sam_file):
    _build(data, tmp_path / "cache", sam_file)
    cfg = dict(
        method="cad",
        backbone="vit_tiny",
        checkpoint=str(sam_file),
        images=str(data / "images"),
        masks=str(data / "masks"),
        image_size=SIZE,
        epochs=1,
        num_workers=0,
        progress=False,
        options={"adapter_size": 32},
    )
    model = train(TrainConfig(**cfg, cache=str(tmp_path / "cache"), out=str(tmp_path / "run")))
    assert model.sam.image_encoder is None
    assert not any("image_encoder" in name for name in model.state_dict())
    with pytest.raises(CadsamError, match="acts inside the image encoder"):
        train(
            TrainConfig(
                **{**cfg, "method": "sam-adapter-paper", "options": {}},
                cache=str(tmp_path / "cache"),
                out=str(tmp_path / "sa"),
            )
        )


def test_cached_views_follow_the_image_and_mask(data, tmp_path, sam_file):
    cache = _build(data, tmp_path / "cache", sam_file)
    pairs = pair_folders(data / "images", data / "masks")
    dataset = SegmentationDataset(
        pairs, SIZE, augment=True, seed=1, cache=(str(cache.root), cache.views, list(range(6)))
    )
    plain = SegmentationDataset(pairs, SIZE)
    flips = 0
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for i in range(6):
            item, base = dataset[i], plain[i]
            flipped = torch.equal(item["image"], base["image"].flip(-1))
            same = torch.equal(item["image"], base["image"])
            assert flipped or same
            view = "hflip" if flipped and not same else "identity"
            assert torch.equal(
                item["mask"], base["mask"].flip(-1) if view == "hflip" else base["mask"]
            )
            expected = torch.from_numpy(np.array(cache.embeddings[cache.entry(i, view)]))
            assert torch.equal(item["embedding"], expected)
            flips += view == "hflip"
    assert 0 < flips < 24


def test_a_failing_write_is_reported_and_marks_nothing_done(data, tmp_path, sam_file, monkeypatch):
    from cadsam.cache import _EntryWriter

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = _build(data, tmp_path / "cache", sam_file, stop_after=0)
    monkeypatch.setattr(os, "pwrite", disk_full)
    writer = _EntryWriter(open_cache(cache.root, writable=True))
    writer.put(np.array([0]), torch.zeros(1, 256, 16, 16), None)
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    assert int(open_cache(cache.root).done.sum()) == 0


def test_the_writer_puts_rows_in_any_order_where_they_belong(data, tmp_path, sam_file):
    from cadsam.cache import _EntryWriter

    cache = _build(data, tmp_path / "cache", sam_file, stop_after=0)
    rows = np.array([3, 4, 0, 2, 5])  # runs 3-4, 0, 2, 5
    values = torch.randn(len(rows), 256, 16, 16)
    writer = _EntryWriter(open_cache(cache.root, writable=True), flush_seconds=0)
    writer.put(rows[:3], values[:3], None)
    writer.put(rows[3:], values[3:], None)
    writer.close()
    reopened = open_cache(cache.root)
    assert np.array_equal(reopened.embeddings[rows], values.numpy())
    assert reopened.done.tolist() == [int(i in rows) for i in range(len(reopened.done))]
