"""The canonical benchmark run: every figure of BENCHMARKS.md's headline tables, from one
checkout of the code, into one results folder.

What it measures, each ``cadsam bench`` variant in a fresh process:

* Tables 1-2: the training step (peak memory, images/s) of each variant in ``VARIANTS`` on
  ViT-B (batch 4) and ViT-H (batch 2), in fp32 and bf16; the ``-plain`` reference rows in
  fp32 only, the precision of the paper's figures they reproduce;
* the frozen encoder's forward rate (``encoder-forward``), in bf16, the cache build's
  precision;
* the cache build rate of ``cadsam cache --compile`` (bf16, fp16 storage, random weights,
  synthetic 512 x 512 images): each cache is built for two numbers of images, and the extra
  images over the extra time leave the command's startup (checkpoint, loader workers,
  compilation) out. A first, untimed build fills the compiler's cache, so both timed builds
  start alike.

Results go to ``benchmarks/results/DATE_GPU_COMMIT/`` (or ``--out``): one subfolder per
``cadsam bench`` call, with its bench.json, and ``cache-BACKBONE/cache.json``; ``timings.jsonl``
logs how long each call took. ``python benchmarks/tables.py FOLDER`` then rewrites the
headline tables of BENCHMARKS.md from every JSON file in the folder.

In parts: ``--chunk K`` runs the K-th chunk of the canonical run (``--dry-run`` lists the
chunks and their commands), and ``--backbones``, ``--precision`` and ``--variants`` narrow any
selection. Parts write into the same folder: its name comes from the date, the GPU and the
commit; give it with ``--out`` when the parts run on different days, or ``--root`` to put it
elsewhere; ``--commit`` names the commit where the machine's copy of the checkout has no git
history to tell it.

A run goes on where an earlier one into the same folder stopped: a call whose report is in
the folder already, complete and of the same commit, is kept, not measured again (remove its
folder to measure it again). ``--within SECONDS`` starts only the calls whose estimate fits in
the time left and lists the rest, so that one command, repeated where each run may take only
minutes, completes the canonical run:

    python benchmarks/suite.py --out benchmarks/results/NAME --within 540   # again, until done

Duration on one H200, from ``ESTIMATE_S`` and ``CALL_S`` (measured there: a fresh process's
startup, compilation in the auto, lean and cache variants, 3 warm-up and ``--steps 5`` timed
steps; 10-80 s a variant): about 35 minutes in all, in chunks of at most 7.5 minutes
(ViT-B about 16, ViT-H 19, each with its cache build). Examples:

    python benchmarks/suite.py --dry-run                # the plan, chunk by chunk
    python benchmarks/suite.py --chunk 1 --out benchmarks/results/NAME
    python benchmarks/suite.py --backbones vit_b --precision bf16 --variants cad cad-cache

SAM 2.1 (``SAM2_BACKBONES``) is measured on request only, never in the canonical run: naming
one in ``--backbones`` makes the run that ``--chunk`` cuts the whole run of the backbones
named (every variant but SAM-Adapter's, which are SAM 1 only; the encoder's rate and the
cache build), batch 4 (2 for ``sam2.1_hiera_l``). Its estimates are guesses but for
Hiera-B+'s and Hiera-L's auto and cache kinds. The training rows of SAM 2.1 Hiera-B+ and
Hiera-L, about 18 minutes by those estimates (16 in the run of 9ef4f35; ``--within`` where a
command may run only a few minutes):

    python benchmarks/suite.py --backbones sam2.1_hiera_b+ sam2.1_hiera_l \
        --variants decoder cad cad-cache cad-cache-eager lora
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BACKBONES = ("vit_b", "vit_h")  # the canonical run's
# On request only (--backbones); cadsam.sam2.SAM2_CONFIGS's, but its test configuration.
SAM2_BACKBONES = ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l")
SAM1_ONLY = ("sam-adapter",)  # variants of these methods do not run on SAM 2.1
PRECISIONS = ("fp32", "bf16")
STEPS = 5
# The variants of ``cadsam bench`` the tables show, in their order. To measure a new one,
# add it here once ``cadsam bench`` has it (a name ending in -lean or -plain, or containing
# -cache, gets that kind's estimate; any other, auto's); tables.py shows whatever the results
# hold. Left to ``cadsam bench`` on request, to keep the run within two sessions of device
# time: the official SAM-Adapter (the paper's tables compare its re-implementation,
# ``sam-adapter-paper``) and CAD's eager step with the encoder (``cad-cache-eager`` shows what
# the graph saves; benchmarks/results/2026-12-01_H200_d462f86-diagnosis has ViT-B's).
VARIANTS = (
    "decoder-plain",
    "decoder",
    "decoder-lean",
    "sam-adapter-paper-plain",
    "sam-adapter-paper",
    "sam-adapter-paper-lean",
    "cad-plain",
    "cad",
    "cad-lean",
    "cad-cache",
    "cad-cache-lean",
    "cad-cache-eager",
    "lora",
    "lora-lean",
    "encoder-forward",
)
CACHE_BUILD = "cache-build"  # not a bench variant: cadsam cache, timed by this script
KINDS = ("plain", "auto", "lean", "cache", "encoder", CACHE_BUILD)  # see group()
# Seconds one variant takes on an H200, by backbone and kind (see group()): a call's time less
# CALL_S, over its variants, in the slower precision, rounded up to 5 s. Measured: ViT-B's
# and ViT-H's every kind (the canonical run of 8c39fe9, its timings.jsonl; the two cache builds,
# which include making a checkpoint and images, took 338 s together, split here by their timed
# builds), SAM 2.1 b+'s and l's auto and cache (the SAM 2.1 run of 9ef4f35, its timings.jsonl).
# SAM 2.1's other entries are ESTIMATES, NOT YET MEASURED, reasoned from the ViT rows: a step at 1024 px
# whose trunk is cheaper than ViT-B's (t, s) or near it (b+, batch 4), or between ViT-B's and
# ViT-H's (l, batch 2); the decoder reads two high-resolution maps as well, and compiling
# Hiera and that decoder may take longer. Rounded up; replace them with timings.jsonl's.
# fmt: off
ESTIMATE_S = {
    (backbone, kind): seconds
    for backbone, row in {
        #                  plain auto lean cache encoder cache-build
        "vit_b":           (15,  25,  25,  30,   10,     160),
        "vit_h":           (15,  50,  25,  25,   12,     200),
        "sam2.1_hiera_t":  (20,  50,  30,  30,   10,     200),
        "sam2.1_hiera_s":  (20,  50,  30,  30,   10,     200),
        "sam2.1_hiera_b+": (25,  40,  35,  40,   12,     220),
        "sam2.1_hiera_l":  (30,  55,  40,  40,   15,     260),
    }.items()
    for kind, seconds in zip(KINDS, row, strict=True)
}
# fmt: on
# A cadsam bench call's own start, and where its kind compiles, its first variant's
# compilation from a cold compiler cache (a fresh machine): seconds beyond ESTIMATE_S.
CALL_S = {"plain": 5, "encoder": 5, "auto": 30, "lean": 20, "cache": 20, CACHE_BUILD: 0}
CHUNK_S = 450  # a chunk's estimate at most: 7.5 minutes, room below a 9-minute limit

# The cache build: images timed (small, large: about 20 s more on an H200), batch per
# encoder call. SAM 2.1's sizes are ESTIMATES, NOT YET MEASURED: its rows are four times
# SAM's (below), so writing them bounds the rate: about 150 images/s guessed for t, s and b+,
# 80 for l, and fewer images, so that the largest cache fits a RAM disk.
CACHE_SIZES = {
    "vit_b": (512, 8704),
    "vit_h": (256, 2304),
    "sam2.1_hiera_t": (256, 2560),
    "sam2.1_hiera_s": (256, 2560),
    "sam2.1_hiera_b+": (256, 2560),
    "sam2.1_hiera_l": (128, 1408),
}
CACHE_BATCH = {
    "vit_b": 32,
    "vit_h": 16,
    "sam2.1_hiera_t": 32,
    "sam2.1_hiera_s": 32,
    "sam2.1_hiera_b+": 32,
    "sam2.1_hiera_l": 16,
}
CACHE_MODES = {"compiled": ["--compile"]}  # add "eager": [] for the command's default
DISTINCT_IMAGES = 64  # synthetic images, hard-linked under as many names as a build needs
# A cache row in float16: SAM's 256 x 64 x 64 embedding; SAM 2.1's with its high-resolution
# maps, 32 x 256 x 256 and 64 x 128 x 128 (cadsam.backbones.feature_layout).
MIB_PER_EMBEDDING = {"vit_b": 2, "vit_h": 2, **{b: 8 for b in SAM2_BACKBONES}}
# Random weights in the format --checkpoint reads: SAM's state dict; SAM 2.1's under "model".
SAVE_CHECKPOINT = (
    "import sys, torch\n"
    "from cadsam.backbones import build_base, is_sam2\n"
    "torch.manual_seed(0)\n"
    "with torch.device('cuda' if torch.cuda.is_available() else 'cpu'):\n"
    "    state = build_base(sys.argv[1]).state_dict()\n"
    "torch.save({'model': state} if is_sam2(sys.argv[1]) else state, sys.argv[2])\n"
)
ENVIRONMENT = (
    "import json; from cadsam.commands.bench import environment; print(json.dumps(environment()))"
)


@dataclass(frozen=True)
class Job:
    """One measurement: a bench variant (or the cache build) on a backbone in a precision."""

    backbone: str
    precision: str
    variant: str


def group(variant: str) -> str:
    """The kind of a variant, which sets its cost; one ``cadsam bench`` call runs one kind."""
    if variant == CACHE_BUILD:
        return CACHE_BUILD
    if variant == "encoder-forward":
        return "encoder"
    if variant.endswith("-plain"):
        return "plain"
    if "-cache" in variant:
        return "cache"
    return "lean" if variant.endswith("-lean") else "auto"


def precisions_for(variant: str) -> tuple[str, ...]:
    if variant.endswith("-plain"):
        return ("fp32",)
    return ("bf16",) if variant in ("encoder-forward", CACHE_BUILD) else PRECISIONS


def runs_on(variant: str, backbone: str) -> bool:
    """SAM-Adapter's variants are SAM 1 only (``cadsam bench`` refuses them on SAM 2.1)."""
    return not (backbone in SAM2_BACKBONES and variant.startswith(SAM1_ONLY))


