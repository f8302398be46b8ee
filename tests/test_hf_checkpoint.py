"""Hugging Face ``transformers`` SamModel checkpoints given as --checkpoint: read into Meta's keys
and checked against ``transformers``' own SamModel with the same random weights."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, rel_err
from safetensors.torch import load_file, save_file

from cadsam import build_model
from cadsam.errors import CadsamError
from cadsam.sam import SAM_CONFIGS, build_sam
from cadsam.sam.checkpoint import file_sha256, read_sam_state_dict
from cadsam.sam.hf import POSITIONAL, from_hf, hf_key
from cadsam.weights import base_checkpoint_record, load_weights, save_weights

transformers = pytest.importorskip("transformers")

TIED = "prompt_encoder.shared_embedding.positional_embedding"  # save_pretrained drops it


def hf_config(backbone: str, **vision: object) -> transformers.SamConfig:
    """``transformers``' SamConfig for one of our backbones (``vision`` overrides)."""
    c = SAM_CONFIGS[backbone]
    vision_config = transformers.SamVisionConfig(
        **{
            "hidden_size": c.embed_dim,
            "num_hidden_layers": c.depth,
            "num_attention_heads": c.num_heads,
            "global_attn_indexes": list(c.global_attn_indexes),
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "window_size": c.window_size,
            **vision,
        }
    )
    prompt_config = transformers.SamPromptEncoderConfig(
        image_size=c.image_size, image_embedding_size=c.embedding_size
    )
    return transformers.SamConfig(
        vision_config=vision_config.to_dict(), prompt_encoder_config=prompt_config.to_dict()
    )


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A random SamModel shaped as vit_tiny, saved as transformers saves it."""
    model = transformers.SamModel(hf_config("vit_tiny")).eval()
    randomize_(model, seed=5)  # every tensor random: rel-pos tables, positional matrix too
    folder = tmp_path_factory.mktemp("hf") / "sam-tiny"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def assert_matches_transformers(
    model, hf, batch: int, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our model and ``transformers``' on the same normalised encoder input (their
    preprocessing differs in resizing only): the image embedding, then the whole-image box's
    mask logits and IoU, within 1e-4. Returns our embedding and their low-resolution logits."""
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x = model.sam.preprocess(images * 255)
    boxes = model.sam.whole_image_boxes(batch)
    with torch.no_grad():
        ours = model.sam.image_encoder(x)
        theirs = hf.get_image_embeddings(x)
        assert rel_err(ours, theirs) < 1e-4
        out = hf(image_embeddings=theirs, input_boxes=boxes[:, None], multimask_output=False)
        low_res, iou = model.sam.decode(ours, boxes=boxes)
        # Their mask decoder's LayerNorms use eps 1e-6 where Meta's use 1e-5: within 1e-4.
        assert rel_err(low_res, out.pred_masks[:, 0]) < 1e-4
        assert rel_err(iou, out.iou_scores[:, 0]) < 1e-4
    return ours, out.pred_masks[:, 0]


def test_embeddings_and_box_logits_match_transformers(hf_tiny):
    hf, folder = hf_tiny
    model = build_model("zero-shot", "vit_tiny", checkpoint=folder / "model.safetensors").eval()
    ours, their_low_res = assert_matches_transformers(model, hf, batch=2, size=256, seed=1)
    upsampled = F.interpolate(their_low_res, (256, 256), mode="bilinear")
    with torch.no_grad():
        assert rel_err(model.mask_logits(ours, 256), upsampled) < 1e-4


def test_safetensors_bin_and_folder_load_the_same_weights(hf_tiny, tmp_path):
    hf, folder = hf_tiny
    # pytorch_model.bin as transformers 4 wrote it (5 writes safetensors only): a torch.save
    # of the state_dict, both tied positional embeddings included.
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    reference = build_sam("vit_tiny", checkpoint=folder / "model.safetensors").state_dict()
    for source in (tmp_path / "bin" / "pytorch_model.bin", tmp_path / "bin", folder):
        loaded = build_sam("vit_tiny", checkpoint=source).state_dict()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), source
    (tmp_path / "empty").mkdir()  # a folder without either file: said so, not "not found"
    with pytest.raises(CadsamError, match=r"empty holds no model\.safetensors or pytorch_model"):
        build_sam("vit_tiny", checkpoint=tmp_path / "empty")
    # Both tied names present (as older files hold them): one tensor, checked equal.
    state = {k: v for k, v in hf.state_dict().items()}
    assert TIED in state
    mapped = from_hf(state, "x")
    assert torch.equal(
        mapped["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"], state[TIED]
    )
    state[TIED] = state[TIED] + 1
    with pytest.raises(CadsamError, match="differ, but SAM has one positional embedding"):
        from_hf(state, "x")


@pytest.mark.parametrize("backbone", ["vit_b", "vit_l", "vit_h"])
def test_every_key_and_shape_of_the_published_sizes_maps(backbone):
    """facebook/sam-vit-base, -large, -huge: every key maps, to every one of ours, shapes equal
    (on the meta device: shapes only, no memory)."""
    with torch.device("meta"):
        hf = transformers.SamModel(hf_config(backbone))
        ours = build_sam(backbone).state_dict()
    state = hf.state_dict()
    del state[TIED]
    mapped = from_hf(state, f"sam-{backbone}")
    assert mapped.keys() == ours.keys()
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    assert len(set(mapped.source.values())) == len(mapped)  # one file key for each of ours
    # and back: the name the file would give each of ours (for errors about a missing one)
    assert all(hf_key(k) == mapped.source[k] for k in ours if k != POSITIONAL), backbone  # tied


