"""SAM 2.1's image path: parity with Meta's ``sam2`` package (same random weights, loaded from a
file in Meta's format), its state-dict keys, strict loading and its errors, and downloads.

Meta's package is a test-only dependency: ``SAM2_BUILD_CUDA=0 pip install --no-deps
--no-build-isolation sam2==1.1.0`` plus ``hydra-core`` and ``iopath`` (its own requirements
would pull in torchvision, which is stubbed here as for ``segment_anything``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import _stub_torchvision, randomize_, rel_err
from torch import nn

from cadsam import build_model
from cadsam.errors import CadsamError
from cadsam.sam import build_sam
from cadsam.sam.checkpoint import checkpoint_dir, file_sha256, is_sam2_checkpoint
from cadsam.sam2 import SAM2_CONFIGS, Sam2, build_sam2, parameter_counts
from cadsam.sam2 import checkpoint as ckpt2
from cadsam.sam2.build import is_video_only
from cadsam.sam2.prompt_encoder import boxes_as_points

META_BACKBONES = ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l")
TINY = "sam2.1_hiera_tiny_test"
TOLERANCE = 1e-4


# -- Meta's package, with torchvision's three transforms stood in for ---------------------


class _ToTensor:
    """torchvision's ToTensor for H x W x 3 uint8 arrays: C x H x W floats in 0..1."""

    def __call__(self, pic: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(pic)).permute(2, 0, 1).contiguous().float().div(255)


class _Resize(nn.Module):
    """torchvision's Resize of a float tensor: bilinear, antialiased, skipped at the same size."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = [int(s) for s in size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == self.size[0] and x.shape[-1] == self.size[1]:
            return x
        return F.interpolate(
            x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True
        )[0]


class _Normalize(nn.Module):
    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@pytest.fixture(scope="session")
def meta_sam2() -> types.ModuleType:
    """Meta's ``sam2`` package (the independent reference), or a skip where it is missing."""
    for name in ("hydra", "iopath"):
        pytest.importorskip(name)
    if importlib.util.find_spec("sam2") is None:
        pytest.skip("Meta's sam2 package is not installed (see this file's docstring)")
    _stub_torchvision()
    transforms = sys.modules["torchvision.transforms"]
    if not hasattr(transforms, "Resize"):  # the stub: give it what SAM2Transforms builds
        transforms.ToTensor, transforms.Resize, transforms.Normalize = (
            _ToTensor,
            _Resize,
            _Normalize,
        )
    importlib.import_module("sam2")
    return importlib.import_module("sam2.sam2_image_predictor")


def _tiny_overrides() -> list[str]:
    """Hydra overrides turning Meta's sam2.1_hiera_t config into our small test one."""
    c = SAM2_CONFIGS[TINY]
    trunk = "++model.image_encoder.trunk."
    return [
        f"++model.image_size={c.image_size}",
        f"{trunk}embed_dim={c.embed_dim}",
        f"{trunk}num_heads={c.num_heads}",
        f"{trunk}stages={list(c.stages)}",
        f"{trunk}global_att_blocks={list(c.global_att_blocks)}",
        f"{trunk}window_spec={list(c.window_spec)}",
        f"{trunk}window_pos_embed_bkg_spatial_size={list(c.window_pos_embed_bkg_spatial_size)}",
        f"++model.image_encoder.neck.backbone_channel_list={c.backbone_channel_list}",
    ]


def meta_model(backbone: str) -> nn.Module:
    """Meta's SAM2Base from its own yaml, as its ``build_sam2`` composes it (without the
    post-processing overrides: the decoder's stability fallback is switched per test)."""
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    name, overrides = ("sam2.1_hiera_t", _tiny_overrides()) if backbone == TINY else (backbone, [])
    cfg = compose(config_name=f"configs/sam2.1/{name}.yaml", overrides=overrides)
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True)