def canonical_jobs(backbones: tuple[str, ...] = BACKBONES) -> list[Job]:
    """The whole canonical run (or the same run of ``backbones``), grouped by backbone,
    precision and kind."""
    jobs = []
    for backbone in backbones:
        for precision in PRECISIONS:
            for kind in KINDS:  # (the cache builds: below)
                jobs += [
                    Job(backbone, precision, v)
                    for v in VARIANTS
                    if group(v) == kind and precision in precisions_for(v) and runs_on(v, backbone)
                ]
    return jobs + [Job(b, "bf16", CACHE_BUILD) for b in backbones]


def plan_backbones(asked: list[str] | None) -> tuple[str, ...]:
    """The backbones of the run that ``--chunk`` cuts: the canonical run's, or where SAM 2.1
    backbones are asked for, those asked (SAM 2.1 is never in the canonical run)."""
    if asked and any(b in SAM2_BACKBONES for b in asked):
        return tuple(dict.fromkeys(asked))
    return BACKBONES


def estimate(job: Job) -> float:
    return ESTIMATE_S.get((job.backbone, group(job.variant)), 60)


def calls_of(jobs: list[Job]) -> list[list[Job]]:
    """``jobs`` as ``cadsam bench`` calls, one per backbone, precision and kind; and each
    cache build on its own."""
    calls: dict[tuple[str, str, str], list[Job]] = {}
    for i, job in enumerate(jobs):
        kind = group(job.variant)
        key = (job.backbone, job.precision, kind if kind != CACHE_BUILD else f"{kind}{i}")
        calls.setdefault(key, []).append(job)
    return list(calls.values())


