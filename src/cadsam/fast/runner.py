"""The fast paths fitted to a model: :func:`fit`.

A model runs its stages (frozen encoder, encoder blocks inside autograd, CAD's adapter, mask
decoder) through its ``runner``; :class:`~cadsam.methods.model.PlainRunner` is the reference.
:func:`fit` puts a :class:`FastRunner` in its place that runs the same stages as a
:class:`~cadsam.fast.runtime.Runtime` says: chunked or compiled encoder, recomputed encoder
blocks, CAD in bands or Triton kernels, compiled decoder. Each path is tested equal to the
plain one. The CUDA-graph training step is :mod:`.graphs`.

With ``frozen_bf16``, :func:`fit` holds the frozen encoder's matmul weights in bfloat16
(:func:`hold_frozen_in_bf16`), for bf16 runs only. Their float32 values are then gone: fitting
such a model to a runtime without ``frozen_bf16`` is an error, not a silent change of what it
computes; build or load it again instead. Its ``state_dict`` still gives them in float32 (in
host memory), so weights files keep their format.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import CadsamError
from ..methods.cad import ConvAdapter
from ..methods.lora import LoraAdapter, encoder_blocks
from ..methods.model import AdaptedSam, PlainRunner
from ..methods.prompting import Prompts
from ..sam.image_encoder import ImageEncoderViT
from ..sam2 import Sam2
from .adapter import run_adapter
from .compiler import compile_as_eager
from .runtime import Runtime


def fit(model: AdaptedSam, runtime: Runtime) -> AdaptedSam:
    """Run ``model`` as ``runtime`` says from now on (in place; returns it). What it computes,
    and its weights, stay as they are."""
    if isinstance(model.sam.image_encoder, ImageEncoderViT):  # Hiera has one path (SDPA)
        model.sam.image_encoder.set_fused_attention(runtime.fused_attention)
    if runtime.frozen_bf16 is True:
        hold_frozen_in_bf16(model)
    elif holds_frozen_in_bf16(model):
        raise CadsamError(
            "this model's frozen encoder weights are held in bfloat16 (frozen_bf16) and their "
            "float32 values are gone: build or load it again to run it without frozen_bf16"
        )
    model.runner = PlainRunner() if runtime.is_plain else FastRunner(runtime)
    return model


def frozen_matmul_layers(model: AdaptedSam) -> list[nn.Module]:
    """The frozen encoder's linear and convolution layers, and SAM 2.1's ``conv_s0``/``conv_s1``:
    those bf16 autocast casts to bf16 on every call (it caches no cast of a frozen weight).
    Norms, position embeddings and relative-position tables are no such layers: autocast keeps
    them float32. LoRA's ``qkv`` layers stay float32 too: it folds its updates into their
    weights for inference, which must be the float32 weights' sums."""
    encoder = model.sam.image_encoder
    layers = [] if encoder is None else list(encoder.modules())
    if isinstance(model.sam, Sam2):
        layers += [model.sam.mask_decoder.conv_s0, model.sam.mask_decoder.conv_s1]
    merged = set()
    if isinstance(model.encoder_adapter, LoraAdapter) and encoder is not None:
        merged = {id(block.attn.qkv) for block in encoder_blocks(encoder)}
    return [
        layer
        for layer in layers
        if isinstance(layer, (nn.Linear, nn.Conv2d))
        and id(layer) not in merged
        and not any(p.requires_grad for p in layer.parameters(recurse=False))
    ]


def hold_frozen_in_bf16(model: AdaptedSam) -> int:
    """Hold :func:`frozen_matmul_layers`' weights and biases in bfloat16 (in place, once): half
    their memory, and the same results under bf16 autocast, which casts them so anyway. Their
    ``state_dict`` entries stay float32 (:func:`_float32_entries`). Returns how many parameters
    it cast."""
    cast = 0
    for layer in frozen_matmul_layers(model):
        if layer.weight.dtype == torch.bfloat16:
            continue  # held so already
        for parameter in layer.parameters(recurse=False):
            parameter.data = parameter.data.to(torch.bfloat16)
            cast += 1
        layer.register_state_dict_post_hook(_float32_entries)
    return cast


def holds_frozen_in_bf16(model: AdaptedSam) -> bool:
    return any(layer.weight.dtype == torch.bfloat16 for layer in frozen_matmul_layers(model))


def _float32_entries(
    module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """A layer held in bfloat16 gives its weights as float32, as a float32 model would (its
    values are bf16's, which is what the model computes with), in host memory: a state_dict is
    for saving or copying, and float32 copies of a whole encoder on the GPU would take twice
    what holding it in bf16 saves there (ViT-H: 2.4 GiB), if only for a moment."""
    for name, _ in module.named_parameters(recurse=False):
        key = prefix + name
        if key in state and state[key].dtype == torch.bfloat16:
            state[key] = state[key].detach().to("cpu", torch.float32)


class FastRunner(PlainRunner):
    """The model's stages under a runtime; compiled functions are kept here, per module."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.compiled: dict[Any, Any] = {}

    def __deepcopy__(self, memo: dict) -> FastRunner:  # compiled code is not copied
        return FastRunner(copy.deepcopy(self.runtime, memo))

    def frozen_embeddings(self, model: AdaptedSam, images: torch.Tensor) -> torch.Tensor:
        """``encoder_chunk`` images at a time (0: all): without autograd nothing is kept, so the
        peak is one chunk's activations."""
        if self.runtime.frozen_bf16 is True and not _bf16_autocast(images):
            raise CadsamError(
                "frozen_bf16 holds the frozen encoder in bfloat16: run it under bf16 autocast "
                "(--precision bf16)"
            )
        encoder = model.sam.image_encoder
        if _decide(self.runtime.compile_encoder, images.is_cuda and model.training):
            encoder = self._compiled("encoder", encoder)
        chunk = self.runtime.encoder_chunk or len(images)
        return torch.cat(
            [model.decoder_input(encoder(model.sam_input(part))) for part in images.split(chunk)]
        )

    def encoder_block(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        if self.runtime.checkpoint_encoder and torch.is_grad_enabled():
            # nothing random inside; without the RNG's state a CUDA graph can capture it
            return checkpoint(block, tokens, use_reentrant=False, preserve_rng_state=False)
        return block(tokens)

    def adapter(self, adapter: ConvAdapter, images: torch.Tensor) -> torch.Tensor:
        return run_adapter(adapter, images, self.runtime, self.compiled)

    def mask_logits(
        self,
        model: AdaptedSam,
        embeddings: torch.Tensor,
        size: int,
        prompts: Prompts | None = None,
    ) -> torch.Tensor:
        """Compiled while training on CUDA by default, where fusing the decoder's hundreds of
        small kernels pays for the compilation; for the whole-image prompt only (objects'
        prompts vary in number in evaluation)."""
        on_cuda = embeddings.is_cuda and torch.is_grad_enabled()
        if prompts is None and _decide(self.runtime.compile_decoder, on_cuda):
            return self._compiled("decoder", model.mask_logits)(embeddings, size)
        return model.mask_logits(embeddings, size, prompts)

    def _compiled(self, name: str, function: Any) -> Any:
        if name not in self.compiled:
            self.compiled[name] = compile_as_eager(function)
        return self.compiled[name]


def _bf16_autocast(x: torch.Tensor) -> bool:
    device = x.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16


def _decide(setting: bool | str, auto: bool) -> bool:
    return auto if setting == "auto" else bool(setting)


__all__ = ["FastRunner", "fit", "frozen_matmul_layers", "hold_frozen_in_bf16"]
