"""``cadsam bench``: peak GPU memory and training speed per method, laid out like the paper's
Tables 1-2, with the paper's figures beside ours.

Each (backbone, variant, precision) runs in a fresh process, so one run's cached allocations
never count against another. A run is the paper's training step at the paper's settings:
encoder input 1024, adapter input 512, batch 4 (vit_b) or 2 (vit_h), whole-image box,
BCE + IoU loss, AdamW. Weights are random: memory and speed do not depend on their values.
"""

from __future__ import annotations

import argparse
import datetime
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

from .errors import CadsamError
from .figures import pyplot
from .methods import AdaptedSam, build_model
from .paper import AUTHORS_CODE_H100_MIB, MEMORY_TABLES
from .runtime import Runtime, named_runtime

# variant -> (method, runtime, its settings, trains from cached embeddings). A variant is named
# by its method and runtime: none for "auto" (the commands' default), "-lean" (the least
# memory), "-plain" (the reference formulation, which reproduces what the authors' code
# allocates); "-cache": from cached embeddings, no encoder (the paper's section 5); "-graph":
# the step replayed as a CUDA graph (cadsam train --set cuda_graph=true).
VARIANTS: dict[str, tuple[str, str, dict[str, Any], bool]] = {
    "decoder-plain": ("decoder", "plain", {}, False),
    "decoder": ("decoder", "auto", {}, False),
    "decoder-lean": ("decoder", "lean", {}, False),
    "cad-plain": ("cad", "plain", {}, False),
    "cad": ("cad", "auto", {}, False),
    "cad-lean": ("cad", "lean", {}, False),
    "cad-cache": ("cad", "auto", {}, True),
    "cad-cache-lean": ("cad", "lean", {}, True),
    "cad-cache-graph": ("cad", "auto", {"cuda_graph": True}, True),
    "sam-adapter-paper-plain": ("sam-adapter-paper", "plain", {}, False),
    "sam-adapter-paper": ("sam-adapter-paper", "auto", {}, False),
    "sam-adapter-paper-lean": ("sam-adapter-paper", "lean", {}, False),
    "sam-adapter": ("sam-adapter", "auto", {}, False),
    "sam-adapter-lean": ("sam-adapter", "lean", {}, False),
    "lora": ("lora", "auto", {}, False),
    "lora-lean": ("lora", "lean", {}, False),
}
WARMUP = 3  # untimed steps first: compilation, cuDNN's choices
PAPER_BATCH = {"vit_b": 4, "vit_l": 4, "vit_h": 2, "vit_tiny": 4}
MIB = 2**20


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
    variant: str, overrides: dict[str, Any] | None = None, device: str = "cuda"
) -> tuple[str, Runtime, bool]:
    """A bench variant's method, its runtime on ``device`` (``overrides``: runtime settings
    replacing the variant's), and whether it trains from cached embeddings."""
    method, name, settings, from_cache = VARIANTS[variant]
    runtime, _ = named_runtime(name, device)
    return method, runtime.replace(**{**settings, **(overrides or {})}), from_cache


def warmed_step(
    variant: str, precision: str, overrides: dict[str, Any] | None = None, backbone: str = "vit_b"
) -> tuple[Callable[[], None], dict[str, Any]]:
    """A variant's training step on the GPU after its warm-up steps, and its runtime settings:
    what the profiling scripts in ``benchmarks/`` look at."""
    method, runtime, from_cache = variant_runtime(variant, overrides)
    with torch.device("cuda"):
        model = build_model(method, backbone, with_encoder=not from_cache, runtime=runtime)
    step = bench_step(model, precision, from_cache)
    for _ in range(WARMUP + runtime.cuda_graph):
        step()
    torch.cuda.synchronize()
    return step, runtime.changes()


def bench_step(model: AdaptedSam, precision: str, from_cache: bool) -> Callable[[], torch.Tensor]:
    """One training step at the paper's settings (batch, 512 x 512 images, whole-image box,
    BCE + IoU, AdamW) on seeded random data, on the model's device; with the runtime's
    ``cuda_graph``: three eager calls, then captured as a CUDA graph and replayed
    (:class:`~cadsam.fast.graphs.GraphedStep`)."""
    from .fast.graphs import adamw
    from .train import training_step

    graphed = model.runner.runtime.cuda_graph
    batch = PAPER_BATCH[model.backbone]
    device = next(model.parameters()).device
    model.train()
    optimizer = adamw(model.trainable_parameters(), lr=2e-4, weight_decay=0.01, graphed=graphed)
    generator = torch.Generator(device).manual_seed(0)
    images = torch.rand(batch, 3, 512, 512, device=device, generator=generator) * 255
    masks = (torch.rand(batch, 1, 512, 512, device=device, generator=generator) > 0.5).float()
    grid = model.sam.prompt_encoder.image_embedding_size[0]
    embeddings = (
        torch.randn(batch, 256, grid, grid, device=device, generator=generator)
        if from_cache
        else None
    )
    step = training_step(model, optimizer, precision, graphed)
    return lambda: step(images, masks, embeddings)