def call_estimate(call: list[Job]) -> float:
    return sum(map(estimate, call)) + CALL_S[group(call[0].variant)]


def plan_seconds(jobs: list[Job]) -> float:
    return sum(map(call_estimate, calls_of(jobs)))


def chunks(jobs: list[Job], limit: float = CHUNK_S) -> list[list[Job]]:
    """``jobs`` cut into as few runs as first-fit packing finds, each estimated at ``limit``
    at most, each in the jobs' order. A ``cadsam bench`` call's jobs stay together unless
    they alone exceed the limit."""
    calls: list[list[Job]] = []
    for call in calls_of(jobs):
        calls.append([])
        for job in call:
            if calls[-1] and call_estimate([*calls[-1], job]) > limit:
                calls.append([])
            calls[-1].append(job)
    bins: list[list[int]] = []
    for i in sorted(range(len(calls)), key=lambda i: -call_estimate(calls[i])):
        fit = [
            b
            for b in bins
            if sum(call_estimate(calls[j]) for j in b) + call_estimate(calls[i]) <= limit
        ]
        if fit:
            fit[0].append(i)
        else:
            bins.append([i])
    bins = sorted(sorted(b) for b in bins)
    return [[job for i in b for job in calls[i]] for b in bins]


def select(args: argparse.Namespace) -> list[Job]:
    backbones = plan_backbones(args.backbones)
    plan = canonical_jobs(backbones)
    if args.chunk:
        parts = chunks(plan)
        if not all(1 <= k <= len(parts) for k in args.chunk):
            which = "the canonical run" if backbones == BACKBONES else f"the run of {backbones}"
            sys.exit(f"--chunk: {which} has chunks 1 to {len(parts)}")
        plan = [job for k in sorted(set(args.chunk)) for job in parts[k - 1]]
    known = [*VARIANTS, CACHE_BUILD]
    unknown = sorted(set(args.variants or []) - set(known))
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    return [
        job
        for job in plan
        if (not args.backbones or job.backbone in args.backbones)
        and (not args.precision or job.precision in args.precision)
        and (not args.variants or job.variant in args.variants)
    ]


