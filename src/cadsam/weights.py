"""The weights file ``train`` writes: trainable tensors + what is needed to rebuild the model.

One ``.safetensors`` file. Its metadata (``"cadsam"``, JSON) records the method, backbone,
options, training image size, the base SAM checkpoint (as given, and its sha256) and the sha256
of the file's tensors (``tensors_sha256``, checked on load: changed bytes are refused, not run;
files written before it load unchecked). Loading
rebuilds the model on that checkpoint, found again by name or path and verified by sha256.
A model trained on randomly initialised SAM (``vit_tiny``, or no checkpoint) carries the
whole SAM in the file instead, since no checkpoint could restore it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .backbones import is_release_name, resolve_base_checkpoint
from .data.io import parse_channels
from .data.labels import class_table
from .errors import CadsamError
from .fast.runtime import Runtime
from .files import write_atomic
from .methods import METHOD_OPTIONS, AdaptedSam, build_model
from .sam.checkpoint import file_sha256

FORMAT = 1
REPLACE = "use an intact copy, or train it again"  # what to do with a damaged weights file


def base_checkpoint_record(checkpoint: str | os.PathLike | None) -> dict[str, Any]:
    """Identify the base SAM checkpoint: how it was named and the sha256 of its bytes."""
    if checkpoint is None:
        return {"name": None, "sha256": None}
    path = resolve_base_checkpoint(checkpoint)
    name = str(checkpoint) if is_release_name(checkpoint) else str(path.resolve())
    return {"name": name, "sha256": file_sha256(path)}


def save_weights(
    path: str | os.PathLike, model: AdaptedSam, base: dict[str, Any], image_size: int
) -> None:
    """Write atomically: a temporary file beside ``path``, renamed when complete."""
    tensors = dict(model.trainable_state_dict())
    includes_base = base["name"] is None
    if includes_base:
        tensors.update({f"sam.{k}": v for k, v in model.sam.state_dict().items()})
    meta = {
        "format": FORMAT,
        "method": model.method,
        "backbone": model.backbone,
        "options": model.options,
        "image_size": image_size,
        **({} if model.classes is None else {"classes": model.classes.to_dict()}),
        **({} if model.image_channels is None else {"image_channels": model.image_channels}),
        **({} if model.prompt == "whole" else {"prompt": model.prompt}),
        "base_checkpoint": base,
        "includes_base": includes_base,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta["tensors_sha256"] = tensors_digest(tensors)
    write_atomic(
        path, lambda tmp: save_file(tensors, str(tmp), metadata={"cadsam": json.dumps(meta)})
    )


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 of tensors by name, dtype, shape and bytes, in name order: what a weights file
    records of itself when written, so that bytes changed since are seen on load."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def checked_tensors(path: str | os.PathLike, fix: str = REPLACE) -> dict[str, torch.Tensor]:
    """A weights file's tensors, refused in one line (ending in ``fix``) where they are cut
    short or no longer match the digest the file recorded when written."""
    path = weights_file(path)
    meta = read_weights_metadata(path, fix)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CadsamError(f"{path} is truncated or damaged ({exc}): {fix}") from None
    recorded = meta.get("tensors_sha256")
    if recorded is not None:
        found = tensors_digest(tensors)
        if found != recorded:
            raise CadsamError(
                f"{path} is damaged: its tensors (sha256 {found[:12]}...) no longer match the "
                f"digest recorded when it was written ({recorded[:12]}...): {fix}"
            )
    return tensors


def weights_file(path: str | os.PathLike) -> Path:
    """``path``, or for a run folder the weights ``train`` wrote in it (best, else last)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CadsamError(f"{path} is a folder without best.safetensors or last.safetensors")
    if not path.is_file():
        raise CadsamError(f"weights not found: {path}")
    return path


