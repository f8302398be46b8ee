"""Training: BCE + IoU loss, AdamW, a per-step cosine (or constant) learning rate.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per epoch),
``last.safetensors`` (and ``best.safetensors`` with a validation split) and ``state.pt``
(everything ``--resume`` needs). All are written atomically at the end of each epoch, so a
kill at any moment loses at most the epoch in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import distributed
from .cache import check_cache_for_training, open_cache
from .data import (
    SegmentationDataset,
    collate,
    find_pairs,
    pair_folders,
    scan_pairs,
    split_validation,
)
from .errors import CadsamError
from .evaluate import evaluate
from .files import write_atomic
from .graphs import GraphedStep, Step, adamw, match_graph_mode
from .methods import CACHEABLE, METHOD_OPTIONS, AdaptedSam, build_model
from .precision import PRECISIONS, autocast
from .weights import base_checkpoint_record, save_weights

SCHEDULES = ("cosine", "constant")
# Settings that only say how to run, not what is trained: they may differ on --resume.
RUNTIME_KEYS = ("out", "resume", "device", "num_workers", "progress", "tensorboard", "cuda_graph")


@dataclass
class TrainConfig:
    method: str
    backbone: str
    out: str
    checkpoint: str | None = None
    # data: --images/--masks, or --dataset/--data-root (+ split)
    images: str | None = None
    masks: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    split: str = "train"
    val_fraction: float | None = None
    val_images: str | None = None
    val_masks: str | None = None
    image_size: int = 512
    augment: bool = True
    mask_threshold: int = 127
    resize_masks: bool = False
    skip_bad: bool = False
    # optimisation (the paper's defaults)
    epochs: int = 20
    batch_size: int | None = None  # 4, or 2 for vit_h
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.01
    schedule: str = "cosine"
    seed: int = 21
    precision: str = "fp32"
    # method options (only those of the chosen method are passed on)
    method_options: dict[str, Any] = field(default_factory=dict)
    # train from an embedding cache (cadsam cache): no image encoder in memory
    cache: str | None = None
    # how to run
    device: str | None = None
    num_workers: int = 2
    resume: bool = False
    progress: bool = True
    tensorboard: bool = False  # also log to RUN/tensorboard (needs cadsam[tensorboard])
    cuda_graph: bool = False  # replay the step as a CUDA graph (one GPU, grad_accum 1)

    def __post_init__(self) -> None:
        if self.batch_size is None:
            self.batch_size = 2 if self.backbone == "vit_h" else 4
        if self.schedule not in SCHEDULES:
            raise CadsamError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise CadsamError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.method == "zero-shot":
            raise CadsamError("zero-shot has nothing to train: use cadsam eval --method zero-shot")
        if self.method not in METHOD_OPTIONS:
            raise CadsamError(
                f"unknown method {self.method!r}: choose from {', '.join(METHOD_OPTIONS)}"
            )
        for name, value in (
            ("epochs", self.epochs),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
        ):
            if value < 1:
                raise CadsamError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> TrainConfig:
        """Defaults, then the YAML file's values, then the command line's."""
        values: dict[str, Any] = {}
        if config_file is not None:
            values.update(load_yaml(config_file))
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CadsamError(f"unknown training setting(s): {', '.join(unknown)}")
        for required in ("method", "backbone", "out"):
            if values.get(required) is None:
                raise CadsamError(f"--{required} is required (on the command line or in --config)")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise CadsamError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise CadsamError(f"cannot parse {path}: {exc}") from None
    if not isinstance(values, dict):
        raise CadsamError(f"{path} must hold a mapping of settings")
    return values


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE (with logits) + IoU loss on probabilities, 1:1. The IoU term is per image
    (smooth 1e-3), averaged over the batch; BCE is averaged over all pixels."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    inter = (prob * target).sum(1)
    union = (prob + target).sum(1) - inter
    iou = 1 - (inter + 1e-3) / (union + 1e-3)
    return bce + iou.mean()


def forward_backward(
    net: torch.nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    embeddings: torch.Tensor | None,
    precision: str,
    micro_batches: int = 1,
    autocast_cache: bool = True,
) -> torch.Tensor:
    """The loss of one batch, its gradient (over ``micro_batches``, with gradient accumulation)
    added to the parameters'; returns the loss, detached."""
    with autocast(images.device, precision, autocast_cache):
        logits = net(images, embeddings)
    loss = segmentation_loss(logits.float(), masks)
    (loss / micro_batches).backward()
    return loss.detach()