def bench_calls(jobs: list[Job], out: Path, steps: int) -> list[tuple[Path, list[str], float]]:
    """The ``cadsam bench`` calls that run ``jobs``: (folder, command, estimate). A call with
    all of its kind's canonical variants writes BACKBONE-PRECISION-KIND/; one with some of
    them names them, so a rerun of a few never overwrites the rest."""
    canonical = calls_of(canonical_jobs((*BACKBONES, *SAM2_BACKBONES)))
    result = []
    for call in calls_of([job for job in jobs if job.variant != CACHE_BUILD]):
        backbone, precision, kind = call[0].backbone, call[0].precision, group(call[0].variant)
        variants = [job.variant for job in call]
        name = kind if any(call == whole for whole in canonical) else "+".join(variants)
        folder = out / f"{backbone}-{precision}-{name}"
        command = ["cadsam", "bench", "--backbones", backbone, "--methods", *variants]
        command += ["--precision", precision, "--steps", str(steps), "--out", str(folder)]
        result.append((folder, command, call_estimate(call)))
    return result


def python_command(command: list[str]) -> list[str]:
    """``cadsam ...`` run as this interpreter's module, from this checkout (see child_env)."""
    return [sys.executable, "-m", *command] if command[0] == "cadsam" else command


def child_env() -> dict[str, str]:
    """This checkout's src/ first on the path: the code measured is the commit recorded."""
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def short_commit() -> str:
    commit = git("rev-parse", "--short=7", "HEAD")
    if commit is None:
        return "nocommit"
    changed = git("status", "--porcelain", "--untracked-files=no")
    return commit + ("-changes" if changed else "")


def gpu_word(name: str) -> str:
    """A GPU's model as a word for a folder name: "NVIDIA H100 80GB HBM3" -> "H100"."""
    words = []
    for word in name.replace("-", " ").split():
        if re.fullmatch(r"\d+GB|SXM\d*|PCIE|HBM\d*E?|NVL", word, re.IGNORECASE):
            break
        if word.upper() not in ("NVIDIA", "TESLA", "GEFORCE"):
            words.append(re.sub(r"[^A-Za-z0-9]", "", word))
    return "-".join(w for w in words if w) or "gpu"


def short_gpu() -> str:
    """The first GPU's model as a word (nvidia-smi), "nogpu" where there is none."""
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return "nogpu"
    names = proc.stdout.strip().splitlines() if proc.returncode == 0 else []
    return gpu_word(names[0]) if names else "nogpu"


def results_folder(out: str | None, root: str | None = None, commit: str | None = None) -> Path:
    """``out``, else ROOT/DATE_GPU_COMMIT (ROOT: benchmarks/results)."""
    if out:
        return Path(out)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return Path(root or RESULTS) / f"{date}_{short_gpu()}_{commit or short_commit()}"


def stamp(environment: dict, commit: str | None) -> dict:
    """``environment`` with ``--commit``'s commit, git's own answer kept beside it."""
    if commit and environment.get("commit") != commit:
        environment["commit_from_git"] = environment.get("commit")
        environment["commit"] = commit
    return environment


