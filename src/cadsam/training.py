"""Training: BCE + IoU loss, AdamW, a per-step cosine (or constant) learning rate.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per epoch),
``last.safetensors`` (and ``best.safetensors`` with a validation split) and ``state.pt``
(everything ``--resume`` needs). All are written atomically at the end of each epoch, so a
kill at any moment loses at most the epoch in progress.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import distributed
from .backbones import base_weights_note
from .cache import check_cache_for_training, open_cache
from .config import TRAIN_WORKERS, TrainConfig, load_yaml
from .cores import default_workers, share_cores
from .data import (
    SegmentationDataset,
    collate,
    find_pairs,
    pair_folders,
    scan_pairs,
    split_validation,
)
from .errors import CadsamError
from .evaluation import constant_masks, constant_prediction_warning, evaluate, main_score
from .fast.graphs import Step, adamw, match_graph_mode
from .fast.runtime import replays_whole_steps, resolve_runtime
from .files import check_output_folder, read_run_state, write_atomic
from .lock import holds_out_lock
from .methods import (
    AdaptedSam,
    build_model,
)
from .methods.prompting import Prompts
from .provenance import provenance
from .step import forward_backward, training_step
from .weights import base_checkpoint_record, checked_tensors, save_weights

CPU_ADAPTER_SIZE = 128  # cad's adapter input when training on a CPU and none is given


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
    # one scan: every bad pair in one error
    checked, bad = scan_pairs(pairs + val, **scan, **_reading(cfg))
    usable = set(checked)
    pairs, val = ([p for p in group if p in usable] for group in (pairs, val))
    if not pairs:
        raise CadsamError("no usable training pairs")
    return pairs, val, bad


def _reading(cfg: TrainConfig) -> dict[str, Any]:
    """How the pairs are read, as :func:`~cadsam.data.scan_pairs` and the data set take it."""
    return dict(classes=cfg.class_table(), coco_category=cfg.coco_category, channels=cfg.channels())


def _dataset_reading(cfg: TrainConfig) -> dict[str, Any]:
    """:func:`_reading`, and the prompts each item draws."""
    return {**_reading(cfg), "prompts": cfg.prompt_settings()}


def _cache_links(cfg: TrainConfig, train_pairs, val_pairs, base, log):
    """(folder, views, rows) of the train and validation pairs in ``cfg.cache``, or Nones."""
    if cfg.cache is None:
        return None, None
    cache = open_cache(cfg.cache)
    if "identity" not in cache.views:
        raise CadsamError(
            f"cache {cfg.cache} has no identity view: rebuild it with --views identity ..."
        )
    fits = (cfg.backbone, base, cfg.image_size, cfg.channels())
    train = check_cache_for_training(cache, train_pairs, *fits)
    val = check_cache_for_training(cache, val_pairs, *fits) if val_pairs else []
    if cfg.augment:  # once the cache is known to fit
        log(
            f"note: from a cache, augmentation picks among the cached views ({', '.join(cache.views)}); "
            "shift-scale-rotate is not available, since it changes what the encoder sees"
        )
    if cache.digests is None:
        log(
            f"note: cache {cfg.cache} was made before caches recorded digests, so its embeddings "
            f"are not checked: cadsam cache --verify --out {cfg.cache} records them"
        )
    return (cfg.cache, cache.views, train), (cfg.cache, cache.views, val)


@holds_out_lock("cadsam train", "cfg.out")
def train(cfg: TrainConfig) -> AdaptedSam | None:
    """Train ``cfg.method``; the run directory gets the weights. Returns the trained model, or
    None where a resumed run had already trained all its epochs."""
    dist = distributed.setup(cfg.device)
    threads = torch.get_num_threads()
    try:
        run = _setup(cfg, dist)
        if run is None:  # resumed, with every epoch trained already
            return None
        share_cores(run.loader.num_workers)  # threads and workers within the cores
        # zero-shot SAM's baseline (a resumed run has its own; zero-shot predicts no classes)
        if run.val_set is not None and not cfg.resume and run.model.classes is None:
            _score_zero_shot(run)
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
        if dist.is_main:
            for warning in constant_model_warnings(run.path):
                print(f"cadsam: {warning}", file=sys.stderr)
            not_better = zero_shot_warning(run.path)
            if not_better:
                print(f"cadsam: {not_better}", file=sys.stderr)
        return run.model
    finally:
        torch.set_num_threads(threads)
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
    records: list[dict[str, Any]] = field(default_factory=list)  # the epochs' metrics lines

    @property
    def path(self) -> Path:
        return Path(self.cfg.out)

    def log(self, *args: Any) -> None:
        if self.dist.is_main:
            print(*args)


def _setup(cfg: TrainConfig, dist: distributed.Dist) -> _Run | None:
    """Check everything, then build data, model, optimiser and schedule (resumed if asked);
    None where a resumed run has nothing left to train."""
    check_output_folder(cfg.out, "--out")
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
    # steps a CUDA graph can replay (cuda_graph=auto): whole, in one process, whole-image prompt
    prompted = cfg.prompt_settings().prompted
    whole_steps = replays_whole_steps(cfg.grad_accum, prompted, dist.world_size)
    training = (cfg.method, cfg.backbone)
    runtime_of = (*cfg.runtime_parts(), dist.device, training, whole_steps)
    resolve_runtime(*runtime_of, precision=cfg.precision)  # refused before any work
    if cfg.resume:
        _check_resumed_files(Path(cfg.out))  # before anything says it resumes
    if cfg.resume and _trained_all(cfg, dist):
        return None
    train_pairs, val_pairs, bad = _pairs(cfg, show)
    images = math.ceil(len(train_pairs) / dist.world_size) * cfg.epochs  # compiling must repay
    runtime, chosen = resolve_runtime(*runtime_of, images, cfg.precision)
    base = base_checkpoint_record(cfg.checkpoint)
    train_cache, val_cache = _cache_links(cfg, train_pairs, val_pairs, base, log)
    # notes about the run only once every input is checked: a wrong path is its error alone
    _fit_options_to_device(cfg, dist.device, log)
    if bad:
        log(f"skipped {len(bad)} unreadable or mismatched pair(s); first: {bad[0]}")
    for line in (note, chosen):
        if line:
            log(line)
    _check_memory(cfg, dist.device, log)
    torch.manual_seed(cfg.seed)
    classes = cfg.class_table()
    model = build_model(
        cfg.method, cfg.backbone, cfg.checkpoint, cfg.cache is None, runtime, classes, **cfg.options
    ).to(dist.device)
    model.image_channels = cfg.channels()  # how its images are read: saved with its weights
    model.prompt = cfg.prompt
    net = _distributed(model, dist, log)
    optimizer = adamw(model.trainable_parameters(), cfg.lr, cfg.weight_decay, runtime.cuda_graph)
    loader = _loader(cfg, dist, train_pairs, train_cache)
    total_steps = _total_steps(cfg, loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.schedule, s, total_steps)
    )
    val_set = None
    if val_pairs:
        data = dict(mask_threshold=cfg.mask_threshold, resize_masks=cfg.resize_masks)
        data |= _dataset_reading(cfg) | {"every_object": True}  # each object scored once
        val_set = SegmentationDataset(val_pairs, cfg.image_size, **data, cache=val_cache)
    # cuda_graph=auto graphs the step where its capture fits; true, whatever it takes
    fit = cfg.runtime.get("cuda_graph") is not True
    step = training_step(net, optimizer, cfg.precision, runtime.cuda_graph, fit, log)
    run = _Run(cfg, dist, model, step, net, loader, optimizer, scheduler, val_set, base, show=show)
    if cfg.resume:
        _resume(run, state_path, runtime.cuda_graph)
    elif dist.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        written = {**cfg.to_dict(), "written_by": provenance()}
        write_atomic(
            run.path / "config.yaml",
            lambda p: p.write_text(yaml.safe_dump(written, sort_keys=False)),
        )
    if cfg.tensorboard and dist.is_main:
        run.board = _tensorboard(run.path)
    return run


def _check_memory(cfg: TrainConfig, device: torch.device, log: Callable[[str], None]) -> None:
    """On a GPU, a run that cadsam plan counts larger than the free memory stops here, before
    any weights load, in one line naming what fits (``memory_check=false``: start anyway). A
    count that fails is said and the run goes on: the check advises, the GPU decides."""
    if device.type != "cuda" or not cfg.memory_check:
        return
    try:
        said = _memory_refusal(cfg, device)
    except Exception as exc:  # a count that fails must not stop a run that fits
        log(f"memory check skipped: counting the step failed ({type(exc).__name__}: {exc})")
        return
    if said:
        raise CadsamError(f"{said} (--set memory_check=false: start anyway)")


def _memory_refusal(cfg: TrainConfig, device: torch.device) -> str | None:
    from .planning import PlanRequest, refusal  # counting on the meta device: GPU runs only

    name, settings = cfg.runtime_parts()
    classes = cfg.class_table()
    request = PlanRequest(
        method=cfg.method,
        backbone=cfg.backbone,
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        precision=cfg.precision,
        classes=1 if classes is None else classes.count,
        cache=cfg.cache is not None,
        runtime=name,
        settings=tuple(settings.items()),
        prompt=cfg.prompt_settings(),
        options=tuple(cfg.options.items()),
        grad_accum=cfg.grad_accum,
    )
    return refusal(request, free_gpu_mib(device), torch.cuda.get_device_name(device))


def free_gpu_mib(device: torch.device) -> float:
    return torch.cuda.mem_get_info(device)[0] / 2**20


def _total_steps(cfg: TrainConfig, loader: DataLoader) -> int:
    """Optimiser steps over all ``cfg.epochs``: what the learning-rate schedule spans."""
    return math.ceil(len(loader) / cfg.grad_accum) * cfg.epochs


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
        **_dataset_reading(cfg),
    )
    sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=default_workers(TRAIN_WORKERS) if cfg.num_workers is None else cfg.num_workers,
        collate_fn=collate,
        pin_memory=dist.device.type == "cuda",
        drop_last=False,
        persistent_workers=False,
    )


def _trained_all(cfg: TrainConfig, dist: distributed.Dist) -> bool:
    """On --resume: whether the run has trained all ``cfg.epochs`` already, which is said, not an
    error (a job that resumes whatever it finds may find its run done). Fewer epochs than the
    run's config.yaml plans are an error: the run cannot be shortened."""
    state_path, config_path = Path(cfg.out) / "state.pt", Path(cfg.out) / "config.yaml"
    if not (state_path.is_file() and config_path.is_file()):
        return False  # resuming says what is missing
    planned = load_yaml(config_path).get("epochs", cfg.epochs)
    if cfg.epochs < planned:
        raise CadsamError(
            f"--epochs {cfg.epochs} is fewer than the run's {planned}: --resume continues the "
            f"run, and trains it longer with --epochs above {planned}"
        )
    done = read_run_state(state_path, mmap=True)["epoch"]
    if done < cfg.epochs:
        return False
    if dist.is_main:
        print(
            f"nothing to do: {cfg.out} has trained all its {done} epochs "
            f"(--resume --epochs N with N above {done} trains it longer)"
        )
    return True


