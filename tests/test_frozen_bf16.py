"""``frozen_bf16``: the frozen encoder's matmul weights held in bfloat16 for bf16 runs.

Under bf16 autocast a linear layer or a convolution casts its float32 weight and bias to
bfloat16 on every call (autocast caches no cast of a weight that needs no gradient), rounding
to nearest even as ``Tensor.to(torch.bfloat16)`` does. Held in bfloat16 beforehand, the same
bf16 operands reach the same kernels: the results are compared for equality, not within a
tolerance. The reference is the same model with its float32 weights, under the same autocast.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from cadsam import build_model
from cadsam.config import TrainConfig
from cadsam.errors import CadsamError
from cadsam.fast.runner import fit, hold_frozen_in_bf16
from cadsam.fast.runtime import LEAN, Runtime, check_settings, resolve_runtime
from cadsam.methods.lora import LoraAdapter
from cadsam.sam2 import Sam2
from cadsam.step import segmentation_loss
from cadsam.training import train

TINY_SAM2 = "sam2.1_hiera_tiny_test"
FUSED = Runtime(fused_attention=True)
HELD = FUSED.replace(frozen_bf16=True)
CASES = [
    ("cad", "vit_tiny"),  # the frozen encoder outside autograd
    ("decoder", TINY_SAM2),  # Hiera and SAM 2.1's conv_s0/conv_s1
    ("lora", "vit_tiny"),  # frozen weights inside autograd
    ("sam-adapter", "vit_tiny"),
    ("lora", TINY_SAM2),
]


def _pair(method: str, backbone: str) -> tuple[nn.Module, nn.Module]:
    """The model with float32 weights, and a copy of it with frozen_bf16."""
    torch.manual_seed(0)
    options = {"adapter_size": 16} if method == "cad" else {}
    reference = build_model(method, backbone, runtime=FUSED, **options)
    return reference, fit(copy.deepcopy(reference), HELD)


def _meant_to_be_held(model: nn.Module) -> set[str]:
    """The rule, spelt out: the frozen Linear and Conv2d parameters of the image encoder and
    SAM 2.1's conv_s0/conv_s1, except the qkv layers LoRA merges into."""
    roots = ["sam.image_encoder."]
    if isinstance(model.sam, Sam2):
        roots += ["sam.sam_mask_decoder.conv_s0.", "sam.sam_mask_decoder.conv_s1."]
    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not name.startswith(
            tuple(r.rstrip(".") for r in roots)
        ):
            continue
        if isinstance(model.encoder_adapter, LoraAdapter) and name.endswith("attn.qkv"):
            continue
        names |= {f"{name}.{p}" for p, t in module.named_parameters() if not t.requires_grad}
    return names


@pytest.mark.parametrize(("method", "backbone"), CASES)
def test_held_weights_compute_what_autocast_computes_from_float32(method, backbone):
    reference, held = _pair(method, backbone)
    expected = _meant_to_be_held(reference)
    assert expected, "nothing to hold"
    float32 = dict(reference.named_parameters())
    for name, parameter in held.named_parameters():
        if name in expected:
            assert parameter.dtype == torch.bfloat16, name
            assert torch.equal(parameter, float32[name].to(torch.bfloat16)), name
        else:  # norms, position embeddings, rel-pos tables, trainable parameters
            assert parameter.dtype == torch.float32, name
    saved = sum(float32[name].numel() * 2 for name in expected)
    assert _bytes(reference) - _bytes(held) == saved

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    masks = (images[:, :1] > 127).float()
    results = [_step(model, images, masks) for model in (reference, held)]
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def _bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _step(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Frozen embeddings (where the encoder runs outside autograd), logits and the trainable
    parameters' gradients, under bf16 autocast."""
    model.train()
    out = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if model.encoder_adapter is None:
            out["embeddings"] = model.frozen_embeddings(images).float()
        logits = model(images)
    out["logits"] = logits.float()
    segmentation_loss(logits.float(), masks).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.grad is not None:
            out[f"grad {name}"] = parameter.grad
    assert sum(key.startswith("grad ") for key in out) > 10  # the decoder's, at least
    return out


def test_lora_merged_for_inference_answers_as_from_float32_weights():
    """LoRA folds its updates into qkv weights, which stay float32: the merged model is the
    float32 path's, and so are its answers."""
    reference, held = _pair("lora", "vit_tiny")
    for model in (reference, held):
        for parameter in model.encoder_adapter.parameters():  # B starts at zero
            nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(2))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 255
    answers = []
    for model in (reference, held):
        model.for_inference()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            answers.append(model(images).float())
    assert held.sam.image_encoder.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert torch.equal(*answers)


