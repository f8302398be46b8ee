"""How a model runs, apart from what it computes.

A :class:`Runtime` holds every switch that changes only speed and memory: the attention
formulation, encoder chunking, compilation, CAD's bands and Triton kernels, activation
checkpointing, the CUDA-graph step. None of them changes a result beyond floating-point
tolerance, and none is ever saved with weights: a model trained under one runtime loads and
runs under any other. :func:`cadsam.fast.runner.fit` applies one to a model.

Three named runtimes:

* ``plain``: the reference formulation (explicit attention scores, whole blocks, nothing
  compiled), which every other path is tested against;
* ``lean``: the least memory (bands and kernels for CAD's full-resolution blocks, one image per
  frozen-encoder call, SAM-Adapter's and LoRA's encoder blocks recomputed in backward);
* ``auto`` (the commands' default): on a GPU, the fastest path that fits its free memory (the
  frozen encoder batched and compiled, CAD's blocks kept for backward, CAD's training step
  replayed as a CUDA graph where its capture fits; where there is much room, the encoder's
  blocks kept for SAM-Adapter's and LoRA's activations), ``lean`` where little is free; on a
  CPU, ``plain`` with the fused attention.

Individual switches (``--set NAME=VALUE``, or a ``runtime:`` section of a training config) pin
any path on top of a named runtime.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CadsamError

RUNTIMES = ("auto", "plain", "lean")
AUTO = "auto"
# Free GPU memory from which ``auto`` batches and compiles the frozen encoder, keeps CAD's
# blocks for backward and replays CAD's step as a CUDA graph where the capture fits
# (GraphedStep checks it; ViT-H CAD at batch 2 in fp32 peaks near 5.3 GiB that way) ...
FAST_GIB = 8
# Training steps ``cuda_graph=auto`` replays as a CUDA graph, by method: the backbones (name
# prefixes) on which the GPU tier checks the graphed step against the eager one, from the
# cache and through the encoder, and the graph was measured faster. Launched eagerly, a bf16
# CAD step leaves a fast GPU idle half of the time or more, and graphed it runs about twice as
# many images a second (benchmarks/BENCHMARKS.md).
GRAPHED_STEPS = {"cad": ("vit_", "sam2.1_")}
# ... and from which it also keeps the encoder's activations for methods that act inside it
# (ViT-H's SAM-Adapter keeps 21 GiB in fp32 at batch 2; benchmarks/BENCHMARKS.md)
ROOMY_GIB = 48


def _check_value(name: str, value: Any, default: Any) -> None:
    if isinstance(default, bool) and name.startswith(("compile_", "triton_", "cuda_graph")):
        if value not in (AUTO, True, False):
            raise CadsamError(f"{name} must be auto, true or false, not {value!r}")
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise CadsamError(f"{name} must be true or false, not {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise CadsamError(f"{name} must be a number >= 0, not {value!r}")
    elif isinstance(default, int) and not isinstance(value, int):
        raise CadsamError(f"{name} must be a whole number, not {value!r}")


@dataclass(frozen=True)
class Runtime:
    """The defaults are the plain path. ``"auto"`` in a compile or kernel switch means: on CUDA
    (compilation: while training there, where its warm-up pays)."""

    fused_attention: bool = False  # SDPA with SAM's rel-pos bias folded into q and k
    encoder_chunk: int = 0  # images per frozen-encoder call (0: the whole batch)
    compile_encoder: bool | str = False  # the frozen encoder through torch.compile
    compile_decoder: bool | str = False  # the mask decoder and upsampling through torch.compile
    checkpoint_encoder: bool = False  # recompute encoder blocks in backward (SAM-Adapter, LoRA)
    checkpoint_adapter: bool = False  # recompute CAD's whole blocks in backward
    adapter_tile_mib: float = 0.0  # CAD: band a block whose activation exceeds this (0: never)
    compile_tiles: bool | str = False  # CAD: the bands' elementwise arithmetic compiled
    triton_kernels: bool | str = False  # CAD: the banded first block as Triton kernels
    compile_blocks: bool | str = False  # CAD: whole (not recomputed) blocks compiled
    channels_last: bool = False  # CAD: activations in NHWC, cuDNN's fast layout
    cuda_graph: bool | str = False  # training: the step captured once and replayed (one GPU)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_value(f.name, getattr(self, f.name), f.default)
        if self.compile_blocks is True and self.checkpoint_adapter:
            raise CadsamError("compile_blocks=true does not combine with checkpoint_adapter")

    def replace(self, **settings: Any) -> Runtime:
        """This runtime with ``settings`` changed; unknown names or bad values are errors."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise CadsamError(
                f"unknown runtime setting {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return dataclasses.replace(self, **settings)

    @property
    def is_plain(self) -> bool:
        return self == Runtime()

    def changes(self) -> dict[str, Any]:
        """The settings that differ from the plain path."""
        plain = Runtime()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(plain, f.name)
        }

    def describe(self) -> str:
        changes = self.changes()
        if not changes:
            return "plain (the reference path)"
        return ", ".join(f"{k}={_show(v)}" for k, v in changes.items())


