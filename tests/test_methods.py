"""The methods: parameter counts, shapes, where gradients flow, the high-pass, the plain CAD
adapter against a hand-written float64 one, and every runtime's way of running a model
against the plain path."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from test_tiling import run_from_input

import cadsam
import cadsam.fast.adapter
from cadsam import build_model
from cadsam.commands import main
from cadsam.errors import CadsamError
from cadsam.fast.adapter import run_adapter
from cadsam.fast.runner import FastRunner, fit
from cadsam.fast.runtime import LEAN, ROOMY, Runtime, resolve_runtime
from cadsam.frequency import high_pass
from cadsam.methods.cad import ConvAdapter
from cadsam.methods.model import PlainRunner

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


def test_params_command_tabulates_what_it_is_asked(capsys):
    """Several backbones and methods: a JSON line or a table row each, the methods that run on
    a backbone by default; a method named where it does not run is an error, not a skip."""
    assert main(["params", "--backbone", "vit_b", "sam2.1_hiera_t", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    pairs = [(row["backbone"], row["method"]) for row in rows]
    sam1 = ["zero-shot", "decoder", "cad", "sam-adapter", "sam-adapter-paper", "lora"]
    sam2 = [m for m in sam1 if not m.startswith("sam-adapter")]
    assert pairs == [("vit_b", m) for m in sam1] + [("sam2.1_hiera_t", m) for m in sam2]
    trainable = {pair: row["trainable"] for pair, row in zip(pairs, rows, strict=True)}
    assert trainable["vit_b", "decoder"] == 4_058_340  # Meta's mask decoder
    assert trainable["vit_b", "lora"] == 4_058_340 + 12 * 4 * 768 * 4  # 4 x width x rank a block
    assert trainable["vit_b", "zero-shot"] == trainable["sam2.1_hiera_t", "zero-shot"] == 0

    assert main(["params", "--backbone", "vit_b", "sam2.1_hiera_t"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["backbone", "method", "trainable", "total"]
    for line, row in zip(table[1:], rows, strict=True):
        assert line.split() == [row["backbone"], row["method"], f"{row['trainable']:,}",
                                f"{row['total']:,}"]  # fmt: skip
    assert (
        main(["params", "--backbone", "sam2.1_hiera_tiny_test", "vit_tiny", "--method", "cad"]) == 0
    )
    assert len({len(line) for line in capsys.readouterr().out.splitlines()}) == 1  # aligned

    assert main(["params", "--backbone", "vit_b", "sam2.1_hiera_t", "--method", "sam-adapter"]) == 1
    assert "SAM-Adapter is SAM 1 only" in capsys.readouterr().err


def test_params_command_defaults_to_the_released_backbones(capsys):
    assert main(["params", "--method", "decoder", "--json"]) == 0
    backbones = [json.loads(line)["backbone"] for line in capsys.readouterr().out.splitlines()]
    sam2 = ["sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l"]
    assert backbones == ["vit_b", "vit_l", "vit_h", *sam2]  # not vit_tiny, the test config


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


RUNTIMES = [pytest.param(None, id="plain"), pytest.param(LEAN, id="lean")]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("method", ["decoder", "cad", "sam-adapter", "sam-adapter-paper"])
def test_gradients_reach_only_trainable_parameters(method, runtime):
    torch.manual_seed(0)
    opts = {"adapter_size": 64} if method == "cad" else {}
    model = build_model(method, "vit_tiny", runtime=runtime, **opts)
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


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_frozen_encoder_keeps_no_activations_for_backward(runtime):
    """Count tensors saved for backward while the frozen encoder and prompt encoder run."""
    model = build_model("cad", "vit_tiny", adapter_size=64, runtime=runtime)
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


def _count_calls(modules) -> list[int]:
    """How often ``modules`` start running (a recomputation may stop before a module ends)."""
    calls = [0]
    for module in modules:
        module.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("method", ["sam-adapter", "sam-adapter-paper"])
def test_block_checkpointing_leaves_gradients_equal(method):
    torch.manual_seed(1)
    plain = build_model(method, "vit_tiny")
    checkpointed = build_model(method, "vit_tiny", runtime=Runtime(checkpoint_encoder=True))
    checkpointed.load_state_dict(plain.state_dict())
    images = _images(2, 64, seed=3)
    runs = [_count_calls(model.sam.image_encoder.blocks) for model in (plain, checkpointed)]
    loss_plain = _loss_and_backward(plain, images)
    loss_ckpt = _loss_and_backward(checkpointed, images)
    assert torch.allclose(loss_plain, loss_ckpt, rtol=1e-6)
    depth = len(plain.sam.image_encoder.blocks)
    assert [calls[0] for calls in runs] == [depth, 2 * depth]  # recomputed in backward
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
    with pytest.raises(CadsamError, match="unknown method 'no-such-method'"):
        build_model("no-such-method", "vit_tiny")
    with pytest.raises(
        CadsamError, match=r"method decoder does not take adapter_size \(it takes no options\)"
    ):
        build_model("decoder", "vit_tiny", adapter_size=256)
    with pytest.raises(CadsamError, match="cad_layout must be one of"):
        build_model("cad", "vit_tiny", cad_layout="fancy")
    with pytest.raises(CadsamError, match="adapter_size must be a whole number of pixels >= 8"):
        build_model("cad", "vit_tiny", adapter_size=4)


def test_bad_runtime_settings_are_user_errors():
    with pytest.raises(CadsamError, match="compile_tiles must be auto, true or false, not 'yes'"):
        Runtime().replace(compile_tiles="yes")
    with pytest.raises(CadsamError, match="triton_kernels must be auto, true or false"):
        Runtime().replace(triton_kernels="fast")
    with pytest.raises(CadsamError, match="compile_decoder must be auto, true or false"):
        LEAN.replace(compile_decoder="fast")
    with pytest.raises(CadsamError, match="compile_blocks=true does not combine with checkpoint_"):
        Runtime().replace(compile_blocks=True, checkpoint_adapter=True)
    with pytest.raises(CadsamError, match="compile_blocks=true does not combine with checkpoint_"):
        ROOMY.replace(compile_blocks=True).replace(checkpoint_adapter=True)
    with pytest.raises(CadsamError, match="compile_blocks=true does not combine with checkpoint_"):
        LEAN.replace(compile_blocks=True)  # lean recomputes CAD's blocks
    assert LEAN.checkpoint_adapter and LEAN.compile_blocks == "auto"  # auto steps aside
    with pytest.raises(CadsamError, match="channels_last must be true or false, not 'yes'"):
        Runtime().replace(channels_last="yes")
    with pytest.raises(CadsamError, match="adapter_tile_mib must be a number >= 0, not -1"):
        Runtime().replace(adapter_tile_mib=-1)
    with pytest.raises(CadsamError, match=r"encoder_chunk must be a whole number, not 1\.5"):
        Runtime().replace(encoder_chunk=1.5)
    with pytest.raises(CadsamError, match="unknown runtime setting checkpoint_blocks"):
        Runtime().replace(checkpoint_blocks=True)  # now checkpoint_encoder
    # how a model runs is not among what it trains: no runtime setting is a model option
    with pytest.raises(
        CadsamError, match=r"method cad does not take compile_tiles \(it takes: adapter_size, "
    ):
        build_model("cad", "vit_tiny", compile_tiles=True)
    with pytest.raises(CadsamError, match="method decoder does not take fused_attention"):
        build_model("decoder", "vit_tiny", fused_attention=True)


def test_encoder_chunks_equal_the_whole_batch():
    torch.manual_seed(3)
    chunked = build_model("decoder", "vit_tiny", runtime=Runtime(encoder_chunk=1))
    whole = build_model("decoder", "vit_tiny", runtime=Runtime(encoder_chunk=0))
    whole.load_state_dict(chunked.state_dict())
    images = _images(3, 64, seed=6)
    runs = [_count_calls([model.sam.image_encoder]) for model in (chunked, whole)]
    assert rel_err(chunked.frozen_embeddings(images), whole.frozen_embeddings(images)) < 1e-6
    assert [calls[0] for calls in runs] == [3, 1]  # one image per call, and the whole batch


@pytest.mark.parametrize("layout", ["official", "paper"])
def test_adapter_checkpointing_equals_the_plain_adapter(layout):
    torch.manual_seed(4)
    plain = build_model("cad", "vit_tiny", adapter_size=64, cad_layout=layout)
    ckpt = build_model(
        "cad",
        "vit_tiny",
        adapter_size=64,
        cad_layout=layout,
        runtime=Runtime(checkpoint_adapter=True),
    )
    ckpt.load_state_dict(plain.state_dict())
    runs = [_count_calls(b.conv for b in model.adapter.blocks) for model in (plain, ckpt)]
    for step in range(2):  # two steps: running statistics must advance once per step
        images = _images(2, 64, seed=10 + step)
        loss_plain = _loss_and_backward(plain, images)
        loss_ckpt = _loss_and_backward(ckpt, images)
        assert torch.allclose(loss_plain, loss_ckpt, rtol=1e-6)
    assert [calls[0] for calls in runs] == [2 * 3, 2 * 2 * 3]  # recomputed in backward
    for (name, a), b in zip(
        plain.adapter.named_parameters(), ckpt.adapter.parameters(), strict=True
    ):
        assert rel_err(b.grad, a.grad) < 1e-5, name
    for (name, a), b in zip(plain.adapter.named_buffers(), ckpt.adapter.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7), name
    assert plain.adapter.blocks[0].bn.num_batches_tracked.item() == 2
    assert ckpt.adapter.blocks[0].bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize("size", [64, 72])  # pooled to 8 x 8 by cells, and adaptively
def test_compiled_adapter_blocks_equal_the_plain_blocks(size):
    """What training on CUDA runs by default (``compile_blocks`` auto, in channels_last), here
    on CPU, against a float64 copy of the plain adapter: outputs, gradients and running
    statistics over two steps, as close as the plain float32 module's given the same
    channels_last input (torch's CPU convolutions round differently by layout:
    test_channels_last_adapter_equals_nchw). The later blocks pool their input (the previous
    block's output) in the compiled code. Three compiles (one per block), some 20 seconds."""
    torch.manual_seed(6)
    plain = ConvAdapter(embedding_size=8, embed_dim=16)
    compiled = copy.deepcopy(plain)
    reference = copy.deepcopy(plain).double()
    runner = FastRunner(Runtime(compile_blocks=True, channels_last=True))
    for step in range(2):
        images = _images(2, size, seed=20 + step)
        x = plain.adapter_input(images)
        upstream = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(step))
        outputs = [
            reference.forward_from_input(x.double()),
            plain.forward_from_input(x.contiguous(memory_format=torch.channels_last)),
            runner.adapter(compiled, images),
        ]
        for output in outputs:
            (output * upstream.to(output.dtype)).sum().backward()
        assert rel_err(outputs[2].double(), outputs[0]) < 5e-5
    blocks = compiled.blocks
    assert set(runner.compiled) == {(blocks[0], 0), (blocks[1], 8), (blocks[2], 8)}
    assert not hasattr(PlainRunner(), "compiled")  # the plain path compiles nothing
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
    plain = build_model("decoder", "vit_tiny", with_encoder=False)
    compiled = build_model(
        "decoder", "vit_tiny", with_encoder=False, runtime=Runtime(compile_decoder=True)
    )
    compiled.load_state_dict(plain.state_dict())
    images = _images(2, 64, seed=3)
    grid = plain.sam.prompt_encoder.image_embedding_size
    embeddings = torch.randn(2, 256, *grid, generator=torch.Generator().manual_seed(4))
    upstream = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    logits = []
    for model in (plain, compiled):
        logits.append(model(images, embeddings))
        (logits[-1] * upstream).sum().backward()
    assert set(compiled.runner.compiled) == {"decoder"}
    assert type(plain.runner) is PlainRunner and not hasattr(plain.runner, "compiled")
    assert rel_err(logits[1], logits[0]) < 1e-5
    for (name, a), b in zip(plain.named_parameters(), compiled.parameters(), strict=True):
        if a.grad is None:  # (the multimask outputs' heads)
            assert b.grad is None, name
        else:  # (+1e-6: the key projections' biases have gradient 0, to rounding)
            assert (b.grad - a.grad).norm() < 1e-4 * a.grad.norm() + 1e-6, name