def _resume(run: _Run, state_path: Path, graphed: bool) -> None:
    state = checked_state(state_path)
    if run.dist.is_main:
        run.records = _rebuild_metrics(run.path, state)
    run.model.load_trainable_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    match_graph_mode(run.optimizer, graphed)
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    run.start_epoch, run.best_dice, run.base = state["epoch"], state["best_dice"], state["base"]
    planned = load_yaml(run.path / "config.yaml").get("epochs", run.cfg.epochs)
    factor = _follow_schedule(run)
    if run.cfg.epochs > planned:
        _extend(run, planned, factor)
    else:
        run.log(f"resuming {run.path} after epoch {run.start_epoch}")


def _follow_schedule(run: _Run) -> float:
    """Set the learning rate of the next step to the schedule's, over ``cfg.epochs``; returns its
    factor. The same rate as saved unless the run is trained longer (or was, and then stopped
    before an epoch of the longer run was saved), so a resume changes nothing otherwise."""
    steps = run.scheduler.last_epoch  # optimiser steps taken
    factor = lr_factor(run.cfg.schedule, steps, _total_steps(run.cfg, run.loader))
    for group, base in zip(run.optimizer.param_groups, run.scheduler.base_lrs, strict=True):
        if isinstance(group["lr"], torch.Tensor):  # graphed: the captured step reads it
            group["lr"].fill_(base * factor)
        else:
            group["lr"] = base * factor
    return factor


