"""The embedding cache: run the frozen encoder once per image (and view), train without it.

CAD and decoder-only training never need gradients through SAM's encoder (the paper's
section 5), so its output can be computed once. A cache folder holds:

* ``embeddings.npy``: one preallocated array, one row per image and view holding what the mask
  decoder reads (:class:`~cadsam.backbones.FeatureLayout`): for SAM the image embedding,
  (images x views) x 256 x E x E; for SAM 2.1 the image embedding and the two projected
  high-resolution maps, flattened one after the other, (images x views) x N. Float16 by
  default (float32 on request), opened as a memory map;
* ``done.npy``: one byte per entry, set only after that entry's embedding is on disk, so an
  interrupted build resumes where it stopped and never trusts a half-written entry;
* ``digests.npy``: each entry's CRC-32, recorded with its done mark, checked when training opens
  the cache, when a build goes on (a damaged entry is computed again) and by ``cadsam cache
  --verify``: bytes changed on disk stop a run instead of training it on them. Caches made
  before it have no digests until a build or ``--verify`` records them;
* ``manifest.json``: what the embeddings depend on: backbone, base checkpoint (sha256),
  training image size, SAM's preprocessing, views, image ids and file digests, dtype, and the
  parts of a row with their shapes (``parts``).

Geometric augmentation changes what the encoder sees, so a cache stores a fixed set of views
per image (identity, flips, rotations by 90 degrees); training samples among them.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import distributed
from .backbones import FeatureLayout, backbone_config, feature_layout, is_sam2
from .cores import default_workers, usable_cores
from .data.io import read_image
from .data.transforms import VIEWS, apply_view, resize_image
from .errors import CadsamError
from .fast.runtime import Runtime
from .files import check_output_folder, write_atomic
from .lock import holds_out_lock
from .precision import autocast
from .sam.sam import PIXEL_MEAN, PIXEL_STD
from .sam2.sam2 import PIXEL_MEAN as SAM2_PIXEL_MEAN
from .sam2.sam2 import PIXEL_STD as SAM2_PIXEL_STD

# 2: a row's parts and shapes in the manifest (1: "channels" and "grid", SAM's embedding only;
# such caches are read as the format-2 cache of one part they are)
FORMAT = 2
NOT_CACHEABLE = {
    "shift_scale_rotate": "shift-scale-rotate draws a new continuous transform every time, "
    "so no fixed set of cached embeddings can stand for it",
}


def check_views(views: list[str]) -> list[str]:
    for view in views:
        if view in NOT_CACHEABLE:
            raise CadsamError(f"view {view} cannot be cached: {NOT_CACHEABLE[view]}")
        if view not in VIEWS:
            raise CadsamError(f"unknown view {view!r}: choose from {', '.join(VIEWS)}")
    if len(set(views)) != len(views) or not views:
        raise CadsamError("--views must name one or more distinct views")
    return list(views)


def file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass
class EmbeddingCache:
    """An opened cache: its manifest and its arrays (memory-mapped, read-only for training)."""

    root: Path
    manifest: dict[str, Any]
    embeddings: np.ndarray
    done: np.ndarray
    digests: np.ndarray | None = None  # a CRC-32 per entry; None in caches made before them

    @property
    def views(self) -> list[str]:
        return self.manifest["views"]

    def entry(self, image_index: int, view: str) -> int:
        return image_index * len(self.views) + self.views.index(view)

    def complete(self) -> bool:
        return bool(self.done.all())

    def row_of(self) -> dict[str, int]:
        return {image_id: i for i, image_id in enumerate(self.manifest["ids"])}

    @property
    def layout(self) -> FeatureLayout:
        return FeatureLayout.from_json(self.manifest["parts"])

    def describe_entry(self) -> str:
        """What one image (and view) takes: its bytes and its parts."""
        size = self.embeddings[0].nbytes
        return (
            f"{size / 2**20:g} MiB ({size:,} bytes) per image and view: "
            f"{self.layout.describe()}, {self.manifest['dtype']}"
        )


def _paths(root: Path) -> tuple[Path, Path, Path]:
    return root / "manifest.json", root / "embeddings.npy", root / "done.npy"


def _digests_path(root: Path) -> Path:
    return root / "digests.npy"


def open_cache(root: str | os.PathLike, writable: bool = False) -> EmbeddingCache:
    """Open a cache, checking that its files are whole; a clear error otherwise."""
    root = Path(root)
    manifest_path, emb_path, done_path = _paths(root)
    if not manifest_path.is_file():
        raise CadsamError(
            f"not an embedding cache: {root} (no manifest.json; make one with cadsam cache)"
        )
    manifest = _read_manifest(manifest_path)
    entries = len(manifest["ids"]) * len(manifest["views"])
    shape = (entries, *FeatureLayout.from_json(manifest["parts"]).shape)
    mode = "r+" if writable else "r"
    digests_path = _digests_path(root)
    try:
        embeddings = np.load(emb_path, mmap_mode=mode)
        done = np.load(done_path, mmap_mode=mode)
        digests = np.load(digests_path, mmap_mode=mode) if digests_path.is_file() else None
    except (OSError, ValueError) as exc:
        raise CadsamError(
            f"cache {root} is truncated or corrupt ({exc}); delete it and run cadsam cache again"
        ) from None
    if (
        embeddings.shape != shape
        or embeddings.dtype != np.dtype(manifest["dtype"])
        or done.shape != (entries,)
    ):
        raise CadsamError(
            f"cache {root} is corrupt: embeddings {embeddings.shape} {embeddings.dtype}, "
            f"expected {shape} {manifest['dtype']}; delete it and run cadsam cache again"
        )
    if digests is not None and (digests.shape, digests.dtype) != ((entries,), np.uint32):
        raise CadsamError(
            f"cache {root} is corrupt: digests.npy holds {digests.shape} {digests.dtype}, "
            f"expected ({entries},) uint32; delete digests.npy and run cadsam cache --verify "
            f"--out {root} to record them again"
        )
    return EmbeddingCache(root, manifest, embeddings, done, digests)


def _read_manifest(path: Path) -> dict[str, Any]:
    """A cache's manifest, a format-1 one read as format 2."""
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CadsamError(f"{path} is corrupt: {exc}") from None
    found = manifest.get("format")
    if found == 1:
        manifest["format"] = FORMAT
        channels, grid = manifest.pop("channels"), manifest.pop("grid")
        manifest["parts"] = [["image_embedding", [channels, grid, grid]]]
    elif found != FORMAT:
        raise CadsamError(
            f"{path} is a cache of format {found!r}; this cadsam reads formats 1 and {FORMAT}: "
            "rebuild it with cadsam cache"
        )
    return manifest