LEAN = Runtime(
    fused_attention=True,
    encoder_chunk=1,
    compile_decoder=AUTO,
    checkpoint_encoder=True,
    checkpoint_adapter=True,
    adapter_tile_mib=64,  # ViT-H fp32 peaks lower than at 128 (benchmarks/experiments/HISTORY.md)
    compile_tiles=AUTO,
    triton_kernels=AUTO,
    compile_blocks=AUTO,
    channels_last=True,
)
# where memory allows: the encoder batched and compiled, its blocks' activations kept
ROOMY = dataclasses.replace(
    LEAN,
    encoder_chunk=0,
    compile_encoder=AUTO,
    checkpoint_encoder=False,
    checkpoint_adapter=False,
    adapter_tile_mib=128,  # taller bands, fewer launches
    cuda_graph=AUTO,
)
PRESETS = {
    "plain": (Runtime(),),
    "lean": (LEAN,),
    AUTO: (Runtime(fused_attention=True), LEAN, ROOMY),
}


def check_settings(name: str, settings: dict[str, Any]) -> None:
    """``settings`` on the runtime called ``name``, whatever the device it resolves on: a bad
    name, value or combination is an error where it is given, before any work."""
    if name not in PRESETS:
        raise CadsamError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {name!r}")
    for runtime in PRESETS[name]:
        runtime.replace(**settings)


def named_runtime(name: str, device: torch.device | str = "cpu") -> tuple[Runtime, str]:
    """The runtime called ``name`` on ``device``, and why (for the log)."""
    device = torch.device(device)
    if name == "plain":
        return Runtime(), "plain: the reference path"
    if name == "lean":
        return LEAN, "lean: the least memory"
    if name != AUTO:
        raise CadsamError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {name!r}")
    if device.type != "cuda":
        return Runtime(fused_attention=True), f"auto on {device.type}: plain, fused attention"
    free_gib = torch.cuda.mem_get_info(device)[0] / 2**30
    where = f"auto on {torch.cuda.get_device_name(device)} ({free_gib:.0f} GiB free)"
    if free_gib >= ROOMY_GIB:
        return ROOMY, f"{where}: fast"
    if free_gib >= FAST_GIB:
        fast = ROOMY.replace(checkpoint_encoder=True)
        return fast, f"{where}: fast, encoder blocks recomputed"
    return LEAN, f"{where}: lean"


def resolve_runtime(
    name: str = AUTO,
    settings: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    training: tuple[str, str] | None = None,
    whole_steps: bool = True,
) -> tuple[Runtime, str]:
    """A named runtime with ``settings`` on top, checked for ``device`` (a one-line error for a
    switch that cannot apply there), ``cuda_graph=auto`` settled (:func:`settle_cuda_graph`);
    and a line saying what was chosen."""
    runtime, why = named_runtime(name, device)
    runtime = runtime.replace(**(settings or {}))
    check_device(runtime, torch.device(device))
    runtime = settle_cuda_graph(runtime, torch.device(device), training, whole_steps)
    return runtime, f"runtime {why}; {runtime.describe()}"


def settle_cuda_graph(
    runtime: Runtime,
    device: torch.device,
    training: tuple[str, str] | None,
    whole_steps: bool = True,
) -> Runtime:
    """``cuda_graph=auto`` made true or false: true when training (``training``: the method
    and backbone) a step of GRAPHED_STEPS on CUDA in whole optimiser steps (``whole_steps``:
    no gradient accumulation, one process), where a graph can replay the step."""
    if runtime.cuda_graph != AUTO:
        return runtime
    method, backbone = training or ("", "")
    tested = backbone.startswith(GRAPHED_STEPS.get(method, ()))
    return runtime.replace(cuda_graph=tested and device.type == "cuda" and whole_steps)


def check_device(runtime: Runtime, device: torch.device) -> None:
    if runtime.cuda_graph is True and device.type != "cuda":
        raise CadsamError(f"cuda_graph needs a CUDA device; this run is on {device}")
    if runtime.triton_kernels is True:
        if not triton_available():
            raise CadsamError("triton_kernels=true needs Triton: pip install triton")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise CadsamError(
                "triton_kernels=true needs a CUDA device (on a CPU, Triton runs kernels only "
                "under TRITON_INTERPRET=1, its slow interpreter): use auto or false"
            )


def parse_setting(text: str) -> tuple[str, Any]:
    """``NAME=VALUE``, the value read as YAML (numbers, true/false, strings)."""
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise CadsamError(f"--set takes NAME=VALUE, got {text!r}")
    return name.strip().replace("-", "_"), yaml.safe_load(value)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