def _extend(run: _Run, planned: int, factor: float) -> None:
    """Train a run longer than the ``planned`` epochs of its config.yaml, which then records the
    new number. The learning-rate schedule is planned again over the new number from the same
    start (:func:`_follow_schedule`): the next step's rate is the one a run of that many epochs
    has at this step (for the cosine, higher than the old plan's, which ends at 0)."""
    cfg = run.cfg
    if run.dist.is_main:
        saved = {**load_yaml(run.path / "config.yaml"), "epochs": cfg.epochs}
        write_atomic(
            run.path / "config.yaml",
            lambda p: p.write_text(yaml.safe_dump(saved, sort_keys=False)),
        )
    start = run.scheduler.base_lrs[0]
    schedule = (
        f"the cosine from {start:.2e} to 0 is planned again over {cfg.epochs} epochs, so it "
        f"goes on at {start * factor:.2e}, the rate at this step of a {cfg.epochs}-epoch run"
        if cfg.schedule == "cosine"
        else f"constant at {start:.2e}"
    )
    run.log(
        f"resuming {run.path} after epoch {run.start_epoch}, trained longer: {planned} -> "
        f"{cfg.epochs} epochs; learning rate: {schedule}"
    )


def _train_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """One pass over the training data; the epoch's record for metrics.jsonl."""
    cfg, dist, loader = run.cfg, run.dist, run.loader
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    run.model.train()
    started, loss_sum, seen = time.perf_counter(), torch.zeros((), device=dist.device), 0
    # a non-finite loss stops the run: on a CPU seen at its batch (reading it costs nothing),
    # elsewhere at the epoch's end from each batch's loss kept on the device (no wait per step)
    each_step, losses, batches = _loss_read_each_step(dist), [], []
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not run.show)
    shown_at = 0.0
    for i, batch in enumerate(bar):
        prompts = Prompts.from_batch(batch, dist.device)  # None: the whole image
        target = "mask" if prompts is None else "object_masks"
        images, masks, embeddings = (
            None if batch.get(key) is None else batch[key].to(dist.device, non_blocking=True)
            for key in ("image", target, "embedding")
        )
        prompted = () if prompts is None else (prompts,)
        last_micro = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(loader)
        if cfg.grad_accum == 1:  # forward, backward and AdamW (one launch where graphed)
            loss = run.step(images, masks, embeddings, *prompted)
        else:
            sync = run.net.no_sync() if dist.enabled and not last_micro else nullcontext()
            with sync:
                loss = forward_backward(
                    run.net, images, masks, embeddings, cfg.precision, cfg.grad_accum, True, prompts
                )
            if last_micro:
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
        if last_micro:
            run.scheduler.step()
            if run.board is not None:
                run.board.add_scalar("train/loss", loss.item(), run.scheduler.last_epoch)
                run.board.add_scalar("train/lr", _lr(run.scheduler), run.scheduler.last_epoch)
        batches.append((batch["id"], batch["index"]))
        if each_step and not math.isfinite(loss.item()):
            raise _stopped(run, epoch, i, batches, loss.item())
        losses.append(loss)
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
    if not math.isfinite(totals[0].item()):  # a batch here, or on another process
        bad = torch.nonzero(~torch.isfinite(torch.stack(losses))).flatten().tolist()
        raise _stopped(run, epoch, bad[0] if bad else None, batches, totals[0].item())
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
    improved = "val" in record and main_score(record["val"]) > run.best_dice
    if improved:
        run.best_dice = main_score(record["val"])
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
    if cfg.prompt_settings().prompted:
        raise CadsamError("cuda_graph replays the whole-image prompt's step: drop --prompt or it")


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CadsamError(
            "--tensorboard needs TensorBoard: pip install 'cadsam[tensorboard]'"
        ) from None
    return SummaryWriter(str(run / "tensorboard"))


