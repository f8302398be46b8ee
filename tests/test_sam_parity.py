"""Our SAM against Meta's ``segment-anything``: same weights, same outputs, same keys."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, rel_err

from cadsam.sam import SAM_CONFIGS, build_sam
from cadsam.sam.image_encoder import ImageEncoderViT
from cadsam.sam.mask_decoder import MaskDecoder
from cadsam.sam.prompt_encoder import PromptEncoder
from cadsam.sam.transformer import TwoWayTransformer

TOL = 1e-4


def _encoder_pair(meta_sam, img_size: int, fused: bool):
    kwargs = dict(
        img_size=img_size,
        patch_size=16,
        embed_dim=96,
        depth=3,
        num_heads=3,
        out_chans=256,
        window_size=14,
        global_attn_indexes=(1,),
    )
    ref = meta_sam.modeling.ImageEncoderViT(
        **kwargs,
        norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
        use_rel_pos=True,
        qkv_bias=True,
    ).eval()
    randomize_(ref)
    ours = ImageEncoderViT(**kwargs, fused_attention=fused).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("img_size", [224, 320], ids=["windows-divide", "windows-padded"])
def test_image_encoder_matches_meta(meta_sam, img_size, fused):
    ref, ours = _encoder_pair(meta_sam, img_size, fused)
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = ref(x), ours(x)
    assert actual.shape == expected.shape == (2, 256, img_size // 16, img_size // 16)
    assert rel_err(actual, expected) < TOL


def _prompt_pair(meta_sam):
    kwargs = dict(
        embed_dim=256, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=16
    )
    ref = meta_sam.modeling.PromptEncoder(**kwargs).eval()
    randomize_(ref, seed=2)
    ours = PromptEncoder(**kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_prompt_encoder_matches_meta(meta_sam):
    ref, ours = _prompt_pair(meta_sam)
    g = torch.Generator().manual_seed(3)
    coords = torch.rand(3, 4, 2, generator=g) * 256
    labels = torch.tensor([[1, 0, -1, 1], [0, 0, 1, -1], [1, 1, 1, 1]])
    boxes = torch.tensor([[0.0, 0.0, 256.0, 256.0], [10.0, 20.0, 100.0, 200.0], [5, 5, 6, 7]])
    masks = torch.randn(3, 1, 64, 64, generator=g)
    cases = [
        dict(points=(coords, labels), boxes=None, masks=None),
        dict(points=None, boxes=boxes, masks=None),
        dict(points=(coords, labels), boxes=boxes, masks=masks),
    ]
    with torch.no_grad():
        for case in cases:
            exp_sparse, exp_dense = ref(**case)
            sparse, dense = ours(**case)
            assert sparse.shape == exp_sparse.shape and dense.shape == exp_dense.shape
            assert rel_err(sparse, exp_sparse) < TOL
            assert rel_err(dense, exp_dense) < TOL
        assert rel_err(ours.get_dense_pe(), ref.get_dense_pe()) < TOL


@pytest.mark.parametrize("multimask", [False, True])
def test_mask_decoder_matches_meta(meta_sam, multimask):
    ref = meta_sam.modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=meta_sam.modeling.TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8
        ),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    ).eval()
    randomize_(ref, seed=4)
    ours = MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer()).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(5)
    args = dict(
        image_embeddings=torch.randn(1, 256, 16, 16, generator=g),
        image_pe=torch.randn(1, 256, 16, 16, generator=g),
        sparse_prompt_embeddings=torch.randn(3, 2, 256, generator=g),
        dense_prompt_embeddings=torch.randn(3, 256, 16, 16, generator=g),
        multimask_output=multimask,
    )
    with torch.no_grad():
        exp_masks, exp_iou = ref(**args)
        masks, iou = ours(**args)
    assert masks.shape == exp_masks.shape == (3, 3 if multimask else 1, 64, 64)
    assert rel_err(masks, exp_masks) < TOL
    assert rel_err(iou, exp_iou) < TOL


def meta_tiny_sam(meta_sam):
    """Meta's ``Sam`` in vit_tiny's configuration (weights to be loaded into it)."""
    cfg = SAM_CONFIGS["vit_tiny"]
    return meta_sam.modeling.Sam(
        image_encoder=meta_sam.modeling.ImageEncoderViT(
            img_size=cfg.image_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            window_size=cfg.window_size,
            global_attn_indexes=cfg.global_attn_indexes,
            norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
            use_rel_pos=True,
            qkv_bias=True,
        ),
        prompt_encoder=meta_sam.modeling.PromptEncoder(
            embed_dim=256,
            image_embedding_size=(16, 16),
            input_image_size=(256, 256),
            mask_in_chans=16,
        ),
        mask_decoder=meta_sam.modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=meta_sam.modeling.TwoWayTransformer(
                depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=256,
        ),
    ).eval()


def test_whole_model_matches_meta_end_to_end(meta_sam):
    """Preprocess, encode, box prompt, decode and postprocess, as Meta's ``Sam.forward``."""
    ours = build_sam("vit_tiny").eval()
    randomize_(ours, seed=6)
    ref = meta_tiny_sam(meta_sam)
    ref.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(7)
    image = torch.rand(3, 256, 200, generator=g) * 255  # already resized, needs padding
    boxes = torch.tensor([[10.0, 12.0, 180.0, 240.0], [0.0, 0.0, 200.0, 256.0]])
    with torch.no_grad():
        expected = ref(
            [{"image": image, "original_size": (300, 234), "boxes": boxes}],
            multimask_output=False,
        )[0]
        embedding = ours.image_encoder(ours.preprocess(image[None]))
        low_res, iou = ours.decode(embedding, boxes=boxes)
        masks = ours.postprocess_masks(low_res, (256, 200), (300, 234))
    assert rel_err(low_res, expected["low_res_logits"]) < TOL
    assert rel_err(iou, expected["iou_predictions"]) < TOL
    assert torch.equal(masks > ours.mask_threshold, expected["masks"])


@pytest.mark.parametrize("backbone", ["vit_b", "vit_l", "vit_h"])
def test_state_dict_keys_and_shapes_match_meta(meta_sam, backbone):
    with torch.device("meta"):
        expected = meta_sam.sam_model_registry[backbone]().state_dict()
        actual = build_sam(backbone).state_dict()
    assert list(actual) == list(expected)
    assert {k: v.shape for k, v in actual.items()} == {k: v.shape for k, v in expected.items()}


def test_preprocess_geometry_matches_meta(meta_sam):
    import numpy as np
    from segment_anything.utils.transforms import ResizeLongestSide

    from cadsam.sam.transforms import apply_boxes, apply_coords, preprocess_shape

    for h, w in [(529, 622), (1070, 1348), (512, 512), (37, 1000)]:
        assert preprocess_shape(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)
    ref = ResizeLongestSide(1024)
    coords = np.array([[[3.0, 7.0], [600.0, 500.0]]])
    boxes = np.array([[1.0, 2.0, 300.0, 400.0]])
    np.testing.assert_allclose(
        apply_coords(coords, (529, 622), 1024), ref.apply_coords(coords, (529, 622))
    )
    np.testing.assert_allclose(
        apply_boxes(boxes, (529, 622), 1024), ref.apply_boxes(boxes, (529, 622))
    )