def cache_command(backbone: str, mode: str, checkpoint: Path, images: Path, target: Path):
    command = ["cadsam", "cache", "--backbone", backbone, "--checkpoint", str(checkpoint)]
    command += ["--images", str(images), "--out", str(target), "--precision", "bf16"]
    command += ["--dtype", "float16", "--batch-size", str(CACHE_BATCH[backbone])]
    return [*command, "--num-workers", str(min(12, os.cpu_count() or 1)), *CACHE_MODES[mode]]


def image_folders(work: Path, sizes: tuple[int, ...]) -> dict[int, Path]:
    """Folders of ``size`` synthetic 512 x 512 images, hard links to a few distinct ones."""
    sys.path.insert(0, str(REPO / "src"))
    from cadsam.data.synthetic import make_synthetic_set

    data = work / "data"
    if not (data / "train" / "images").is_dir():
        make_synthetic_set(data, DISTINCT_IMAGES, 0, size=512)
    made = sorted((data / "train" / "images").iterdir())
    folders = {}
    for size in sizes:
        folders[size] = work / f"images-{size}"
        folders[size].mkdir(exist_ok=True)
        for i in range(size):
            link = folders[size] / f"{i:05d}.png"
            if not link.exists():
                link.hardlink_to(made[i % len(made)])
    return folders


def cache_place(work: Path, backbone: str) -> Path:
    """A RAM disk where it has room for the backbone's largest cache (a disk may be the limit
    at 2 MiB an image, or SAM 2.1's 8), else the work folder."""
    ram = Path("/dev/shm")
    size = max(CACHE_SIZES[backbone]) * MIB_PER_EMBEDDING[backbone] * 2**20
    if ram.is_dir() and shutil.disk_usage(ram).free > 1.5 * size:
        return Path(tempfile.mkdtemp(prefix="cadsam-suite-", dir=ram))
    return work


def timed(command: list[str]) -> float:
    """Seconds ``command`` takes; its last line of errors raised if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(python_command(command), env=child_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1])
    return seconds


def checkpoint_path(work: Path, backbone: str) -> Path:
    """Where the build's random checkpoint goes: Meta's suffix, .pth for SAM, .pt for SAM 2.1."""
    return work / f"{backbone}{'.pt' if backbone in SAM2_BACKBONES else '.pth'}"


def cache_rate(backbone: str, mode: str, work: Path, place: Path) -> dict:
    """One backbone's build rate past startup: an untimed build (compiler caches, file
    caches), then two timed ones of different sizes."""
    small, large = CACHE_SIZES[backbone]
    checkpoint = checkpoint_path(work, backbone)
    folders = image_folders(work, (small, large))
    seconds = {}
    for size, is_timed in ((small, False), (small, True), (large, True)):
        target = place / f"cache-{backbone}-{mode}-{size}"
        shutil.rmtree(target, ignore_errors=True)
        wall = timed(cache_command(backbone, mode, checkpoint, folders[size], target))
        shutil.rmtree(target, ignore_errors=True)
        if is_timed:
            seconds[size] = wall
    rate = (large - small) / (seconds[large] - seconds[small])
    return {
        "images": [small, large],
        "seconds": [round(seconds[small], 2), round(seconds[large], 2)],
        "images_per_second": round(rate, 1),
        "startup_seconds": round(seconds[small] - small / rate, 1),
    }


def run_cache_build(backbone: str, out: Path, work: Path, commit: str | None) -> int:
    """Times ``cadsam cache`` on ``backbone`` in each of CACHE_MODES; writes
    OUT/cache-BACKBONE/cache.json in bench.json's layout. Returns the number of failures."""
    checkpoint = checkpoint_path(work, backbone)
    if not checkpoint.exists():
        subprocess.run(
            [sys.executable, "-c", SAVE_CHECKPOINT, backbone, str(checkpoint)],
            env=child_env(),
            check=True,
        )
    place = cache_place(work, backbone)
    rows = []
    for mode in CACHE_MODES:
        row = {"backbone": backbone, "variant": CACHE_BUILD, "method": "cache", "mode": mode}
        row |= {"precision": "bf16", "dtype": "float16", "batch": CACHE_BATCH[backbone]}
        row["written_to"] = "RAM disk" if str(place).startswith("/dev/shm") else "disk"
        try:
            row |= cache_rate(backbone, mode, work, place)
        except (RuntimeError, ZeroDivisionError) as error:
            row["error"] = str(error)
        print(f"{backbone:>8} {CACHE_BUILD} {mode:<8} {row.get('error') or row}", flush=True)
        rows.append(row)
    if place != work:
        shutil.rmtree(place, ignore_errors=True)
    env = subprocess.run(
        [sys.executable, "-c", ENVIRONMENT], env=child_env(), capture_output=True, text=True
    )
    environment = json.loads(env.stdout.strip().splitlines()[-1]) if env.returncode == 0 else {}
    placeholder = cache_command(
        backbone, "compiled", Path("CHECKPOINT"), Path("IMAGES"), Path("CACHE")
    )
    environment["command"] = shlex.join(["python", *sys.argv])
    environment["cache_command"] = shlex.join(placeholder)
    folder = out / f"cache-{backbone}"
    folder.mkdir(parents=True, exist_ok=True)
    report = {"environment": stamp(environment, commit), "results": rows}
    (folder / "cache.json").write_text(json.dumps(report, indent=2) + "\n")
    return sum("error" in row for row in rows)


