"""K classes at once: the mask decoder's output tokens, one per class.

SAM's decoder turns each of its mask tokens into a mask through the token's hypernetwork MLP.
For K classes it gets K tokens and K MLPs, each starting as one of SAM's own (class k from SAM's
token k mod 4, so every class starts from a trained mask head), and predicts K masks from the
same whole-image prompt; softmax over them gives each pixel's class. Everything before the
decoder (encoder, adapter, cache) is the binary task's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..sam.mask_decoder import MaskDecoder
from ..sam2.mask_decoder import MaskDecoder as Sam2MaskDecoder


def give_class_tokens(decoder: MaskDecoder | Sam2MaskDecoder, count: int) -> None:
    """Replace the decoder's mask tokens and their MLPs by ``count`` of them, one per class,
    copied from its own (in place: after SAM's weights are loaded, before trained ones)."""
    own_tokens, own_mlps = decoder.mask_tokens.weight.detach(), decoder.output_hypernetworks_mlps
    picks = [k % decoder.num_mask_tokens for k in range(count)]
    tokens = nn.Embedding(count, own_tokens.shape[1])
    with torch.no_grad():
        tokens.weight.copy_(own_tokens[picks])
    decoder.mask_tokens = tokens.to(own_tokens.device)
    decoder.output_hypernetworks_mlps = nn.ModuleList(copy.deepcopy(own_mlps[k]) for k in picks)
    decoder.num_mask_tokens = count


def class_answers(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """N prompted objects' K class maps (N x K x H x W logits) -> the class each answers
    (the map holding the most confident pixel) and that map's logits (N x H x W): a prompt
    asks what is there and where, and the class that holds the object answers both."""
    answered = logits.flatten(2).amax(2).argmax(1)
    return answered, logits[torch.arange(len(logits), device=logits.device), answered]