def preprocessing_record(backbone: str) -> dict[str, Any]:
    """How images reach the encoder, as a cache records it."""
    size = backbone_config(backbone).image_size
    resize = "PIL bilinear to image_size, then bilinear (antialiased) to sam_image_size"
    if is_sam2(backbone):
        return {
            "sam_image_size": size,
            "pixel_mean": list(SAM2_PIXEL_MEAN),
            "pixel_std": list(SAM2_PIXEL_STD),
            "resize": resize + ", scaled to 0..1 (SAM 2.1's)",
        }
    return {
        "sam_image_size": size,
        "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD),
        "resize": resize,
    }


def cache_manifest(
    backbone: str,
    base: dict[str, Any],
    image_size: int,
    views: list[str],
    images: list[Path],
    dtype: str,
    precision: str,
    channels: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "backbone": backbone,
        "base_checkpoint": base,
        "image_size": image_size,
        "preprocessing": preprocessing_record(backbone),
        "views": views,
        "ids": [p.stem for p in images],
        "digests": [file_digest(p) for p in images],
        "dtype": dtype,
        "encoder_precision": precision,
        "parts": feature_layout(backbone).to_json(),
        **({} if channels is None else {"image_channels": list(channels)}),
    }


# What must agree between a cache and its use; "digests" and "ids" are compared per image.
SETTINGS_KEYS = (
    "format",
    "backbone",
    "base_checkpoint",
    "image_size",
    "preprocessing",
    "views",
    "dtype",
    "encoder_precision",
    "parts",
    "image_channels",
)


