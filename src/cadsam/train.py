"""Training: BCE + IoU loss, AdamW, a per-step cosine (or constant) learning rate.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per epoch),
``last.safetensors`` (and ``best.safetensors`` with a validation split) and ``state.pt``
(everything ``--resume`` needs). All are written atomically at the end of each epoch, so a
kill at any moment loses at most the epoch in progress.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
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
from .backbones import DEFAULT_BATCH, base_weights_note
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
from .fast.graphs import GraphedStep, Step, adamw, match_graph_mode
from .files import write_atomic
from .methods import (
    CACHEABLE,
    AdaptedSam,
    build_model,
    check_method_on_backbone,
    check_runtime_settings,
    resolve_options,
)
from .precision import PRECISIONS, autocast
from .runtime import Runtime, check_settings, resolve_runtime
from .weights import base_checkpoint_record, save_weights

SCHEDULES = ("cosine", "constant")
# Settings that only say how to run, not what is trained: they may differ on --resume.
RUNTIME_KEYS = ("out", "resume", "device", "num_workers", "progress", "tensorboard", "runtime")
CPU_ADAPTER_SIZE = 128  # cad's adapter input when training on a CPU and none is given


@dataclass
class TrainConfig:
    method: str
    backbone: str
    out: str
    checkpoint: str | None = None
    random_weights: bool = False  # a pretrained backbone on random weights, on purpose
    # data: --images/--masks, or --dataset/--data-root (+ split)
    images: str | None = None
    masks: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    split: str = "train"
    mask_suffix: str | None = None  # a mask's stem is its image's plus this
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
    batch_size: int | None = None  # DEFAULT_BATCH's: 4, or 2 for vit_h and sam2.1_hiera_l
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.01
    schedule: str = "cosine"
    seed: int = 21
    precision: str = "fp32"
    # the method's model options (what is trained; saved with the weights)
    options: dict[str, Any] = field(default_factory=dict)
    # train from an embedding cache (cadsam cache): no image encoder in memory
    cache: str | None = None
    # how to run: a named runtime and settings on top ({"name": "auto", "cuda_graph": True})
    runtime: dict[str, Any] = field(default_factory=lambda: {"name": "auto"})
    device: str | None = None
    num_workers: int = 2
    resume: bool = False
    progress: bool = True
    tensorboard: bool = False  # also log to RUN/tensorboard (needs cadsam[tensorboard])

    def __post_init__(self) -> None:
        if self.batch_size is None:
            self.batch_size = DEFAULT_BATCH.get(self.backbone, 4)
        if isinstance(self.runtime, str):
            self.runtime = {"name": self.runtime}
        self.runtime = {"name": "auto", **(self.runtime or {})}
        if self.schedule not in SCHEDULES:
            raise CadsamError(f"schedule must be one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise CadsamError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.method == "zero-shot":
            raise CadsamError("zero-shot has nothing to train: use cadsam eval --method zero-shot")
        resolve_options(self.method, self.options)  # an option the method does not take
        check_method_on_backbone(self.method, self.backbone)  # before the data and weights
        name, settings = self.runtime_parts()
        check_settings(name, settings)  # before any work
        check_runtime_settings(self.method, settings)
        if self.cache and self.method not in CACHEABLE:
            raise CadsamError(
                f"{self.method} acts inside the image encoder, so it cannot train from cached "
                "embeddings: drop --cache"
            )
        for name, value in (
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("grad_accum", self.grad_accum),  # a --set setting, not a flag
        ):
            if value < 1:
                raise CadsamError(f"{name} must be at least 1, got {value}")

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> TrainConfig:
        """Defaults, then the YAML file's values, then the command line's; ``options`` and
        ``runtime`` merge key by key."""
        values: dict[str, Any] = {}
        if config_file is not None:
            values.update(_upgraded(load_yaml(config_file)))
        for key in ("options", "runtime"):
            if isinstance(values.get(key), str):
                values[key] = {"name": values[key]}
            if key in overrides:
                overrides = {**overrides, key: {**(values.get(key) or {}), **overrides[key]}}
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

    def runtime_parts(self) -> tuple[str, dict[str, Any]]:
        """(named runtime, settings on top)."""
        settings = dict(self.runtime)
        return settings.pop("name"), settings


def _upgraded(values: dict[str, Any]) -> dict[str, Any]:
    """A config written before model and runtime options were told apart: its method options
    split into the two, ``cuda_graph`` into the runtime."""
    if "method_options" not in values and "cuda_graph" not in values:
        return values
    values = dict(values)
    old = dict(values.pop("method_options", None) or {})
    if old.pop("checkpoint_blocks", False):  # its name before checkpoint_encoder
        old["checkpoint_encoder"] = True
    settings = {f.name for f in dataclasses.fields(Runtime)}
    runtime = {"name": "auto", **(values.get("runtime") or {})}
    runtime.update({k: v for k, v in old.items() if k in settings})
    if values.pop("cuda_graph", False):
        runtime["cuda_graph"] = True
    # the rest are model options: one the method does not take is then an error naming it
    options = {k: v for k, v in old.items() if k not in settings}
    values["options"] = {**options, **(values.get("options") or {})}
    values["runtime"] = runtime
    return values


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

    def step(images, masks, embeddings):
        loss = forward_backward(
            net, images, masks, embeddings, precision, autocast_cache=not graphed
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if not graphed:
        return step
    return GraphedStep(step, only_if_it_fits=only_if_it_fits, log=log)


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Cosine from 1 to 0 over all optimiser steps; or constant, which is what the authors'
    per-epoch stepping of a per-step cosine amounts to (the LR stays within 1% of its start)."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _pairs(cfg: TrainConfig, progress: bool):
    pairing = dict(skip_bad=cfg.skip_bad, mask_suffix=cfg.mask_suffix)
    pairs = find_pairs(cfg.images, cfg.masks, cfg.dataset, cfg.data_root, cfg.split, **pairing)
    val: list = []
    if cfg.val_images or cfg.val_masks:
        if cfg.val_fraction:
            raise CadsamError("give --val-fraction or --val-images/--val-masks, not both")
        if not (cfg.val_images and cfg.val_masks):
            raise CadsamError("--val-images and --val-masks go together")
        val = pair_folders(cfg.val_images, cfg.val_masks, **pairing)
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
        run = _setup(cfg, dist)
        for epoch in range(run.start_epoch, cfg.epochs):
            record = _train_epoch(run, epoch)
            if run.val_set is not None:
                record["val"] = evaluate(
                    run.model,
                    run.val_set,
                    batch_size=cfg.batch_size,
                    dist=dist,
                    precision=cfg.precision,
                    progress=run.show,
                )
            _save_epoch(run, record)
        if run.board is not None:
            run.board.close()
        return run.model
    finally:
        distributed.teardown(dist)


@dataclass
class _Run:
    """Everything one training run holds between epochs."""

    cfg: TrainConfig
    dist: distributed.Dist
    model: AdaptedSam
    step: Step  # forward, backward and AdamW of one batch (graphed or eager)
    net: torch.nn.Module  # the model, or DDP around it
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    val_set: SegmentationDataset | None
    base: dict[str, Any]
    start_epoch: int = 0
    best_dice: float = -1.0
    board: Any = None
    show: bool = True

    @property
    def path(self) -> Path:
        return Path(self.cfg.out)

    def log(self, *args: Any) -> None:
        if self.dist.is_main:
            print(*args)


def _setup(cfg: TrainConfig, dist: distributed.Dist) -> _Run:
    """Check everything, then build data, model, optimiser and schedule (resumed if asked)."""
    state_path = Path(cfg.out) / "state.pt"
    if state_path.exists() and not cfg.resume:
        raise CadsamError(
            f"{cfg.out} already holds a run: pass --resume to continue it, or choose another --out"
        )
    if cfg.resume and not state_path.exists():
        raise CadsamError(f"nothing to resume in {cfg.out} (no state.pt)")
    log = print if dist.is_main else (lambda *a, **k: None)
    show = cfg.progress and dist.is_main
    note = base_weights_note(cfg.backbone, cfg.checkpoint, cfg.random_weights)
    if cfg.runtime.get("cuda_graph") is True:
        _check_graphable(cfg, dist)
    whole_steps = cfg.grad_accum == 1 and not dist.enabled
    training = (cfg.method, cfg.backbone)
    runtime, chosen = resolve_runtime(*cfg.runtime_parts(), dist.device, training, whole_steps)
    _fit_options_to_device(cfg, dist.device, log)
    train_pairs, val_pairs, bad = _pairs(cfg, show)
    if bad:
        log(f"skipped {len(bad)} unreadable or mismatched pair(s); first: {bad[0]}")
    base = base_checkpoint_record(cfg.checkpoint)
    train_cache, val_cache = _cache_links(cfg, train_pairs, val_pairs, base, log)
    for line in (note, chosen):
        if line:
            log(line)
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.method, cfg.backbone, cfg.checkpoint, cfg.cache is None, runtime, **cfg.options
    ).to(dist.device)
    net = _distributed(model, dist, log)
    optimizer = adamw(model.trainable_parameters(), cfg.lr, cfg.weight_decay, runtime.cuda_graph)
    loader = _loader(cfg, dist, train_pairs, train_cache)
    total_steps = math.ceil(len(loader) / cfg.grad_accum) * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.schedule, s, total_steps)
    )
    val_set = None
    if val_pairs:
        data = dict(mask_threshold=cfg.mask_threshold, resize_masks=cfg.resize_masks)
        val_set = SegmentationDataset(val_pairs, cfg.image_size, **data, cache=val_cache)
    # cuda_graph=auto graphs the step where its capture fits; true, whatever it takes
    fit = cfg.runtime.get("cuda_graph") is not True
    step = training_step(net, optimizer, cfg.precision, runtime.cuda_graph, fit, log)
    run = _Run(cfg, dist, model, step, net, loader, optimizer, scheduler, val_set, base, show=show)
    if cfg.resume:
        _resume(run, state_path, runtime.cuda_graph)
    elif dist.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        write_atomic(
            run.path / "config.yaml",
            lambda p: p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)),
        )
    if cfg.tensorboard and dist.is_main:
        run.board = _tensorboard(run.path)
    return run


def _fit_options_to_device(cfg: TrainConfig, device: torch.device, log: Callable) -> None:
    """On a CPU, CAD's adapter reads 128 x 128 images unless told otherwise: at the paper's
    512 a step takes seconds per image there."""
    if cfg.method != "cad" or device.type == "cuda" or "adapter_size" in cfg.options:
        return
    size = min(CPU_ADAPTER_SIZE, cfg.image_size)
    cfg.options = {**cfg.options, "adapter_size": size}
    log(
        f"note: training on a CPU, so cad's adapter reads {size} x {size} images "
        "(--set adapter_size=512 for the paper's 512, far slower here)"
    )


def _distributed(model: AdaptedSam, dist: distributed.Dist, log: Callable) -> torch.nn.Module:
    """DDP around the model under torchrun, with BatchNorm synchronised where it can be."""
    if not dist.enabled:
        return model
    if dist.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        log("note: SyncBatchNorm needs CUDA; on CPU each process normalises its own batch")
    return DistributedDataParallel(
        model,
        device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
        find_unused_parameters=True,  # SAM's IoU head and 3 of 4 mask heads are unused
    )


def _loader(cfg: TrainConfig, dist: distributed.Dist, pairs: list, cache) -> DataLoader:
    dataset = SegmentationDataset(
        pairs,
        cfg.image_size,
        cfg.augment,
        cfg.mask_threshold,
        cfg.resize_masks,
        seed=cfg.seed,
        cache=cache,
    )
    sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=dist.device.type == "cuda",
        drop_last=False,
        persistent_workers=False,
    )


def _resume(run: _Run, state_path: Path, graphed: bool) -> None:
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    run.model.load_trainable_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    match_graph_mode(run.optimizer, graphed)
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    run.start_epoch, run.best_dice, run.base = state["epoch"], state["best_dice"], state["base"]
    run.log(f"resuming {run.path} after epoch {run.start_epoch}")


def _train_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """One pass over the training data; the epoch's record for metrics.jsonl."""
    cfg, dist, loader = run.cfg, run.dist, run.loader
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    run.model.train()
    started, loss_sum, seen = time.perf_counter(), torch.zeros((), device=dist.device), 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not run.show)
    shown_at = 0.0
    for i, batch in enumerate(bar):
        images, masks, embeddings = (
            None if batch.get(key) is None else batch[key].to(dist.device, non_blocking=True)
            for key in ("image", "mask", "embedding")
        )
        last_micro = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(loader)
        if cfg.grad_accum == 1:  # forward, backward and AdamW (one launch where graphed)
            loss = run.step(images, masks, embeddings)
        else:
            sync = run.net.no_sync() if dist.enabled and not last_micro else nullcontext()
            with sync:
                loss = forward_backward(
                    run.net, images, masks, embeddings, cfg.precision, cfg.grad_accum
                )
            if last_micro:
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
        if last_micro:
            run.scheduler.step()
            if run.board is not None:
                run.board.add_scalar("train/loss", loss.item(), run.scheduler.last_epoch)
                run.board.add_scalar("train/lr", _lr(run.scheduler), run.scheduler.last_epoch)
        loss_sum += loss * len(images)  # stays on the device: no sync per step
        seen += len(images)
        # .item() waits for the GPU: only when someone is watching, and once a second, so
        # that the CPU can queue the next steps while the GPU runs
        if run.show and time.perf_counter() - shown_at > 1.0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{_lr(run.scheduler):.2e}")
            shown_at = time.perf_counter()
    totals = torch.stack((loss_sum, torch.tensor(float(seen), device=dist.device)))
    if dist.enabled:
        torch_dist.all_reduce(totals)
    seconds = time.perf_counter() - started
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "loss": (totals[0] / totals[1]).item(),
        "lr": _lr(run.scheduler),
        "seconds": round(seconds, 2),
        "images_per_second": round(totals[1].item() / seconds, 2),
    }
    if dist.device.type == "cuda":  # the peak since the run started, this process
        peak = torch.cuda.max_memory_allocated(dist.device) / 2**20
        record["peak_memory_mib"] = round(peak, 1)
    return record