@pytest.mark.parametrize("preset", [LEAN, ROOMY], ids=["lean", "roomy"])
def test_nothing_compiles_by_default_on_a_cpu(monkeypatch, preset):
    """The decoder, the encoder and the whole adapter blocks compile under ``auto`` only while
    training on CUDA; the banded blocks' band functions and Triton kernels: on CUDA. (Bands
    forced by a 1 MiB budget; Triton's kernels, uninterpreted, would fail on CPU tensors.)"""

    def refuse(*args, **kwargs):
        raise AssertionError("compiled on a CPU")

    monkeypatch.setattr(torch, "compile", refuse)
    runtime = preset.replace(adapter_tile_mib=1)  # the first block, 2 MiB, in bands
    model = build_model("cad", "vit_tiny", adapter_size=32, runtime=runtime)
    assert model.options == {"adapter_size": 32, "cad_layout": "official"}  # no runtime there
    switches = ("compile_decoder", "compile_blocks", "compile_tiles", "triton_kernels")
    assert {getattr(model.runner.runtime, name) for name in switches} == {"auto"}
    assert model.runner.runtime.compile_encoder == ("auto" if preset is ROOMY else False)
    model(_images(2, 64)).sum().backward()
    assert model.runner.compiled == {}
    # what the commands run by default on a CPU: no compiling switch at all
    auto, _ = resolve_runtime("auto", None, "cpu")
    assert auto.changes() == {"fused_attention": True}


