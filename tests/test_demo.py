"""The demo end to end on a small budget, and its synthetic data."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from cadsam.data.synthetic import make_synthetic_set
from cadsam.demo import run_demo
from cadsam.weights import load_weights


def test_synthetic_masks_mark_what_differs(tmp_path):
    root = make_synthetic_set(tmp_path, n_train=6, n_test=0, size=96, seed=3)
    for path in sorted((root / "train" / "images").iterdir()):
        image = np.array(Image.open(path)).astype(float).mean(-1)
        mask = np.array(Image.open(root / "train" / "masks" / path.name)) > 127
        assert 0.03 < mask.mean() < 0.6
        if path.name.startswith("shadow"):  # darker inside
            assert image[mask].mean() < 0.85 * image[~mask].mean()
        else:  # about the same brightness, another stripe orientation
            gy, gx = np.gradient(image)
            angle = np.arctan2(gy, gx) % np.pi
            assert abs(image[mask].mean() - image[~mask].mean()) < 15
            assert abs(np.median(angle[mask]) - np.median(angle[~mask])) > 0.3


def test_demo_writes_a_consistent_report(tmp_path):
    report = run_demo(
        tmp_path, n_train=8, n_test=4, size=64, epochs=1, adapter_size=32, progress=False
    )
    text = report.read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results] == ["decoder", "cad", "sam-adapter-paper (not trained)"]
    for r in results[:2]:
        assert f"| {r['method']} | {r['trainable']:,} | {r['activations_mib']:.1f} |" in text
        assert f"{r['dice']:.4f}" in text and 0 <= r["dice"] <= 1
    for picture in ("tradeoff.png", "examples.png"):
        assert Image.open(tmp_path / picture).size[0] > 0
    examples = Image.open(tmp_path / "examples.png")
    assert examples.size == (64 * 4, 64 * 4)  # image, truth, decoder, cad x four examples
    model, meta = load_weights(tmp_path / "runs" / "cad" / "last.safetensors")
    assert meta["base_checkpoint"]["name"].endswith("sam_vit_tiny_random.pth")
    assert model.sam.image_encoder is not None  # trained from the cache, usable with the encoder


def test_demo_picks_the_given_then_a_cached_then_a_random_sam(tmp_path, monkeypatch):
    import torch

    from cadsam.demo import pick_backbone
    from cadsam.sam import build_sam

    monkeypatch.setenv("CADSAM_HOME", str(tmp_path / "home"))
    assert pick_backbone(None, tmp_path) == ("vit_tiny", str(tmp_path / "sam_vit_tiny_random.pth"))
    given = tmp_path / "mine.pth"
    torch.save(build_sam("vit_tiny").state_dict(), given)
    assert pick_backbone(str(given), tmp_path) == ("vit_tiny", str(given))
    cached = tmp_path / "home" / "checkpoints" / "sam_vit_b_01ec64.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"found by name")
    assert pick_backbone(None, tmp_path) == ("vit_b", str(cached))


def test_demo_refuses_a_checkpoint_of_no_known_backbone(tmp_path):
    import pytest
    import torch

    from cadsam.demo import pick_backbone
    from cadsam.errors import CadsamError
    from cadsam.sam.image_encoder import ImageEncoderViT
    from cadsam.sam.prompt_encoder import PromptEncoder

    odd = {
        f"image_encoder.{k}": v
        for k, v in ImageEncoderViT(img_size=64, embed_dim=32, depth=1, num_heads=1)
        .state_dict()
        .items()
    }
    odd |= {f"prompt_encoder.{k}": v for k, v in PromptEncoder().state_dict().items()}
    odd["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(CadsamError, match=r"no known backbone \(embed dim 32, 1 blocks\)"):
        pick_backbone(str(tmp_path / "odd.pth"), tmp_path)
