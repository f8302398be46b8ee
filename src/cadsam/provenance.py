"""What wrote a result: cadsam's own version and, where its source is a git checkout, that
checkout's commit; never the commit of a repository the user happens to stand in."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # src/cadsam/ -> the checkout, if any


def source_commit(root: Path = SOURCE_ROOT) -> str | None:
    """The commit of the checkout holding this package's source (with "+changes" if its
    tracked files differ), or None for an installed copy: a ``.git`` must sit at ``root``
    itself, or git would find the repository of whatever folder holds ``root``."""
    if not (root / ".git").exists():
        return None
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


def provenance() -> dict[str, Any]:
    from . import __version__

    return {"cadsam": __version__, "commit": source_commit()}