def test_sam_adapter_cannot_go_without_its_encoder():
    with pytest.raises(CadsamError, match="cannot train from cached embeddings"):
        build_model("sam-adapter-paper", "vit_tiny", with_encoder=False)


def _adapter_watched(model) -> dict:
    """Keep the adapter's output, and the gradient it gets, from ``model``'s next steps."""
    watched, run = {}, model.runner.adapter

    def adapter(module, images):
        out = run(module, images)
        watched["out"] = out.detach()
        out.register_hook(lambda grad: watched.update(grad=grad))
        return out

    model.runner.adapter = adapter  # on this runner alone
    return watched


def test_channels_last_adapter_equals_nchw():
    """channels_last computes the plain adapter's function (in float64 to rounding:
    test_run_adapter_equals_the_plain_adapter); it differs from NCHW only in the rounding of
    torch's convolutions, which on a CPU is some 6x coarser in NHWC at 256 channels (values
    1e-5 from float64, against 2e-6). BatchNorm's backward and the LeakyReLU's kinks amplify
    float32 rounding in gradients to 1e-3 .. 1e-2 of their largest in either layout, depending
    on the seed (an activation near a kink changes sides), so float32 gradients are not
    compared across layouts. Instead, with the gradient the loss sends the adapter (some 1e-7):
    the training loss in both layouts; each layout against the float64 adapter, within
    float32's rounding; and channels_last against the plain module given the same channels_last
    input, which it equals (nothing added to the layout's rounding)."""
    torch.manual_seed(6)
    nchw = build_model("cad", "vit_tiny", adapter_size=64)
    nhwc = build_model("cad", "vit_tiny", adapter_size=64, runtime=Runtime(channels_last=True))
    nhwc.load_state_dict(nchw.state_dict())
    module = copy.deepcopy(nchw.adapter)  # the models' adapter before their step
    exact = copy.deepcopy(module).double()
    watched = [_adapter_watched(model) for model in (nchw, nhwc)]
    images = _images(2, 64, seed=8)
    loss_a, loss_b = _loss_and_backward(nhwc, images), _loss_and_backward(nchw, images)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    upstream = watched[1]["grad"]  # (the NCHW model's differs by some 1e-6 of it)
    assert upstream.abs().max() < 1e-4  # the loss's gradient reaching the adapter is tiny
    x = module.adapter_input(nchw.adapter_input(images))
    out = module.forward_from_input(x.contiguous(memory_format=torch.channels_last))
    out.backward(upstream)
    expected = exact.forward_from_input(x.double())
    expected.backward(upstream.double())

    def grads(adapter):
        return torch.cat([p.grad.flatten() for p in adapter.parameters()]).double()

    assert rel_err(watched[1]["out"], out) < 1e-6
    assert rel_err(grads(nhwc.adapter), grads(module)) < 1e-5
    # against float64: values within float32's rounding of 3 x 3 x 256-term sums (2304 x 2^-24,
    # some 1.4e-4), gradients within what BatchNorm and the kinks make of it
    for model, seen in zip((nchw, nhwc), watched, strict=True):
        assert rel_err(seen["out"].double(), expected) < 1.4e-4
        assert rel_err(grads(model.adapter), grads(exact)) < 5e-2


