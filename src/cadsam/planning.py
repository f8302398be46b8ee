"""Will a training run fit a GPU, and how fast does it go: answered on a CPU, before any GPU.

Peak training memory is counted, not guessed. One training step (forward, loss, backward) of
the model ``cadsam train`` builds runs on PyTorch's meta device, where tensors have shapes and
no data: every tensor the step allocates is followed from its creation to its release, and the
highest sum is the step's peak. Weights, gradients and AdamW's two float32 states per trained
parameter (each that gets a gradient) come from the model's parameters. What a meta run cannot
see, cuDNN's workspaces, the allocator's rounding, compiled kernels' buffers, a CUDA graph's
pool, is a constant per runtime, precision and method family, fitted to the recorded benchmark
runs by ``benchmarks/plan_constants.py`` into ``plan_constants.json`` beside this module.

How the runtimes are counted:

* ``plain``: as it runs (explicit attention scores, whole blocks);
* ``lean``, ``auto``: their structure as it runs (recomputed blocks, CAD's bands, one image per
  frozen-encoder call); fused attention keeps what the fused kernels keep (q, k, v, the output,
  a float32 log-sum-exp per query); a function the GPU compiles into one kernel (CAD's bands'
  arithmetic, the first block's Triton kernels) allocates its outputs only;
* bf16: autocast's casts as CUDA's autocast makes them (matrix products and convolutions in
  bfloat16, reductions, norms and losses in float32), made on the meta device by
  :class:`_Autocast`, since PyTorch's autocast does not act there.

``auto`` depends on the GPU: :func:`plan_runtime` picks what it picks on a card of that size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import re
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from .backbones import DEFAULT_BATCH, DEFAULT_IMAGE_SIZE, backbone_config
from .data.labels import class_table
from .data.prompts import TRAIN_NAMES as PROMPT_TRAIN_NAMES
from .data.prompts import PromptSettings
from .errors import CadsamError
from .fast.runtime import (
    FAST_GIB,
    LEAN,
    ROOMY,
    ROOMY_GIB,
    RUNTIMES,
    Runtime,
    replays_whole_steps,
    settle_cuda_graph,
)
from .methods import (
    CACHEABLE,
    METHODS,
    build_model,
    check_method_on_backbone,
    resolve_options,
)
from .methods.prompting import Prompts
from .precision import PRECISIONS

MIB = 2**20
CONSTANTS = Path(__file__).with_name("plan_constants.json")

# -- GPUs -----------------------------------------------------------------------------------

# Known cards -> their memory in GiB, as sold (a "24 GB" card holds 24 GiB).
KNOWN_GPUS: dict[str, float] = {
    "t4": 16,
    "v100-16gb": 16,
    "v100-32gb": 32,
    "rtx2080ti": 11,
    "rtx3060": 12,
    "rtx3070": 8,
    "rtx3080": 10,
    "rtx3090": 24,
    "rtx4060": 8,
    "rtx4070": 12,
    "rtx4080": 16,
    "rtx4090": 24,
    "rtx5090": 32,
    "a10": 24,
    "a10g": 24,
    "l4": 24,
    "a40": 48,
    "a6000": 48,
    "l40s": 48,
    "a100-40gb": 40,
    "a100-80gb": 80,
    "h100": 80,
    "h200": 141,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*$", re.IGNORECASE)


def parse_gpu_memory(text: str | float) -> float:
    """``--gpu-memory``: a size (``12``, ``12GiB``, ``24GB``, ``12288MiB``; GB read as GiB, as
    cards are sold) or a known card's name (``rtx3060``, ``a100-80gb``) -> MiB."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    name = str(text).strip().lower().replace(" ", "").replace("_", "-")
    if name in KNOWN_GPUS:
        return KNOWN_GPUS[name] * 1024
    match = _SIZE.match(str(text))
    if match is None or float(match.group(1)) <= 0:
        raise CadsamError(
            f"--gpu-memory {text!r} is neither a size (12, 12GiB, 24GB, 12288MiB) nor a known "
            f"card ({', '.join(KNOWN_GPUS)})"
        )
    unit = (match.group(2) or "gib").lower()
    return float(match.group(1)) * (1 if unit.startswith("m") else 1024)