def meta_and_ours(backbone: str, directory: Path, seed: int) -> tuple[nn.Module, Sam2]:
    """Meta's model with random weights, saved in Meta's format and loaded into ours."""
    ref = meta_model(backbone).eval()
    randomize_(ref, seed=seed)
    path = directory / f"{backbone}.pt"
    torch.save({"model": ref.state_dict()}, path)
    return ref, build_sam2(backbone, checkpoint=path).eval()


def _recording(module: nn.Module, outputs: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda _m, _i, out: outputs.append(out))


def meta_features(predictor: Any, image: np.ndarray) -> tuple[list, list, dict]:
    """Meta's trunk stages, all four FPN levels and the predictor's kept features."""
    trunk, neck = [], []
    encoder = predictor.model.image_encoder
    handles = [_recording(encoder.trunk, trunk), _recording(encoder.neck, neck)]
    predictor.set_image(image)
    for handle in handles:
        handle.remove()
    return trunk[0], neck[0][0], predictor._features


def our_features(ours: Sam2, image: np.ndarray) -> tuple[list, list, torch.Tensor, list]:
    trunk, neck = [], []
    encoder = ours.image_encoder
    handles = [_recording(encoder.trunk, trunk), _recording(encoder.neck, neck)]
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.no_grad():
        image_embed, high_res = ours.image_features(ours.preprocess(pixels))
    for handle in handles:
        handle.remove()
    return trunk[0], neck[0], image_embed, high_res


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def assert_features_match(meta: tuple, ours: tuple) -> None:
    meta_trunk, meta_neck, meta_kept = meta
    our_trunk, our_neck, image_embed, high_res = ours
    assert len(our_trunk) == len(meta_trunk) == 4 and len(our_neck) == len(meta_neck) == 4
    for a, b in zip(our_trunk + our_neck, meta_trunk + meta_neck, strict=True):
        assert a.shape == b.shape and rel_err(a, b) < TOLERANCE
    assert rel_err(image_embed, meta_kept["image_embed"]) < TOLERANCE
    for a, b in zip(high_res, meta_kept["high_res_feats"], strict=True):
        assert a.shape == b.shape and rel_err(a, b) < TOLERANCE


# -- configurations and state-dict keys ----------------------------------------------------


def test_configs_are_metas_yamls(meta_sam2):
    import inspect

    import yaml
    from sam2.modeling.backbones.hieradet import Hiera

    defaults = {k: p.default for k, p in inspect.signature(Hiera).parameters.items()}
    root = Path(importlib.util.find_spec("sam2").submodule_search_locations[0])
    for backbone in META_BACKBONES:
        model = yaml.safe_load((root / f"configs/sam2.1/{backbone}.yaml").read_text())["model"]
        trunk, neck = model["image_encoder"]["trunk"], model["image_encoder"]["neck"]
        c = SAM2_CONFIGS[backbone]
        for field in ("embed_dim", "num_heads", "stages", "global_att_blocks", "window_spec"):
            assert tuple(np.atleast_1d(trunk.get(field, defaults[field]))) == tuple(
                np.atleast_1d(getattr(c, field))
            ), (backbone, field)
        bkg = trunk.get(
            "window_pos_embed_bkg_spatial_size", defaults["window_pos_embed_bkg_spatial_size"]
        )
        assert tuple(bkg) == c.window_pos_embed_bkg_spatial_size
        assert neck["backbone_channel_list"] == c.backbone_channel_list
        assert (neck["d_model"], neck["fpn_interp_model"]) == (256, "nearest")
        assert tuple(neck["fpn_top_down_levels"]) == (2, 3)
        assert model["image_encoder"]["scalp"] == 1 and model["image_size"] == c.image_size
        for flag in (
            "use_high_res_features_in_sam",
            "directly_add_no_mem_embed",
            "iou_prediction_use_sigmoid",
            "pred_obj_scores",
            "pred_obj_scores_mlp",
        ):
            assert model[flag] is True, (backbone, flag)