def measure_training(
    backbone: str,
    variant: str,
    precision: str,
    steps: int = 10,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One variant's training step on the current CUDA device: peak memory and images/s.
    ``overrides``: runtime settings that replace the variant's."""
    method, runtime, from_cache = variant_runtime(variant, overrides)
    graphed = runtime.cuda_graph
    batch = PAPER_BATCH[backbone]
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        model = build_model(method, backbone, with_encoder=not from_cache, runtime=runtime)
    weights_mib = torch.cuda.memory_allocated() / MIB
    step = bench_step(model, precision, from_cache)
    warmup = WARMUP + graphed  # a graphed step is captured on the call after its warm-up

    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    counts = model.parameter_counts()
    return {
        "backbone": backbone,
        "variant": variant,
        "method": method,
        "runtime": runtime.changes(),
        "overrides": overrides or {},
        "from_cache": from_cache,
        "cuda_graph": graphed,
        "precision": precision,
        "batch": batch,
        "trainable": counts["trainable"],
        "weights_mib": round(weights_mib, 1),
        "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MIB, 1),
        "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / MIB, 1),
        **{k: (round(v, 1) if v is not None else None) for k, v in _nvml_mib().items()},
        "images_per_second": round(batch / statistics.median(times), 2),
    }


@torch.no_grad()
def measure_encoder(
    backbone: str, precision: str, batch: int = 16, steps: int = 10
) -> dict[str, Any]:
    """The frozen encoder's forward rate (what building an embedding cache is bound by)."""
    from .precision import autocast
    from .sam import build_sam

    device = torch.device("cuda")
    with device:  # fused attention, the whole batch at once: what the cache build runs
        encoder = build_sam(backbone, fused_attention=True).image_encoder.eval()
    x = torch.randn(batch, 3, encoder.img_size, encoder.img_size, device=device)
    times = []
    for i in range(3 + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(device, precision):
            encoder(x)
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
        "commit": git_commit(),
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


def git_commit() -> str | None:
    """The checkout's commit (with "+changes" if its tracked files differ), if in one."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _label(r: dict[str, Any]) -> str:
    """The variant's name, with any options set by ``--set``."""
    overrides = r.get("overrides") or {}
    return " ".join([r["variant"], *(f"{k}={v}" for k, v in overrides.items())])


def _run_isolated(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "cadsam.bench", json.dumps(job)], capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        out_of_memory = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
        return {**job, "error": "out of memory" if out_of_memory else tail}
    return json.loads(lines[-1])


def run_bench(
    backbones: list[str],
    variants: list[str],
    precisions: list[str],
    out: Path,
    steps: int = 10,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each (backbone, variant, precision) in a fresh process; ``overrides``: runtime settings
    set in every variant."""
    unknown = sorted(set(variants) - set(VARIANTS) - {"encoder-forward"})
    if unknown:
        raise CadsamError(
            f"unknown bench variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}, encoder-forward"
        )
    overrides = overrides or {}
    Runtime().replace(**overrides)  # a bad name or value is an error before any run
    for variant in variants:
        if overrides and variant != "encoder-forward":
            settings = VARIANTS[variant][2]
            for name, value in overrides.items():
                if name in settings and settings[name] != value:
                    raise CadsamError(
                        f"--set {name}={value} contradicts variant {variant}, which is "
                        f"defined by {name}={settings[name]}: leave it out of --methods"
                    )
    if not torch.cuda.is_available():
        raise CadsamError("cadsam bench measures GPU memory and needs a CUDA GPU; none is visible")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        {"backbone": b, "variant": v, "precision": p, "steps": steps, "overrides": overrides}
        for b in backbones
        for p in precisions
        for v in variants
    ]
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
                f"{job['backbone']:>8} {_label(job):<24} {job['precision']:<5} {shown}",
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
        "| backbone | variant | precision | batch | trainable | paper (A100, MiB) | authors' code (H100, MiB) "
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
        authors = AUTHORS_CODE_H100_MIB.get(key, "") if paper != "" else ""
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
        )
    print(json.dumps(result), flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbones", nargs="+", default=["vit_b", "vit_h"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[*VARIANTS, "encoder-forward"],
        dest="variants",
        metavar="VARIANT",
        help=f"any of: {', '.join(VARIANTS)}, encoder-forward",
    )
    parser.add_argument(
        "--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"]
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps after 3 warm-up steps")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="OPTION=VALUE",
        help="set a runtime setting in every variant, e.g. --set adapter_tile_mib=32 "
        "(repeatable; see cadsam.runtime.Runtime)",
    )
    parser.add_argument(
        "--out", default="bench", help="folder for bench.json, bench.md, bench_memory.png"
    )


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