def _save_epoch(run: _Run, record: dict[str, Any]) -> None:
    """Weights (and the best so far), state and the metrics line, all written atomically."""
    improved = "val" in record and record["val"]["dice"] > run.best_dice
    if improved:
        run.best_dice = record["val"]["dice"]
    if run.dist.is_main:
        image_size = run.cfg.image_size
        save_weights(run.path / "last.safetensors", run.model, run.base, image_size)
        if improved:
            save_weights(run.path / "best.safetensors", run.model, run.base, image_size)
        _save_state(run, record)
        run.log(_summary(record))
    if run.board is not None:
        run.board.add_scalar("epoch/loss", record["loss"], record["epoch"])
        for key, value in record.get("val", {}).items():
            run.board.add_scalar(f"val/{key}", value, record["epoch"])
        run.board.flush()


def _lr(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    return float(scheduler.get_last_lr()[0])  # a GPU tensor where the step is graphed


def _check_graphable(cfg: TrainConfig, dist: distributed.Dist) -> None:
    if cfg.grad_accum != 1:
        raise CadsamError("cuda_graph captures whole optimiser steps: drop --set grad_accum")
    if dist.enabled:
        raise CadsamError("cuda_graph runs in one process: drop it under torchrun")


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CadsamError(
            "--tensorboard needs TensorBoard: pip install 'cadsam[tensorboard]'"
        ) from None
    return SummaryWriter(str(run / "tensorboard"))


def _save_state(run: _Run, record: dict[str, Any]) -> None:
    state = {
        "epoch": record["epoch"],
        "best_dice": run.best_dice,
        "base": run.base,
        "model": run.model.trainable_state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    write_atomic(run.path / "state.pt", lambda p: torch.save(state, p))
    with open(run.path / "metrics.jsonl", "a") as f:  # a line per finished epoch
        f.write(json.dumps(record) + "\n")


def _summary(record: dict[str, Any]) -> str:
    text = f"epoch {record['epoch']}: loss {record['loss']:.4f}, {record['images_per_second']:.1f} images/s"
    if "val" in record:
        text += f", val dice {record['val']['dice']:.4f} iou {record['val']['iou']:.4f}"
    return text