def _save_state(run: _Run, record: dict[str, Any]) -> None:
    """state.pt, with every epoch's metrics line (so that a resume rebuilds metrics.jsonl
    whatever a kill between the two left) and a digest of itself, then the metrics line."""
    run.records.append(record)
    state = {
        "epoch": record["epoch"],
        "best_dice": run.best_dice,
        "base": run.base,
        "model": run.model.trainable_state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "metrics": run.records,
    }
    state[STATE_DIGEST] = state_digest(state)
    write_atomic(run.path / "state.pt", lambda p: torch.save(state, p))
    with open(run.path / "metrics.jsonl", "a") as f:  # a line per finished epoch
        f.write(metrics_line(record))


def _loss_read_each_step(dist: distributed.Dist) -> bool:
    """Whether each batch's loss is read as it comes: on a CPU in one process, where that costs
    nothing; on a GPU it would wait for the device every step (and a process stopping alone
    would leave the others waiting), so there it is read at the epoch's end."""
    return dist.device.type == "cpu" and not dist.enabled


STATE_DIGEST = "sha256"  # state.pt's key for the digest of the rest of it


def state_digest(state: Any) -> str:
    """The sha256 of a training state, walked: keys, values, and each tensor's dtype, shape and
    bytes (not its device). Of the objects, not of torch.save's bytes, so that it holds
    whatever version of torch reads the file back."""
    digest = hashlib.sha256()
    _feed_digest(digest, state)
    return digest.hexdigest()


