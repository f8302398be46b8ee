"""``cadsam train --cuda-graph`` against the eager ``cadsam train`` from the command line, on a
CUDA GPU: ViT-B with random weights, a synthetic set of 10 images (batches of 4, 4 and a
short 2 that runs eagerly), its embedding cache, two epochs each, with the data loader's
worker and pinning threads running while the step is captured.

Run: python benchmarks/graph_train_cli.py WORK_DIR  (prints one JSON object)
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cadsam.cli import main as cadsam
from cadsam.data.synthetic import make_synthetic_set
from cadsam.sam import build_sam


def main(work: Path) -> int:
    with contextlib.redirect_stdout(sys.stderr):  # cadsam's own lines: stdout is the report
        report = compare(work)
    print(json.dumps(report, indent=2))
    return 0 if report["weights_rel_diff"] < 1e-2 else 1


def compare(work: Path) -> dict:
    data = make_synthetic_set(work / "data", 10, 2, size=512) / "train"
    checkpoint = work / "sam_vit_b_random.pth"
    torch.manual_seed(0)
    torch.save(build_sam("vit_b").state_dict(), checkpoint)
    common = ["--backbone", "vit_b", "--checkpoint", str(checkpoint), "--precision", "bf16"]
    assert cadsam(["cache", "--images", str(data / "images"), "--out", str(work / "cache"),
                   *common, "--image-size", "512", "--views", "identity"]) == 0  # fmt: skip
    runs = {}
    for name, extra in (("eager", []), ("graphed", ["--cuda-graph"])):
        started = time.perf_counter()
        code = cadsam(
            ["train", "--method", "cad", *common, "--images", str(data / "images"),
             "--masks", str(data / "masks"), "--cache", str(work / "cache"), "--epochs", "2",
             "--no-augment", "--no-progress", "--out", str(work / name), *extra]
        )  # fmt: skip
        assert code == 0, name
        lines = (work / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = {
            "seconds": round(time.perf_counter() - started, 1),
            "metrics": [json.loads(line) for line in lines],
            "weights": load_file(work / name / "last.safetensors"),
        }
    eager, graphed = runs["eager"]["weights"], runs["graphed"]["weights"]
    trained = [k for k in eager if k.startswith(("adapter.", "sam.mask_decoder."))]
    diff = sum((graphed[k].double() - eager[k].double()).norm() ** 2 for k in trained) ** 0.5
    norm = sum(eager[k].double().norm() ** 2 for k in trained) ** 0.5
    report = {
        "trained_tensors": len(trained),
        "weights_rel_diff": (diff / norm).item(),
        "losses": {n: [m["loss"] for m in r["metrics"]] for n, r in runs.items()},
        "lrs": {n: [m["lr"] for m in r["metrics"]] for n, r in runs.items()},
        "seconds": {n: r["seconds"] for n, r in runs.items()},
    }
    return report


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
