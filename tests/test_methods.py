"""The methods: parameter counts, shapes, where gradients flow, the high-pass, checkpointing."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import rel_err

from cadsam import build_model
from cadsam.cli import main
from cadsam.errors import CadsamError
from cadsam.frequency import high_pass
from cadsam.methods.cad import ConvAdapter

# (method, backbone, options) -> trainable parameters: the issue's and the notes' figures.
TRAINABLE = [
    ("decoder", "vit_b", {}, 4_058_340),
    ("decoder", "vit_l", {}, 4_058_340),
    ("decoder", "vit_h", {}, 4_058_340),
    ("cad", "vit_b", {}, 5_831_908),
    ("cad", "vit_h", {"cad_layout": "paper"}, 5_831_908),
    ("cad", "vit_b", {"cad_layout": "paper"}, 5_831_908),
    ("sam-adapter-paper", "vit_b", {}, 4_459_268),
    ("sam-adapter-paper", "vit_h", {}, 4_697_988),
    ("sam-adapter", "vit_b", {}, 4_121_652),
    ("sam-adapter", "vit_h", {}, 4_245_300),
    ("zero-shot", "vit_b", {}, 0),
]


@pytest.mark.parametrize(("method", "backbone", "options", "expected"), TRAINABLE)
def test_trainable_parameter_counts(method, backbone, options, expected):
    with torch.device("meta"):
        model = build_model(method, backbone, **options)
    assert model.parameter_counts()["trainable"] == expected


def test_paper_counts_shared_layer_once_per_adapter():
    """The paper prints 4,788,740 / 6,091,908: the shared Linear(32 -> E) of its SAM-Adapter
    counted once per registration (depth + 1 adapters and itself), as a state_dict lists it."""
    for backbone, depth, embed, paper in [
        ("vit_b", 12, 768, 4_788_740),
        ("vit_h", 32, 1280, 6_091_908),
    ]:
        with torch.device("meta"):
            unique = build_model("sam-adapter-paper", backbone).parameter_counts()["trainable"]
        shared = 32 * embed + embed
        assert unique + (depth + 1) * shared == paper


def test_params_command_json(capsys, meta_sam):
    assert main(["params", "--backbone", "vit_b", "--method", "decoder", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "decoder" and out["backbone"] == "vit_b"
    assert out["trainable"] == 4_058_340
    with torch.device("meta"):
        reference = meta_sam.sam_model_registry["vit_b"]()
    assert out["total"] == sum(p.numel() for p in reference.parameters())


def _numpy_high_pass(x: np.ndarray, area: float = 0.25) -> np.ndarray:
    h, w = x.shape[-2:]
    half = int(np.sqrt(h * w * area) // 2)
    f = np.fft.fftshift(np.fft.fft2(x.astype(np.float64), norm="forward"), axes=(-2, -1))
    f[..., h // 2 - half : h // 2 + half, w // 2 - half : w // 2 + half] = 0
    return np.abs(np.fft.ifft2(np.fft.ifftshift(f, axes=(-2, -1)), norm="forward").real)


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 48, 80), (1, 3, 33, 31)])
def test_high_pass_matches_numpy(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 255
    expected = _numpy_high_pass(x.numpy())
    np.testing.assert_allclose(high_pass(x).numpy(), expected, rtol=1e-4, atol=1e-3)


def test_high_pass_removes_a_quarter_of_the_spectrum_and_constants():
    assert high_pass(torch.full((1, 3, 64, 64), 200.0)).abs().max() < 1e-4
    # A checkerboard is pure Nyquist frequency: it passes unchanged in magnitude.
    board = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 255.0
    hp = high_pass(board.expand(1, 3, 64, 64))
    assert torch.allclose(hp, torch.full_like(hp, 127.5), atol=1e-3)


def _images(batch=2, size=64, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


def test_cad_adapter_output_shape_and_range():
    torch.manual_seed(0)
    adapter = ConvAdapter(embedding_size=16)
    out = adapter(_images(3, 128))
    assert out.shape == (3, 256, 16, 16)
    assert out.abs().max() <= 1.0  # tanh; fp32 rounds saturated values to exactly 1
    assert out.std() > 0.1


@pytest.mark.parametrize("layout", ["official", "paper"])
def test_cad_embedding_is_encoder_plus_tenth_of_adapter(layout):
    torch.manual_seed(0)
    model = build_model("cad", "vit_tiny", adapter_size=64, cad_layout=layout).eval()
    images = _images()
    with torch.no_grad():
        encoder = model.sam.image_encoder(model.sam_input(images))
        expected = encoder + 0.1 * model.adapter(images)
        assert rel_err(model.image_embeddings(images), expected) < 1e-6
        assert rel_err(model.adapter(images), torch.zeros(1)) > 0  # the adapter contributes


@pytest.mark.parametrize(
    "method", ["zero-shot", "decoder", "cad", "sam-adapter", "sam-adapter-paper"]
)
def test_forward_shape(method):
    model = build_model(method, "vit_tiny", **({"adapter_size": 64} if method == "cad" else {}))
    with torch.no_grad():
        logits = model(_images(2, 96))
    assert logits.shape == (2, 1, 96, 96)
    assert torch.isfinite(logits).all()


def _loss_and_backward(model, images):
    logits = model(images)
    target = (images.mean(1, keepdim=True) > 127).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    loss.backward()
    return loss


@pytest.mark.parametrize("method", ["decoder", "cad", "sam-adapter", "sam-adapter-paper"])
def test_gradients_reach_only_trainable_parameters(method):
    torch.manual_seed(0)
    model = build_model(method, "vit_tiny", **({"adapter_size": 64} if method == "cad" else {}))
    encoder_out = {}
    model.sam.image_encoder.register_forward_hook(
        lambda m, i, o: encoder_out.update(grad=torch.is_grad_enabled(), requires=o.requires_grad)
    )
    _loss_and_backward(model, _images())
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None, f"frozen {name} received a gradient"
    own = model.adapter if method == "cad" else model.encoder_adapter
    for name, p in own.named_parameters() if own is not None else []:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    decoder_grads = [p.grad for p in model.sam.mask_decoder.parameters() if p.grad is not None]
    assert decoder_grads and any(g.abs().sum() > 0 for g in decoder_grads)
    if method in ("decoder", "cad"):  # the encoder ran outside autograd: nothing kept
        assert encoder_out == {"grad": False, "requires": False}
    else:  # SAM-Adapter acts inside the encoder (which it walks itself)
        assert not encoder_out


def test_frozen_encoder_keeps_no_activations_for_backward():
    """Count tensors saved for backward while the frozen encoder and prompt encoder run."""
    model = build_model("cad", "vit_tiny", adapter_size=64)
    saved = {"count": 0, "inside": False}

    def pack(t):
        if saved["inside"]:
            saved["count"] += 1
        return t

    for module in (model.sam.image_encoder, model.sam.prompt_encoder):
        module.register_forward_pre_hook(lambda *a: saved.update(inside=True))
        module.register_forward_hook(lambda *a: saved.update(inside=False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss_and_backward(model, _images())
    assert saved["count"] == 0


def test_zero_shot_has_nothing_to_train():
    model = build_model("zero-shot", "vit_tiny")
    assert model.trainable_parameters() == []
    assert model.trainable_state_dict() == {}


@pytest.mark.parametrize("method", ["sam-adapter", "sam-adapter-paper"])
def test_block_checkpointing_leaves_gradients_equal(method):
    torch.manual_seed(1)
    plain = build_model(method, "vit_tiny")
    checkpointed = build_model(method, "vit_tiny", checkpoint_blocks=True)
    checkpointed.load_state_dict(plain.state_dict())
    images = _images(2, 64, seed=3)
    loss_plain = _loss_and_backward(plain, images)
    loss_ckpt = _loss_and_backward(checkpointed, images)
    assert torch.allclose(loss_plain, loss_ckpt, rtol=1e-6)
    pairs = zip(plain.trainable_parameters(), checkpointed.trainable_parameters(), strict=True)
    for a, b in pairs:
        if a.grad is not None:
            assert rel_err(b.grad, a.grad) < 1e-5


@pytest.mark.parametrize("method", ["decoder", "cad", "sam-adapter-paper"])
def test_trainable_state_round_trip(method):
    opts = {"adapter_size": 64} if method == "cad" else {}
    torch.manual_seed(2)
    trained = build_model(method, "vit_tiny", **opts)
    if trained.adapter is not None:  # move BN statistics off their initial values
        trained.train()
        trained(_images(2, 64, seed=4))
    state = trained.trainable_state_dict()
    assert state and all(
        k.startswith(("sam.mask_decoder.", "adapter.", "encoder_adapter.")) for k in state
    )
    fresh = build_model(method, "vit_tiny", **opts)
    fresh.sam.load_state_dict(trained.sam.state_dict())  # same base SAM
    fresh.load_trainable_state_dict(state)
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(_images(1, 64, seed=5)), trained(_images(1, 64, seed=5)))


def test_bad_method_and_options_are_user_errors():
    with pytest.raises(CadsamError, match="unknown method 'lora'"):
        build_model("lora", "vit_tiny")
    with pytest.raises(CadsamError, match="decoder does not take adapter_size"):
        build_model("decoder", "vit_tiny", adapter_size=256)
    with pytest.raises(CadsamError, match="cad_layout must be one of"):
        build_model("cad", "vit_tiny", cad_layout="fancy")
    with pytest.raises(CadsamError, match="compile_tiles must be auto, true or false"):
        build_model("cad", "vit_tiny", compile_tiles="yes")
    with pytest.raises(CadsamError, match="triton_kernels must be auto, true or false"):
        build_model("cad", "vit_tiny", triton_kernels="fast")
    with pytest.raises(CadsamError, match="compile_decoder must be auto, true or false"):
        build_model("decoder", "vit_tiny", compile_decoder="fast")
    with pytest.raises(CadsamError, match="does not combine with checkpoint_adapter"):
        build_model("cad", "vit_tiny", compile_blocks=True, checkpoint_adapter=True)


def test_encoder_chunks_equal_the_whole_batch():
    torch.manual_seed(3)
    chunked = build_model("decoder", "vit_tiny", encoder_chunk=1)
    whole = build_model("decoder", "vit_tiny", encoder_chunk=0)
    whole.load_state_dict(chunked.state_dict())
    images = _images(3, 64, seed=6)
    assert rel_err(chunked.frozen_embeddings(images), whole.frozen_embeddings(images)) < 1e-6


@pytest.mark.parametrize("layout", ["official", "paper"])
def test_adapter_checkpointing_equals_the_plain_adapter(layout):
    torch.manual_seed(4)
    plain = build_model("cad", "vit_tiny", adapter_size=64, cad_layout=layout)
    ckpt = build_model(
        "cad", "vit_tiny", adapter_size=64, cad_layout=layout, checkpoint_adapter=True
    )
    ckpt.load_state_dict(plain.state_dict())
    for step in range(2):  # two steps: running statistics must advance once per step
        images = _images(2, 64, seed=10 + step)
        loss_plain = _loss_and_backward(plain, images)
        loss_ckpt = _loss_and_backward(ckpt, images)
        assert torch.allclose(loss_plain, loss_ckpt, rtol=1e-6)
    for (name, a), b in zip(
        plain.adapter.named_parameters(), ckpt.adapter.parameters(), strict=True
    ):
        assert rel_err(b.grad, a.grad) < 1e-5, name
    for (name, a), b in zip(plain.adapter.named_buffers(), ckpt.adapter.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7), name
    assert plain.adapter.blocks[0].bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize("size", [64, 72])  # pooled to 8 x 8 by cells, and adaptively
def test_compiled_adapter_blocks_equal_the_plain_blocks(size):
    """What training on CUDA runs by default (``compile_blocks`` auto), here on CPU, against a
    float64 copy of the plain adapter: outputs, gradients and running statistics over two
    steps, as close as the plain float32 blocks'. The later blocks pool their input (the
    previous block's output) in the compiled code. Three compiles (one per block), some 20
    seconds."""
    torch.manual_seed(6)
    plain = ConvAdapter(embedding_size=8, embed_dim=16, compile_blocks=False)
    compiled = ConvAdapter(embedding_size=8, embed_dim=16, compile_blocks=True)
    compiled.load_state_dict(plain.state_dict())
    reference = copy.deepcopy(plain).double()
    for step in range(2):
        x = plain.adapter_input(_images(2, size, seed=20 + step))
        upstream = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(step))
        outputs = []
        for adapter in (reference, plain, compiled):
            outputs.append(adapter.forward_from_input(x.to(next(adapter.parameters()).dtype)))
            (outputs[-1] * upstream.to(outputs[-1].dtype)).sum().backward()
        assert rel_err(outputs[2].double(), outputs[0]) < 5e-5
    assert len(compiled.__dict__["_compiled_blocks"]) == 3
    assert "_compiled_blocks" not in plain.__dict__
    named = zip(
        reference.named_parameters(), plain.parameters(), compiled.parameters(), strict=True
    )
    for (name, exact), a, b in named:
        if name.endswith("conv.bias"):  # before BatchNorm: gradient 0, to rounding
            weight = dict(reference.named_parameters())[name.replace("bias", "weight")]
            assert b.grad.norm() < 1e-4 * weight.grad.norm(), name
        else:
            assert (
                rel_err(b.grad.double(), exact.grad)
                < 2 * rel_err(a.grad.double(), exact.grad) + 1e-5
            ), name
    for (name, a), b in zip(reference.named_buffers(), compiled.buffers(), strict=True):
        assert torch.allclose(a, b.to(a.dtype), rtol=1e-5, atol=1e-6), name
    assert compiled.blocks[0].bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize("method", ["decoder", "cad"])
def test_training_from_given_embeddings_equals_running_the_encoder(method, tmp_path):
    opts = {"adapter_size": 64} if method == "cad" else {}
    torch.manual_seed(5)
    full = build_model(method, "vit_tiny", **opts)
    torch.save(full.sam.state_dict(), tmp_path / "sam.pth")
    cached = build_model(
        method, "vit_tiny", checkpoint=tmp_path / "sam.pth", with_encoder=False, **opts
    )
    assert cached.sam.image_encoder is None
    assert not any(name.startswith("sam.image_encoder") for name, _ in cached.named_parameters())
    cached.load_trainable_state_dict(full.trainable_state_dict())
    images = _images(2, 64, seed=7)
    embeddings = full.frozen_embeddings(images)
    target = (images.mean(1, keepdim=True) > 127).float()
    losses = []
    for model, given in ((full, None), (cached, embeddings)):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images, given), target)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-6)
    for a, b in zip(full.trainable_parameters(), cached.trainable_parameters(), strict=True):
        if a.grad is not None:
            assert rel_err(b.grad, a.grad) < 1e-5


def test_compiled_decoder_equals_the_plain_decoder():
    """What training on CUDA runs by default (``compile_decoder`` auto), here on CPU: the mask
    logits and every trainable gradient as the plain decoder's. One compile, about half a
    minute."""
    torch.manual_seed(2)
    plain = build_model("decoder", "vit_tiny", with_encoder=False, compile_decoder=False)
    compiled = build_model("decoder", "vit_tiny", with_encoder=False, compile_decoder=True)
    compiled.load_state_dict(plain.state_dict())
    images = _images(2, 64, seed=3)
    grid = plain.sam.prompt_encoder.image_embedding_size
    embeddings = torch.randn(2, 256, *grid, generator=torch.Generator().manual_seed(4))
    upstream = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    logits = []
    for model in (plain, compiled):
        logits.append(model(images, embeddings))
        (logits[-1] * upstream).sum().backward()
    assert "_compiled_mask_logits" in compiled.__dict__
    assert "_compiled_mask_logits" not in plain.__dict__
    assert rel_err(logits[1], logits[0]) < 1e-5
    for (name, a), b in zip(plain.named_parameters(), compiled.parameters(), strict=True):
        if a.grad is None:  # (the multimask outputs' heads)
            assert b.grad is None, name
        else:  # (+1e-6: the key projections' biases have gradient 0, to rounding)
            assert (b.grad - a.grad).norm() < 1e-4 * a.grad.norm() + 1e-6, name


def test_nothing_compiles_by_default_on_a_cpu(monkeypatch):
    """The decoder and the whole adapter blocks compile by default only while training on CUDA
    (the banded blocks' band functions: on CUDA)."""

    def refuse(*args, **kwargs):
        raise AssertionError("compiled on a CPU")

    monkeypatch.setattr(torch, "compile", refuse)
    model = build_model("cad", "vit_tiny", adapter_size=64, with_encoder=False)
    assert model.options["compile_decoder"] == model.options["compile_blocks"] == "auto"
    grid = model.sam.prompt_encoder.image_embedding_size
    model(_images(1, 64), torch.randn(1, 256, *grid)).sum().backward()


def test_sam_adapter_cannot_go_without_its_encoder():
    with pytest.raises(CadsamError, match="cannot train from cached embeddings"):
        build_model("sam-adapter-paper", "vit_tiny", with_encoder=False)


def test_channels_last_adapter_equals_nchw():
    torch.manual_seed(6)
    nhwc = build_model("cad", "vit_tiny", adapter_size=64)
    nchw = build_model("cad", "vit_tiny", adapter_size=64, channels_last=False)
    nchw.load_state_dict(nhwc.state_dict())
    images = _images(2, 64, seed=8)
    loss_a, loss_b = _loss_and_backward(nhwc, images), _loss_and_backward(nchw, images)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    grads = [torch.cat([p.grad.flatten() for p in m.adapter.parameters()]) for m in (nhwc, nchw)]
    assert rel_err(grads[0], grads[1]) < 1e-4