def kept(report: Path, variants: list[str], commit: str | None) -> bool:
    """Whether ``report`` (a bench.json or cache.json) measured each of ``variants`` without
    error, so a run into its folder keeps it; a report of another commit is an error."""
    if not report.exists():
        return False
    data = json.loads(report.read_text())
    if not set(variants) <= {row["variant"] for row in data["results"] if "error" not in row}:
        return False  # an interrupted or failed call: measured again
    measured = data["environment"].get("commit") or ""
    if commit and not measured.startswith(commit[:7]):
        sys.exit(
            f"{report} measured commit {measured}, not {commit}: remove {report.parent} to "
            "measure it again, or give another --out"
        )
    return True


def fits(seconds: float, deadline: float | None) -> bool:
    return deadline is None or time.monotonic() + seconds <= deadline


def run_bench_call(folder: Path, command: list[str], out: Path, commit: str | None) -> int:
    """One ``cadsam bench`` call, its output shown as it goes; its duration logged in
    OUT/timings.jsonl. Returns 1 if it failed."""
    print(f"== {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(python_command(command), env=child_env())
    seconds = time.perf_counter() - start
    log = {"folder": folder.name, "seconds": round(seconds, 1), "returncode": proc.returncode}
    with (out / "timings.jsonl").open("a") as file:
        file.write(json.dumps(log) + "\n")
    print(f"== {folder.name}: {seconds:.0f} s", flush=True)
    report = folder / "bench.json"
    if commit and report.exists():
        data = json.loads(report.read_text())
        stamp(data["environment"], commit)
        report.write_text(json.dumps(data, indent=2) + "\n")
    return int(proc.returncode != 0)


def show(command: list[str]) -> str:
    return shlex.join(["python", "-m", *command] if command[0] == "cadsam" else command)


def print_calls(jobs: list[Job], out: Path, steps: int) -> None:
    for _, command, seconds in bench_calls(jobs, out, steps):
        print(f"  [~{seconds / 60:.1f} min] {show(command)}")
    for job in jobs:
        if job.variant == CACHE_BUILD:
            small, large = CACHE_SIZES[job.backbone]
            folder = out / f"cache-{job.backbone}"
            print(
                f"  [~{estimate(job) / 60:.1f} min] {job.backbone} cache build rate -> "
                f"{folder}/cache.json: a random checkpoint "
                f"{checkpoint_path(Path('WORK'), job.backbone)}, then for "
                f"{small} (untimed), {small} and {large} images:"
            )
            for mode in CACHE_MODES:
                images, cache = Path("WORK/images-N"), Path(f"CACHE-{mode}-N")
                checkpoint = checkpoint_path(Path("WORK"), job.backbone)
                command = cache_command(job.backbone, mode, checkpoint, images, cache)
                print(f"      {show(command)}")


def print_plan(
    jobs: list[Job], out: Path, steps: int, whole: bool, backbones: tuple[str, ...] = BACKBONES
) -> None:
    """What a run would do; for the whole run (canonical, or of ``backbones``), chunk by chunk."""
    print(f"results folder: {out}")
    parts = chunks(jobs) if whole else [jobs]
    which = "" if backbones == BACKBONES else shlex.join(["--backbones", *backbones]) + " "
    for k, part in enumerate(parts, 1):
        minutes = plan_seconds(part) / 60
        if whole:
            print(
                f"chunk {k} (~{minutes:.1f} min): "
                f"python benchmarks/suite.py --chunk {k} {which}--out {out}"
            )
        else:
            print(f"selection (~{minutes:.1f} min):")
        print_calls(part, out, steps)
    total = plan_seconds(jobs) / 60
    print(f"estimated: {total:.0f} min; then: python benchmarks/tables.py {out}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The canonical benchmark run (BENCHMARKS.md's headline tables), or a part."
    )
    parser.add_argument(
        "--out", help="results folder (default: benchmarks/results/DATE_GPU_COMMIT)"
    )
    parser.add_argument(
        "--root", help="where the DATE_GPU_COMMIT folder goes (default: benchmarks/results)"
    )
    parser.add_argument(
        "--chunk",
        type=int,
        nargs="+",
        help="run these chunks of the canonical run (--dry-run lists them)",
    )
    parser.add_argument(
        "--backbones",
        nargs="+",
        choices=(*BACKBONES, *SAM2_BACKBONES),
        metavar="BACKBONE",
        help=f"any of: {', '.join((*BACKBONES, *SAM2_BACKBONES))}; SAM 2.1's only on request "
        "(the run --chunk cuts is then the one of the backbones named)",
    )
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS)
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="VARIANT",
        help=f"any of: {', '.join(VARIANTS)}, {CACHE_BUILD}",
    )
    parser.add_argument("--steps", type=int, default=STEPS, help=f"timed steps (default {STEPS})")
    parser.add_argument(
        "--work", help="scratch folder for the cache build (default: a temporary one)"
    )
    parser.add_argument(
        "--commit",
        help="the commit measured, where the machine's git cannot tell it (a copy of the "
        "checkout): names the folder, and goes into each report (git's answer kept as "
        "commit_from_git)",
    )
    parser.add_argument(
        "--within",
        type=float,
        metavar="SECONDS",
        help="start only the calls whose estimate fits in what is left of SECONDS; list the "
        "rest (the same command again goes on: what is measured already is kept)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = select(args)
    out = results_folder(args.out, args.root, args.commit)
    if args.dry_run:
        backbones = plan_backbones(args.backbones)
        # a SAM 2.1 selection of backbones is a whole run of its own, chunked like the canonical
        narrowed_backbones = args.backbones and backbones == BACKBONES
        narrowed = args.chunk or narrowed_backbones or args.precision or args.variants
        print_plan(jobs, out, args.steps, not narrowed, backbones)
        return 0
    if not jobs:
        sys.exit("nothing selected")
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.within if args.within is not None else None
    commit = args.commit or git("rev-parse", "--short=7", "HEAD")
    failures, later = run_calls(jobs, out, args.steps, commit, deadline, args.commit)
    builds = [job for job in jobs if job.variant == CACHE_BUILD]
    builds = [job for job in builds if not kept_build(out, job.backbone, commit)]
    if builds:
        work = Path(args.work or tempfile.mkdtemp(prefix="cadsam-suite-"))
        work.mkdir(parents=True, exist_ok=True)
        for job in builds:
            if fits(estimate(job), deadline):
                failures += run_cache_build(job.backbone, out, work, args.commit)
            else:
                later.append(f"cache-{job.backbone}")
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if later:
        print(f"not started, too little of --within left: {', '.join(later)}")
        print("the same command again goes on from here")
    print(f"results: {out}\ntables: python benchmarks/tables.py {out}")
    return 1 if failures else 0


def run_calls(
    jobs: list[Job],
    out: Path,
    steps: int,
    commit: str | None,
    deadline: float | None,
    stamped: str | None,
) -> tuple[int, list[str]]:
    """The ``cadsam bench`` calls of ``jobs`` not yet in ``out`` that fit before ``deadline``:
    the number that failed, and the folders of those left for later. ``commit``: the commit
    measured, which a kept report must be of; ``stamped``: ``--commit``, written into each
    new report."""
    failures, later = 0, []
    for folder, command, seconds in bench_calls(jobs, out, steps):
        variants = command[command.index("--methods") + 1 : command.index("--precision")]
        if kept(folder / "bench.json", variants, commit):
            print(f"== kept {folder.name}: measured already", flush=True)
        elif fits(seconds, deadline):
            failures += run_bench_call(folder, command, out, stamped)
        else:
            later.append(folder.name)
    return failures, later


def kept_build(out: Path, backbone: str, commit: str | None) -> bool:
    if kept(out / f"cache-{backbone}" / "cache.json", [CACHE_BUILD], commit):
        print(f"== kept cache-{backbone}: measured already", flush=True)
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
