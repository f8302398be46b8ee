"""The methods on SAM 2.1: parameter counts, what CAD changes, LoRA on Hiera, the embedding
cache of the embedding and the high-resolution maps, and training from the command line."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, rel_err
from safetensors.torch import save_file
from test_train import _isbi_subset

from cadsam import build_model
from cadsam.backbones import feature_layout
from cadsam.cache import build_cache, check_cache_for_training, open_cache
from cadsam.commands import main
from cadsam.data import pair_folders
from cadsam.data.io import read_image, read_mask
from cadsam.data.transforms import apply_view, resize_pair
from cadsam.errors import CadsamError
from cadsam.methods.cad import ConvAdapter
from cadsam.sam import build_sam
from cadsam.sam2 import SAM2_CONFIGS, build_sam2
from cadsam.step import segmentation_loss
from cadsam.weights import base_checkpoint_record

TINY = "sam2.1_hiera_tiny_test"
SAM2_BACKBONES = ["sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l", TINY]
ISBI = SHARED_DATA / "isbi2012-membrane"
SIZE = 64
DECODER = 4_190_437  # SAM 2.1's mask decoder (4,215,109) without conv_s0/conv_s1 (24,672)
CAD = 1_773_568  # the adapter's 256 channels, whatever the backbone
FAST = ["--image-size", str(SIZE), "--set", "num_workers=0", "--no-progress"]


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory):
    """Random SAM 2.1 weights in Meta's format."""
    path = tmp_path_factory.mktemp("sam2") / "sam2_tiny.pt"
    torch.manual_seed(3)
    torch.save({"model": build_sam2(TINY).state_dict()}, path)
    return path


@pytest.fixture()
def data(tmp_path):
    _isbi_subset(tmp_path, 4)
    return tmp_path