def _differences(found: dict[str, Any], wanted: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [
        f"{k}: cache has {found.get(k)!r}, wanted {wanted.get(k)!r}"
        for k in keys
        if found.get(k) != wanted.get(k)
    ]


class _ViewImages(Dataset):
    """(entry, view image as 3 x S x S uint8) for each entry still to compute."""

    def __init__(
        self,
        images: list[Path],
        views: list[str],
        size: int,
        entries: list[int],
        channels: tuple[int, ...] | None,
    ) -> None:
        self.images, self.views, self.size, self.entries = images, views, size, entries
        self.channels = channels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        entry = self.entries[i]
        image = read_image(self.images[entry // len(self.views)], self.channels)
        image = resize_image(image, self.size)
        view = apply_view(image, self.views[entry % len(self.views)])
        return entry, torch.from_numpy(view).permute(2, 0, 1)


@holds_out_lock("cadsam cache")
def build_cache(
    images: list[Path],
    out: str | os.PathLike,
    backbone: str,
    checkpoint: str | os.PathLike | None = None,
    views: list[str] | None = None,
    image_size: int = 512,
    batch_size: int = 8,
    precision: str = "fp32",
    dtype: str = "float16",
    device: str | None = None,
    runtime: Runtime | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    skip_bad: bool = False,
    channels: tuple[int, ...] | None = None,
) -> EmbeddingCache:
    """Compute (or finish computing) the cache in ``out``. Under torchrun the ranks share the
    entries still to do and write disjoint rows. ``num_workers`` data-loader processes read
    the images (default 4, at most the usable cores; none when nothing is left to do).
    ``stop_after`` (batches) is for tests; ``on_batch(images)`` is called as each batch is
    handed to the writer (for timing). An unreadable image is an error before anything is
    written, or with ``skip_bad`` left out of the cache and named. ``runtime`` says how the
    frozen encoder runs (by default the whole batch per call, with the fused attention: nothing
    is kept). ``channels``: those of multi-channel images read (recorded in the manifest)."""
    from .methods import build_model
    from .weights import base_checkpoint_record

    views = check_views(views or ["identity"])
    _check_request(images, backbone, checkpoint, dtype)
    check_output_folder(out, "--out")
    images = readable_images(images, skip_bad, progress, channels)
    dist = distributed.setup(device)
    try:
        root = Path(out)
        base = base_checkpoint_record(checkpoint)
        manifest = cache_manifest(
            backbone, base, image_size, views, images, dtype, precision, channels
        )
        # built before the folder, so that a checkpoint refused for this backbone writes nothing;
        # by default the whole batch per encoder call, with the fused attention
        runtime = runtime or Runtime(fused_attention=True)
        model = build_model("zero-shot", backbone, checkpoint, runtime=runtime)
        model.to(dist.device).eval()
        cache, todo = _open_for_writing(root, manifest, dist)
        workers = default_workers(4) if num_workers is None else num_workers
        view_images = _ViewImages(images, views, image_size, todo, channels)
        loader = DataLoader(
            view_images,
            batch_size,
            num_workers=workers if todo else 0,
            pin_memory=dist.device.type == "cuda",
        )
        bar = tqdm(
            total=len(todo) * dist.world_size,
            desc="caching embeddings",
            unit="image",
            disable=not (progress and dist.is_main),
        )
        writer = _EntryWriter(cache)
        try:
            for step, (entries, batch) in enumerate(loader):
                if stop_after is not None and step >= stop_after:
                    break
                emb, ready = _embed(model, batch, dist.device, precision, getattr(torch, dtype))
                writer.put(entries.numpy(), emb, ready)
                bar.update(len(entries) * dist.world_size)
                if on_batch is not None:
                    on_batch(len(entries))
        finally:
            writer.close()
        bar.close()
        distributed.barrier(dist)
        return open_cache(root)
    finally:
        distributed.teardown(dist)


def _open_for_writing(
    root: Path, manifest: dict[str, Any], dist: distributed.Dist
) -> tuple[EmbeddingCache, list[int]]:
    """The cache folder made (or its finished entries checked), open for writing, and this
    process's share of the entries still to do."""
    if dist.is_main:
        _prepare_folder(root, manifest)
        _recheck_done_entries(root)
    distributed.barrier(dist)
    cache = open_cache(root, writable=True)
    todo = [int(e) for e in np.flatnonzero(cache.done == 0) if e % dist.world_size == dist.rank]
    return cache, todo


def _check_request(
    images: list[Path], backbone: str, checkpoint: str | os.PathLike | None, dtype: str
) -> None:
    if checkpoint is None:
        raise CadsamError(
            "a cache needs --checkpoint (embeddings of weights drawn at random now could not be "
            f"checked against training later): {_checkpoint_hint(backbone)}"
        )
    if dtype not in ("float16", "float32"):
        raise CadsamError("--dtype must be float16 or float32")
    if len({p.stem for p in images}) != len(images):
        raise CadsamError("two images share a file stem; a cache names images by stem")


def _checkpoint_hint(backbone: str) -> str:
    """Where a checkpoint for ``backbone`` comes from, said where a cache is refused without one."""
    if backbone_config(backbone).pretrained:
        kind = ".pt" if is_sam2(backbone) else ".pth"
        return f"--checkpoint {backbone} (downloaded once) or the path of its {kind} file"
    name = f"{backbone}_random.pt" if is_sam2(backbone) else f"sam_{backbone}_random.pth"
    return (
        f"{backbone} has no released weights; cadsam demo --backbone {backbone} --out DIR saves "
        f"its random ones as DIR/{name}: pass --checkpoint DIR/{name}"
    )


def _prepare_folder(root: Path, manifest: dict[str, Any]) -> None:
    """A new cache's preallocated arrays and manifest; an existing cache must be this one."""
    manifest_path, emb_path, done_path = _paths(root)
    if manifest_path.exists():
        existing = _read_manifest(manifest_path)
        problems = _differences(existing, manifest, (*SETTINGS_KEYS, "ids", "digests"))
        if problems:
            raise CadsamError(
                f"{root} holds a cache made differently ({problems[0]}): choose another --out"
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    entries = len(manifest["ids"]) * len(manifest["views"])
    shape = (entries, *FeatureLayout.from_json(manifest["parts"]).shape)
    dtype = np.dtype(manifest["dtype"])
    np.lib.format.open_memmap(emb_path, mode="w+", dtype=dtype, shape=shape).flush()
    np.lib.format.open_memmap(done_path, mode="w+", dtype=np.uint8, shape=(entries,)).flush()
    digests_path = _digests_path(root)
    np.lib.format.open_memmap(digests_path, mode="w+", dtype=np.uint32, shape=(entries,)).flush()
    # Written last: a folder without a manifest is not a cache.
    write_atomic(manifest_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


@torch.no_grad()
def _embed(
    model: torch.nn.Module,
    batch: torch.Tensor,
    device: torch.device,
    precision: str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """One batch's embeddings on the CPU in ``dtype``, and on a GPU the event after which they
    are there: they come back without waiting, and the writer waits on the event."""
    with autocast(device, precision):
        emb = model.frozen_embeddings(batch.to(device, non_blocking=True))
    emb = emb.to(dtype)
    if device.type != "cuda":
        return emb, None
    emb = torch.empty_like(emb, device="cpu", pin_memory=True).copy_(emb, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return emb, ready


class _EntryWriter:
    """Writes embeddings on a background thread while the GPU computes the next batch.

    Rows go to the file with ``pwrite`` (a memory-mapped assignment faults in every page and
    ran at a third of the speed), runs of consecutive rows in one call. Every few seconds
    (and at the end) the file is synced and only then are the entries written before the
    sync marked done: a crash can lose recent work, never mark garbage done.
    """

    def __init__(self, cache: EmbeddingCache, flush_seconds: float = 5.0) -> None:
        self.cache, self.flush_seconds = cache, flush_seconds
        self.file = os.open(_paths(cache.root)[1], os.O_WRONLY)
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(
        self, rows: np.ndarray, embeddings: torch.Tensor, ready: torch.cuda.Event | None
    ) -> None:
        """Queue ``embeddings`` (on the CPU, complete once ``ready`` has happened) for ``rows``."""
        if self.error is not None:
            raise self.error
        self.queue.put((rows, embeddings, ready))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        os.close(self.file)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        pending: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, their digests) to mark done
        last, finished = time.monotonic(), False
        while not finished:
            item = self.queue.get()
            finished = item is None
            if self.error is not None:
                continue  # after a failure, only drain so the producer never blocks
            try:
                if item is not None:
                    rows, embeddings, ready = item
                    if ready is not None:
                        ready.synchronize()
                    array = embeddings.numpy()
                    self._write(rows, array)
                    pending.append((rows, entry_digests(array)))
                if finished or time.monotonic() - last > self.flush_seconds:
                    self._commit(pending)
                    pending, last = [], time.monotonic()
            except BaseException as exc:  # surfaced in the main thread by put() / close()
                self.error = exc

    def _write(self, rows: np.ndarray, embeddings: np.ndarray) -> None:
        array = self.cache.embeddings
        assert embeddings.dtype == array.dtype and embeddings.shape[1:] == array.shape[1:]
        row_bytes = embeddings[0].nbytes
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for start, stop in zip([0, *breaks], [*breaks, len(rows)], strict=True):
            data = memoryview(np.ascontiguousarray(embeddings[start:stop])).cast("B")
            offset = array.offset + int(rows[start]) * row_bytes
            while data:  # pwrite may write less than asked
                written = os.pwrite(self.file, data, offset)
                data, offset = data[written:], offset + written

    def _commit(self, pending: list[tuple[np.ndarray, np.ndarray]]) -> None:
        if not pending:
            return
        os.fdatasync(self.file)  # the data first ...
        rows = np.concatenate([rows for rows, _ in pending])
        if self.cache.digests is not None:  # ... then what it must read back as ...
            self.cache.digests[rows] = np.concatenate([digests for _, digests in pending])
            self.cache.digests.flush()
        self.cache.done[rows] = 1
        self.cache.done.flush()  # ... then the marks that say it is there


def entry_digests(embeddings: np.ndarray) -> np.ndarray:
    """The CRC-32 of each entry's bytes (each row of ``embeddings``): the fastest of the digests
    tried, and small beside the encoder's work for an entry (benchmarks/BENCHMARKS.md)."""
    return np.array([zlib.crc32(np.ascontiguousarray(row)) for row in embeddings], np.uint32)


def _read_digests(cache: EmbeddingCache, entries: list[int]) -> list[int]:
    """The CRC-32 of ``entries`` as they are on disk now, a thread per core (zlib lets go of
    the GIL while it reads)."""
    with ThreadPoolExecutor(max(1, usable_cores())) as pool:
        return list(pool.map(lambda entry: zlib.crc32(cache.embeddings[entry]), entries))


def damaged_entries(cache: EmbeddingCache, entries: Iterable[int] | None = None) -> list[int]:
    """The done entries (of ``entries``; all by default) whose bytes no longer match their
    digest. A cache without digests has none to compare: record them first."""
    assert cache.digests is not None
    todo = np.flatnonzero(cache.done) if entries is None else entries
    checked = [int(entry) for entry in todo if cache.done[entry]]
    found = _read_digests(cache, checked)
    recorded = cache.digests[checked]
    return [entry for entry, crc, kept in zip(checked, found, recorded, strict=True) if crc != kept]


def name_entry(cache: EmbeddingCache, entry: int) -> str:
    """An entry as a person finds it: its image id and view."""
    image, view = divmod(entry, len(cache.views))
    return f"image {cache.manifest['ids'][image]} (view {cache.views[view]}, entry {entry})"


def record_digests(cache: EmbeddingCache) -> EmbeddingCache:
    """Digests for a cache made before caches had them, of its done entries as they are now
    (from here on a change is seen); written whole, then renamed. The cache, reopened."""
    digests = np.zeros(len(cache.done), np.uint32)
    done = np.flatnonzero(cache.done)
    digests[done] = _read_digests(cache, [int(entry) for entry in done])

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, digests)

    write_atomic(_digests_path(cache.root), write)
    return open_cache(cache.root, writable=cache.embeddings.mode == "r+")


def _recheck_done_entries(root: Path) -> None:
    """Before a build goes on: done entries whose bytes no longer match their digest are
    marked not done, so that they are computed again (a cache made before digests gets them)."""
    cache = open_cache(root, writable=True)
    if cache.digests is None:
        record_digests(cache)
        return
    damaged = damaged_entries(cache)
    if damaged:
        cache.done[damaged] = 0
        cache.done.flush()
        print(
            f"cadsam: {len(damaged)} damaged embedding(s) in {root} are computed again "
            f"(first: {name_entry(cache, damaged[0])})",
            file=sys.stderr,
        )


def verify_cache(root: str | os.PathLike) -> str:
    """``cadsam cache --verify``: every done entry read back against its digest. What was found,
    or an error naming the damaged entries; a cache made before digests gets them now."""
    cache = open_cache(root)
    done = int(cache.done.sum())
    state = f"{done} of {len(cache.done)} entries done"
    if cache.digests is None:
        record_digests(open_cache(root, writable=True))
        return (
            f"{root} was made before caches recorded digests: recorded those of its {done} done "
            f"embeddings as they are now ({state})"
        )
    damaged = damaged_entries(cache)
    if damaged:
        names = "; ".join(name_entry(cache, entry) for entry in damaged[:3])
        raise CadsamError(
            f"cache {root}: {len(damaged)} of {done} embeddings are damaged ({names}"
            f"{'; ...' if len(damaged) > 3 else ''}): run the cadsam cache command that made it "
            "again, which computes them again"
        )
    return f"{root}: all {done} done embeddings match their digests ({state})"


def _refuse_damaged(cache: EmbeddingCache, rows: list[int]) -> None:
    """Training's check of the entries it will read (every view of ``rows``); a cache without
    digests is not checked, which training says."""
    if cache.digests is None:
        return
    views = len(cache.views)
    damaged = damaged_entries(cache, [row * views + view for row in rows for view in range(views)])
    if damaged:
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        raise CadsamError(
            f"cache {cache.root} is damaged: the embedding of {name_entry(cache, damaged[0])}"
            f"{more} no longer matches its digest: run the cadsam cache command that made it "
            f"again, which computes damaged embeddings again (cadsam cache --verify --out "
            f"{cache.root} lists them)"
        )


def check_cache_for_training(
    cache: EmbeddingCache,
    pairs: list,
    backbone: str,
    base: dict[str, Any],
    image_size: int,
    channels: tuple[int, ...] | None = None,
) -> list[int]:
    """Refuse a cache that does not fit this training run; return each pair's cache row."""
    wanted = {
        "format": FORMAT,
        "backbone": backbone,
        "base_checkpoint": base,
        "image_size": image_size,
        "image_channels": None if channels is None else list(channels),
    }
    made_from = cache.manifest["base_checkpoint"]
    if base["name"] is None and made_from["name"] is not None:
        raise CadsamError(
            f"the cache in {cache.root} was made from checkpoint {made_from['name']} (sha256 "
            f"{made_from['sha256'][:16]}...): pass --checkpoint {made_from['name']}"
        )
    checked = ("format", "backbone", "image_size", "image_channels")
    problems = _differences(cache.manifest, wanted, checked)
    if made_from["sha256"] != base["sha256"]:
        problems.append(
            f"made from checkpoint {made_from['name']}, training uses {base['name']} (sha256 "
            f"differs): pass --checkpoint {made_from['name']}, or cache again from yours"
        )
    if problems:
        raise CadsamError(f"cache {cache.root} does not fit this run: {'; '.join(problems)}")
    if not cache.complete():
        raise CadsamError(
            f"cache {cache.root} is incomplete ({int(cache.done.sum())} of {len(cache.done)} entries): "
            "run the same cadsam cache command again to finish it"
        )
    rows = cache.row_of()
    missing = [p.id for p in pairs if p.id not in rows]
    changed = [
        p.id
        for p in pairs
        if p.id in rows and file_digest(p.image) != cache.manifest["digests"][rows[p.id]]
    ]
    if missing or changed:
        what = f"{len(missing)} image(s) not in it (e.g. {missing[0]})" if missing else ""
        what += ("; " if what else "") + (
            f"{len(changed)} image(s) changed since (e.g. {changed[0]})" if changed else ""
        )
        raise CadsamError(f"cache {cache.root} holds other images: {what}")
    used = [rows[p.id] for p in pairs]
    _refuse_damaged(cache, used)
    return used


def recorded_precision(out: str | os.PathLike) -> str | None:
    """The encoder precision an existing cache in ``out`` was made in: what finishing it must
    use when none is asked for (caches made before fp32 was every command's default are bf16)."""
    manifest = Path(out) / "manifest.json"
    if not manifest.is_file():
        return None
    return _read_manifest(manifest).get("encoder_precision")


def readable_images(
    images: list[Path], skip_bad: bool, progress: bool, channels: tuple[int, ...] | None = None
) -> list[Path]:
    """The images that can be read, checked before anything is written: an unreadable one is
    an error naming every such file, or with ``skip_bad`` left out and named."""
    bad = []
    for path in tqdm(images, desc="checking images", unit="image", disable=not progress):
        try:
            read_image(path, channels)
        except CadsamError as exc:
            bad.append((path, str(exc)))
    if not bad:
        return images
    if not skip_bad:
        listed = "; ".join(why for _, why in bad[:5]) + ("; ..." if len(bad) > 5 else "")
        raise CadsamError(
            f"{len(bad)} of {len(images)} image(s) cannot be read ({listed}): replace or remove "
            "them, or pass --skip-bad to leave them out; nothing was written"
        )
    for _, why in bad:
        print(f"cadsam: skipped: {why}", file=sys.stderr)
    skipped = {path for path, _ in bad}
    return [path for path in images if path not in skipped]
