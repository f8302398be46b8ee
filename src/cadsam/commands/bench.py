"""``cadsam bench``: peak GPU memory and training speed per method, laid out like the paper's
Tables 1-2, with the paper's figures beside ours.

Each (backbone, variant, precision) runs in a fresh process, so one run's cached allocations
never count against another. A run is the paper's training step at the paper's settings:
512 x 512 images as ``cadsam train`` feeds them (encoder input 1024, adapter input 512),
batch 4 (vit_b) or 2 (vit_h), whole-image box, BCE + IoU loss, AdamW. Weights are random:
memory and speed do not depend on their values.

SAM 2.1 backbones run the same step (batch 4, or 2 for ``sam2.1_hiera_l``; the paper has no
figures for them); SAM-Adapter's variants are SAM 1 only.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..backbones import DEFAULT_BATCH, DEFAULT_IMAGE_SIZE, backbone_config
from ..data.labels import class_table
from ..data.prompts import PromptSettings
from ..errors import CadsamError
from ..fast.runtime import (
    Runtime,
    named_runtime,
    replays_whole_steps,
    settle_cuda_graph,
    settle_frozen_bf16,
)
from ..methods import (
    SAM1_ONLY_WHY,
    AdaptedSam,
    build_model,
    check_runtime_settings,
    resolve_options,
    runs_on,
)
from ..methods.prompting import Prompts
from ..precision import autocast
from ..provenance import provenance
from . import common, flags
from .figures import pyplot
from .paper import AUTHORS_CODE_DEVICE, AUTHORS_CODE_MIB, MEMORY_TABLES, PAPER_DEVICE

# variant -> (method, runtime, its settings, trains from cached embeddings). A variant is named
# by its method and runtime: none for "auto" (the commands' default), "-lean" (the least
# memory), "-plain" (the reference formulation, which reproduces what the authors' code
# allocates); "-cache": from cached embeddings, no encoder (the paper's section 5); "-eager":
# the step launched kernel by kernel, where ``auto`` replays CAD's as a CUDA graph
# (cadsam train --set cuda_graph=false); "-boxN": N objects an image, each prompted by its
# box (cadsam train --prompt box --set prompts_per_image=N), eager as train runs it.
VARIANTS: dict[str, tuple[str, str, dict[str, Any], bool]] = {
    "decoder-plain": ("decoder", "plain", {}, False),
    "decoder": ("decoder", "auto", {}, False),
    "decoder-lean": ("decoder", "lean", {}, False),
    "cad-plain": ("cad", "plain", {}, False),
    "cad": ("cad", "auto", {}, False),
    "cad-lean": ("cad", "lean", {}, False),
    "cad-eager": ("cad", "auto", {"cuda_graph": False}, False),
    "cad-cache": ("cad", "auto", {}, True),
    "cad-cache-lean": ("cad", "lean", {}, True),
    "cad-cache-eager": ("cad", "auto", {"cuda_graph": False}, True),
    "sam-adapter-paper-plain": ("sam-adapter-paper", "plain", {}, False),
    "sam-adapter-paper": ("sam-adapter-paper", "auto", {}, False),
    "sam-adapter-paper-lean": ("sam-adapter-paper", "lean", {}, False),
    "sam-adapter": ("sam-adapter", "auto", {}, False),
    "sam-adapter-lean": ("sam-adapter", "lean", {}, False),
    "lora": ("lora", "auto", {}, False),
    "lora-lean": ("lora", "lean", {}, False),
    "cad-k12": ("cad", "auto", {}, False),
    "cad-cache-k12": ("cad", "auto", {}, True),
    "decoder-box8": ("decoder", "auto", {}, False),
    "cad-box8": ("cad", "auto", {}, False),
}
# "-kK": K classes (the decoder's K output tokens, cross-entropy + Dice) beside the binary task
VARIANT_CLASSES = {"cad-k12": 12, "cad-cache-k12": 12}
VARIANT_PROMPTS = {v: PromptSettings("box", per_image=8) for v in ("decoder-box8", "cad-box8")}
WARMUP = 3  # untimed steps first: compilation, cuDNN's choices
# The images a training step gets: cadsam train's default --image-size. The model resizes them
# to its encoder's square itself (SAM 2.1 without padding) and CAD's adapter to adapter_size.
IMAGE_SIZE = DEFAULT_IMAGE_SIZE
ENCODER_BATCH = 16  # images per frozen-encoder call in encoder-forward
MIB = 2**20


def variant_runs_on(variant: str, backbone: str) -> bool:
    """Whether ``variant``'s method exists on ``backbone`` (:func:`cadsam.methods.runs_on`)."""
    return variant not in VARIANTS or runs_on(VARIANTS[variant][0], backbone)