def read_weights_metadata(path: str | os.PathLike, fix: str = REPLACE) -> dict[str, Any]:
    path = weights_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("cadsam")
    except (SafetensorError, OSError) as exc:
        if _looks_like_safetensors(path):
            raise CadsamError(f"{path} is truncated or damaged ({exc}): {fix}") from None
        raise CadsamError(f"{path} is not a cadsam weights file: {_what_it_is(path)}") from None
    if meta is None:
        raise CadsamError(f"{path} is not a cadsam weights file (no cadsam metadata)")
    try:
        return json.loads(meta)
    except json.JSONDecodeError as exc:
        raise CadsamError(f"{path} is damaged (its cadsam metadata: {exc}): {fix}") from None


def _looks_like_safetensors(path: Path) -> bool:
    """Whether a file begins as safetensors files do: a header length, then its JSON."""
    try:
        with open(path, "rb") as f:
            start = f.read(9)
    except OSError:
        return False
    return len(start) == 9 and start[8:] == b"{" and int.from_bytes(start[:8], "little") < 2**32


def _what_it_is(path: Path) -> str:
    """A guess at what a file given as weights is, and what to pass instead."""
    if path.name == "state.pt":
        return (
            "it is a run's training state (for --resume); pass the run folder or its "
            "last.safetensors"
        )
    try:
        import torch

        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return "not a safetensors file"
    if isinstance(content, dict) and any(str(k).startswith("image_encoder.") for k in content):
        return "it is a SAM checkpoint; give it as --checkpoint, and trained weights as --weights"
    if isinstance(content, dict) and {"optimizer", "model"} <= set(content):
        return "it is a run's training state (for --resume); pass its last.safetensors"
    return "a PyTorch file, not a safetensors file written by cadsam train"


def load_weights(
    path: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    runtime: Runtime | None = None,
) -> tuple[AdaptedSam, dict[str, Any]]:
    """Rebuild the trained model from a weights file (or a run folder), to run under
    ``runtime`` (the plain path if none). ``checkpoint`` overrides where the base SAM
    checkpoint is found (its sha256 must still match the recorded one)."""
    path = weights_file(path)
    meta = read_weights_metadata(path)
    tensors = checked_tensors(path)  # before the model is built: a damaged file costs nothing
    base = None if meta["includes_base"] else _verified_base(path, meta, checkpoint)
    options = model_options(meta, path)
    classes = class_table(meta.get("classes"))
    model = build_model(
        meta["method"], meta["backbone"], base, runtime=runtime, classes=classes, **options
    )
    model.image_channels = parse_channels(meta.get("image_channels"))
    model.prompt = meta.get("prompt", "whole")
    if meta["includes_base"]:  # sam.* holds all of SAM, the trained decoder included
        model.sam.load_state_dict(
            {k.removeprefix("sam."): v for k, v in tensors.items() if k.startswith("sam.")}
        )
    expected = model.trainable_state_dict()
    model.load_trainable_state_dict({k: v for k, v in tensors.items() if k in expected})
    return model, meta


def model_options(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """The model options in a weights file's metadata. Files written before runtime and model
    options were told apart also hold how they were trained to run: that is ignored."""
    known = METHOD_OPTIONS.get(meta["method"], {})
    options = {k: v for k, v in meta["options"].items() if k in known}
    ignored = sorted(set(meta["options"]) - set(known))
    if ignored:
        print(
            f"note: {path.name} records how it was run ({', '.join(ignored)}); ignored, "
            "since that is the runtime's choice now",
            file=sys.stderr,
        )
    return options


def _verified_base(
    path: str | os.PathLike, meta: dict[str, Any], checkpoint: str | os.PathLike | None
) -> Path:
    recorded = meta["base_checkpoint"]
    try:
        resolved = resolve_base_checkpoint(
            checkpoint if checkpoint is not None else recorded["name"]
        )
    except CadsamError as exc:
        raise CadsamError(f"{exc}; {path} was trained on it (pass --checkpoint)") from None
    digest = file_sha256(resolved)
    if digest != recorded["sha256"]:
        raise CadsamError(
            f"{resolved} is not the SAM checkpoint {path} was trained on "
            f"(sha256 {digest[:12]}..., expected {recorded['sha256'][:12]}...)"
        )
    return resolved