# -- what is planned ------------------------------------------------------------------------


WHOLE_IMAGE = PromptSettings()  # the paper's prompt


@dataclass(frozen=True)
class PlanRequest:
    """A training run as ``cadsam train`` would make it: what decides its memory and speed.
    ``settings``: runtime switches by name (``--set``), e.g. ``(("cuda_graph", False),)``."""

    method: str = "cad"
    backbone: str = "vit_b"
    batch_size: int | None = None  # None: train's default for the backbone
    image_size: int = DEFAULT_IMAGE_SIZE
    precision: str = "fp32"
    classes: int = 1  # 1: the binary task
    cache: bool = False  # from cached embeddings: no image encoder in memory
    runtime: str = "auto"
    settings: tuple[tuple[str, Any], ...] = ()
    prompt: PromptSettings = WHOLE_IMAGE  # or each object's box or points
    options: tuple[tuple[str, Any], ...] = ()  # the method's model options where not its defaults
    grad_accum: int = 1  # micro-batches per optimiser step

    def __post_init__(self) -> None:
        if self.method not in METHODS or self.method == "zero-shot":
            trained = [m for m in METHODS if m != "zero-shot"]
            raise CadsamError(f"--method {self.method!r}: choose from {', '.join(trained)}")
        backbone_config(self.backbone)
        check_method_on_backbone(self.method, self.backbone)
        if self.cache and self.method not in CACHEABLE:
            raise CadsamError(f"--cache: {self.method} acts inside the encoder, so it has none")
        resolve_options(self.method, dict(self.options))
        sizes = ("--batch-size", self.batch), ("--image-size", self.image_size)
        for flag, value in (*sizes, ("--set grad_accum", self.grad_accum)):
            if value < 1:
                raise CadsamError(f"{flag} must be 1 or more, not {value}")
        if self.classes < 1:
            raise CadsamError(f"--classes must be 1 or more, not {self.classes}")
        if self.precision not in PRECISIONS:
            raise CadsamError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.runtime not in RUNTIMES:
            raise CadsamError(f"--runtime must be one of {', '.join(RUNTIMES)}")

    @property
    def batch(self) -> int:
        return DEFAULT_BATCH[self.backbone] if self.batch_size is None else self.batch_size

    @property
    def family(self) -> str:
        """What sets the constant beside the count: where training acts."""
        if self.method == "cad":
            return "cad-cache" if self.cache else "cad"
        return "decoder" if self.method == "decoder" else "encoder"

    def with_batch(self, batch: int) -> PlanRequest:
        return dataclasses.replace(self, batch_size=batch)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak allocated GPU memory of a training run, in MiB, with its parts."""

    runtime: str  # the named runtime
    runtime_settings: dict[str, Any]  # what it resolved to on this GPU (Runtime.changes())
    batch: int
    weights_mib: float  # every parameter and buffer on the GPU
    optimiser_mib: float  # gradients, and AdamW's two states per parameter given one
    activations_mib: float  # what the step allocates beyond them at its peak (autograd's)
    overhead_mib: float  # what counting on the meta device cannot see (fitted constant)
    cuda_graph: bool  # the step replayed as a CUDA graph
    gpu_mib: float | None = None
    fits: bool | None = None  # None: no GPU given

    @property
    def total_mib(self) -> float:
        return self.weights_mib + self.optimiser_mib + self.activations_mib + self.overhead_mib

    def to_json(self) -> dict[str, Any]:
        parts = {
            k: None if v is None else round(v, 1)
            for k, v in dataclasses.asdict(self).items()
            if k.endswith("mib")
        }
        return {**dataclasses.asdict(self), **parts, "total_mib": round(self.total_mib, 1)}


# -- the runtime on a GPU of a given size ----------------------------------------------------


def plan_runtime(request: PlanRequest, gpu_mib: float | None = None) -> Runtime:
    """The runtime ``cadsam train`` resolves on a GPU of ``gpu_mib`` (its free memory: what
    the CUDA context leaves); ``auto`` with no GPU given: the benchmarks' card's (the roomiest)."""
    if request.runtime == "plain":
        runtime = Runtime()
    elif request.runtime == "lean":
        runtime = LEAN
    else:
        free_gib = math.inf if gpu_mib is None else usable_mib(gpu_mib) / 1024
        if free_gib >= ROOMY_GIB:
            runtime = ROOMY
        else:
            runtime = ROOMY.replace(checkpoint_encoder=True) if free_gib >= FAST_GIB else LEAN
    runtime = runtime.replace(**dict(request.settings))
    training = (request.method, request.backbone)
    whole_steps = replays_whole_steps(request.grad_accum, request.prompt.prompted)
    runtime = settle_cuda_graph(runtime, torch.device("cuda"), training, whole_steps)
    if getattr(runtime, "frozen_bf16", False) == "auto":  # on CUDA: in a bf16 run
        runtime = runtime.replace(frozen_bf16=request.precision == "bf16")
    return runtime


def usable_mib(gpu_mib: float) -> float:
    """What tensors may take of a GPU: its memory less the CUDA context (fitted)."""
    return gpu_mib - load_constants().get("context_mib", 0.0)


def _counted_runtime(runtime: Runtime) -> Runtime:
    """What runs on the meta device: the same structure, nothing compiled, no graph."""
    off = ("compile_encoder", "compile_decoder", "compile_tiles", "triton_kernels")
    return runtime.replace(**dict.fromkeys(off, False), compile_blocks=False, cuda_graph=False)


def _fuses_bands(runtime: Runtime) -> bool:
    """Whether on a GPU CAD's bands' arithmetic runs as compiled (or Triton) kernels."""
    return any(
        getattr(runtime, name) in (True, "auto") for name in ("compile_tiles", "triton_kernels")
    )


def runtime_kind(request: PlanRequest, runtime: Runtime) -> str:
    """The constant's runtime key: the named runtime, ``auto-graph`` where a graph replays."""
    return f"{request.runtime}-graph" if runtime.cuda_graph else request.runtime


