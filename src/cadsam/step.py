"""One training step: the losses, forward and backward, AdamW. What ``train`` runs on each
batch and ``cadsam plan`` counts on the meta device."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .data.labels import IGNORE
from .fast.graphs import GraphedStep, Step
from .methods.prompting import Prompts
from .precision import autocast


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The binary task (float 0/1 targets, B x 1 x S x S): BCE (with logits) + IoU loss on
    probabilities, 1:1. The IoU term is per image (smooth 1e-3), averaged over the batch; BCE
    is averaged over all pixels. K classes (class indices, B x S x S): :func:`class_loss`."""
    if not target.is_floating_point():
        return class_loss(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    inter = (prob * target).sum(1)
    union = (prob + target).sum(1) - inter
    iou = 1 - (inter + 1e-3) / (union + 1e-3)
    return bce + iou.mean()


def class_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + Dice loss, 1:1, over the pixels that are not IGNORE. The Dice term is
    over the batch, per class present in its targets, averaged over those classes: a class
    absent from the batch has no overlap to learn there, and cross-entropy already pushes its
    probability down."""
    valid = (target != IGNORE).unsqueeze(1)  # B x 1 x S x S
    # the mean over valid pixels, 0 (not NaN) for a batch with none
    ce = F.cross_entropy(logits, target.long(), ignore_index=IGNORE, reduction="sum")
    ce = ce / valid.sum().clamp(min=1)
    prob = torch.softmax(logits, 1) * valid
    onehot = F.one_hot(target.long().clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2) * valid
    inter, sizes = (prob * onehot).sum((0, 2, 3)), onehot.sum((0, 2, 3))
    dice = 1 - (2 * inter + 1e-3) / (prob.sum((0, 2, 3)) + sizes + 1e-3)
    present = (sizes > 0).float()
    return ce + (dice * present).sum() / present.sum().clamp(min=1)


def object_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Prompted objects (B x N of them), each scored as an image of its own. Binary: each
    object's mask as the binary task's (:func:`segmentation_loss`). K classes (logits
    B x N x K x S x S, targets B x N x S x S: the object's class on it, K off it, IGNORE where
    ignored): BCE over every class's map against the object's mask in its class's map and
    nothing in the others, + the IoU loss over all K maps together, so that the object in
    another class's map counts against it; for K = 1 the binary task's loss."""
    if target.is_floating_point():
        return segmentation_loss(logits.flatten(0, 1).unsqueeze(1), target.flatten(0, 1)[:, None])
    logits, target = logits.flatten(0, 1), target.flatten(0, 1)
    valid = (target != IGNORE).unsqueeze(1).to(logits.dtype)  # O x 1 x S x S
    onehot = F.one_hot(target.clamp(min=0), logits.shape[1] + 1)[..., :-1].permute(0, 3, 1, 2)
    onehot = onehot.to(logits.dtype) * valid
    bce = F.binary_cross_entropy_with_logits(logits, onehot, weight=valid, reduction="sum")
    bce = bce / (valid.sum() * logits.shape[1]).clamp(min=1)
    prob = (torch.sigmoid(logits) * valid).flatten(1)
    onehot = onehot.flatten(1)
    inter = (prob * onehot).sum(1)
    union = (prob + onehot).sum(1) - inter
    return bce + (1 - (inter + 1e-3) / (union + 1e-3)).mean()


def forward_backward(
    net: torch.nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    embeddings: torch.Tensor | None,
    precision: str,
    micro_batches: int = 1,
    autocast_cache: bool = True,
    prompts: Prompts | None = None,
) -> torch.Tensor:
    """The loss of one batch, its gradient (over ``micro_batches``, with gradient accumulation)
    added to the parameters'; returns the loss, detached. With ``prompts``, ``masks`` holds
    each prompted object's mask (B x N x S x S) and the loss is per object."""
    with autocast(images.device, precision, autocast_cache):
        logits = net(images, embeddings) if prompts is None else net(images, embeddings, prompts)
    loss = (segmentation_loss if prompts is None else object_loss)(logits.float(), masks)
    (loss / micro_batches).backward()
    return loss.detach()


def training_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: str,
    graphed: bool = False,
    only_if_it_fits: bool = False,
    log: Callable[[str], None] = print,
) -> Step:
    """One whole training step on a batch (images, masks, embeddings or None): forward, backward,
    AdamW. ``graphed``: a :class:`GraphedStep` of it, replayed as a CUDA graph (eager where
    ``only_if_it_fits`` and the capture would not fit, which ``log`` says)."""

    def step(images, masks, embeddings, prompts=None):
        loss = forward_backward(
            net, images, masks, embeddings, precision, autocast_cache=not graphed, prompts=prompts
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if not graphed:
        return step
    return GraphedStep(step, only_if_it_fits=only_if_it_fits, log=log)