@pytest.mark.parametrize("backbone", META_BACKBONES)
def test_state_dict_keys_and_shapes_are_metas(meta_sam2, monkeypatch, backbone):
    # Meta's Hiera reads its drop-path rates with .item(): make those on the CPU.
    linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    with torch.device("meta"):
        ref, ours = meta_model(backbone), build_sam2(backbone)
    image_path = [(k, v.shape) for k, v in ref.state_dict().items() if not is_video_only(k)]
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == image_path
    skipped = {k.split(".")[0] for k in ref.state_dict() if is_video_only(k)}
    assert skipped == {
        "memory_attention",
        "memory_encoder",
        "maskmem_tpos_enc",
        "no_mem_pos_enc",
        "no_obj_ptr",
        "no_obj_embed_spatial",
        "mask_downsample",
        "obj_ptr_proj",
        "obj_ptr_tpos_proj",
    }


PARAMETERS = {  # image path total, mask decoder (of which conv_s0 + conv_s1: 24,672)
    "sam2.1_hiera_t": (31_440_721, 4_215_109),
    "sam2.1_hiera_s": (38_538_577, 4_215_109),
    "sam2.1_hiera_b+": (73_328_401, 4_215_109),
    "sam2.1_hiera_l": (216_924_865, 4_215_109),
    TINY: (4_841_905, 4_215_109),
}


@pytest.mark.parametrize("backbone", list(PARAMETERS))
def test_parameter_counts(backbone):
    with torch.device("meta"):
        counts = parameter_counts(build_sam2(backbone))
    assert (counts["total"], counts["mask_decoder"]) == PARAMETERS[backbone]
    assert counts["mask_decoder_high_res"] == 256 * 32 + 32 + 256 * 64 + 64