def test_weights_read_as_float32_and_a_held_model_is_not_fitted_back():
    """What state_dict gives is float32 (the bf16 values), so weights files keep their dtypes;
    fitting a held model again with frozen_bf16 casts nothing twice, and without it is an
    error: its float32 values are gone."""
    reference, held = _pair("decoder", "vit_tiny")
    name = "sam.image_encoder.blocks.0.mlp.lin1.weight"
    state = held.state_dict()
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    assert torch.equal(state[name], reference.state_dict()[name].to(torch.bfloat16).float())
    assert dict(held.named_parameters())[name].dtype == torch.bfloat16  # still held
    assert hold_frozen_in_bf16(held) == 0
    fit(held, HELD)
    assert dict(held.named_parameters())[name].dtype == torch.bfloat16
    with pytest.raises(CadsamError, match=r"held in bfloat16.*build or load it again"):
        fit(held, FUSED)
    held.load_state_dict(reference.state_dict())  # float32 values in: held, rounded
    assert torch.equal(dict(held.named_parameters())[name], state[name].to(torch.bfloat16))


def test_a_held_encoder_outside_bf16_autocast_is_an_error():
    _, held = _pair("decoder", "vit_tiny")
    with pytest.raises(CadsamError, match=r"frozen_bf16 .* bf16 autocast"):
        held.frozen_embeddings(torch.rand(1, 3, 64, 64) * 255)


def test_auto_holds_frozen_weights_in_bf16_only_for_bf16_on_cuda(monkeypatch):
    """A GPU stood in for: auto and lean settle frozen_bf16 by device and precision; plain
    never; true for fp32 is refused where given; an unknown precision leaves it auto, which
    fit holds in float32."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100 * 2**30, 2**40))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Stand-in GPU")

    def held(name, device, precision, settings=None):
        return resolve_runtime(name, settings, device, precision=precision)[0].frozen_bf16

    assert LEAN.frozen_bf16 == "auto"
    assert held("auto", "cuda", "bf16") is True
    assert held("lean", "cuda", "bf16") is True
    assert held("auto", "cuda", "fp32") is False
    assert held("lean", "cpu", "bf16") is False
    assert held("auto", "cpu", "bf16") is False
    assert held("plain", "cuda", "bf16") is False
    assert held("auto", "cuda", None) == "auto"
    assert held("auto", "cuda", "bf16", {"frozen_bf16": False}) is False
    assert held("plain", "cpu", "bf16", {"frozen_bf16": True}) is True
    _, said = resolve_runtime("auto", None, "cuda", precision="bf16")
    assert "frozen_bf16=true" in said
    with pytest.raises(CadsamError, match="frozen_bf16=true is for --precision bf16"):
        resolve_runtime("auto", {"frozen_bf16": True}, "cuda", precision="fp32")
    with pytest.raises(CadsamError, match="frozen_bf16 must be auto, true or false"):
        check_settings("auto", {"frozen_bf16": "yes"})
    model = build_model("decoder", "vit_tiny", runtime=LEAN)  # auto, never settled
    assert model.sam.image_encoder.patch_embed.proj.weight.dtype == torch.float32


def test_a_bf16_training_run_saves_the_same_weights_format_either_way(tmp_path):
    """Trained one step in bf16 with and without frozen_bf16 (random base weights, so the whole
    SAM is saved too): the same tensor names, shapes and dtypes and the same metadata; the
    trained tensors equal, the frozen ones the float32 ones rounded to bf16."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        mask = np.zeros((64, 64), np.uint8)
        mask[8 * (i + 1) : 40, 16:48] = 255
        Image.fromarray(mask).save(masks / f"{i}.png")
    files = {}
    for held in (False, True):
        out = tmp_path / f"run-{held}"
        config = TrainConfig(
            method="cad",
            backbone="vit_tiny",
            out=str(out),
            images=str(images),
            masks=str(masks),
            image_size=64,
            epochs=1,
            batch_size=2,
            augment=False,
            precision="bf16",
            device="cpu",
            num_workers=0,
            progress=False,
            options={"adapter_size": 16},
            runtime={"name": "plain", "frozen_bf16": held},
        )
        model = train(config)
        assert model.runner.runtime.frozen_bf16 is held
        assert (model.sam.image_encoder.blocks[0].attn.qkv.weight.dtype == torch.bfloat16) is held
        with safe_open(str(out / "last.safetensors"), framework="pt") as f:
            meta = json.loads(f.metadata()["cadsam"])
            files[held] = meta, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    (meta_off, off), (meta_on, on) = files[False], files[True]
    del meta_off["tensors_sha256"], meta_on["tensors_sha256"]
    assert meta_on == meta_off and meta_on["includes_base"]
    assert sorted(on) == sorted(off)
    for key in off:
        assert (on[key].dtype, on[key].shape) == (off[key].dtype, off[key].shape), key
    trained = [k for k in off if not k.startswith("sam.")]
    frozen = [k for k in off if k.startswith("sam.image_encoder.") and "attn.qkv" in k]
    assert trained and frozen
    for key in trained:
        assert torch.equal(on[key], off[key]), key
    for key in frozen:
        assert torch.equal(on[key], off[key].to(torch.bfloat16).float()), key
