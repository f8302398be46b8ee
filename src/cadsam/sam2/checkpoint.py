"""Finding, downloading and reading Meta's SAM 2.1 checkpoints, with errors a user can act on.

A checkpoint is named by a path, or by a backbone name (``sam2.1_hiera_t`` ...) that is looked up
in the cache directory (``$CADSAM_HOME/checkpoints``, shared with SAM's) and otherwise downloaded
from Meta's release of 2024-09-28 (or from ``$CADSAM_CHECKPOINT_URL``, a mirror of Meta's files).

Meta publishes no digests for these files (its download script and README give only the URLs),
so none is pinned here. A download is trusted on first use: its sha256 is recorded beside the
file (``<file>.sha256``) and every later download of that name must match the record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CadsamError
from ..sam.checkpoint import download_file, read_checkpoint_file, resolve_release

META_SAM2_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"


@dataclass(frozen=True)
class Sam2CheckpointFile:
    """One of Meta's SAM 2.1 checkpoints; ``sha256`` is None while no digest is known."""

    filename: str
    sha256: str | None = None

    @property
    def url(self) -> str:
        base = os.environ.get("CADSAM_CHECKPOINT_URL", META_SAM2_BASE_URL).rstrip("/")
        return f"{base}/{self.filename}"


SAM2_CHECKPOINTS: dict[str, Sam2CheckpointFile] = {
    "sam2.1_hiera_t": Sam2CheckpointFile("sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_s": Sam2CheckpointFile("sam2.1_hiera_small.pt"),
    "sam2.1_hiera_b+": Sam2CheckpointFile("sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_l": Sam2CheckpointFile("sam2.1_hiera_large.pt"),
}


def digest_record(path: Path) -> Path:
    """Where the sha256 of the first download of ``path`` is kept."""
    return path.with_name(path.name + ".sha256")


def resolve_sam2_checkpoint(spec: str | os.PathLike, download: bool = True) -> Path:
    """A path, or a backbone name found in the cache or downloaded into it -> a local file."""
    return resolve_release(spec, SAM2_CHECKPOINTS, download_trusting_first_use, download)


def download_trusting_first_use(source: Sam2CheckpointFile, dest: Path) -> None:
    """Download ``source`` to ``dest``: checked against its pinned digest if it has one, else
    against the sha256 recorded at the first download, else recorded now."""
    record = digest_record(dest)
    if source.sha256 is not None:
        expected, origin = source.sha256, "the digest cadsam pins"
    elif record.is_file():
        expected = record.read_text().strip()
        origin = f"the first download's, recorded in {record}: delete that file to trust a new one"
    else:
        expected, origin = None, ""
    digest = f"sha256:{expected}" if expected else None
    sha256 = download_file(source.url, dest, digest, origin=origin)
    if not record.is_file():
        record.write_text(sha256 + "\n")


def read_sam2_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a SAM 2 checkpoint (its weights under ``"model"``) safely, or say clearly why the
    file cannot be one."""
    path = Path(path)
    return sam2_state_dict(read_checkpoint_file(path), path)


def sam2_state_dict(content: object, path: Path) -> dict[str, torch.Tensor]:
    """What :func:`read_checkpoint_file` read from ``path``, as SAM 2's state_dict, or the
    one-line error that says why it is not one."""
    if is_sam1_state_dict(content):
        raise CadsamError(
            f"{path} is a SAM (1) checkpoint, not SAM 2.1: use it with a SAM backbone "
            "(vit_b, vit_l, vit_h)"
        )
    state = content.get("model") if isinstance(content, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CadsamError(
            f"{path} is not a SAM 2 checkpoint (expected a dict with its weights under 'model')"
        )
    if is_sam1_state_dict(state):
        raise CadsamError(f"{path} holds SAM (1) weights, not SAM 2.1: use a SAM backbone")
    parts = ("image_encoder.trunk.", "sam_prompt_encoder.", "sam_mask_decoder.")
    missing = [p[:-1] for p in parts if not any(k.startswith(p) for k in state)]
    if missing:
        sample = ", ".join(list(state)[:3]) or "no keys"
        raise CadsamError(
            f"{path} is not a SAM 2 checkpoint: no {', '.join(missing)} weights (found {sample})"
        )
    return state


def is_sam1_state_dict(content: object) -> bool:
    """Whether ``content`` is a SAM (1) state_dict: flat, with ViT encoder and decoder keys."""
    return isinstance(content, dict) and any(
        isinstance(k, str) and k.startswith(("mask_decoder.", "image_encoder.patch_embed."))
        for k in content
    )


def trunk_signature(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(embed dim, number of blocks) of the Hiera trunk in a SAM 2 state_dict."""
    embed_dim = state["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
    prefix = "image_encoder.trunk.blocks."
    blocks = {k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}
    return int(embed_dim), len(blocks)