# -- counting one step on the meta device ----------------------------------------------------

# CUDA autocast's lists (torch.amp): what runs in bfloat16, what in float32, what in the widest
# of its inputs. Matched by the name of the function called.
_LOWER = {"linear", "conv1d", "conv2d", "conv_transpose2d", "matmul", "__matmul__", "__rmatmul__"}
_LOWER |= {"bmm", "baddbmm", "addmm", "mm", "einsum", "scaled_dot_product_attention"}
_FLOAT32 = {"softmax", "log_softmax", "layer_norm", "group_norm", "cross_entropy", "sum", "norm"}
_FLOAT32 |= {"binary_cross_entropy_with_logits", "pow", "__pow__", "rsqrt", "exp", "log"}
_FLOAT32 |= {"normalize", "cumsum", "softplus", "reciprocal", "mse_loss"}
_WIDEST = {"cat", "stack", "addcmul", "addcdiv"}


def _cast(tree: Any, source: torch.dtype, target: torch.dtype) -> Any:
    def cast(t: Any) -> Any:
        return t.to(target) if isinstance(t, torch.Tensor) and t.dtype == source else t

    return tree_map(cast, tree)


class _FusedAttention(torch.autograd.Function):
    """Attention as the fused kernels run it: the output, and kept for backward q, k, v, the
    output and a float32 log-sum-exp per query, never the score matrix."""

    @staticmethod
    def forward(ctx, q, k, v, mask):  # type: ignore[override]
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(*(t for t in (q, k, v, out, lse, mask) if t is not None))
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