# -- the plain adapter against the paper's computation, by hand in float64 -----------------

EPS, MOMENTUM, SLOPE = 1e-5, 0.1, 0.1  # BatchNorm's and LeakyReLU's, as the authors' code


def _pool2(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    return x[..., :h, :w].unflatten(-1, (w // 2, 2)).unflatten(-3, (h // 2, 2)).mean((-1, -3))


def _pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling as a product with averaging matrices: output cell i averages
    input rows floor(i n / size) .. ceil((i + 1) n / size)."""

    def averaging(n: int) -> torch.Tensor:
        matrix = torch.zeros(size, n, dtype=x.dtype)
        for i in range(size):
            lo, hi = i * n // size, -(-(i + 1) * n // size)
            matrix[i, lo:hi] = 1 / (hi - lo)
        return matrix

    return averaging(x.shape[-2]) @ x @ averaging(x.shape[-1]).T


def _batch_norm(z: torch.Tensor, p: dict, stats: dict, name: str, training: bool):
    running_mean, running_var = f"{name}.running_mean", f"{name}.running_var"
    if training:  # the batch's statistics; the running ones move towards them (var unbiased)
        mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), correction=0)
        n = z.numel() / z.shape[1]
        with torch.no_grad():
            stats[running_mean] = (1 - MOMENTUM) * stats[running_mean] + MOMENTUM * mean
            unbiased = var * n / (n - 1)
            stats[running_var] = (1 - MOMENTUM) * stats[running_var] + MOMENTUM * unbiased
    else:
        mean, var = stats[running_mean], stats[running_var]
    zhat = (z - mean[:, None, None]) / (var[:, None, None] + EPS).sqrt()
    return zhat * p[f"{name}.weight"][:, None, None] + p[f"{name}.bias"][:, None, None]


def _leaky(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z > 0, z, SLOPE * z)


def _hand_adapter(images: np.ndarray, p: dict, stats: dict, layout: str, size: int, training):
    """CAD as the paper and the authors' code compute it, in float64 from the parameters
    ``p`` and BatchNorm's statistics ``stats`` (updated in place while training)."""
    rgb = torch.from_numpy(images.astype(np.float64))
    x = torch.cat((rgb, torch.from_numpy(_numpy_high_pass(images))), dim=1)
    x = x / (x.amax(dim=(-2, -1), keepdim=True) + 1e-5)  # each channel by its maximum
    x = F.conv2d(x, p["conv_up.weight"], p["conv_up.bias"])
    pooled = []
    for i in range(len({k.split(".")[1] for k in p if k.startswith("blocks.")})):
        weight, bias = p[f"blocks.{i}.conv.weight"], p[f"blocks.{i}.conv.bias"]
        if layout == "official":  # conv (dilation 2) -> BN -> LeakyReLU -> + input -> pool
            z = F.conv2d(x, weight, bias, padding=2, dilation=2)
            x = _pool2(_leaky(_batch_norm(z, p, stats, f"blocks.{i}.bn", training)) + x)
            pooled.append(_pool_to(x, size))
        else:  # conv -> LeakyReLU -> BN -> pool
            z = _leaky(F.conv2d(x, weight, bias, padding=1))
            x = _pool2(_batch_norm(z, p, stats, f"blocks.{i}.bn", training))
    return torch.tanh(sum(pooled) if layout == "official" else _pool_to(x, size))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("size", [64, 72])  # pooled to 8 x 8 by cells, and adaptively
@pytest.mark.parametrize("layout", ["official", "paper"])
def test_plain_adapter_is_the_papers_computation(layout, size, training):
    """``ConvAdapter`` (the reference every fast path is tested against) against the
    computation written out here from the paper and the authors' code: the numpy high-pass,
    conv_up, the blocks, pooling and tanh, in float64. The module in float64 matches to
    rounding, values and gradients; in float32, values to float32's precision."""
    torch.manual_seed(7)
    adapter = ConvAdapter(embedding_size=8, embed_dim=32, layout=layout).train(training)
    with torch.no_grad():  # BatchNorm away from its identity start, so every term matters
        for block in adapter.blocks:
            block.conv.bias.uniform_(-0.1, 0.1)
            block.bn.weight.uniform_(0.5, 1.5)
            block.bn.bias.uniform_(-0.5, 0.5)
            block.bn.running_mean.uniform_(-1, 1)
            block.bn.running_var.uniform_(0.5, 2)
    exact = copy.deepcopy(adapter).double()
    p = {k: v.detach().double().clone().requires_grad_() for k, v in adapter.named_parameters()}
    stats = {k: v.double().clone() for k, v in adapter.named_buffers() if "running" in k}
    images = _images(2, size, seed=9)
    expected = _hand_adapter(images.numpy(), p, stats, layout, 8, training)
    assert expected.shape == (2, 32, 8, 8)
    x = exact.adapter_input(images)
    assert rel_err(x.double(), _hand_input(images)) < 1e-6  # float32 high-pass and maxima
    actual = exact.forward_from_input(_hand_input(images))
    assert rel_err(actual, expected) < 1e-12
    assert rel_err(adapter(images).double(), expected) < 1e-5
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    expected.backward(upstream)
    actual.backward(upstream)
    scale = p["conv_up.weight"].grad.abs().max()
    for name, tested in exact.named_parameters():
        if training and layout == "official" and name.endswith("conv.bias"):
            # before BatchNorm: zero in exact math, both to rounding
            assert max(tested.grad.abs().max(), p[name].grad.abs().max()) < 1e-10 * scale
        else:
            assert rel_err(tested.grad, p[name].grad) < 1e-10, name
    for name, tested in exact.named_buffers():
        if "running" in name:
            assert torch.allclose(tested, stats[name], rtol=1e-12, atol=1e-14), name
    assert exact.blocks[0].bn.num_batches_tracked.item() == (1 if training else 0)


def _hand_input(images: torch.Tensor) -> torch.Tensor:
    x = torch.cat((images.double(), torch.from_numpy(_numpy_high_pass(images.numpy()))), dim=1)
    return x / (x.amax(dim=(-2, -1), keepdim=True) + 1e-5)


# -- every runtime runs the plain path's function ------------------------------------------


@pytest.fixture
def banded(monkeypatch) -> list[int]:
    """The rows per band of each block ``run_adapter`` runs in bands, as it runs them."""
    calls, run = [], cadsam.fast.adapter.tiled_residual_block

    def counted(x, block, conv_up, rows, *args):
        calls.append(rows)
        return run(x, block, conv_up, rows, *args)

    monkeypatch.setattr(cadsam.fast.adapter, "tiled_residual_block", counted)
    return calls


# MiB: with 16 float64 channels, rows per band of each banded block (the last one runs whole
# at 64 pixels, its activation exactly the budget; at 72 its bands are whole images)
BUDGET = 1 / 16
BANDS = {64: [8, 16], 72: [6, 14, 28]}
FAST_ADAPTERS = [
    pytest.param(Runtime(adapter_tile_mib=BUDGET), id="bands"),
    pytest.param(LEAN.replace(adapter_tile_mib=BUDGET), id="lean-bands"),
    pytest.param(LEAN, id="lean"),  # whole blocks recomputed in backward, in channels_last
    pytest.param(ROOMY, id="roomy"),  # whole blocks kept, compile_blocks auto: eager on a CPU
    pytest.param(Runtime(compile_blocks=False), id="whole"),
    pytest.param(Runtime(checkpoint_adapter=True), id="checkpoint"),
    pytest.param(Runtime(checkpoint_adapter=True, adapter_tile_mib=BUDGET), id="checkpoint-bands"),
    pytest.param(Runtime(channels_last=True), id="channels-last"),
]


# (the paper's layout never bands; at 72 pixels its last map is pooled adaptively)
@pytest.mark.parametrize(("layout", "size"), [("official", 64), ("official", 72), ("paper", 72)])
@pytest.mark.parametrize("runtime", FAST_ADAPTERS)
def test_run_adapter_equals_the_plain_adapter(runtime, layout, size, banded):
    """``run_adapter`` under each runtime against ``ConvAdapter`` itself, both in float64 (so
    that this checks the algebra, not rounding): outputs, every gradient and BatchNorm's
    running statistics over two steps. ``compile_blocks=True`` is
    test_compiled_adapter_blocks_equal_the_plain_blocks."""
    torch.manual_seed(8)
    plain = ConvAdapter(embedding_size=8, embed_dim=16, layout=layout).double()
    fast = copy.deepcopy(plain)
    compiled = {}
    for step in range(2):
        x = _hand_input(_images(2, size, seed=30 + step))
        expected, actual = plain.forward_from_input(x), run_from_input(fast, x, runtime, compiled)
        assert actual.shape == expected.shape == (2, 16, 8, 8)
        assert rel_err(actual, expected) < 1e-10
        upstream = torch.randn_like(expected)
        expected.backward(upstream)
        actual.backward(upstream)
    bands = runtime.adapter_tile_mib == BUDGET and layout == "official"
    assert banded == (BANDS[size] * 2 if bands else [])  # two steps
    assert compiled == {}  # nothing compiles on a CPU here
    scale = plain.conv_up.weight.grad.abs().max()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        if layout == "official" and name.endswith("conv.bias"):  # 0 in exact math, before BN
            assert a.grad.abs().max() < 1e-10 * scale and b.grad.abs().max() < 1e-10 * scale
        else:
            assert rel_err(a.grad, b.grad) < 1e-10, name
    for (name, a), b in zip(fast.named_buffers(), plain.buffers(), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), name
    assert fast.blocks[0].bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize("runtime", FAST_ADAPTERS)
def test_run_adapter_in_float32_is_as_close_to_float64_as_the_plain_adapter(runtime, banded):
    """The same from images, in float32 (``adapter_input`` included; the budget halved, so
    that the same blocks run in bands): each path's distance to the float64 module, the fast
    one's at most about the plain module's given the input in the same layout (torch's CPU
    convolutions round differently in channels_last: test_channels_last_adapter_equals_nchw)."""
    runtime = runtime.replace(adapter_tile_mib=runtime.adapter_tile_mib / 2)
    torch.manual_seed(9)
    plain = ConvAdapter(embedding_size=8, embed_dim=16)
    fast, exact = copy.deepcopy(plain), copy.deepcopy(plain).double()
    images = _images(2, 64, seed=40)
    x = plain.adapter_input(images)
    layout = torch.channels_last if runtime.channels_last else torch.contiguous_format
    outputs = [
        exact.forward_from_input(x.double()),
        plain.forward_from_input(x.contiguous(memory_format=layout)),
        run_adapter(fast, images, runtime, {}),
    ]
    upstream = torch.randn_like(outputs[0])
    for output in outputs:
        output.backward(upstream.to(output.dtype))
    assert banded == (BANDS[64] if runtime.adapter_tile_mib == BUDGET / 2 else [])
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (exact, plain, fast)]
    for values in (outputs, grads):
        plain_error = rel_err(values[1].double(), values[0])
        assert plain_error < 1e-4
        assert rel_err(values[2].double(), values[0]) < 2 * plain_error + 1e-6


def test_fit_to_the_plain_runtime_gives_back_the_plain_runner():
    model = build_model("cad", "vit_tiny", adapter_size=64, runtime=LEAN)
    encoder = model.sam.image_encoder
    assert type(model.runner) is FastRunner and model.runner.runtime == LEAN
    assert all(block.attn.fused for block in encoder.blocks)
    assert fit(model, Runtime()) is model
    assert type(model.runner) is PlainRunner and model.runner.runtime.is_plain
    assert not any(block.attn.fused for block in encoder.blocks)
    plain = build_model("cad", "vit_tiny", adapter_size=64)  # no runtime: the plain path
    assert type(plain.runner) is PlainRunner
    assert not any(block.attn.fused for block in plain.sam.image_encoder.blocks)
    fit(plain, Runtime(fused_attention=True))  # anything else is a FastRunner
    assert type(plain.runner) is FastRunner
    assert all(block.attn.fused for block in plain.sam.image_encoder.blocks)
    cached = fit(build_model("decoder", "vit_tiny", with_encoder=False), LEAN)  # no encoder
    assert type(cached.runner) is FastRunner and cached.runner.runtime == LEAN


def test_a_runtime_is_not_part_of_the_weights():
    """Weights saved under one runtime load under any other; copies keep the runtime and
    compile afresh."""
    lean = build_model("cad", "vit_tiny", adapter_size=64, runtime=LEAN)
    plain = build_model("cad", "vit_tiny", adapter_size=64)
    assert list(lean.state_dict()) == list(plain.state_dict())
    assert list(lean.trainable_state_dict()) == list(plain.trainable_state_dict())
    plain.load_trainable_state_dict(lean.trainable_state_dict())
    lean.runner.compiled["decoder"] = object()
    copied = copy.deepcopy(lean)
    assert type(copied.runner) is FastRunner and copied.runner is not lean.runner
    assert copied.runner.runtime == LEAN and copied.runner.compiled == {}


def test_auto_on_a_cpu_equals_the_plain_path():
    """What the commands run by default on a CPU (the fused attention) against the plain
    path: logits and gradients of a training step, to float32 rounding."""
    runtime, _ = resolve_runtime("auto", None, "cpu")
    torch.manual_seed(10)
    plain = build_model("cad", "vit_tiny", adapter_size=32)
    auto = fit(copy.deepcopy(plain), runtime)
    assert type(auto.runner) is FastRunner and type(plain.runner) is PlainRunner
    images = _images(2, 64, seed=11)
    target = (images.mean(1, keepdim=True) > 127).float()
    logits = []
    for model in (plain, auto):
        logits.append(model(images))
        F.binary_cross_entropy_with_logits(logits[-1], target).backward()
    assert rel_err(logits[1], logits[0]) < 1e-5
    for (name, a), b in zip(plain.named_parameters(), auto.parameters(), strict=True):
        if a.grad is not None:
            assert (b.grad - a.grad).norm() < 1e-4 * a.grad.norm() + 1e-7, name


def test_the_plain_adapter_stands_alone():
    """``cadsam/methods/cad.py`` is the reference: short, and importing nothing of the fast
    paths, directly or through what it imports from the package."""
    root = Path(cadsam.__file__).parent
    source = root / "methods" / "cad.py"
    assert len(source.read_text().splitlines()) <= 150
    seen, pending = set(), ["cadsam.methods.cad"]
    while pending:
        name = pending.pop()
        path = root.joinpath(*name.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if name in seen or not path.exists():  # (not a module: a name from one)
            continue
        seen.add(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(filter(None, [base, node.module]))
                imported = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            for module in imported:
                assert not module.startswith("cadsam.fast"), f"{name} imports {module}"
                if module.startswith("cadsam."):
                    pending.append(module)
    assert {"cadsam.methods.cad", "cadsam.frequency"} <= seen


def test_no_function_in_the_package_is_over_80_lines():
    """A reader sees each function whole on one screen (the project's rule)."""
    root = Path(cadsam.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - (node.decorator_list or [node])[0].lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines})")
    assert not long, long
