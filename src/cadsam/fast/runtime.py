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
  CPU, ``plain`` with the fused attention. ``auto`` and ``lean`` hold the frozen encoder's weights
  in bfloat16 for bf16 runs on CUDA (``frozen_bf16``), and compile nothing for a job too small
  to repay the compiler's warm-up (:func:`settle_job_size`).

Individual switches (``--set NAME=VALUE``, or a ``runtime:`` section of a training config) pin
any path on top of a named runtime.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
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

# What the compiler's warm-up costs and what it saves, from which ``auto`` judges whether a job
# repays it (settle_job_size): cold caches, ViT-B, bf16 (benchmarks/BENCHMARKS.md, "Warm-up").
# Training spent about a minute compiling and capturing before its first step; the step then
# runs 171.5 images/s compiled and graphed, 47.6 with the frozen encoder eager. fp32 gains less
# from compiling, so this errs toward it.
TRAIN_WARMUP_S = 60.0
TRAIN_EAGER_IMAGES_PER_S = 47.6
TRAIN_COMPILED_IMAGES_PER_S = 171.5
# Evaluation and prediction compile only CAD's banded first block (its bands' arithmetic, or
# Triton kernels): `cadsam eval` spent 9.7 s on its first batch (BENCHMARKS.md, "Warm-up").
# That block takes 85.1 ms eager for 4 images, forward and backward (experiments/HISTORY.md,
# "The banded adapter block"), more than compiling its forward alone can save: the compiled
# block is counted as free, which errs toward compiling.
INFER_WARMUP_S = 9.7
INFER_EAGER_IMAGES_PER_S = 4 / 0.0851  # the banded block's rate, not the model's
INFER_COMPILED_IMAGES_PER_S = math.inf
# the switches that compile (Triton's kernels included) or capture, which a small job turns off
WARMUP_SWITCHES = (
    "compile_encoder",
    "compile_decoder",
    "compile_tiles",
    "compile_blocks",
    "triton_kernels",
    "cuda_graph",
)
# the switches that may be ``auto``: those above, and the frozen weights' precision
AUTO_SWITCHES = (*WARMUP_SWITCHES, "frozen_bf16")


def _check_value(name: str, value: Any, default: Any) -> None:
    if name in AUTO_SWITCHES:
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
    (compilation: while training there, where its warm-up pays); in ``frozen_bf16``: on CUDA
    in a bf16 run (:func:`resolve_runtime` settles it, knowing the precision; unsettled, the
    weights stay float32)."""

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
    frozen_bf16: bool | str = False  # bf16 runs: the frozen encoder's matmul weights in bf16

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
    frozen_bf16=AUTO,
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
    job_images: int | None = None,
    precision: str | None = None,
) -> tuple[Runtime, str]:
    """A named runtime with ``settings`` on top, checked for ``device`` and ``precision`` (a
    one-line error for a switch that cannot apply there), its ``auto`` switches settled for the
    job's size (``job_images``: images to process, times epochs when training; None: unknown,
    see :func:`settle_job_size`), ``cuda_graph`` (:func:`settle_cuda_graph`) and
    ``frozen_bf16`` (:func:`settle_frozen_bf16`; ``precision`` None: not known, left ``auto``,
    held float32); and a line saying what was chosen."""
    device = torch.device(device)
    runtime, why = named_runtime(name, device)
    runtime = runtime.replace(**(settings or {}))
    check_device(runtime, device)
    check_precision(runtime, precision)
    runtime, sized = settle_job_size(runtime, device.type, job_images, training is not None)
    runtime = settle_cuda_graph(runtime, device, training, whole_steps)
    runtime = settle_frozen_bf16(runtime, device, precision)
    why = f"{why}; {sized}" if sized else why
    return runtime, f"runtime {why}; {runtime.describe()}"


def repaying_images(warmup_s: float, eager_per_s: float, compiled_per_s: float) -> int:
    """Images from which compiling pays: its warm-up over the time it saves per image."""
    saved_s = 1 / eager_per_s - 1 / compiled_per_s
    return math.ceil(warmup_s / saved_s)


def settle_job_size(
    runtime: Runtime, device_type: str, job_images: int | None, training: bool
) -> tuple[Runtime, str]:
    """The ``auto`` switches that compile or capture (WARMUP_SWITCHES) made false on CUDA where
    ``job_images`` cannot repay the warm-up (the TRAIN_ or INFER_ figures), and the reason in a
    few words ("" where nothing is said). Settings given as true stand; elsewhere ``auto``
    stays for the runner to decide as before. A job of unknown size (None) is taken to repay
    it, as before sizes were weighed; on a CPU nothing compiles under ``auto`` anyway."""
    autos = [name for name in WARMUP_SWITCHES if getattr(runtime, name) == AUTO]
    if device_type != "cuda" or job_images is None or not autos:
        return runtime, ""
    figures = (
        (TRAIN_WARMUP_S, TRAIN_EAGER_IMAGES_PER_S, TRAIN_COMPILED_IMAGES_PER_S)
        if training
        else (INFER_WARMUP_S, INFER_EAGER_IMAGES_PER_S, INFER_COMPILED_IMAGES_PER_S)
    )
    warmup_s, pays_from = figures[0], repaying_images(*figures)
    images = f"{job_images:,} image{'' if job_images == 1 else 's'}"
    if job_images >= pays_from:
        return runtime, f"compiled where it pays: {images} repay its warm-up (~{warmup_s:.0f} s)"
    graphed = training and "cuda_graph" in autos
    what = "compilation and CUDA graph off" if graphed else "compilation off"
    return runtime.replace(**dict.fromkeys(autos, False)), (
        f"{what}: {images} do not repay its warm-up (~{warmup_s:.0f} s; from ~{pays_from:,})"
    )


def settle_frozen_bf16(runtime: Runtime, device: torch.device, precision: str | None) -> Runtime:
    """``frozen_bf16=auto`` made true or false: true in a bf16 run on CUDA, where it halves the
    frozen encoder's memory and autocast would cast those weights to bf16 on every call anyway
    (it caches no casts of frozen weights). ``precision`` None: not known, left ``auto``, which
    :func:`~cadsam.fast.runner.fit` holds in float32."""
    if runtime.frozen_bf16 != AUTO or precision is None:
        return runtime
    return runtime.replace(frozen_bf16=device.type == "cuda" and precision == "bf16")


def check_precision(runtime: Runtime, precision: str | None) -> None:
    """``frozen_bf16=true`` holds weights in the precision a bf16 run computes in, and only
    there do the results stay those of float32 weights."""
    if runtime.frozen_bf16 is True and precision not in (None, "bf16"):
        raise CadsamError(
            f"frozen_bf16=true is for --precision bf16 (this run is {precision}): drop it"
        )


def replays_whole_steps(grad_accum: int = 1, prompted: bool = False, processes: int = 1) -> bool:
    """Whether a CUDA graph can replay the training step: one whole optimiser step a call (no
    gradient accumulation), the whole-image prompt (a prompted batch's objects vary), and
    one process (a graph does not capture the processes' exchange)."""
    return grad_accum == 1 and not prompted and processes == 1


def settle_cuda_graph(
    runtime: Runtime,
    device: torch.device,
    training: tuple[str, str] | None,
    whole_steps: bool = True,
) -> Runtime:
    """``cuda_graph=auto`` made true or false: true when training (``training``: the method
    and backbone) a step of GRAPHED_STEPS on CUDA in steps a graph can replay
    (``whole_steps``: :func:`replays_whole_steps`)."""
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