class _Autocast(TorchFunctionMode):
    """CUDA's bf16 autocast made on meta tensors (while :attr:`on`), and fused attention."""

    on = False  # set by _meta_autocast's contexts, as torch.autocast sets its state

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if _Autocast.on and name in _LOWER:
            args, kwargs = _cast((args, kwargs), torch.float32, torch.bfloat16)
        elif _Autocast.on and (name in _FLOAT32 or name in _WIDEST):
            wide = name in _FLOAT32 or any(
                isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in tree_leaves(args)
            )
            if wide:
                args, kwargs = _cast((args, kwargs), torch.bfloat16, torch.float32)
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args
            return _FusedAttention.apply(q, k, v, rest[0] if rest else kwargs.get("attn_mask"))
        return func(*args, **kwargs)


@contextlib.contextmanager
def _autocast_region(device_type: str, dtype: Any = None, enabled: bool = True, **kw: Any):
    """``torch.autocast`` for "meta" (the counting's casts on or off, as asked: the step's
    forward, a recomputed block in backward, a band computed without autocast); others as
    PyTorch's."""
    if device_type != "meta":
        with _TORCH_AUTOCAST[2](device_type, dtype=dtype, enabled=enabled, **kw):
            yield
        return
    before, _Autocast.on = _Autocast.on, bool(enabled)
    try:
        with _Autocast():  # backward's recomputation runs outside the step's own mode
            yield
    finally:
        _Autocast.on = before


_TORCH_AUTOCAST = (
    torch.is_autocast_enabled,
    torch.get_autocast_dtype,
    torch.autocast,
    torch.amp.is_autocast_available,
)


@contextlib.contextmanager
def _meta_autocast() -> Iterator[None]:
    """PyTorch's autocast functions answering for the meta device while a step is counted
    (the code counted asks them, and they refuse "meta"); restored after."""
    enabled, dtype, autocast, available = _TORCH_AUTOCAST

    def is_enabled(device_type: str | None = None) -> bool:
        if device_type == "meta":
            return _Autocast.on
        return enabled() if device_type is None else enabled(device_type)

    patched = {
        "is_autocast_enabled": is_enabled,
        "get_autocast_dtype": lambda d: torch.bfloat16 if d == "meta" else dtype(d),
        "autocast": _autocast_region,
    }
    for name, value in patched.items():
        setattr(torch, name, value)
    torch.amp.autocast = _autocast_region
    torch.amp.is_autocast_available = lambda d: d == "meta" or available(d)
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.get_autocast_dtype = enabled, dtype
        torch.autocast = torch.amp.autocast = autocast
        torch.amp.is_autocast_available = available
        _Autocast.on = False


