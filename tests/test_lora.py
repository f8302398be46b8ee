"""LoRA on the encoder's q and v projections: counts, identity at initialisation, the update
against a float64 reference, where gradients go, merged inference, and the commands."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import randomize_, rel_err
from test_train import FAST, _isbi_subset

from cadsam import build_model
from cadsam.commands import main
from cadsam.errors import CadsamError
from cadsam.fast.runtime import LEAN
from cadsam.sam.image_encoder import _plain_rel_pos_attention, decomposed_rel_pos


@pytest.mark.parametrize(
    ("backbone", "expected"), [("vit_b", 4_205_796), ("vit_l", 4_451_556), ("vit_h", 4_713_700)]
)
def test_trainable_counts_at_rank_4(backbone, expected, capsys):
    """4 x width x rank per block, plus the mask decoder's 4,058,340."""
    with torch.device("meta"):
        model = build_model("lora", backbone)
    assert model.parameter_counts()["trainable"] == expected
    assert main(["params", "--backbone", backbone, "--method", "lora", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable"] == expected


def _images(batch=2, size=64, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


def test_untrained_lora_is_the_base_sam_exactly():
    torch.manual_seed(0)
    lora = build_model("lora", "vit_tiny")
    base = build_model("decoder", "vit_tiny")
    base.sam.load_state_dict(lora.sam.state_dict())
    with torch.no_grad():
        assert torch.equal(lora.eval()(_images()), base.eval()(_images()))


def _reference_qkv(block, lora, index, x):
    """qkv(x) with the updates, in float64, written out from the definition."""
    qkv = block.attn.qkv
    w, b = qkv.weight.double(), qkv.bias.double()
    dim = w.shape[1]
    scale = lora.scale
    wq = w[:dim] + scale * lora.q[index].b.weight.double() @ lora.q[index].a.weight.double()
    wv = w[2 * dim :] + scale * lora.v[index].b.weight.double() @ lora.v[index].a.weight.double()
    return x.double() @ torch.cat((wq, w[dim : 2 * dim], wv)).T + b


def test_the_update_is_scale_b_a_x_on_q_and_v_only():
    torch.manual_seed(1)
    model = build_model("lora", "vit_tiny", lora_rank=3, lora_alpha=6)
    lora = model.encoder_adapter
    randomize_(lora, seed=2)  # B no longer zero
    assert lora.scale == 2.0
    block = model.sam.image_encoder.blocks[1]
    x = torch.randn(2, 7, 7, block.attn.qkv.in_features, generator=torch.Generator().manual_seed(3))
    out = block.attn.qkv(x)
    expected = _reference_qkv(block, lora, 1, x)
    assert rel_err(out.double(), expected) < 1e-6
    plain = x @ block.attn.qkv.weight.T + block.attn.qkv.bias
    dim = x.shape[-1]
    assert torch.equal(out[..., dim : 2 * dim], plain[..., dim : 2 * dim])  # k untouched
    assert rel_err(out[..., :dim], plain[..., :dim]) > 1e-3  # q moved


def test_attention_with_the_update_matches_a_float64_block():
    """The whole attention of a block, updates in, against float64 arithmetic."""
    torch.manual_seed(4)
    model = build_model("lora", "vit_tiny")
    lora = model.encoder_adapter
    randomize_(lora, seed=5)
    attn = model.sam.image_encoder.blocks[1].attn  # a global block: 16 x 16 tokens
    x = torch.randn(1, 16, 16, attn.qkv.in_features, generator=torch.Generator().manual_seed(6))
    qkv = _reference_qkv(model.sam.image_encoder.blocks[1], lora, 1, x)
    heads = attn.num_heads
    qkv = qkv.reshape(1, 256, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    rel_h, rel_w = decomposed_rel_pos(q, attn.rel_pos_h.double(), attn.rel_pos_w.double(), 16, 16)
    out = _plain_rel_pos_attention(q, k, v, rel_h, rel_w, attn.scale)
    out = out.transpose(1, 2).reshape(1, 16, 16, -1)
    expected = out @ attn.proj.weight.double().T + attn.proj.bias.double()
    assert rel_err(attn(x).double(), expected) < 1e-5


def test_gradients_reach_only_the_factors_and_the_decoder():
    torch.manual_seed(7)
    model = build_model("lora", "vit_tiny", runtime=LEAN)  # blocks recomputed in backward
    logits = model(_images())
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
    for name, p in model.named_parameters():
        if name.startswith(("encoder_adapter.", "sam.mask_decoder.")):
            assert p.requires_grad, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # B starts at zero, so only B gets a gradient at first (A's is B^T times something)
    assert all(m.b.weight.grad.abs().sum() > 0 for m in model.encoder_adapter.q)
    state = model.trainable_state_dict()
    assert state and all(k.startswith(("encoder_adapter.", "sam.mask_decoder.")) for k in state)


def test_merged_equals_unmerged():
    torch.manual_seed(8)
    model = build_model("lora", "vit_tiny").eval()
    randomize_(model.encoder_adapter, seed=9)
    merged = copy.deepcopy(model).for_inference()
    assert merged.encoder_adapter.merged
    with torch.no_grad():
        assert rel_err(merged(_images()), model(_images())) < 1e-5


def test_lora_cannot_train_from_a_cache(tmp_path, capsys):
    with pytest.raises(CadsamError, match="lora acts inside the image encoder"):
        build_model("lora", "vit_tiny", with_encoder=False)
    with pytest.raises(CadsamError, match="lora_rank must be a whole number"):
        build_model("lora", "vit_tiny", lora_rank=0)


def test_lora_trains_evaluates_and_predicts(tmp_path, capsys):
    data = _isbi_subset(tmp_path, 4)
    run = tmp_path / "run"
    args = ["train", "--method", "lora", "--epochs", "1", "--set", "lora_rank=2", *FAST, *data]
    assert main([*args, "--out", str(run)]) == 0
    assert main(["eval", "--weights", str(run), *data, "--json", "--num-workers", "0"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= scores["dice"] <= 1
    out = tmp_path / "predicted"
    assert main(["predict", "--weights", str(run), "--images", data[1], "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 4
