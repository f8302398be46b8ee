"""``cadsam export`` on the real backbones' shapes: each graph, run by onnxruntime, against
PyTorch, as export itself checks it. The test suite exports only the small configurations;
this records the large ones (random weights: the check is of the graph, not of the values).

    python benchmarks/experiments/export_backbones.py --backbones vit_b vit_h \\
        --out benchmarks/experiments/cpu_export_backbones.jsonl

Each backbone in a fresh process; a line per backbone: the command, what export reported,
how long it took, and the versions and commit it ran with.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _commit() -> str:
    found = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def export_one(backbone: str, size: int, folder: Path) -> dict:
    command = [
        *(sys.executable, "-m", "cadsam", "export", "--method", "zero-shot"),
        *("--backbone", backbone, "--random-weights", "--image-size", str(size)),
        *("--out", str(folder / f"{backbone}.onnx")),
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    found = re.search(r"largest difference (\S+) of the logits' scale", done.stdout)
    return {
        "backbone": backbone,
        "image_size": size,
        "command": " ".join(["cadsam", *command[3:]]),
        "returncode": done.returncode,
        "difference": float(found.group(1)) if found else None,
        "said": (done.stdout + done.stderr).strip().splitlines()[-3:],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["vit_b", "vit_h"])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True, help="a JSON-lines file to append to")
    args = parser.parse_args()
    context = {"commit": _commit(), "machine": platform.processor() or platform.machine()}
    context |= _versions()
    for backbone in args.backbones:
        with tempfile.TemporaryDirectory() as folder:
            row = {**export_one(backbone, args.image_size, Path(folder)), **context}
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
