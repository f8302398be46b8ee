"""The fast paths fitted to a model: :func:`fit`.

A model runs its stages (frozen encoder, encoder blocks inside autograd, CAD's adapter, mask
decoder) through its ``runner``; :class:`~cadsam.methods.model.PlainRunner` is the reference.
:func:`fit` puts a :class:`FastRunner` in its place that runs the same stages as a
:class:`~cadsam.fast.runtime.Runtime` says: chunked or compiled encoder, recomputed encoder
blocks, CAD in bands or Triton kernels, compiled decoder. Each path is tested equal to the
plain one. The CUDA-graph training step is :mod:`.graphs`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..methods.cad import ConvAdapter
from ..methods.model import AdaptedSam, PlainRunner
from ..methods.prompting import Prompts
from ..sam.image_encoder import ImageEncoderViT
from .adapter import run_adapter
from .compiler import compile_as_eager
from .runtime import Runtime


def fit(model: AdaptedSam, runtime: Runtime) -> AdaptedSam:
    """Run ``model`` as ``runtime`` says from now on (in place; returns it). What it computes,
    and its weights, stay as they are."""
    if isinstance(model.sam.image_encoder, ImageEncoderViT):  # Hiera has one path (SDPA)
        model.sam.image_encoder.set_fused_attention(runtime.fused_attention)
    model.runner = PlainRunner() if runtime.is_plain else FastRunner(runtime)
    return model


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


def _decide(setting: bool | str, auto: bool) -> bool:
    return auto if setting == "auto" else bool(setting)


__all__ = ["FastRunner", "fit"]