def training_step(
    net: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: str, graphed: bool = False
) -> Step:
    """One whole training step on a batch (images, masks, embeddings or None): forward, backward,
    AdamW. ``graphed``: a :class:`GraphedStep` of it, replayed as a CUDA graph."""

    def step(images, masks, embeddings):
        loss = forward_backward(
            net, images, masks, embeddings, precision, autocast_cache=not graphed
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return GraphedStep(step) if graphed else step


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Cosine from 1 to 0 over all optimiser steps; or constant, which is what the authors'
    per-epoch stepping of a per-step cosine amounts to (the LR stays within 1% of its start)."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _pairs(cfg: TrainConfig, progress: bool):
    pairs = find_pairs(cfg.images, cfg.masks, cfg.dataset, cfg.data_root, cfg.split)
    val: list = []
    if cfg.val_images or cfg.val_masks:
        if cfg.val_fraction:
            raise CadsamError("give --val-fraction or --val-images/--val-masks, not both")
        if not (cfg.val_images and cfg.val_masks):
            raise CadsamError("--val-images and --val-masks go together")
        val = pair_folders(cfg.val_images, cfg.val_masks)
    elif cfg.val_fraction:
        pairs, val = split_validation(pairs, cfg.val_fraction, cfg.seed)
    scan = dict(
        mask_threshold=cfg.mask_threshold,
        resize_masks=cfg.resize_masks,
        skip_bad=cfg.skip_bad,
        progress=progress,
    )
    pairs, bad = scan_pairs(pairs, **scan)
    if val:
        val, bad_val = scan_pairs(val, **scan)
        bad += bad_val
    if not pairs:
        raise CadsamError("no usable training pairs")
    return pairs, val, bad


def _cache_links(cfg: TrainConfig, train_pairs, val_pairs, base, log):
    """(folder, views, rows) of the train and validation pairs in ``cfg.cache``, or Nones."""
    if cfg.cache is None:
        return None, None
    if cfg.method not in CACHEABLE:
        raise CadsamError(
            f"{cfg.method} acts inside the image encoder, so it cannot train from cached "
            "embeddings: drop --cache"
        )
    cache = open_cache(cfg.cache)
    if "identity" not in cache.views:
        raise CadsamError(
            f"cache {cfg.cache} has no identity view: rebuild it with --views identity ..."
        )
    if cfg.augment:
        log(
            f"note: from a cache, augmentation picks among the cached views ({', '.join(cache.views)}); "
            "shift-scale-rotate is not available, since it changes what the encoder sees"
        )
    train = check_cache_for_training(cache, train_pairs, cfg.backbone, base, cfg.image_size)
    val = (
        check_cache_for_training(cache, val_pairs, cfg.backbone, base, cfg.image_size)
        if val_pairs
        else []
    )
    return (cfg.cache, cache.views, train), (cfg.cache, cache.views, val)


def train(cfg: TrainConfig) -> AdaptedSam:
    """Train ``cfg.method``; the run directory gets the weights. Returns the trained model."""
    dist = distributed.setup(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        distributed.teardown(dist)


def _train(cfg: TrainConfig, dist: distributed.Dist) -> AdaptedSam:
    run = Path(cfg.out)
    state_path = run / "state.pt"
    if state_path.exists() and not cfg.resume:
        raise CadsamError(
            f"{run} already holds a run: pass --resume to continue it, or choose another --out"
        )
    if cfg.resume and not state_path.exists():
        raise CadsamError(f"nothing to resume in {run} (no state.pt)")
    if cfg.cuda_graph:
        _check_graphable(cfg, dist)
    log = print if dist.is_main else (lambda *a, **k: None)
    show = cfg.progress and dist.is_main

    train_pairs, val_pairs, bad = _pairs(cfg, show)
    if bad:
        log(f"skipped {len(bad)} unreadable or mismatched pair(s); first: {bad[0]}")
    base = base_checkpoint_record(cfg.checkpoint)
    train_cache, val_cache = _cache_links(cfg, train_pairs, val_pairs, base, log)
    dataset = SegmentationDataset(
        train_pairs,
        cfg.image_size,
        cfg.augment,
        cfg.mask_threshold,
        cfg.resize_masks,
        seed=cfg.seed,
        cache=train_cache,
    )
    sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=dist.device.type == "cuda",
        drop_last=False,
        persistent_workers=False,
    )

    torch.manual_seed(cfg.seed)
    options = {k: v for k, v in cfg.method_options.items() if k in METHOD_OPTIONS[cfg.method]}
    model = build_model(
        cfg.method, cfg.backbone, cfg.checkpoint, with_encoder=cfg.cache is None, **options
    ).to(dist.device)
    net: torch.nn.Module = model
    if dist.enabled:
        if dist.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log("note: SyncBatchNorm needs CUDA; on CPU each process normalises its own batch")
        net = DistributedDataParallel(
            model,
            device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            find_unused_parameters=True,  # SAM's IoU head and 3 of 4 mask heads are unused
        )
    optimizer = adamw(model.trainable_parameters(), cfg.lr, cfg.weight_decay, cfg.cuda_graph)
    graph_step = (
        training_step(net, optimizer, cfg.precision, graphed=True) if cfg.cuda_graph else None
    )
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.schedule, s, total_steps)
    )

    start_epoch, best_dice = 0, -1.0
    if cfg.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_trainable_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        match_graph_mode(optimizer, cfg.cuda_graph)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best_dice, base = state["epoch"], state["best_dice"], state["base"]
        log(f"resuming {run} after epoch {start_epoch}")
    elif dist.is_main:
        run.mkdir(parents=True, exist_ok=True)
        write_atomic(
            run / "config.yaml",
            lambda p: p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)),
        )

    board = _tensorboard(run) if cfg.tensorboard and dist.is_main else None
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        model.train()
        started, loss_sum, seen = time.perf_counter(), torch.zeros((), device=dist.device), 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not show)
        shown_at = 0.0
        for i, batch in enumerate(bar):
            images = batch["image"].to(dist.device, non_blocking=True)
            masks = batch["mask"].to(dist.device, non_blocking=True)
            cached = batch.get("embedding")
            embeddings = None if cached is None else cached.to(dist.device, non_blocking=True)
            last_micro = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(loader)
            if graph_step is not None:  # forward, backward and AdamW in one launch
                loss = graph_step(images, masks, embeddings)
            else:
                sync = (
                    net.no_sync() if dist.enabled and not last_micro else contextlib.nullcontext()
                )
                with sync:
                    loss = forward_backward(
                        net, images, masks, embeddings, cfg.precision, cfg.grad_accum
                    )
                if last_micro:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if last_micro:
                scheduler.step()
                if board is not None:
                    board.add_scalar("train/loss", loss.item(), scheduler.last_epoch)
                    board.add_scalar("train/lr", _lr(scheduler), scheduler.last_epoch)
            loss_sum += loss * len(images)  # stays on the device: no sync per step
            seen += len(images)
            # .item() waits for the GPU: only when someone is watching, and once a second, so
            # that the CPU can queue the next steps while the GPU runs
            if show and time.perf_counter() - shown_at > 1.0:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{_lr(scheduler):.2e}")
                shown_at = time.perf_counter()
        totals = torch.stack((loss_sum, torch.tensor(float(seen), device=dist.device)))
        if dist.enabled:
            torch_dist.all_reduce(totals)
        seconds = time.perf_counter() - started
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": (totals[0] / totals[1]).item(),
            "lr": _lr(scheduler),
            "seconds": round(seconds, 2),
            "images_per_second": round(totals[1].item() / seconds, 2),
        }
        if dist.device.type == "cuda":  # the peak since the run started, this process
            record["peak_memory_mib"] = round(
                torch.cuda.max_memory_allocated(dist.device) / 2**20, 1
            )
        if val_pairs:
            val_set = SegmentationDataset(
                val_pairs,
                cfg.image_size,
                mask_threshold=cfg.mask_threshold,
                resize_masks=cfg.resize_masks,
                cache=val_cache,
            )
            record["val"] = evaluate(
                model,
                val_set,
                batch_size=cfg.batch_size,
                dist=dist,
                precision=cfg.precision,
                progress=show,
            )
        improved = "val" in record and record["val"]["dice"] > best_dice
        if improved:
            best_dice = record["val"]["dice"]
        if dist.is_main:
            save_weights(run / "last.safetensors", model, base, cfg.image_size)
            if improved:
                save_weights(run / "best.safetensors", model, base, cfg.image_size)
            _save_state(run, model, optimizer, scheduler, base, record, best_dice)
            log(_summary(record))
        if board is not None:
            board.add_scalar("epoch/loss", record["loss"], record["epoch"])
            for key, value in record.get("val", {}).items():
                board.add_scalar(f"val/{key}", value, record["epoch"])
            board.flush()
    if board is not None:
        board.close()
    return model


