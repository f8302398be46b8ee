"""Data: reading files as people have them, pairing, layouts, scanning, augmentation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from cadsam.data import SegmentationDataset, find_pairs, layout_pairs, pair_folders, scan_pairs
from cadsam.data.io import read_image, read_mask
from cadsam.data.transforms import _shift_scale_rotate_matrix, augment_pair
from cadsam.errors import CadsamError

KVASIR = SHARED_DATA / "kvasir-seg-sample"
ISBI = SHARED_DATA / "isbi2012-membrane"


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _rgb(h=6, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_greyscale_rgba_palette_and_16_bit_become_rgb(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    assert np.array_equal(read_image(_save(tmp_path / "g.png", grey)), np.stack([grey] * 3, -1))
    rgba = np.dstack([_rgb(), np.full((6, 8), 7, np.uint8)])
    assert np.array_equal(read_image(_save(tmp_path / "a.png", rgba)), rgba[..., :3])
    palette = Image.fromarray(grey).convert("P")
    palette.save(tmp_path / "p.png")
    assert np.array_equal(read_image(tmp_path / "p.png"), np.array(palette.convert("RGB")))
    wide = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    expected = np.rint(wide / 65535 * 255).astype(np.uint8)
    assert np.array_equal(read_image(tmp_path / "w.png")[..., 0], expected)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.fromarray(_rgb(4, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "r.jpg", exif=exif, quality=100)
    assert read_image(tmp_path / "r.jpg").shape == (10, 4, 3)


def test_mask_threshold_and_palette_masks(tmp_path):
    values = np.array([[0, 100, 127, 128, 255]], dtype=np.uint8)
    assert read_mask(_save(tmp_path / "m.png", values)).tolist() == [
        [False, False, False, True, True]
    ]
    assert read_mask(tmp_path / "m.png", threshold=0).tolist() == [[False, True, True, True, True]]
    indices = Image.fromarray(np.array([[0, 1, 2, 0]], dtype=np.uint8)).convert("P")
    indices.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    indices.save(tmp_path / "pal.png")
    assert read_mask(tmp_path / "pal.png").tolist() == [[False, True, True, False]]


def test_lossy_jpeg_masks_threshold_to_clean_binary():
    mask_path = sorted((KVASIR / "masks").iterdir())[0]
    raw = np.array(Image.open(mask_path).convert("L"))
    noisy = ((raw > 0) & (raw < 255)).mean()
    assert noisy > 0  # JPEG compression left values off 0/255 ...
    mask = read_mask(mask_path)
    assert mask.dtype == bool and 0.01 < mask.mean() < 0.99  # ... the threshold removes them
    near_white = raw > 200
    assert mask[near_white].all() and not mask[raw < 50].any()


def test_pairs_by_stem_not_by_sorted_index(tmp_path):
    for stem in ("b", "a", "c"):
        _save(tmp_path / "img" / f"{stem}.jpg", _rgb())
    for stem in ("c", "a", "b"):  # masks in another format, listed in another order
        _save(tmp_path / "gt" / f"{stem}.png", np.zeros((6, 8), np.uint8))
    pairs = pair_folders(tmp_path / "img", tmp_path / "gt")
    assert [(p.id, p.image.name, p.mask.name) for p in pairs] == [
        ("a", "a.jpg", "a.png"),
        ("b", "b.jpg", "b.png"),
        ("c", "c.jpg", "c.png"),
    ]


def test_unpaired_files_are_listed(tmp_path):
    for stem in ("a", "b", "lonely"):
        _save(tmp_path / "img" / f"{stem}.png", _rgb())
    for stem in ("a", "b", "orphan"):
        _save(tmp_path / "gt" / f"{stem}.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(
        CadsamError, match=r"1 image\(s\) .* no mask .*: lonely; 1 mask\(s\) .* no image: orphan"
    ):
        pair_folders(tmp_path / "img", tmp_path / "gt")


def _fake_layout(root, image_dir, mask_dir, stems):
    for stem in stems:
        _save(root / image_dir / f"{stem}.jpg", _rgb())
        _save(root / mask_dir / f"{stem}.png", np.zeros((6, 8), np.uint8))


def test_named_layouts(tmp_path):
    _fake_layout(tmp_path / "ISTD", "train/train_A", "train/train_B", ["1", "2"])
    _fake_layout(tmp_path / "ISTD", "test/test_A", "test/test_B", ["3"])
    assert [p.id for p in layout_pairs("istd", tmp_path / "ISTD", "train")] == ["1", "2"]
    assert [p.id for p in layout_pairs("istd", tmp_path / "ISTD", "test")] == ["3"]
    # CAMO keeps every split's masks in one GT folder
    _fake_layout(tmp_path / "CAMO", "Images/Train", "GT", ["camo_1", "camo_2"])
    _fake_layout(tmp_path / "CAMO", "Images/Test", "GT", ["camo_9"])
    assert [p.id for p in layout_pairs("camo", tmp_path / "CAMO", "test")] == ["camo_9"]
    # COD10K: only the camouflaged subset
    stems = ["COD10K-CAM-1-Aquatic-1", "COD10K-NonCAM-2-x", "COD10K-CAM-3-y"]
    _fake_layout(tmp_path / "COD", "Train/Image", "Train/GT_Object", stems)
    assert [p.id for p in layout_pairs("cod10k", tmp_path / "COD", "train")] == [stems[0], stems[2]]
    _fake_layout(tmp_path / "S", "TestDataset/CHAMELEON/Imgs", "TestDataset/CHAMELEON/GT", ["x"])
    assert len(layout_pairs("sinet", tmp_path / "S", "test-chameleon")) == 1
    with pytest.raises(CadsamError, match=r"expected folder .*train_A \(is --data-root right\?\)"):
        layout_pairs("istd", tmp_path / "nowhere", "train")
    with pytest.raises(CadsamError, match="unknown --dataset 'kitti'"):
        find_pairs(dataset="kitti", data_root=tmp_path)


def test_scan_finds_corrupt_and_mismatched_files_up_front(tmp_path):
    _save(tmp_path / "img" / "ok.png", _rgb())
    _save(tmp_path / "gt" / "ok.png", np.zeros((6, 8), np.uint8))
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _save(tmp_path / "gt" / "broken.png", np.zeros((6, 8), np.uint8))
    _save(tmp_path / "img" / "big.png", _rgb(12, 16))
    _save(tmp_path / "gt" / "big.png", np.zeros((6, 8), np.uint8))
    pairs = pair_folders(tmp_path / "img", tmp_path / "gt")
    with pytest.raises(CadsamError) as error:  # every bad pair, under the fix for its kind
        scan_pairs(pairs, progress=False)
    lines = str(error.value).splitlines()
    assert lines[0] == "2 of 3 image/mask pairs cannot be used:"
    assert lines[1].startswith("  1 unreadable (") and "--skip-bad" in lines[1]
    assert "cannot read image" in lines[2] and "broken.png" in lines[2]
    assert lines[3].startswith("  1 with a mask of another size (pass --resize-masks")
    assert re.search(r"big\.png is 16x12 but mask .*big\.png is 8x6$", lines[4])
    good, problems = scan_pairs(pairs, skip_bad=True, progress=False)
    assert [p.id for p in good] == ["ok"] and len(problems) == 2
    assert any("cannot read image" in p and "broken.png" in p for p in problems)
    good, problems = scan_pairs(pairs, resize_masks=True, skip_bad=True, progress=False)
    assert [p.id for p in good] == ["big", "ok"]
    item = SegmentationDataset(
        [p for p in good if p.id == "big"], size=8, resize_masks=True, keep_original=True
    )[0]
    assert item["original_mask"].shape == (12, 16)


def test_augmentations_move_image_and_mask_together():
    rng = np.random.default_rng(0)
    image = _rgb(32, 32, seed=1)
    mask = image[..., 0] > 127
    seen = set()
    for _ in range(60):
        out_image, out_mask, name = augment_pair(image, mask, rng)
        seen.add(name)
        agreement = ((out_image[..., 0] > 127) == out_mask).mean()
        if name in (None, "hflip", "vflip", "rot90"):  # exact permutations of pixels
            assert agreement == 1.0
        else:  # resampled: bilinear image vs nearest mask differ only at a few pixels
            assert agreement > 0.7
    assert seen == {None, "hflip", "vflip", "rot90", "shift_scale_rotate"}


def test_shift_scale_rotate_matrix():
    identity = _shift_scale_rotate_matrix(40, 20, np.zeros(2), 1.0, 0.0)
    assert np.allclose(identity, (1, 0, 0, 0, 1, 0))
    # PIL maps output (x, y) to input (a x + b y + c, d x + e y + f): a shift of +10 % in x
    # means output pixel x reads input x - 4.
    a, b, c, d, e, f = _shift_scale_rotate_matrix(40, 20, np.array([0.1, 0.0]), 1.0, 0.0)
    assert np.allclose((a * 10 + b * 5 + c, d * 10 + e * 5 + f), (6, 5))
    # 90 degrees about the centre maps the centre to itself
    a, b, c, d, e, f = _shift_scale_rotate_matrix(20, 20, np.zeros(2), 1.0, 90.0)
    assert np.allclose((a * 10 + b * 10 + c, d * 10 + e * 10 + f), (10, 10))


def test_augmentation_depends_only_on_seed_epoch_and_index():
    pairs = pair_folders(ISBI / "images", ISBI / "masks")[:4]
    a = SegmentationDataset(pairs, size=64, augment=True, seed=3)
    b = SegmentationDataset(pairs, size=64, augment=True, seed=3)
    b.set_epoch(0)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(4))
    b.set_epoch(1)
    assert not all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(4))


def test_dataset_items_from_real_greyscale_and_jpeg_data():
    for root in (ISBI, KVASIR):
        pairs, _ = scan_pairs(pair_folders(root / "images", root / "masks"), progress=False)
        item = SegmentationDataset(pairs, size=96)[0]
        assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.uint8
        assert item["mask"].shape == (1, 96, 96)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_skip_bad_skips_unpaired_files_and_says_so(tmp_path, capsys):
    for stem in ("a", "b", "lonely"):
        _save(tmp_path / "img" / f"{stem}.png", _rgb())
    for stem in ("a", "b", "orphan"):
        _save(tmp_path / "gt" / f"{stem}.png", np.zeros((6, 8), np.uint8))
    pairs = pair_folders(tmp_path / "img", tmp_path / "gt", skip_bad=True)
    assert [p.id for p in pairs] == ["a", "b"]
    err = capsys.readouterr().err
    assert err.startswith("cadsam: warning: skipped unpaired files: 1 image(s) in ")
    assert "no mask in" in err and "lonely" in err and "1 mask(s)" in err and "orphan" in err
    found = find_pairs(tmp_path / "img", tmp_path / "gt", skip_bad=True)
    assert [p.id for p in found] == ["a", "b"]
    for stem in ("a", "b"):
        (tmp_path / "gt" / f"{stem}.png").unlink()
    with pytest.raises(CadsamError, match=r"no image in .* has a mask in .*: 3 image\(s\)"):
        pair_folders(tmp_path / "img", tmp_path / "gt", skip_bad=True)


def test_mask_suffix_pairs_stem_with_stem_plus_suffix(tmp_path):
    images = sorted((KVASIR / "images").iterdir())
    (tmp_path / "masks").mkdir()
    for image in images:  # 00.jpg pairs with 00_mask.jpg
        (tmp_path / "masks" / f"{image.stem}_mask.jpg").symlink_to(KVASIR / "masks" / image.name)
    pairs = pair_folders(KVASIR / "images", tmp_path / "masks", mask_suffix="_mask")
    assert [p.id for p in pairs] == [p.stem for p in images]
    assert all(p.mask.name == f"{p.id}_mask.jpg" for p in pairs)
    # the suffix may include the extension
    with_ext = find_pairs(KVASIR / "images", tmp_path / "masks", mask_suffix="_mask.jpg")
    assert with_ext == pairs
    with pytest.raises(CadsamError, match=r"5 image\(s\) .* have no mask"):
        pair_folders(KVASIR / "images", tmp_path / "masks")  # without the suffix
    _save(tmp_path / "masks" / "notes.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(
        CadsamError, match=r"1 file\(s\) .* do not end in --mask-suffix _mask: notes"
    ):
        pair_folders(KVASIR / "images", tmp_path / "masks", mask_suffix="_mask")
    assert (
        pair_folders(KVASIR / "images", tmp_path / "masks", mask_suffix="_mask", skip_bad=True)
        == pairs
    )
