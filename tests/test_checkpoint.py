"""Loading Meta-format checkpoints strictly, and every way a checkpoint can be wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import randomize_

from cadsam.errors import CadsamError
from cadsam.sam import build_sam
from cadsam.sam import checkpoint as ckpt


@pytest.fixture(scope="module")
def tiny_state():
    sam = build_sam("vit_tiny")
    randomize_(sam, seed=21)
    return sam.state_dict()


@pytest.fixture()
def tiny_file(tmp_path, tiny_state) -> Path:
    path = tmp_path / "sam_tiny.pth"
    torch.save(tiny_state, path)
    return path


def test_strict_load_restores_every_weight(tiny_file, tiny_state):
    loaded = build_sam("vit_tiny", checkpoint=tiny_file).state_dict()
    assert loaded.keys() == tiny_state.keys()
    assert all(torch.equal(loaded[k], tiny_state[k]) for k in tiny_state)


def test_loads_a_file_saved_by_metas_own_model(meta_sam, tmp_path):
    from cadsam.sam import SAM_CONFIGS

    cfg = SAM_CONFIGS["vit_tiny"]
    modeling = meta_sam.modeling
    ref = modeling.Sam(
        modeling.ImageEncoderViT(
            img_size=cfg.image_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            window_size=cfg.window_size,
            global_attn_indexes=cfg.global_attn_indexes,
            use_rel_pos=True,
            qkv_bias=True,
            norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
        ),
        modeling.PromptEncoder(256, (16, 16), (256, 256), 16),
        modeling.MaskDecoder(
            transformer_dim=256, transformer=modeling.TwoWayTransformer(2, 256, 8, 2048)
        ),
    )
    randomize_(ref, seed=22)
    torch.save(ref.state_dict(), tmp_path / "meta.pth")
    ours = build_sam("vit_tiny", checkpoint=tmp_path / "meta.pth")
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_wrong_backbone_is_named(tiny_file):
    with pytest.raises(CadsamError, match=r"holds vit_tiny image encoder .* not vit_b"):
        build_sam("vit_b", checkpoint=tiny_file)


def test_missing_file(tmp_path):
    with pytest.raises(CadsamError, match=r"checkpoint not found: .*nope\.pth"):
        build_sam("vit_tiny", checkpoint=tmp_path / "nope.pth")


def test_truncated_file(tiny_file):
    data = tiny_file.read_bytes()
    tiny_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CadsamError, match=r"cannot read checkpoint .*truncated, corrupt"):
        build_sam("vit_tiny", checkpoint=tiny_file)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CadsamError, match="cannot read checkpoint"):
        build_sam("vit_tiny", checkpoint=path)


@pytest.mark.parametrize(
    "content",
    [[1, 2, 3], {"weight": torch.zeros(3)}, {"model": {"image_encoder.x": torch.zeros(1)}}],
    ids=["list", "other-model", "nested"],
)
def test_not_a_sam_state_dict(tmp_path, content):
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(CadsamError, match="is not a SAM state_dict"):
        build_sam("vit_tiny", checkpoint=path)


def test_missing_and_reshaped_keys_are_listed(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["mask_decoder.iou_token.weight"]
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 128)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CadsamError) as info:
        build_sam("vit_tiny", checkpoint=tmp_path / "bad.pth")
    assert "missing mask_decoder.iou_token.weight" in str(info.value)
    assert "no_mask_embed.weight has shape (1, 128)" in str(info.value)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture()
def mirror(tmp_path, monkeypatch, tiny_file):
    """A local 'download server' (a file:// URL) and an empty checkpoint cache."""
    served = tmp_path / "server"
    served.mkdir()
    (served / "sam_vit_b_01ec64.pth").write_bytes(tiny_file.read_bytes())
    monkeypatch.setenv("CADSAM_CHECKPOINT_URL", served.as_uri())
    monkeypatch.setenv("CADSAM_HOME", str(tmp_path / "home"))
    return served / "sam_vit_b_01ec64.pth"


def test_download_by_name_into_the_cache(mirror, monkeypatch):
    monkeypatch.setitem(
        ckpt.META_CHECKPOINTS, "vit_b", ckpt.CheckpointFile("sam_vit_b_01ec64.pth", _md5(mirror))
    )
    path = ckpt.resolve_checkpoint("vit_b")
    assert path == ckpt.checkpoint_dir() / "sam_vit_b_01ec64.pth"
    assert path.read_bytes() == mirror.read_bytes()
    mirror.unlink()  # a second resolve uses the cache, not the network
    assert ckpt.resolve_checkpoint("vit_b") == path


def test_digest_mismatch_leaves_nothing_in_the_cache(mirror):
    # The registry holds Meta's real digest; the served file is not Meta's checkpoint.
    with pytest.raises(CadsamError, match=r"corrupt: md5 .* expected 01ec64d2"):
        ckpt.resolve_checkpoint("vit_b")
    assert list(ckpt.checkpoint_dir().iterdir()) == []


def test_sha256_digests_are_checked_too(mirror, tmp_path):
    dest = tmp_path / "out" / "x.pth"
    good = hashlib.sha256(mirror.read_bytes()).hexdigest()
    ckpt.download_file(mirror.as_uri(), dest, f"sha256:{good}", progress=False)
    assert dest.read_bytes() == mirror.read_bytes()
    with pytest.raises(CadsamError, match="corrupt: sha256"):
        ckpt.download_file(mirror.as_uri(), tmp_path / "out" / "y.pth", "sha256:" + "0" * 64)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["x.pth"]


def test_offline_error_says_what_to_download_and_where(monkeypatch, tmp_path):
    monkeypatch.setenv("CADSAM_CHECKPOINT_URL", (tmp_path / "absent").as_uri())
    monkeypatch.setenv("CADSAM_HOME", str(tmp_path / "home"))
    with pytest.raises(CadsamError) as info:
        ckpt.resolve_checkpoint("vit_h")
    message = str(info.value)
    assert "sam_vit_h_4b8939.pth" in message
    assert str(ckpt.checkpoint_dir() / "sam_vit_h_4b8939.pth") in message
    assert list(ckpt.checkpoint_dir().iterdir()) == []


def test_sha256_is_remembered_but_never_stale(tmp_path):
    import os

    path = tmp_path / "f.bin"
    path.write_bytes(b"one")
    assert ckpt.file_sha256(path) == hashlib.sha256(b"one").hexdigest()
    path.write_bytes(b"two")  # same size, new contents
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1000))
    assert ckpt.file_sha256(path) == hashlib.sha256(b"two").hexdigest()
