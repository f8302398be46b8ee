"""Finding, downloading and reading SAM checkpoints, with errors a user can act on.

A checkpoint is named by a path, or by a backbone name (``vit_b``, ``vit_l``, ``vit_h``) that is
looked up in the cache directory (``$CADSAM_HOME/checkpoints`` or
``~/.cache/cadsam/checkpoints``) and otherwise downloaded from Meta's URL. A path may be Meta's
``.pth`` or a Hugging Face ``SamModel``'s ``model.safetensors`` / ``pytorch_model.bin`` (or
the folder holding it); either is read into Meta's key names.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from tqdm import tqdm

from ..errors import CadsamError
from ..files import plain_file_mode
from . import hf

META_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything"


@dataclass(frozen=True)
class CheckpointFile:
    """One of Meta's published checkpoints. Meta publishes MD5 digests; the file name carries
    the digest's first six hex digits."""

    filename: str
    md5: str

    @property
    def url(self) -> str:
        base = os.environ.get("CADSAM_CHECKPOINT_URL", META_BASE_URL).rstrip("/")
        return f"{base}/{self.filename}"

    @property
    def digest(self) -> str:
        return f"md5:{self.md5}"


META_CHECKPOINTS: dict[str, CheckpointFile] = {
    "vit_b": CheckpointFile("sam_vit_b_01ec64.pth", "01ec64d29a2fca3f0661936605ae66f8"),
    "vit_l": CheckpointFile("sam_vit_l_0b3195.pth", "0b3195507c641ddb6910d2bb5adee89c"),
    "vit_h": CheckpointFile("sam_vit_h_4b8939.pth", "4b8939a88964f0f4ff5f5b2642c598a6"),
}


# What a Hugging Face model folder holds the weights in (``save_pretrained``).
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def cadsam_home() -> Path:
    return Path(os.environ.get("CADSAM_HOME", Path.home() / ".cache" / "cadsam"))


def checkpoint_dir() -> Path:
    return cadsam_home() / "checkpoints"


def resolve_checkpoint(spec: str | os.PathLike, download: bool = True) -> Path:
    """A path (a Hugging Face model folder: its weights file), or a backbone name found in the
    cache or downloaded into it -> a local file."""
    return resolve_release(
        spec,
        META_CHECKPOINTS,
        lambda source, path: download_file(source.url, path, source.digest),
        download,
    )


def resolve_release(
    spec: str | os.PathLike,
    releases: Mapping[str, Any],
    fetch: Callable[[Any, Path], object],
    download: bool = True,
) -> Path:
    """A path, or the name of one of ``releases`` (each with ``filename`` and ``url``) found in
    the checkpoint cache or fetched into it by ``fetch(release, path)`` -> a local file. SAM's
    and SAM 2.1's names resolve alike; only how a download is checked differs."""
    name = str(spec)
    if name not in releases:
        path = Path(name).expanduser()
        if path.is_dir():  # a Hugging Face model folder
            found = [path / n for n in HF_WEIGHT_FILES if (path / n).is_file()]
            if not found:
                raise CadsamError(
                    f"checkpoint folder {path} holds no {' or '.join(HF_WEIGHT_FILES)}"
                )
            path = found[0]
        if not path.is_file():
            known = ", ".join(releases)
            raise CadsamError(f"checkpoint not found: {path} (give a file or one of: {known})")
        return path
    source = releases[name]
    path = checkpoint_dir() / source.filename
    if path.is_file():
        return path
    if not download:
        raise CadsamError(
            f"{name} checkpoint is not in {checkpoint_dir()}: download {source.url} there"
        )
    fetch(source, path)
    return path


# sha256 by file (path, size, mtime): see file_sha256
_SHA256_SEEN: dict[tuple[str, int, int], str] = {}