def _lr(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    return float(scheduler.get_last_lr()[0])  # a GPU tensor where the step is graphed


def _check_graphable(cfg: TrainConfig, dist: distributed.Dist) -> None:
    if cfg.grad_accum != 1:
        raise CadsamError("--cuda-graph captures whole optimiser steps: drop --grad-accum")
    if dist.enabled:
        raise CadsamError("--cuda-graph runs in one process: drop it under torchrun")
    if dist.device.type != "cuda":
        raise CadsamError(f"--cuda-graph needs a CUDA device; this run is on {dist.device}")


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CadsamError(
            "--tensorboard needs TensorBoard: pip install 'cadsam[tensorboard]'"
        ) from None
    return SummaryWriter(str(run / "tensorboard"))


def _save_state(run, model, optimizer, scheduler, base, record, best_dice) -> None:
    state = {
        "epoch": record["epoch"],
        "best_dice": best_dice,
        "base": base,
        "model": model.trainable_state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    write_atomic(run / "state.pt", lambda p: torch.save(state, p))
    with open(run / "metrics.jsonl", "a") as f:  # a line per finished epoch
        f.write(json.dumps(record) + "\n")


def _summary(record: dict[str, Any]) -> str:
    text = f"epoch {record['epoch']}: loss {record['loss']:.4f}, {record['images_per_second']:.1f} images/s"
    if "val" in record:
        text += f", val dice {record['val']['dice']:.4f} iou {record['val']['iou']:.4f}"
    return text
