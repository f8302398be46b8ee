"""Shared test helpers: Meta's reference package (torchvision stubbed) and the real data."""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch

# The Triton kernels run on CPU tensors under Triton's interpreter, which must be chosen before
# Triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _stub_torchvision() -> None:
    """Meta's package imports torchvision at import time for code these tests never call."""
    if "torchvision" in sys.modules:
        return

    def unused(*args, **kwargs):
        raise AssertionError("torchvision stub called")

    modules = {
        name: types.ModuleType(name)
        for name in (
            "torchvision",
            "torchvision.transforms",
            "torchvision.transforms.functional",
            "torchvision.ops",
            "torchvision.ops.boxes",
        )
    }
    modules["torchvision.transforms.functional"].resize = unused
    modules["torchvision.transforms.functional"].to_pil_image = unused
    modules["torchvision.ops.boxes"].batched_nms = unused
    modules["torchvision.ops.boxes"].box_area = unused
    sys.modules.update(modules)


@pytest.fixture(scope="session")
def meta_sam():
    """Meta's ``segment_anything`` package, the independent reference for parity tests."""
    _stub_torchvision()
    return importlib.import_module("segment_anything")


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every state_dict entry random values (zero-initialised rel-pos tables too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(noise * (0.5 if tensor.ndim == 1 else tensor.shape[-1] ** -0.5))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def join_as_rank(rank: int, world: int, port: int) -> None:
    """Set what torchrun would set for process ``rank`` of ``world`` on this machine."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