def _file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def download_file(
    url: str, dest: Path, digest: str | None, progress: bool = True, origin: str = ""
) -> str:
    """Download ``url`` to ``dest``, checking ``digest`` ("md5:<hex>" or "sha256:<hex>"; None:
    nothing to check against); returns the file's digest in that algorithm (sha256 for None).
    ``origin`` says where the expected digest came from, for the error.

    The bytes go to a temporary file beside ``dest`` that is moved into place only once
    complete and verified, so an interrupted or corrupt download never looks like a checkpoint.
    """
    algorithm, expected = digest.split(":", 1) if digest else ("sha256", None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.new(algorithm)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    os.chmod(tmp, plain_file_mode(dest.parent))  # as any file written here, not mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=60)
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise CadsamError(
                    f"cannot download {url} ({reason}): download it by hand and put it at {dest}"
                ) from None
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress
                ) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        hasher.update(chunk)
                        bar.update(len(chunk))
        if expected is not None and hasher.hexdigest() != expected:
            why = f" ({origin})" if origin else ""
            raise CadsamError(
                f"download of {url} is corrupt: {algorithm} {hasher.hexdigest()}, "
                f"expected {expected}{why}; nothing was saved"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    if algorithm == "sha256":  # file_sha256 need not read the file again
        _SHA256_SEEN[_file_key(dest)] = hasher.hexdigest()
    return hasher.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256, computed once per process for each (path, size, mtime), or taken
    from its download: training, caching and loading weights all identify the same multi-GB
    checkpoint by it."""
    key = _file_key(path)
    if key not in _SHA256_SEEN:
        size = key[1]
        hasher = hashlib.sha256()
        with (
            open(path, "rb") as f,
            tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                desc=f"sha256 {Path(path).name}",
                disable=size < 2**28,
                leave=False,
            ) as bar,
        ):
            while chunk := f.read(1 << 24):
                hasher.update(chunk)
                bar.update(len(chunk))
        _SHA256_SEEN[key] = hasher.hexdigest()
    return _SHA256_SEEN[key]


def read_sam_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a SAM checkpoint safely, or say clearly why it cannot be one: Meta's ``.pth``
    (``weights_only``), or a Hugging Face ``SamModel``'s ``model.safetensors`` or
    ``pytorch_model.bin``, whose keys are renamed to Meta's (:mod:`cadsam.sam.hf`)."""
    path = Path(path)
    return sam_state_dict(read_checkpoint_file(path), path)


def sam_state_dict(state: object, path: Path) -> dict[str, torch.Tensor]:
    """What :func:`read_checkpoint_file` read from ``path``, as SAM's state_dict in Meta's keys,
    or the one-line error that says why it is not one."""
    if is_sam2_checkpoint(state):
        raise CadsamError(
            f"{path} is a SAM 2.1 checkpoint, not SAM: use it with a sam2.1_hiera_* backbone"
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CadsamError(f"{path} is not a SAM state_dict (expected a dict of tensors)")
    if hf.is_hf_layout(state):
        state = hf.from_hf(state, path)
    parts = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
    missing = [p[:-1] for p in parts if not any(k.startswith(p) for k in state)]
    if missing:
        sample = ", ".join(list(state)[:3]) or "no keys"
        raise CadsamError(
            f"{path} is not a SAM state_dict: no {', '.join(missing)} weights (found {sample}; "
            "expected Meta's keys or a Hugging Face SamModel's)"
        )
    return state


def is_sam2_checkpoint(content: object) -> bool:
    """Whether ``content`` (what ``torch.load`` returned) is a SAM 2 checkpoint: for SAM's
    loader, to name the mix-up when one is given for a SAM backbone (SAM 2.1's
    loader builds on this module, never the reverse)."""
    state = content.get("model") if isinstance(content, dict) else None
    return isinstance(state, dict) and any(
        isinstance(k, str) and k.startswith("image_encoder.trunk.") for k in state
    )


def read_checkpoint_file(path: Path) -> object:
    """A checkpoint's content: a safetensors file (by its header) or a PyTorch file (SAM's
    and SAM 2.1's alike), or a one-line error."""
    try:
        if _is_safetensors(path):
            return load_safetensors(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CadsamError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch or safetensors"
        raise CadsamError(
            f"cannot read checkpoint {path}: truncated, corrupt or not a {kind} file "
            f"({first_line[:160]})"
        ) from None


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian)
    and the header's ``{``; a PyTorch file is a zip (``PK``) or a pickle."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") < path.stat().st_size


def encoder_signature(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(embed dim, number of blocks) of the image encoder in a SAM state_dict."""
    embed_dim = state["image_encoder.patch_embed.proj.weight"].shape[0]
    blocks = {k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")}
    return int(embed_dim), len(blocks)
