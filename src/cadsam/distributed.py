"""torchrun support: one process per device, set up from the environment torchrun provides."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import CadsamError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str | None) -> torch.device:
    """The device ``--device`` names, checked to exist here (default: cuda if available).

    A misspelt name, a CUDA device on a torch build without CUDA or on a machine where no GPU
    is visible, and a GPU index beyond the visible ones are :class:`CadsamError`, not a
    traceback from deep inside the first tensor moved there."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        raise CadsamError(
            f"unknown --device {requested!r}: use cpu, cuda or cuda:N (N counts from 0)"
        ) from None
    if device.type == "cuda":
        _check_cuda(requested, device)
    elif device.type != "cpu" and not _available(device.type):
        raise CadsamError(f"--device {requested}: no {device.type} device here; use --device cpu")
    return device


def _check_cuda(requested: str, device: torch.device) -> None:
    if not torch.cuda.is_available():
        why = (
            "this torch was built without CUDA"
            if torch.version.cuda is None
            else f"this torch (CUDA {torch.version.cuda}) sees no GPU"
        )
        raise CadsamError(f"--device {requested}: {why}; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise CadsamError(
            f"--device {requested}: only {count} GPU(s) visible (cuda:0 to cuda:{count - 1})"
        )


def _available(kind: str) -> bool:
    """Whether torch can use an accelerator of this kind (mps, xpu, ...) here."""
    if kind == "mps":
        return torch.backends.mps.is_available()
    backend = getattr(torch, kind, None)
    is_available = getattr(backend, "is_available", None)
    return bool(is_available and is_available())


def setup(requested_device: str | None = None) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(requested_device)
    if world_size == 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, device=device)


def teardown(state: Dist) -> None:
    if state.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj: object, state: Dist) -> list[object]:
    """Every rank's ``obj`` (on every rank); just ``[obj]`` when running alone."""
    if not state.enabled:
        return [obj]
    out: list[object] = [None] * state.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(state: Dist) -> None:
    if state.enabled:
        dist.barrier()