def _images(batch=2, size=SIZE, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _lora_count(trunk: torch.nn.Module, rank: int = 4) -> int:
    """Per block, rank-``rank`` updates of q and v: input width -> rank -> output width."""
    qkvs = [block.attn.qkv for block in trunk.blocks]
    return sum(2 * rank * (qkv.in_features + qkv.out_features // 3) for qkv in qkvs)


@pytest.mark.parametrize("backbone", SAM2_BACKBONES)
def test_params_command_counts_every_method(backbone, capsys):
    with torch.device("meta"):
        sam2 = build_sam2(backbone)
    decoder = sam2.sam_mask_decoder
    derived = _count(decoder) - _count(decoder.conv_s0) - _count(decoder.conv_s1)
    assert derived == DECODER
    with torch.device("meta"):
        assert _count(ConvAdapter(SAM2_CONFIGS[backbone].embedding_size)) == CAD
    expected = {
        "zero-shot": 0,
        "decoder": DECODER,
        "cad": DECODER + CAD,
        "lora": DECODER + _lora_count(sam2.image_encoder.trunk),
    }
    for method, trainable in expected.items():
        assert main(["params", "--backbone", backbone, "--method", method, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["trainable"] == trainable, method
        own = CAD if method == "cad" else trainable - DECODER if method == "lora" else 0
        assert out["total"] == _count(sam2) + own, method


def test_lora_counts_are_pinned():
    """What the README's table says (rank 4)."""
    pinned = {"sam2.1_hiera_t": 69_888, "sam2.1_hiera_b+": 165_760, "sam2.1_hiera_l": 429_696}
    for backbone, lora in pinned.items():
        with torch.device("meta"):
            counts = build_model("lora", backbone).parameter_counts()
        assert counts["trainable"] == DECODER + lora


@pytest.mark.parametrize("method", ["sam-adapter", "sam-adapter-paper"])
def test_sam_adapter_on_sam2_is_a_one_line_error(method, capsys, tmp_path):
    assert main(["params", "--backbone", "sam2.1_hiera_b+", "--method", method]) == 1
    err = capsys.readouterr().err
    assert "SAM-Adapter is SAM 1 only" in err and len(err.strip().splitlines()) == 1
    # train says so before it reads images or checkpoints: neither of these exists
    missing = ["--images", "no/images", "--masks", "no/masks", "--checkpoint", "sam2.1_hiera_l"]
    args = [
        "train",
        "--method",
        method,
        "--backbone",
        "sam2.1_hiera_l",
        *missing,
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 1
    assert "SAM-Adapter is SAM 1 only" in capsys.readouterr().err


def test_zero_shot_is_the_sam2_image_path():
    """Preprocessing, whole-image box and logits upsampled from low-res straight to the size."""
    torch.manual_seed(0)
    model = build_model("zero-shot", TINY).eval()
    images = _images()
    sam = model.sam
    with torch.no_grad():
        embed, high_res = sam.image_features(sam.preprocess(images))
        low_res, _ = sam.decode(embed, high_res, boxes=sam.whole_image_boxes(2))
        expected = F.interpolate(low_res, (SIZE, SIZE), mode="bilinear", align_corners=False)
        assert rel_err(model(images), expected) < 1e-6
        parts = model.layout.unpack(model.frozen_embeddings(images))
    for part, reference in zip(parts, [embed, *high_res], strict=True):
        assert torch.equal(part, reference)


def test_cad_adds_to_the_embedding_and_leaves_high_res_features_alone():
    torch.manual_seed(0)
    model = build_model("cad", TINY, adapter_size=32).eval()
    images = _images()
    with torch.no_grad():
        frozen = model.layout.unpack(model.frozen_embeddings(images))
        adapted = model.layout.unpack(model.image_embeddings(images))
        adapter = model.adapter(model.adapter_input(images))
    assert adapter.shape == frozen[0].shape == (2, 256, 16, 16)
    assert adapter.abs().max() > 0
    assert rel_err(adapted[0], frozen[0] + 0.1 * adapter) < 1e-6
    for a, b in zip(adapted[1:], frozen[1:], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["decoder", "cad", "lora"])
def test_gradients_reach_the_decoder_but_not_conv_s0_s1(method):
    torch.manual_seed(0)
    model = build_model(method, TINY, **({"adapter_size": 32} if method == "cad" else {}))
    decoder = model.sam.mask_decoder
    assert not any(
        p.requires_grad for p in [*decoder.conv_s0.parameters(), *decoder.conv_s1.parameters()]
    )
    assert not model.sam.no_mem_embed.requires_grad
    assert not any("conv_s" in name for name in model.trainable_state_dict())
    images = _images()
    if method == "lora":  # B starts at zero: give it a value, so A gets a gradient too
        with torch.no_grad():
            for low_rank in [*model.encoder_adapter.q, *model.encoder_adapter.v]:
                low_rank.b.weight.normal_(0, 0.1)
    segmentation_loss(model(images), (images.mean(1, keepdim=True) > 127).float()).backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None, f"frozen {name} received a gradient"
    own = {"cad": model.adapter, "lora": model.encoder_adapter}.get(method)
    for name, p in own.named_parameters() if own is not None else []:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert decoder.output_upscaling[0].weight.grad.abs().sum() > 0


def test_lora_on_hiera_starts_as_sam2_and_merges_exactly():
    torch.manual_seed(0)
    # the decoder method: SAM 2.1 answering with the first mask token, as every trained one does
    base = build_model("decoder", TINY).eval()
    lora = build_model("lora", TINY).eval()
    lora.sam.load_state_dict(base.sam.state_dict())
    images = _images()
    with torch.no_grad():
        assert torch.equal(lora(images), base(images))
        for low_rank in [*lora.encoder_adapter.q, *lora.encoder_adapter.v]:
            low_rank.b.weight.normal_(0, 0.1)
        hooked = lora(images)
        assert rel_err(hooked, base(images)) > 1e-3  # the updates act
        merged = lora.for_inference()(images)
    assert rel_err(merged, hooked) < 1e-4


def _cache(data, out, sam2_file, **kwargs):
    options = dict(
        views=["identity", "hflip"],
        image_size=SIZE,
        batch_size=4,
        precision="fp32",
        dtype="float32",
        num_workers=0,
        progress=False,
    )
    images = sorted((data / "images").iterdir())
    return build_cache(images, out, TINY, sam2_file, **{**options, **kwargs})


def test_the_cache_stores_embedding_and_high_res_maps(data, tmp_path, sam2_file):
    cache = _cache(data, tmp_path / "cache", sam2_file)
    layout = feature_layout(TINY)
    assert cache.manifest["parts"] == [
        ["image_embedding", [256, 16, 16]],
        ["high_res_s0", [32, 64, 64]],
        ["high_res_s1", [64, 32, 32]],
    ]
    assert cache.embeddings.shape == (8, 256 * 16 * 16 + 32 * 64 * 64 + 64 * 32 * 32)
    assert cache.layout == layout and cache.complete()
    model = build_model("zero-shot", TINY, sam2_file)
    image, _ = resize_pair(
        read_image(data / "images" / "01.png"), read_mask(data / "masks" / "01.png"), SIZE
    )
    view = torch.from_numpy(apply_view(image, "hflip")).permute(2, 0, 1)[None]
    row = torch.from_numpy(np.array(cache.embeddings[cache.entry(1, "hflip")]))[None]
    assert rel_err(row, model.frozen_embeddings(view)) < 1e-5
    pairs = pair_folders(data / "images", data / "masks")
    base = base_checkpoint_record(sam2_file)
    assert check_cache_for_training(cache, pairs, TINY, base, SIZE) == list(range(4))
    with pytest.raises(CadsamError, match=r"backbone: cache has 'sam2\.1_hiera_tiny_test'"):
        check_cache_for_training(cache, pairs, "sam2.1_hiera_t", base, SIZE)


def test_bytes_per_image():
    """SAM: 2 MiB of float16 at ViT-B; SAM 2.1: 4 Mi values, 8 MiB, on every backbone."""
    assert math.prod(feature_layout("vit_b").shape) * 2 == 2 * 2**20
    for backbone in SAM2_BACKBONES[:4]:
        layout = feature_layout(backbone)
        assert layout.sizes == [256 * 64 * 64, 32 * 256 * 256, 64 * 128 * 128]
        assert math.prod(layout.shape) * 2 == 8 * 2**20


def test_a_step_from_the_cache_equals_a_step_with_the_encoder(data, tmp_path, sam2_file):
    cache = _cache(data, tmp_path / "cache", sam2_file)
    pair = pair_folders(data / "images", data / "masks")[2]
    image, mask = resize_pair(read_image(pair.image), read_mask(pair.mask), SIZE)
    image, mask = apply_view(image, "hflip"), apply_view(mask, "hflip")
    images = torch.from_numpy(image).permute(2, 0, 1)[None]
    target = torch.from_numpy(mask).float()[None, None]
    row = torch.from_numpy(np.array(cache.embeddings[cache.entry(2, "hflip")]))[None]
    for method in ("decoder", "cad"):
        opts = {"adapter_size": 32} if method == "cad" else {}
        torch.manual_seed(0)
        full = build_model(method, TINY, sam2_file, **opts)
        cached = build_model(method, TINY, sam2_file, with_encoder=False, **opts)
        assert cached.sam.image_encoder is None
        cached.load_trainable_state_dict(full.trainable_state_dict())
        losses = []
        for model, given in ((full, None), (cached, row)):
            loss = segmentation_loss(model(images, given), target)
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])
        grads = [
            torch.cat([p.grad.flatten() for p in m.trainable_parameters() if p.grad is not None])
            for m in (full, cached)
        ]
        assert rel_err(grads[1], grads[0]) < 1e-5, method


def test_a_format_1_sam_cache_still_opens(data, tmp_path):
    sam_file = tmp_path / "sam_tiny.pth"
    torch.save(build_sam("vit_tiny").state_dict(), sam_file)
    images = sorted((data / "images").iterdir())
    cache = build_cache(
        images, tmp_path / "c", "vit_tiny", sam_file, image_size=SIZE, num_workers=0, progress=False
    )
    assert cache.embeddings.shape == (4, 256, 16, 16)
    manifest_path = cache.root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["parts"] == [["image_embedding", [256, 16, 16]]]
    old = {k: v for k, v in manifest.items() if k != "parts"}
    manifest_path.write_text(json.dumps({**old, "format": 1, "channels": 256, "grid": 16}))
    reopened = open_cache(cache.root)
    assert reopened.manifest == manifest and np.array_equal(reopened.embeddings, cache.embeddings)
    pairs = pair_folders(data / "images", data / "masks")
    check_cache_for_training(reopened, pairs, "vit_tiny", base_checkpoint_record(sam_file), SIZE)
    manifest_path.write_text(json.dumps({**manifest, "format": 9}))
    with pytest.raises(
        CadsamError, match="is a cache of format 9; this cadsam reads formats 1 and 2"
    ):
        open_cache(cache.root)


def test_train_decoder_and_cad_with_and_without_the_cache(data, tmp_path, sam2_file, capsys):
    sam2 = ["--backbone", TINY, "--checkpoint", str(sam2_file)]
    pairs = ["--images", str(data / "images"), "--masks", str(data / "masks")]
    cache = tmp_path / "cache"
    args = ["cache", *sam2, "--images", str(data / "images"), "--out", str(cache)]
    assert main([*args, "--image-size", str(SIZE), "--num-workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "0.5 MiB (524,288 bytes) per image and view" in out
    assert "image_embedding 256x16x16 + high_res_s0 32x64x64 + high_res_s1 64x32x32" in out
    for method in ("decoder", "cad"):
        for cached in (False, True):
            run = tmp_path / f"{method}-{cached}"
            extra = ["--cache", str(cache)] if cached else []
            extra += ["--set", "adapter_size=32"] if method == "cad" else []
            train = ["train", "--method", method, *sam2, *pairs, "--epochs", "1", *FAST]
            assert main([*train, "--batch-size", "2", *extra, "--out", str(run)]) == 0
            metrics = json.loads((run / "metrics.jsonl").read_text())
            assert math.isfinite(metrics["loss"])
    capsys.readouterr()
    evaluate = ["eval", "--weights", str(tmp_path / "cad-True"), *pairs, "--json"]
    assert main([*evaluate, "--num-workers", "0", "--image-size", str(SIZE)]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["dice"] <= 1


def test_wrong_checkpoint_files_are_one_line_errors(data, tmp_path, sam2_file, capsys):
    sam1_file = tmp_path / "sam1.pth"
    torch.save(build_sam("vit_tiny").state_dict(), sam1_file)
    sam1_safetensors = tmp_path / "sam1.safetensors"  # read as SAM's loader reads it
    save_file({k: v.contiguous() for k, v in torch.load(sam1_file).items()}, sam1_safetensors)
    pairs = ["--images", str(data / "images"), "--masks", str(data / "masks")]
    train = ["train", "--method", "decoder", *pairs, "--epochs", "1", *FAST]
    cases = [
        (TINY, sam1_file, r"sam1\.pth is a SAM \(1\) checkpoint, not SAM 2\.1"),
        (TINY, sam1_safetensors, r"sam1\.safetensors is a SAM \(1\) checkpoint, not SAM 2\.1"),
        ("vit_tiny", sam2_file, r"SAM 2|not a SAM state_dict"),
        ("sam2.1_hiera_t", sam2_file, r"holds sam2\.1_hiera_tiny_test trunk"),
    ]
    for i, (backbone, checkpoint, message) in enumerate(cases):
        flags = ["--backbone", backbone, "--checkpoint", str(checkpoint)]
        assert main([*train, *flags, "--out", str(tmp_path / f"run{i}")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith("cadsam: error: ")
        assert re.search(message, err), err