def default_variants(backbone: str) -> list[str]:
    """What ``cadsam bench`` measures on ``backbone`` when no --variants are given."""
    return [v for v in [*VARIANTS, "encoder-forward"] if variant_runs_on(v, backbone)]


def _nvml_mib() -> dict[str, float | None]:
    """This process's GPU memory as the driver sees it (what nvidia-smi shows), if NVML is
    there; also the whole device's use, since containers may hide process ids."""
    try:
        import pynvml
    except ImportError:
        return {"nvml_process_mib": None, "nvml_device_used_mib": None}
    pynvml.nvmlInit()
    try:
        index = torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / MIB
        mine = [
            p.usedGpuMemory / MIB
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.pid == os.getpid() and p.usedGpuMemory is not None
        ]
        return {"nvml_process_mib": mine[0] if mine else None, "nvml_device_used_mib": used}
    finally:
        pynvml.nvmlShutdown()


def variant_runtime(
    variant: str,
    backbone: str,
    overrides: dict[str, Any] | None = None,
    device: str = "cuda",
    precision: str | None = None,
) -> tuple[str, Runtime, bool]:
    """A bench variant's method, its runtime on ``device`` for ``backbone`` in ``precision``
    (``overrides``: runtime settings replacing the variant's), and whether it trains from
    cached embeddings. A step repeated is a long job: compilation is not weighed."""
    method, name, settings, from_cache = VARIANTS[variant]
    runtime, _ = named_runtime(name, device)
    runtime = runtime.replace(**{**settings, **(overrides or {})})
    training, device = (method, backbone), torch.device(device)
    whole_steps = replays_whole_steps(prompted=variant in VARIANT_PROMPTS)
    runtime = settle_cuda_graph(runtime, device, training, whole_steps)
    runtime = settle_frozen_bf16(runtime, device, precision)
    return method, runtime, from_cache


def warmed_step(
    variant: str, precision: str, overrides: dict[str, Any] | None = None, backbone: str = "vit_b"
) -> tuple[Callable[[], None], dict[str, Any]]:
    """A variant's training step on the GPU after its warm-up steps, and its runtime settings:
    what the profiling scripts in ``benchmarks/`` look at."""
    method, runtime, from_cache = variant_runtime(variant, backbone, overrides, precision=precision)
    with torch.device("cuda"):
        model = _variant_model(variant, method, backbone, from_cache, runtime)
    step = bench_step(model, precision, from_cache, prompt=VARIANT_PROMPTS.get(variant))
    for _ in range(WARMUP + runtime.cuda_graph):
        step()
    torch.cuda.synchronize()
    return step, runtime.changes()


def _variant_model(
    variant: str,
    method: str,
    backbone: str,
    from_cache: bool,
    runtime: Runtime,
    options: dict[str, Any] | None = None,
) -> AdaptedSam:
    classes = class_table(VARIANT_CLASSES.get(variant))
    return build_model(
        method,
        backbone,
        with_encoder=not from_cache,
        runtime=runtime,
        classes=classes,
        **(options or {}),
    )