# -- parity with Meta's image predictor ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(meta_sam2, tmp_path_factory):
    """Meta's and our small model (same random weights), a non-square image, and both
    features of it: Meta's from SAM2ImagePredictor.set_image, ours from preprocess."""
    ref, ours = meta_and_ours(TINY, tmp_path_factory.mktemp("sam2"), seed=5)
    predictor = meta_predictor(meta_sam2, ref)
    size = ours.image_size
    predictor._bb_feat_sizes = [(size // s, size // s) for s in (4, 8, 16)]
    image = random_image(300, 200, seed=6)
    return predictor, ours, image, meta_features(predictor, image), our_features(ours, image)


def test_image_features_match_meta(tiny_pair):
    _, _, _, meta, ours = tiny_pair
    assert_features_match(meta, ours)


PROMPTS = {
    "whole-box": dict(box=True),
    # Meta's build_sam2 default: a stable single mask is kept, an unstable one replaced by the
    # best multimask output (a threshold above 1 makes every mask unstable).
    "whole-box-stable": dict(box=True, dynamic=0.98),
    "whole-box-unstable": dict(box=True, dynamic=1.5),
    "box-and-clicks-multimask": dict(box=True, clicks=True, multimask=True),
    "clicks": dict(clicks=True),
    "mask-input": dict(box=True, mask=True),
}


@pytest.mark.parametrize("case", list(PROMPTS))
def test_masks_match_meta_predictor(tiny_pair, case):
    predictor, ours, image, _, (_, _, image_embed, high_res) = tiny_pair
    spec = PROMPTS[case]
    height, width = image.shape[:2]
    box = np.array([0, 0, width, height]) if spec.get("box") else None
    clicks = np.array([[50.0, 80.0], [150.0, 210.0]]) if spec.get("clicks") else None
    labels = np.array([1, 0]) if spec.get("clicks") else None
    mask = np.random.default_rng(7).normal(size=(1, 64, 64)).astype(np.float32) * 5
    mask = mask if spec.get("mask") else None
    multimask, threshold = spec.get("multimask", False), spec.get("dynamic")
    meta_decoder, our_decoder = predictor.model.sam_mask_decoder, ours.sam_mask_decoder
    meta_decoder.dynamic_multimask_via_stability = threshold is not None
    our_decoder.dynamic_multimask_via_stability = threshold is not None
    meta_decoder.dynamic_multimask_stability_thresh = our_decoder.stability_thresh = threshold
    masks, iou, low_res = predictor.predict(
        clicks, labels, box, mask, multimask_output=multimask, return_logits=True
    )
    points = None
    if clicks is not None:  # to the encoder's frame, as Meta's predictor computes it
        coords = torch.from_numpy(clicks).float() / torch.tensor([width, height]) * ours.image_size
        points = (coords[None], torch.from_numpy(labels)[None])
    boxes = ours.whole_image_boxes(1) if box is not None else None
    with torch.no_grad():
        our_low, our_iou = ours.decode(
            image_embed,
            high_res,
            boxes=boxes,
            points=points,
            mask_inputs=None if mask is None else torch.from_numpy(mask)[None],
            multimask_output=multimask,
        )
        our_masks = ours.postprocess_masks(our_low, (height, width))
    assert our_masks.shape[1] == (3 if multimask else 1)
    assert rel_err(our_masks[0], torch.from_numpy(masks)) < TOLERANCE
    assert rel_err(our_low[0].clamp(-32, 32), torch.from_numpy(low_res)) < TOLERANCE
    assert rel_err(our_iou[0], torch.from_numpy(iou)) < TOLERANCE
    if threshold is not None:  # the fallback, when taken, changed the result
        with torch.no_grad():
            _, all_iou, _ = our_decoder.predict_masks(
                image_embed,
                ours.prompt_encoder.get_dense_pe(),
                *ours.prompt_encoder(points=boxes_as_points(boxes, None), boxes=None, masks=None),
                high_res,
            )
        chosen = all_iou[0, 0] if threshold < 1 else all_iou[0, 1:].max()
        assert our_iou[0, 0] == chosen


def meta_predictor(meta_sam2: types.ModuleType, ref: nn.Module) -> Any:
    with warnings.catch_warnings():  # SAM2Transforms uses torch.jit.script
        warnings.simplefilter("ignore", DeprecationWarning)
        return meta_sam2.SAM2ImagePredictor(ref)


def test_hiera_t_at_full_size_matches_meta(meta_sam2, tmp_path):
    """The real sam2.1_hiera_t configuration on one 1024 x 1024 image: every trunk stage and
    FPN level, the kept features and the whole-image-box mask logits."""
    ref, ours = meta_and_ours("sam2.1_hiera_t", tmp_path, seed=8)
    predictor = meta_predictor(meta_sam2, ref)
    image = random_image(1024, 1024, seed=9)
    ours_out = our_features(ours, image)
    assert_features_match(meta_features(predictor, image), ours_out)
    masks, iou, _ = predictor.predict(
        box=np.array([0, 0, 1024, 1024]), multimask_output=False, return_logits=True
    )
    with torch.no_grad():
        low, our_iou = ours.decode(ours_out[2], ours_out[3], boxes=ours.whole_image_boxes(1))
        our_masks = ours.postprocess_masks(low, (1024, 1024))
    assert rel_err(our_masks[0], torch.from_numpy(masks)) < TOLERANCE
    assert rel_err(our_iou[0], torch.from_numpy(iou)) < TOLERANCE


def test_the_single_mask_rule_is_metas_for_every_release(meta_sam2, monkeypatch):
    """What Meta's build_sam2 (and so SAM2ImagePredictor.from_pretrained) composes for each
    release: its post-processing overrides on top of the yaml, read before anything is built."""
    import sam2.build_sam as meta_build

    composed = []

    def composed_only(cfg: Any, **_: Any) -> nn.Module:
        composed.append(cfg)
        return nn.Module()

    monkeypatch.setattr(meta_build, "instantiate", composed_only)
    names = [f"dynamic_multimask_{name}" for name in ("via_stability", "stability_delta")]
    names.append("dynamic_multimask_stability_thresh")
    for backbone in META_BACKBONES:
        meta_build.build_sam2(f"configs/sam2.1/{backbone}.yaml", device="cpu")
        metas = composed[-1].sam_mask_decoder_extra_args
        ours = SAM2_CONFIGS[backbone]
        assert [metas[n] for n in names] == [getattr(ours, n) for n in names], backbone
        assert [metas[n] for n in names] == [True, 0.05, 0.98], backbone
        decoder = build_sam2(backbone, with_encoder=False).sam_mask_decoder
        assert (decoder.dynamic_multimask_via_stability, decoder.stability_delta) == (True, 0.05)
        assert decoder.stability_thresh == 0.98


@pytest.mark.parametrize("first_mask", ["unstable", "stable"])
def test_zero_shot_answers_as_metas_image_predictor(meta_sam2, tmp_path, first_mask):
    """cadsam's zero-shot model against SAM2ImagePredictor as Meta's build_sam2 builds it, on
    the whole-image box, single mask. Randomized weights give a stable first mask (logits in
    the thousands); the first mask token's hypernetwork scaled down by 1e-5 makes it unstable
    (logits within a few hundredths of 0). A trained method answers with the first token."""
    from sam2.build_sam import build_sam2 as meta_build_sam2

    ref = meta_model(TINY)
    randomize_(ref, seed=21)
    if first_mask == "unstable":
        with torch.no_grad():
            for tensor in ref.sam_mask_decoder.output_hypernetworks_mlps[0].layers[-1].parameters():
                tensor.mul_(1e-5)
    path = tmp_path / "sam2.pt"
    torch.save({"model": ref.state_dict()}, path)
    config = "configs/sam2.1/sam2.1_hiera_t.yaml"
    released = meta_build_sam2(config, path, device="cpu", hydra_overrides_extra=_tiny_overrides())
    predictor = meta_predictor(meta_sam2, released)
    size = SAM2_CONFIGS[TINY].image_size
    predictor._bb_feat_sizes = [(size // s, size // s) for s in (4, 8, 16)]
    image = random_image(size, size, seed=22)
    predictor.set_image(image)
    masks, _, _ = predictor.predict(
        box=np.array([0, 0, size, size]), multimask_output=False, return_logits=True
    )
    expected = torch.from_numpy(masks)
    images = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.no_grad():
        zero_shot = build_model("zero-shot", TINY, path).eval()(images)[0]
        first_token = build_model("decoder", TINY, path).eval()(images)[0]
    assert zero_shot.shape == expected.shape == (1, size, size)
    assert rel_err(zero_shot, expected) < TOLERANCE
    # where the first mask is unstable, the rule took another output; where stable, it did not
    assert (rel_err(first_token, expected) < TOLERANCE) == (first_mask == "stable")


# -- our model on its own ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    model = build_sam2(TINY).eval()
    randomize_(model, seed=11)
    return model


def test_preprocess_resizes_without_padding_and_normalises(tiny_model):
    image = torch.from_numpy(random_image(90, 140, seed=12)).permute(2, 0, 1)[None]
    size = tiny_model.image_size
    x = tiny_model.preprocess(image)
    resized = F.interpolate(
        image.float() / 255, (size, size), mode="bilinear", align_corners=False, antialias=True
    )
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert x.shape == (1, 3, size, size)
    torch.testing.assert_close(x, (resized - mean) / std)


def test_batches_decode_as_single_images(tiny_model):
    images = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        embed, high_res = tiny_model.image_features(images)
        assert embed.shape == (2, 256, 16, 16)
        assert [f.shape for f in high_res] == [(2, 32, 64, 64), (2, 64, 32, 32)]
        both, _ = tiny_model.decode(embed, high_res, boxes=tiny_model.whole_image_boxes(2))
        for i in range(2):
            one, _ = tiny_model.decode(
                embed[i : i + 1],
                [f[i : i + 1] for f in high_res],
                boxes=tiny_model.whole_image_boxes(1),
            )
            assert rel_err(both[i : i + 1], one) < 1e-5


# -- loading checkpoints strictly ----------------------------------------------------------


@pytest.fixture()
def tiny_file(tmp_path, tiny_model) -> Path:
    path = tmp_path / "tiny.pt"
    torch.save({"model": tiny_model.state_dict()}, path)
    return path


def _one_line_error(call: Callable[[], object], match: str) -> str:
    with pytest.raises(CadsamError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_strict_load_restores_every_weight(tiny_file, tiny_model):
    loaded = build_sam2(TINY, checkpoint=tiny_file).state_dict()
    expected = tiny_model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_video_only_weights_are_skipped_and_nothing_else(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    state["memory_attention.layers.0.linear1.weight"] = torch.zeros(2, 2)
    state["no_obj_embed_spatial"] = torch.zeros(1, 64)
    state["obj_ptr_proj.layers.0.weight"] = torch.zeros(2, 2)
    torch.save({"model": state}, tmp_path / "video.pt")
    build_sam2(TINY, checkpoint=tmp_path / "video.pt")
    state["sam_mask_decoder.extra.weight"] = torch.zeros(1)
    del state["no_mem_embed"]
    torch.save({"model": state}, tmp_path / "bad.pt")
    message = _one_line_error(
        lambda: build_sam2(TINY, checkpoint=tmp_path / "bad.pt"), "does not match"
    )
    assert "missing no_mem_embed" in message
    assert "unexpected sam_mask_decoder.extra.weight" in message


def test_without_encoder_loads_the_heads(tiny_file, tiny_model):
    model = build_sam2(TINY, checkpoint=tiny_file, with_encoder=False)
    assert model.image_encoder is None
    assert torch.equal(model.no_mem_embed, tiny_model.no_mem_embed)


def test_sam1_file_for_a_sam2_backbone(tmp_path):
    torch.save(build_sam("vit_tiny").state_dict(), tmp_path / "sam1.pth")
    _one_line_error(
        lambda: build_sam2(TINY, checkpoint=tmp_path / "sam1.pth"),
        r"sam1\.pth is a SAM \(1\) checkpoint, not SAM 2\.1",
    )


def test_sam2_file_for_a_sam1_backbone(tiny_file):
    _one_line_error(
        lambda: build_sam("vit_tiny", checkpoint=tiny_file),
        r"is a SAM 2\.1 checkpoint, not SAM: use it with a sam2\.1_hiera_\* backbone",
    )
    assert is_sam2_checkpoint(torch.load(tiny_file, weights_only=True))


def test_truncated_file(tiny_file):
    data = tiny_file.read_bytes()
    tiny_file.write_bytes(data[: len(data) // 2])
    _one_line_error(
        lambda: build_sam2(TINY, checkpoint=tiny_file),
        r"cannot read checkpoint .*truncated, corrupt",
    )


def test_wrong_backbone_is_named(tiny_file):
    _one_line_error(
        lambda: build_sam2("sam2.1_hiera_t", checkpoint=tiny_file),
        r"holds sam2\.1_hiera_tiny_test trunk \(embed dim 16, 8 blocks\), not sam2\.1_hiera_t",
    )


def test_sam2_0_weights_are_refused(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict(), **{"memory_attention.norm.weight": torch.ones(1)})
    torch.save({"model": state}, tmp_path / "sam2.pt")
    _one_line_error(lambda: build_sam2(TINY, checkpoint=tmp_path / "sam2.pt"), "SAM 2.0 weights")


@pytest.mark.parametrize(
    "content",
    [[1, 2], {"model": "weights"}, {"model": {"sam_mask_decoder.x": torch.zeros(1)}}],
    ids=["list", "not-a-dict", "partial"],
)
def test_not_a_sam2_checkpoint(tmp_path, content):
    torch.save(content, tmp_path / "other.pt")
    _one_line_error(
        lambda: build_sam2(TINY, checkpoint=tmp_path / "other.pt"), "is not a SAM 2 checkpoint"
    )


def test_unknown_backbone_and_missing_file(tmp_path):
    _one_line_error(lambda: build_sam2("sam2.1_hiera_x"), "unknown backbone 'sam2.1_hiera_x'")
    _one_line_error(
        lambda: build_sam2(TINY, checkpoint=tmp_path / "nope.pt"), r"checkpoint not found: .*nope"
    )


# -- downloads, trusted on first use ---------------------------------------------------------


@pytest.fixture()
def mirror(tmp_path, monkeypatch, tiny_file):
    """A local 'download server' (a file:// URL) holding Meta's tiny file name, and an empty
    checkpoint cache."""
    served = tmp_path / "server"
    served.mkdir()
    (served / "sam2.1_hiera_tiny.pt").write_bytes(tiny_file.read_bytes())
    monkeypatch.setenv("CADSAM_CHECKPOINT_URL", served.as_uri())
    monkeypatch.setenv("CADSAM_HOME", str(tmp_path / "home"))
    return served / "sam2.1_hiera_tiny.pt"


def test_first_download_records_its_sha256(mirror, monkeypatch):
    path = ckpt2.resolve_sam2_checkpoint("sam2.1_hiera_t")
    assert path == checkpoint_dir() / "sam2.1_hiera_tiny.pt"
    assert path.read_bytes() == mirror.read_bytes()
    sha256 = hashlib.sha256(mirror.read_bytes()).hexdigest()
    assert ckpt2.digest_record(path).read_text().strip() == sha256
    # the weights' record of their base takes the digest from the download, not another read
    monkeypatch.setattr("cadsam.sam.checkpoint.hashlib.sha256", None)
    assert file_sha256(path) == sha256
    mirror.unlink()  # a second resolve uses the cache, not the network
    assert ckpt2.resolve_sam2_checkpoint("sam2.1_hiera_t") == path


def test_later_downloads_must_match_the_record(mirror):
    path = ckpt2.resolve_sam2_checkpoint("sam2.1_hiera_t")
    record = ckpt2.digest_record(path).read_text()
    path.unlink()
    assert ckpt2.resolve_sam2_checkpoint("sam2.1_hiera_t") == path  # same bytes: accepted
    path.unlink()
    mirror.write_bytes(mirror.read_bytes()[:-1] + b"x")  # the server's file changed
    _one_line_error(
        lambda: ckpt2.resolve_sam2_checkpoint("sam2.1_hiera_t"),
        r"is corrupt: sha256 .*\(the first download's, recorded in .*nothing was saved",
    )
    assert not path.exists() and ckpt2.digest_record(path).read_text() == record
    assert [p.name for p in checkpoint_dir().iterdir()] == [ckpt2.digest_record(path).name]


def test_a_pinned_digest_is_checked_first(mirror, monkeypatch):
    pinned = ckpt2.Sam2CheckpointFile("sam2.1_hiera_tiny.pt", sha256="0" * 64)
    monkeypatch.setitem(ckpt2.SAM2_CHECKPOINTS, "sam2.1_hiera_t", pinned)
    _one_line_error(
        lambda: ckpt2.resolve_sam2_checkpoint("sam2.1_hiera_t"), "the digest cadsam pins"
    )
    assert list(checkpoint_dir().iterdir()) == []


def test_offline_error_says_what_to_download_and_where(monkeypatch, tmp_path):
    monkeypatch.setenv("CADSAM_CHECKPOINT_URL", (tmp_path / "absent").as_uri())
    monkeypatch.setenv("CADSAM_HOME", str(tmp_path / "home"))
    message = _one_line_error(
        lambda: ckpt2.resolve_sam2_checkpoint("sam2.1_hiera_l"), "cannot download"
    )
    assert "sam2.1_hiera_large.pt" in message
    assert str(checkpoint_dir() / "sam2.1_hiera_large.pt") in message
    assert list(checkpoint_dir().iterdir()) == []


def test_meta_urls(monkeypatch):
    monkeypatch.delenv("CADSAM_CHECKPOINT_URL", raising=False)
    assert ckpt2.SAM2_CHECKPOINTS["sam2.1_hiera_b+"].url == (
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt"
    )