def _feed_digest(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _feed_digest(digest, key)
            _feed_digest(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _feed_digest(digest, item)
    else:
        digest.update(f"V{type(value).__name__}:{value!r}".encode())


def checked_state(path: Path) -> dict[str, Any]:
    """A run's state.pt, refused in one line where it no longer matches the digest it was
    written with (a state.pt from before digests loads unchecked)."""
    state = read_run_state(path)
    recorded = state.pop(STATE_DIGEST, None) if isinstance(state, dict) else None
    if not isinstance(state, dict) or (recorded is not None and state_digest(state) != recorded):
        raise CadsamError(
            f"{path} is damaged: it no longer matches the digest it was written with, so the "
            "run cannot be resumed from it; train it again into another --out"
        )
    return state


def _check_resumed_files(run: Path) -> None:
    """What --resume goes on from, read back against its digests: state.pt and the weights so
    far, last.safetensors (which the next epoch writes again)."""
    state = checked_state(run / "state.pt")
    last = run / "last.safetensors"
    if last.exists():
        fix = (
            "delete it and --resume again (state.pt is intact, and the next epoch writes it "
            f"again; this run has trained {state['epoch']} epoch(s): a run that has trained all "
            "it plans needs --epochs above that)"
        )
        checked_tensors(last, fix)


def _rebuild_metrics(run: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    """metrics.jsonl as state.pt has it, rewritten on resume: a line per epoch done, whatever a
    kill between the two left (a line missing, one too many, one cut short); lines before the
    first epoch (the zero-shot baseline) kept. A state.pt from before it kept the lines keeps
    the file's. Returns the epochs' records."""
    path, done = run / "metrics.jsonl", state["epoch"]
    lines, found = [], []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by a kill
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if not (isinstance(epoch, int) and epoch >= 1):
            lines.append(line + "\n")
        elif epoch <= done:
            found.append(record)
    records = state.get("metrics", found)
    text = "".join(lines) + "".join(metrics_line(record) for record in records)
    if not path.is_file() or path.read_text() != text:
        write_atomic(path, lambda p: p.write_text(text))
    return list(records)


def metrics_line(record: dict[str, Any]) -> str:
    """One metrics.jsonl line, valid JSON: a value that is not finite is written as null."""
    return json.dumps(_finite(record), allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _stopped(
    run: _Run, epoch: int, batch: int | None, batches: list[tuple], value: float
) -> CadsamError:
    """The one line that ends a run whose loss is not finite: where, on which images (and
    cache rows), and which weights are left; nothing of this epoch is saved."""
    where = "on another process"
    if batch is not None:
        ids, indices = batches[batch]
        where = f"at batch {batch + 1} of epoch {epoch + 1}, images {', '.join(map(str, ids))}"
        cache = run.loader.dataset.cache
        if cache is not None:
            rows = ", ".join(str(cache[2][index]) for index in indices.tolist())
            where += f" (cache {cache[0]} rows {rows})"
    kept = (
        f"{run.path / 'last.safetensors'} keeps the weights of epoch {epoch}"
        if epoch
        else "no weights were written"
    )
    check = f"cadsam cache --verify --out {run.cfg.cache}" if run.cfg.cache else "their files"
    return CadsamError(
        f"training stopped: the loss is {value} {where}; {kept}: check those images and masks "
        f"({check}), or lower --lr"
    )


def _summary(record: dict[str, Any]) -> str:
    text = f"epoch {record['epoch']}: loss {record['loss']:.4f}, {record['images_per_second']:.1f} images/s"
    if "val" in record:
        val = record["val"]
        if "mdice" in val:
            text += f", val mdice {val['mdice']:.4f} miou {val['miou']:.4f}"
        else:
            text += f", val dice {val['dice']:.4f} iou {val['iou']:.4f}"
        constant = constant_masks(
            val.get("predicted_all_foreground", 0),
            val.get("predicted_all_background", 0),
            val.get("images", val.get("objects", 0)),
            val.get("predicted_one_class", 0),
        )
        if constant:  # a high Dice can hide a model that learnt nothing
            text += f" (predicts {constant})"
    return text


UNTRAINED_ADVICE = "check the masks, and train from a pretrained --checkpoint or for longer"


def constant_model_warnings(run: Path) -> list[str]:
    """A warning for the weights a run leaves (best.safetensors, last.safetensors) that predicted
    one value everywhere on every validation image at their epoch: however high their Dice,
    they segment nothing. From metrics.jsonl, so a resumed run's earlier epochs count."""
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    records = [record for record in map(json.loads, lines) if "val" in record]
    if not records:
        return []
    best = max(records, key=lambda record: main_score(record["val"]))  # the first best, as saved
    last = records[-1]
    names = {best["epoch"]: ["best.safetensors"]}
    names.setdefault(last["epoch"], []).append("last.safetensors")
    warnings = []
    for record in [best] if best is last else [best, last]:
        model = f"{' and '.join(names[record['epoch']])} (epoch {record['epoch']})"
        result = "the validation scores describe"
        warning = constant_prediction_warning(
            record["val"], model=model, result=result, advice=UNTRAINED_ADVICE
        )
        if warning:
            warnings.append(warning)
    return warnings


# -- the zero-shot baseline ----------------------------------------------------------------

ZERO_SHOT_KEY = "zero_shot"  # marks metrics.jsonl's first line: zero-shot SAM, before training
MIN_GAIN = 1e-4  # the last digit of the Dice shown: a smaller gain is no gain


class _OnFrozenEncoder(torch.nn.Module):
    """``model`` (built without an encoder) fed the frozen encoder's embeddings of
    ``encoder_of`` where none are given: zero-shot SAM with no second image encoder."""

    def __init__(self, model: AdaptedSam, encoder_of: AdaptedSam) -> None:
        super().__init__()
        self.model = model
        self.classes = model.classes
        self.__dict__["encoder_of"] = encoder_of  # not a submodule: the run owns it

    def forward(
        self,
        images: torch.Tensor,
        embeddings: torch.Tensor | None = None,
        prompts: Prompts | None = None,
    ) -> torch.Tensor:
        if embeddings is None:
            embeddings = self.__dict__["encoder_of"].frozen_embeddings(images)
        return self.model(images, embeddings, prompts)


def _zero_shot_model(run: _Run) -> _OnFrozenEncoder:
    """Zero-shot SAM as the run starts from: a model of method zero-shot (SAM 2.1's single-mask
    rule included) holding the training model's SAM weights before any step (random ones
    too), fed by the training model's frozen encoder or by the cache, whose embeddings are
    that encoder's own."""
    with torch.random.fork_rng(devices=[]):  # the run's random numbers stay as they were
        zero_shot = build_model("zero-shot", run.cfg.backbone, None, with_encoder=False)
    loaded = zero_shot.sam.load_state_dict(run.model.sam.state_dict(), strict=False)
    assert not loaded.missing_keys, loaded.missing_keys
    return _OnFrozenEncoder(zero_shot.to(run.dist.device), run.model)


def _score_zero_shot(run: _Run) -> None:
    """Zero-shot SAM's validation Dice and IoU before the first epoch, with the run's prompt,
    size, pairs and metrics: what the fine-tune must beat. Into metrics.jsonl's first line,
    the log and TensorBoard. Every process scores its share, as at each epoch."""
    was_training = run.model.training
    run.model.eval()  # the frozen encoder runs as in evaluation (nothing compiled for training)
    try:
        metrics = evaluate(
            _zero_shot_model(run),
            run.val_set,
            batch_size=run.cfg.batch_size,
            dist=run.dist,
            precision=run.cfg.precision,
            progress=run.show,
        )
    finally:
        run.model.train(was_training)
    if run.dist.device.type == "cuda":
        torch.cuda.empty_cache()  # the training step's memory checks see what training has
    record = {
        "epoch": 0,
        ZERO_SHOT_KEY: True,
        "val_dice": metrics["dice"],
        "val_iou": metrics["iou"],
    }
    if run.dist.is_main:
        line = metrics_line(record)
        write_atomic(run.path / "metrics.jsonl", lambda p: p.write_text(line))
        run.log(
            f"zero-shot SAM before training: val dice {record['val_dice']:.4f} "
            f"iou {record['val_iou']:.4f} (the score to beat)"
        )
    if run.board is not None:
        run.board.add_scalar("zero_shot/dice", record["val_dice"], 0)
        run.board.add_scalar("zero_shot/iou", record["val_iou"], 0)


def zero_shot_warning(run: Path) -> str | None:
    """A warning where the run's best validation Dice is not above zero-shot SAM's (by
    :data:`MIN_GAIN`): the fine-tune ends no better than the model it started from. From
    metrics.jsonl, so a resumed run compares with the baseline of its start; None where there
    is no baseline (no validation, or a run from before it was recorded)."""
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    baseline = next((r for r in records if r.get(ZERO_SHOT_KEY)), None)
    epochs = [r for r in records if "val" in r]
    if baseline is None or not epochs:
        return None
    best = max(epochs, key=lambda record: main_score(record["val"]))  # the first best, as saved
    dice, zero_shot = main_score(best["val"]), baseline["val_dice"]
    if dice >= zero_shot + MIN_GAIN:
        return None
    return (
        f"warning: the best epoch ({best['epoch']}, best.safetensors) has validation Dice "
        f"{dice:.4f}, not better than zero-shot SAM's {zero_shot:.4f} before training: the "
        "fine-tune did not improve on the model it started from; try another --lr, more "
        "epochs or more data, or use zero-shot (cadsam eval --method zero-shot)"
    )