def test_a_safetensors_file_that_is_not_sam_is_refused(tmp_path):
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CadsamError, match=r"is not a SAM state_dict: no image_encoder.*found encoder.weight"
    ):
        build_sam("vit_tiny", checkpoint=tmp_path / "model.safetensors")
    save_file({"vision_encoder.backbone.x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(
        CadsamError, match=r"not of a SAM SamModel: unknown keys vision_encoder\.backbone\.x"
    ):
        read_sam_state_dict(tmp_path / "other.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:40])
    with pytest.raises(CadsamError, match="truncated, corrupt or not a safetensors file"):
        build_sam("vit_tiny", checkpoint=tmp_path / "cut.safetensors")


def test_an_hf_file_whose_shapes_fit_no_backbone_is_named(tmp_path):
    odd = transformers.SamModel(hf_config("vit_tiny", hidden_size=96, num_attention_heads=2))
    odd.save_pretrained(tmp_path / "wide", safe_serialization=True)
    with pytest.raises(
        CadsamError,
        match=r"holds an unknown image encoder \(embed dim 96, 4 blocks\), not vit_tiny",
    ):
        build_sam("vit_tiny", checkpoint=tmp_path / "wide")
    slim = transformers.SamModel(hf_config("vit_tiny", mlp_dim=128))
    slim.save_pretrained(tmp_path / "slim", safe_serialization=True)
    with pytest.raises(CadsamError) as info:
        build_sam("vit_tiny", checkpoint=tmp_path / "slim")
    assert (
        "image_encoder.blocks.0.mlp.lin1.weight (vision_encoder.layers.0.mlp.lin1.weight in the "
        "file) has shape (128, 64), expected (256, 64)"
    ) in str(info.value)


def test_weights_record_and_verify_an_hf_base_checkpoint(hf_tiny, tmp_path):
    _, folder = hf_tiny
    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(folder / "model.safetensors", checkpoint)
    model = build_model("decoder", "vit_tiny", checkpoint=checkpoint)
    base = base_checkpoint_record(checkpoint)
    assert base["sha256"] == file_sha256(checkpoint)
    save_weights(tmp_path / "w.safetensors", model, base, 64)
    loaded, meta = load_weights(tmp_path / "w.safetensors")
    assert meta["base_checkpoint"]["sha256"] == base["sha256"]
    assert torch.equal(loaded.sam.image_encoder.pos_embed, model.sam.image_encoder.pos_embed)
    moved = tmp_path / "moved" / "model.safetensors"
    moved.parent.mkdir()
    shutil.copy(checkpoint, moved)
    checkpoint.unlink()
    load_weights(tmp_path / "w.safetensors", checkpoint=moved.parent)  # the folder will do
    other = transformers.SamModel(hf_config("vit_tiny"))
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(CadsamError, match="is not the SAM checkpoint"):
        load_weights(tmp_path / "w.safetensors", checkpoint=tmp_path / "other")


def test_vit_b_weights_in_transformers_format_give_transformers_embedding(tmp_path):
    """The published layout at full size: ViT-B's random weights saved by transformers, read
    through --checkpoint, give its image embedding (1e-4) and its box-prompted mask logits."""
    torch.manual_seed(0)
    hf = transformers.SamModel(hf_config("vit_b")).eval()
    randomize_(hf, seed=7)
    hf.save_pretrained(tmp_path / "sam-vit-b", safe_serialization=True)
    model = build_model("zero-shot", "vit_b", checkpoint=tmp_path / "sam-vit-b").eval()
    assert_matches_transformers(model, hf, batch=1, size=1024, seed=2)


@pytest.mark.parametrize("with_encoder", [True, False], ids=["encoder", "from-cache"])
def test_a_misshapen_hf_tensor_is_named_as_the_file_names_it(hf_tiny, tmp_path, with_encoder):
    """A mismatch in a Hugging Face file is reported under its own key (what the user can
    find there) beside Meta's, with or without the encoder (training from a cache)."""
    _, folder = hf_tiny
    state = read_sam_state_dict(folder / "model.safetensors")
    meta, hf_name = next((k, v) for k, v in state.source.items() if k.startswith("mask_decoder"))
    hf_state = load_file(str(folder / "model.safetensors"))
    hf_state[hf_name] = torch.zeros(3)
    save_file(hf_state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CadsamError, match=rf"{re.escape(meta)} \({re.escape(hf_name)} in the file\)"
    ):
        build_model("decoder", "vit_tiny", tmp_path / "model.safetensors", with_encoder)


def test_a_key_missing_from_an_hf_file_is_named_as_the_file_would_name_it(hf_tiny, tmp_path):
    _, folder = hf_tiny
    hf_state = load_file(str(folder / "model.safetensors"))
    del hf_state["vision_encoder.neck.conv1.weight"]
    save_file(hf_state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CadsamError,
        match=r"missing image_encoder\.neck\.0\.weight "
        r"\(vision_encoder\.neck\.conv1\.weight in its naming\)",
    ):
        build_sam("vit_tiny", tmp_path / "model.safetensors")