class _LiveBytes(TorchDispatchMode):
    """The bytes of every storage an op creates, from its creation until it is released;
    :attr:`peak` the highest sum. Storages in ``known`` (the weights) are not counted."""

    def __init__(self, known: set[int]) -> None:
        super().__init__()
        self.sizes: dict[int, int] = dict.fromkeys(known, 0)
        self.live = self.peak = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            for t in tree_leaves(out):
                self.track(t)
        return out

    def track(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()  # (one Python object per storage, released with it)
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        self.live += self.sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def fused(self, function: Any) -> Any:
        """``function`` as one compiled kernel: only its outputs are allocated."""

        def run(*args: Any, **kwargs: Any) -> Any:
            self.paused = True
            try:
                out = function(*args, **kwargs)
            finally:
                self.paused = False
            for t in tree_leaves(out):
                self.track(t)
            return out

        return run


@contextlib.contextmanager
def _fused_bands(live: _LiveBytes, fused: bool) -> Iterator[None]:
    """CAD's bands' arithmetic counted as the GPU runs it: compiled, each function one kernel."""
    from .fast import tiling

    eager = tiling._band_functions

    def functions(compiled: bool) -> types.SimpleNamespace:
        plain = eager(False)
        return types.SimpleNamespace(**{k: live.fused(f) for k, f in vars(plain).items()})

    tiling._band_functions = functions if fused else eager
    try:
        yield
    finally:
        tiling._band_functions = eager


@contextlib.contextmanager
def _bands_of_two_images() -> Iterator[None]:
    """CAD's banded blocks counted on their first two images' bands: each image's bands
    allocate the same transients in turn, what outlives them (the block's output and input
    gradient, the sums) is allocated for the whole batch at once, and what one image leaves
    to the next (an input gradient written after the next band reads its rows) is there from
    the second image on; so the peak is the same and the count no longer grows with the
    batch."""
    from .fast import tiling

    bands = tiling._Bands.bands

    def first_two_images(self: Any) -> Iterator[tuple[slice, int, int]]:
        return itertools.takewhile(lambda band: band[0].start < 2, bands(self))

    tiling._Bands.bands = first_two_images
    try:
        yield
    finally:
        tiling._Bands.bands = bands


@contextlib.contextmanager
def _chunks_run_twice(encoder: torch.nn.Module | None, chunks: int) -> Iterator[None]:
    """The frozen encoder run without autograd, ``chunks`` times a step (``encoder_chunk``),
    counted from two runs: the first (for its output's shape) and the last, which runs beside
    every earlier chunk's output, as on the GPU; the chunks between only allocate their output.
    Each chunk's transient peak is the same, so the step's peak is too, and ``lean``'s count
    (one image a chunk) no longer grows with the batch."""
    if encoder is None or chunks <= 2:
        yield
        return
    forward, calls, layouts = encoder.forward, [0], []

    def empty(layout: tuple) -> torch.Tensor:
        shape, stride, dtype = layout
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")

    def counted_forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return forward(*args, **kwargs)
        calls[0] += 1
        if layouts and calls[0] % chunks not in (0, 1):
            return tree_map(empty, layouts[0], is_leaf=lambda x: isinstance(x, tuple))
        out = forward(*args, **kwargs)
        layouts[:] = [tree_map(lambda t: (t.shape, t.stride(), t.dtype), out)]  # not the tensors:
        return out  # holding one would keep its bytes counted past its release

    encoder.forward = counted_forward
    try:
        yield
    finally:
        del encoder.forward


@dataclass(frozen=True)
class Counted:
    """One step counted on the meta device, in MiB."""

    weights_mib: float
    trainable: int
    step_mib: float  # the step's peak beyond the weights, its gradients included
    gradients_mib: float


@functools.lru_cache(maxsize=8)
def _meta_model(
    method: str,
    backbone: str,
    cache: bool,
    classes: int,
    options: tuple[tuple[str, Any], ...],
    frozen: bool,
):
    """A model as training builds it, on the meta device; ``frozen``: its frozen weights to be
    held in bf16 (``frozen_bf16``, which cannot be undone: a model of its own)."""
    with torch.device("meta"):
        model = build_model(
            method,
            backbone,
            with_encoder=not cache,
            classes=class_table(classes if classes > 1 else None),
            **dict(options),
        )
    return model.train()


@functools.lru_cache(maxsize=64)
def count_step(request: PlanRequest, runtime: Runtime) -> Counted:
    """One training step of ``request`` under ``runtime``, on the meta device: no memory, no
    arithmetic, a second or two even for vit_h. Kept: a plan asks the same count again (the
    fit, the largest batch, the recommendation)."""
    from .fast.runner import fit
    from .step import forward_backward

    key = (request.method, request.backbone, request.cache, request.classes, request.options)
    frozen = getattr(runtime, "frozen_bf16", False) is True
    model = fit(_meta_model(*key, frozen), _counted_runtime(runtime))
    held = [*model.parameters(), *model.buffers()]
    live = _LiveBytes({t.untyped_storage()._cdata for t in held})
    batch, size = request.batch, request.image_size
    chunks = -(-batch // (runtime.encoder_chunk or batch))
    encoder = model.sam.image_encoder
    with (
        live,
        _fused_bands(live, _fuses_bands(runtime)),
        _bands_of_two_images(),
        _chunks_run_twice(encoder, chunks),
        _meta_autocast(),
        _Autocast(),
    ):
        images = torch.empty(batch, 3, size, size, device="meta")
        masks, prompts = _meta_targets(request)
        shape = (batch, *model.layout.shape)
        embeddings = torch.empty(shape, device="meta") if request.cache else None
        # accumulating, a micro-batch after the first runs with every gradient already held
        for _ in range(min(request.grad_accum, 2)):
            forward_backward(model, images, masks, embeddings, request.precision, prompts=prompts)
    trainable = model.trainable_parameters()
    gradients = sum(p.grad.nbytes for p in trainable if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return Counted(
        weights_mib=sum(t.nbytes for t in held) / MIB,
        trainable=sum(p.numel() for p in trainable),
        step_mib=live.peak / MIB,
        gradients_mib=gradients / MIB,
    )


def _meta_targets(request: PlanRequest) -> tuple[torch.Tensor, Prompts | None]:
    """A batch's masks as train's data set gives them (B x 1 x S x S, or class indices
    B x S x S), or per prompted object (B x N x S x S), and the objects' prompts."""
    batch, size, prompt = request.batch, request.image_size, request.prompt
    dtype = torch.long if request.classes > 1 else torch.float32
    if not prompt.prompted:
        shape = (batch, size, size) if request.classes > 1 else (batch, 1, size, size)
        return torch.empty(shape, device="meta", dtype=dtype), None
    objects, points = prompt.per_image, prompt.points + prompt.negatives
    masks = torch.empty(batch, objects, size, size, device="meta", dtype=dtype)
    boxes = torch.empty(batch, objects, 4, device="meta") if prompt.uses_box else None
    if not prompt.uses_points:
        return masks, Prompts(boxes=boxes)
    coords = torch.empty(batch, objects, points, 2, device="meta")
    labels = torch.empty(batch, objects, points, device="meta", dtype=torch.long)
    return masks, Prompts(boxes=boxes, points=coords, labels=labels)


# -- the prediction ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def load_constants(path: Path = CONSTANTS) -> dict[str, Any]:
    """The fitted constants and measured speeds (benchmarks/plan_constants.py); empty where
    the file is missing: the counts alone, no speeds."""
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def overhead_mib(kind: str, precision: str, family: str, constants: dict[str, Any]) -> float:
    """The fitted constant for a runtime kind, precision and family; where the benchmarks
    measured no such row, the constant pooled over the kind and family (either precision),
    then over the kind and precision, then over the kind."""
    fitted = constants.get("overhead_mib", {})
    keys = (f"{kind}/{precision}/{family}", f"{kind}/{family}", f"{kind}/{precision}", kind)
    for key in keys:
        if key in fitted:
            return float(fitted[key])
    return 0.0


def predict_memory(
    request: PlanRequest, gpu_mib: float | None = None, constants: dict[str, Any] | None = None
) -> MemoryEstimate:
    """Peak allocated GPU memory of ``request``'s training, on a GPU of ``gpu_mib`` if given
    (which decides ``auto``'s runtime, and whether its CUDA graph's capture fits)."""
    constants = load_constants() if constants is None else constants
    runtime = plan_runtime(request, gpu_mib)
    counted = count_step(request.with_batch(request.batch), runtime)  # one key per batch
    adamw = 2 * counted.gradients_mib  # two states per parameter that gets a gradient
    if runtime.cuda_graph and gpu_mib is not None:
        # GraphedStep captures only where its pool (CAPTURE_POOL_FACTOR x the step) is free
        from .fast.graphs import CAPTURE_POOL_FACTOR

        need = counted.weights_mib + adamw + CAPTURE_POOL_FACTOR * counted.step_mib
        if need > usable_mib(gpu_mib) and dict(request.settings).get("cuda_graph") is not True:
            runtime = runtime.replace(cuda_graph=False)
    kind = runtime_kind(request, runtime)
    estimate = MemoryEstimate(
        runtime=request.runtime,
        runtime_settings=runtime.changes(),
        batch=request.batch,
        weights_mib=counted.weights_mib,
        optimiser_mib=adamw + counted.gradients_mib,
        activations_mib=max(counted.step_mib - counted.gradients_mib, 0.0),
        overhead_mib=overhead_mib(kind, request.precision, request.family, constants),
        cuda_graph=bool(runtime.cuda_graph),
        gpu_mib=gpu_mib,
    )
    if gpu_mib is None:
        return estimate
    return dataclasses.replace(estimate, fits=estimate.total_mib <= usable_mib(gpu_mib))


EXACT_UP_TO = 16  # largest_batch counts batches up to this


def largest_batch(request: PlanRequest, gpu_mib: float, limit: int = EXACT_UP_TO) -> int:
    """The largest batch up to ``limit`` that fits ``gpu_mib`` (0: not even one image), each
    candidate counted. Memory grows about linearly with the batch, so the line through the
    counts at the request's batch and twice it (one image and the request's batch, where that
    does not fit) starts the search. Past ``limit`` a line is no answer (``auto``'s choices
    change with the batch): a result of ``limit`` means "``limit`` or more"."""

    def fits(batch: int) -> bool:
        return bool(predict_memory(request.with_batch(batch), gpu_mib).fits)

    base = max(request.batch, 2)
    if fits(base):  # then one image fits too: no count of it
        first, second = base, 2 * base
    elif fits(1):
        first, second = 1, base
    else:
        return 0
    low, high = (predict_memory(request.with_batch(b), gpu_mib).total_mib for b in (first, second))
    slope = max((high - low) / (second - first), 1e-3)
    batch = int(min(max(first + (usable_mib(gpu_mib) - low) // slope, 1), limit))
    while batch > 1 and not fits(batch):
        batch -= 1
    while batch < limit and fits(batch + 1):
        batch += 1
    return batch


# -- speed, as measured -----------------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredSpeed:
    """Images/s of the benchmark row nearest a request: measured on ``gpu`` only."""

    images_per_second: float
    gpu: str
    variant: str
    batch: int
    image_size: int
    source: str  # the results folder

    def describe(self) -> str:
        return (
            f"{self.images_per_second:,.1f} images/s measured on {self.gpu} "
            f"({self.variant}, batch {self.batch}, {self.image_size} px; {self.source})"
        )


def speed_from_bench(
    request: PlanRequest, rows: list[dict[str, Any]] | None = None
) -> MeasuredSpeed | None:
    """The measured speed of the benchmark row nearest ``request``: the same method, backbone,
    cache or not, precision, runtime, classes, prompt (and objects per image) and graph or
    eager step, at the nearest batch. None where no such row was measured (none accumulates
    gradients): a speed is never made up for another setting."""
    rows = load_constants().get("speeds", []) if rows is None else rows
    if request.grad_accum != 1:
        return None
    prompted = request.prompt.prompted  # eager, as train runs it: no graph replays it
    eager = dict(request.settings).get("cuda_graph") is False and not prompted
    same = [
        row
        for row in rows
        if (row["method"], row["backbone"], row["cache"], row["precision"], row["runtime"])
        == (request.method, request.backbone, request.cache, request.precision, request.runtime)
        and row.get("classes", 1) == request.classes
        and row.get("eager", False) == eager
        and row.get("prompt", "whole") == request.prompt.kind
        and row.get("prompts_per_image", 1) == (request.prompt.per_image if prompted else 1)
    ]
    if not same:
        return None
    row = min(same, key=lambda r: (abs(r["batch"] - request.batch), r["source"]))
    return MeasuredSpeed(
        images_per_second=row["images_per_second"],
        gpu=row["gpu"],
        variant=row["variant"],
        batch=row["batch"],
        image_size=row.get("image_size", DEFAULT_IMAGE_SIZE),
        source=row["source"],
    )


# -- what to run ------------------------------------------------------------------------------


def train_command(request: PlanRequest) -> str:
    """The ``cadsam train`` command line of ``request`` (data and run folder left to fill)."""
    words = ["cadsam", "train", "--method", request.method, "--backbone", request.backbone]
    words += ["--images", "IMAGES", "--masks", "MASKS", "--out", "RUN"]
    words += ["--batch-size", str(request.batch)]
    if request.image_size != DEFAULT_IMAGE_SIZE:
        words += ["--image-size", str(request.image_size)]
    if request.classes > 1:
        words += ["--classes", str(request.classes)]
    if request.prompt.prompted:
        words += ["--prompt", request.prompt.kind]
    if request.cache:
        words += ["--cache", "CACHE"]
    if request.precision != "fp32":
        words += ["--precision", request.precision]
    if request.runtime != "auto":
        words += ["--runtime", request.runtime]
    settings = {**dict(request.options), **dict(request.settings)}
    if request.grad_accum != 1:
        settings["grad_accum"] = request.grad_accum
    settings |= _prompt_settings(request.prompt)
    for name, value in settings.items():
        words += ["--set", f"{name}={str(value).lower() if isinstance(value, bool) else value}"]
    return " ".join(words)


def _prompt_settings(prompt: PromptSettings) -> dict[str, Any]:
    """train's ``--set`` values of the prompt's settings that differ from its defaults."""
    if not prompt.prompted:
        return {}
    return {
        name: getattr(prompt, field)
        for field, name in PROMPT_TRAIN_NAMES.items()
        if getattr(prompt, field) != getattr(WHOLE_IMAGE, field)
    }


@dataclass(frozen=True)
class Recommendation:
    request: PlanRequest  # what to train: the request, or the nearest that fits
    estimate: MemoryEstimate | None  # None: nothing fits
    why: str

    @property
    def command(self) -> str | None:
        return train_command(self.request) if self.estimate is not None else None


def recommend(request: PlanRequest, gpu_mib: float) -> Recommendation:
    """The fastest way to train ``request`` on a GPU of ``gpu_mib``: its own runtime if it
    fits, else ``lean`` at its batch, else ``lean`` at the largest batch that fits."""
    estimate = predict_memory(request, gpu_mib)
    if estimate.fits:
        return Recommendation(request, estimate, f"fits with runtime {request.runtime}")
    if request.runtime != "lean":
        lean = dataclasses.replace(request, runtime="lean")
        estimate = predict_memory(lean, gpu_mib)
        if estimate.fits:
            return Recommendation(lean, estimate, "fits with runtime lean (the least memory)")
        request = lean
    batch = largest_batch(request, gpu_mib)
    if batch == 0:
        why = "not even one image fits with runtime lean"
        if request.family in ("cad", "decoder"):
            why += "; from an embedding cache (--cache) the encoder stays off the GPU"
        return Recommendation(request, None, why)
    smaller = request.with_batch(batch)
    return Recommendation(
        smaller, predict_memory(smaller, gpu_mib), f"fits with runtime lean at batch {batch}"
    )


def refusal(request: PlanRequest, free_mib: float, where: str) -> str | None:
    """Why ``train`` should not start ``request`` with ``free_mib`` free on the GPU ``where``
    (in one line, naming what fits), or None where it fits. ``free_mib`` is measured with this
    process's CUDA context already made, so the context is not taken from it again."""
    gpu_mib = free_mib + load_constants().get("context_mib", 0.0)
    estimate = predict_memory(request, gpu_mib)
    if estimate.fits:
        return None
    advice = recommend(request, gpu_mib)
    fix = f"{advice.why}: {advice.command}" if advice.command else advice.why
    return (
        f"this run needs about {estimate.total_mib:,.0f} MiB of GPU memory and {where} has "
        f"{free_mib:,.0f} MiB free (cadsam plan counts it); {fix}"
    )