def bench_batch(
    model: AdaptedSam, from_cache: bool, batch: int | None = None, image_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Seeded random data for one step, as ``cadsam train`` feeds it: ``batch`` images (RGB in
    0..255; None: the paper's batch) and masks (class indices for several classes) of
    ``image_size`` pixels (None: :data:`IMAGE_SIZE`), and from a cache what a cache row holds,
    packed as the model's decoder reads it (``model.layout``: SAM's embedding, or SAM 2.1's
    embedding and high-resolution maps in one row), float32 as the training loader gives it."""
    batch = batch or DEFAULT_BATCH[model.backbone]
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(0)
    size = (image_size or IMAGE_SIZE,) * 2
    images = torch.rand(batch, 3, *size, device=device, generator=generator) * 255
    if model.classes is None:
        masks = (torch.rand(batch, 1, *size, device=device, generator=generator) > 0.5).float()
    else:  # class indices, as a label map's loader gives them
        count = model.classes.count
        masks = torch.randint(count, (batch, *size), device=device, generator=generator)
    embeddings = None
    if from_cache:
        shape = (batch, *model.layout.shape)
        embeddings = torch.randn(shape, device=device, generator=generator)
    return images, masks, embeddings


def bench_step(
    model: AdaptedSam,
    precision: str,
    from_cache: bool,
    only_if_it_fits: bool = False,
    batch: int | None = None,
    image_size: int | None = None,
    prompt: PromptSettings | None = None,
) -> functools.partial[torch.Tensor]:
    """One training step at the paper's settings (its batch, 512 x 512 images, whole-image
    box, BCE + IoU, AdamW; or ``batch``, ``image_size`` and a ``prompt`` per object) on seeded
    random data (:func:`bench_batch`, :func:`bench_objects`), on the model's device; with the
    runtime's ``cuda_graph``: three eager calls, then captured as a CUDA graph and replayed
    (:class:`~cadsam.fast.graphs.GraphedStep`, the step's ``func``), eager instead where
    ``only_if_it_fits`` and the capture would not fit, as ``cuda_graph=auto`` trains."""
    from ..fast.graphs import adamw
    from ..step import training_step

    graphed = model.runner.runtime.cuda_graph
    model.train()
    optimizer = adamw(model.trainable_parameters(), lr=2e-4, weight_decay=0.01, graphed=graphed)
    images, masks, embeddings = bench_batch(model, from_cache, batch, image_size)
    step = training_step(model, optimizer, precision, graphed, only_if_it_fits)
    if prompt is None or not prompt.prompted:
        return functools.partial(step, images, masks, embeddings)
    masks, prompts = bench_objects(masks, prompt)
    return functools.partial(step, images, masks, embeddings, prompts)


def bench_objects(masks: torch.Tensor, prompt: PromptSettings) -> tuple[torch.Tensor, Prompts]:
    """Seeded random objects for a prompted step, as train's data set gives them: each image's
    ``prompt.per_image`` masks (B x N x S x S) and a box each, inside the image; binary task."""
    assert masks.dim() == 4 and prompt.kind == "box", "bench prompts binary masks by boxes"
    batch, size, device = masks.shape[0], masks.shape[-1], masks.device
    generator = torch.Generator(device).manual_seed(1)
    shape = (batch, prompt.per_image)
    objects = (torch.rand(*shape, size, size, device=device, generator=generator) > 0.5).float()
    corner = torch.rand(*shape, 2, device=device, generator=generator) * size / 2
    extent = (torch.rand(*shape, 2, device=device, generator=generator) * 0.75 + 0.25) * size / 2
    return objects, Prompts(boxes=torch.cat([corner, corner + extent], dim=-1))


def measure_training(
    backbone: str,
    variant: str,
    precision: str,
    steps: int = 10,
    overrides: dict[str, Any] | None = None,
    shape: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One variant's training step on the current CUDA device: peak memory and images/s.
    ``overrides``: runtime settings that replace the variant's; ``shape``: ``batch``,
    ``image_size`` and model options where not the paper's."""
    shape = shape or {}
    method, runtime, from_cache = variant_runtime(variant, backbone, overrides, precision=precision)
    batch = shape.get("batch") or DEFAULT_BATCH[backbone]
    image_size = shape.get("image_size") or IMAGE_SIZE
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        model = _variant_model(variant, method, backbone, from_cache, runtime, shape_options(shape))
    weights_mib = torch.cuda.memory_allocated() / MIB
    pinned = (overrides or {}).get("cuda_graph") is True  # as cadsam train --set cuda_graph=true
    prompt = VARIANT_PROMPTS.get(variant)
    step = bench_step(model, precision, from_cache, not pinned, batch, image_size, prompt)
    warmup = WARMUP + runtime.cuda_graph  # a graphed step is captured after its warm-up

    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    graphed = getattr(step.func, "graph", None) is not None  # captured, not declined
    counts = model.parameter_counts()
    return {
        "backbone": backbone,
        "variant": variant,
        "method": method,
        "runtime": runtime.changes(),
        "overrides": overrides or {},
        **({"shape": shape} if shape else {}),
        "from_cache": from_cache,
        "cuda_graph": graphed,
        "precision": precision,
        "batch": batch,
        "image_size": image_size,
        **({"prompt": prompt.kind, "prompts_per_image": prompt.per_image} if prompt else {}),
        "trainable": counts["trainable"],
        "weights_mib": round(weights_mib, 1),
        "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MIB, 1),
        "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / MIB, 1),
        **{k: (round(v, 1) if v is not None else None) for k, v in _nvml_mib().items()},
        "images_per_second": round(batch / statistics.median(times), 2),
    }


def encoder_forward(
    backbone: str, precision: str, batch: int = ENCODER_BATCH, device: str = "cuda"
) -> Callable[[], torch.Tensor]:
    """The frozen image path a cache build runs, to be timed: the backbone's image encoder
    (fused attention, the whole batch per call, no autograd) on normalised input at its
    square, to what the decoder reads, as a cache row holds it (SAM: the embedding; SAM 2.1:
    the embedding with ``no_mem_embed`` and the high-resolution maps through
    ``conv_s0``/``conv_s1``, packed). The build's resizing and normalising are left out, so
    SAM's figure stays comparable with those measured before SAM 2.1."""
    torch_device = torch.device(device)
    with torch_device:  # built as cadsam cache builds it
        model = build_model("zero-shot", backbone, runtime=Runtime(fused_attention=True)).eval()
    size = backbone_config(backbone).image_size
    generator = torch.Generator(torch_device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=torch_device, generator=generator)

    @torch.no_grad()
    def forward() -> torch.Tensor:
        with autocast(torch_device, precision):
            return model.decoder_input(model.sam.image_encoder(x))

    return forward


def measure_encoder(
    backbone: str, precision: str, batch: int = ENCODER_BATCH, steps: int = 10
) -> dict[str, Any]:
    """The frozen image path's forward rate (what building an embedding cache is bound by)."""
    forward = encoder_forward(backbone, precision, batch)
    times = []
    for i in range(3 + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        forward()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return {
        "backbone": backbone,
        "variant": "encoder-forward",
        "precision": precision,
        "batch": batch,
        "images_per_second": round(batch / statistics.median(times), 2),
        "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MIB, 1),
    }


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "triton": _version("triton"),  # the first adapter block's kernels
        **provenance(),  # cadsam's version and its source's commit
        "command": " ".join(["cadsam", *sys.argv[1:]]) if sys.argv else "",
        "weights": "random (memory and speed do not depend on their values)",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception:
            info["driver"] = None
    return info


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _label(r: dict[str, Any]) -> str:
    """The variant's name, with any image or adapter size given and options set by ``--set``
    (the batch has its own column)."""
    shape = {k: v for k, v in (r.get("shape") or {}).items() if k != "batch"}
    given = {**shape, **(r.get("overrides") or {})}
    return " ".join([r["variant"], *(f"{k}={v}" for k, v in given.items())])


def _run_isolated(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "cadsam.commands.bench", json.dumps(job)],
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        out_of_memory = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
        return {**job, "error": "out of memory" if out_of_memory else tail}
    return json.loads(lines[-1])


def check_request(
    backbones: list[str], variants: list[str] | None, overrides: dict[str, Any]
) -> None:
    """Refuse, before any measurement, what no run could measure: unknown names, ``--set``
    settings that are bad or contradict a variant, SAM 1's methods on SAM 2.1."""
    for backbone in backbones:
        backbone_config(backbone)  # an unknown name is an error naming every backbone
    unknown = sorted(set(variants or []) - set(VARIANTS) - {"encoder-forward"})
    if unknown:
        raise CadsamError(
            f"unknown bench variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}, encoder-forward"
        )
    for backbone in backbones:
        for variant in variants or []:
            if not variant_runs_on(variant, backbone):
                raise CadsamError(
                    f"bench variant {variant} is SAM 1 only ({SAM1_ONLY_WHY}): leave it out of "
                    f"--variants for {backbone}"
                )
    Runtime().replace(**overrides)  # a bad name or value is an error before any run
    measured = variants if variants is not None else [*VARIANTS]
    for variant in measured:
        if overrides.get("cuda_graph") is True and variant in VARIANT_PROMPTS:
            raise CadsamError(
                f"--set cuda_graph=true: variant {variant} is prompted, and a graph replays the "
                "whole-image step only (as train refuses it with --prompt)"
            )
        if overrides and variant != "encoder-forward":
            method, _, settings, _ = VARIANTS[variant]
            check_runtime_settings(method, overrides)
            for name, value in overrides.items():
                if name in settings and settings[name] != value:
                    raise CadsamError(
                        f"--set {name}={value} contradicts variant {variant}, which is "
                        f"defined by {name}={settings[name]}: leave it out of --variants"
                    )


def shape_options(shape: dict[str, Any]) -> dict[str, Any]:
    """The model options in a step's ``shape`` (all but its batch and image size)."""
    return {name: value for name, value in shape.items() if name not in ("batch", "image_size")}


def check_shape(variants: list[str] | None, shape: dict[str, Any]) -> None:
    """A batch or image size below one, or a model option a variant's method does not take
    (or a bad value of one), is an error before any run."""
    for name, flag in (("batch", "--batch-size"), ("image_size", "--image-size")):
        if shape.get(name) is not None and shape[name] < 1:
            raise CadsamError(f"{flag} must be at least 1, not {shape[name]}")
    if not shape_options(shape):
        return
    for variant in variants if variants is not None else [*VARIANTS]:
        if variant != "encoder-forward":
            resolve_options(VARIANTS[variant][0], shape_options(shape))


def bench_jobs(
    backbones: list[str],
    variants: list[str] | None,
    precisions: list[str],
    steps: int,
    overrides: dict[str, Any],
    shape: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One job per (backbone, precision, variant); ``variants`` None: each backbone's
    :func:`default_variants`."""
    given = {"shape": shape} if shape else {}
    return [
        {"backbone": b, "variant": v, "precision": p, "steps": steps, "overrides": overrides}
        | given
        for b in backbones
        for p in precisions
        for v in (variants if variants is not None else default_variants(b))
    ]


def run_bench(
    backbones: list[str],
    variants: list[str] | None,
    precisions: list[str],
    out: Path,
    steps: int = 10,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    shape: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each (backbone, variant, precision) in a fresh process; ``variants`` None: every one
    that applies to each backbone; ``overrides``: runtime settings set in every variant;
    ``shape``: the step's ``batch``, ``image_size`` and model options where not the paper's."""
    overrides, shape = overrides or {}, shape or {}
    check_request(backbones, variants, overrides)
    check_shape(variants, shape)
    if not torch.cuda.is_available():
        raise CadsamError("cadsam bench measures GPU memory and needs a CUDA GPU; none is visible")
    out.mkdir(parents=True, exist_ok=True)
    jobs = bench_jobs(backbones, variants, precisions, steps, overrides, shape)
    width = max(map(len, backbones), default=0)
    results: list[dict[str, Any]] = []
    env = environment()
    for job in jobs:
        result = _run_isolated(job)
        results.append(result)
        if progress:
            shown = result.get("error") or (
                f"{result.get('peak_allocated_mib', '-')} MiB, {result['images_per_second']} images/s"
            )
            print(
                f"{job['backbone']:>{width}} {_label(job):<24} {job['precision']:<5} {shown}",
                flush=True,
            )
        # Rewritten after every run, so an interrupted bench still leaves what it measured.
        report = {"environment": env, "results": results}
        (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "bench.md").write_text(markdown_table(report))
    plot_memory(results, out / "bench_memory.png")
    return results


def markdown_table(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"| backbone | variant | precision | batch | trainable | paper ({PAPER_DEVICE}, MiB) "
        f"| authors' code ({AUTHORS_CODE_DEVICE}, MiB) "
        "| peak allocated (MiB) | peak reserved (MiB) | NVML process (MiB) | images/s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        if r.get("variant") == "encoder-forward":
            continue
        key = (r["backbone"], r.get("method", r["variant"]))
        # The paper's figure stands beside the method's own row and its plain reference.
        beside = r["variant"] == key[1] or r["variant"].endswith("-plain")
        paper = MEMORY_TABLES[key][1] if beside and key in MEMORY_TABLES else ""
        authors = AUTHORS_CODE_MIB.get(key, "") if paper != "" else ""
        if "error" in r:
            lines.append(
                f"| {r['backbone']} | {_label(r)} | {r['precision']} | | | {paper} | {authors} | {r['error']} | | | |"
            )
            continue
        nvml = r.get("nvml_process_mib") or ""
        lines.append(
            f"| {r['backbone']} | {_label(r)} | {r['precision']} | {r['batch']} | {r['trainable']:,} | {paper} "
            f"| {authors} | {r['peak_allocated_mib']:,.0f} | {r['peak_reserved_mib']:,.0f} | {nvml} | {r['images_per_second']} |"
        )
    encoder = [
        r for r in report["results"] if r.get("variant") == "encoder-forward" and "error" not in r
    ]
    if encoder:
        lines += [
            "",
            "| backbone | frozen encoder forward | precision | batch | images/s |",
            "| --- | --- | --- | ---: | ---: |",
        ]
        lines += [
            f"| {r['backbone']} | no autograd | {r['precision']} | {r['batch']} | {r['images_per_second']} |"
            for r in encoder
        ]
    header = (
        f"GPU: {env.get('gpu')}, driver {env.get('driver')}, torch {env['torch']} (CUDA {env['cuda']}), "
        f"{env['date']}. Command: `{env['command']}`. Weights: {env['weights']}.\n\n"
    )
    return header + "\n".join(lines) + "\n"


def plot_memory(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = [
        r for r in results if "peak_allocated_mib" in r and r.get("variant") != "encoder-forward"
    ]
    if not rows:
        return
    labels = [f"{r['backbone']} {_label(r)} {r['precision']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    ax.barh(labels, [r["peak_allocated_mib"] for r in rows], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("peak allocated GPU memory while training (MiB)")
    ax.set_title("Training memory by method (paper settings)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _child(job: dict[str, Any]) -> None:
    if job["variant"] == "encoder-forward":
        result = measure_encoder(job["backbone"], job["precision"])
    else:
        result = measure_training(
            job["backbone"],
            job["variant"],
            job["precision"],
            steps=job["steps"],
            overrides=job.get("overrides"),
            shape=job.get("shape"),
        )
    print(json.dumps(result), flush=True)


HELP = "Measure peak GPU memory and training speed per method (needs a CUDA GPU)."
RUNTIME_SUFFIXES = {"auto": "", "lean": "-lean", "plain": "-plain"}


def add_arguments(parser: argparse.ArgumentParser) -> None:

    flags.add(parser, "--backbones")
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="VARIANT",
        choices=[*VARIANTS, "encoder-forward"],
        help=f"methods under a runtime, any of: {', '.join(VARIANTS)}, encoder-forward "
        "(default: all; on SAM 2.1 all but SAM-Adapter's, which are SAM 1 only)",
    )
    flags.renamed(parser, "--methods", "--variants", "variants", nargs="+")
    flags.add(parser, "--precisions")
    flags.renamed(parser, "--precision", "--precisions", "precisions", nargs="+")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps")
    flags.add_all(parser, "--batch-size", "--image-size", "--runtime", "--set")
    flags.add(parser, "--out", metavar="DIR")
    parser.epilog = (
        "--backbones defaults to vit_b vit_h, --precisions to fp32 bf16, --out to bench; "
        "--batch-size to the paper's (4, or 2 for vit_h and sam2.1_hiera_l), --image-size to "
        f"{IMAGE_SIZE}. --runtime lean or plain measures each variant named without a runtime "
        "under it (cad as cad-lean); --set sets a runtime switch or a model option "
        "(adapter_size, lora_rank, ...) in every variant measured."
    )


def run(args: argparse.Namespace) -> None:

    out = args.out or "bench"
    options, overrides, _ = common.sorted_settings(args)
    shape = {"batch": args.batch_size, "image_size": args.image_size, **options}
    run_bench(
        args.backbones or ["vit_b", "vit_h"],
        under_runtime(args.variants, args.runtime_name or "auto"),
        args.precisions or ["fp32", "bf16"],
        Path(out),
        args.steps,
        overrides=overrides,
        shape={k: v for k, v in shape.items() if v is not None},
    )
    print(f"wrote {out}/bench.json, bench.md, bench_memory.png")


def under_runtime(variants: list[str] | None, runtime: str) -> list[str] | None:
    """The variants measured under ``runtime``: those named without a runtime take it."""

    if runtime == "auto" or variants is None:
        if variants is None and runtime != "auto":
            raise CadsamError(f"--runtime {runtime} needs --variants: the default list names each")
        return variants
    chosen = []
    for variant in variants:
        named = variant.endswith(("-lean", "-plain")) or variant == "encoder-forward"
        renamed = variant if named else variant + RUNTIME_SUFFIXES[runtime]
        if renamed not in VARIANTS and not named:
            raise CadsamError(f"--variants {variant} has no --runtime {runtime} form")
        chosen.append(renamed)
    return chosen


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
