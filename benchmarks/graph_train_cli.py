"""``cadsam train --cuda-graph`` against the eager ``cadsam train`` from the command line, on a
CUDA GPU: ViT-B with random weights, a synthetic set of 10 images (batches of 4, 4 and a
short 2 that runs eagerly), its embedding cache, two epochs each, with the data loader's
worker and pinning threads running while the step is captured; and runs stopped after the
first epoch and resumed with the other kind of step.

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

from cadsam import train as cadsam_train
from cadsam.cli import main as cadsam
from cadsam.data.synthetic import make_synthetic_set
from cadsam.sam import build_sam


def main(work: Path) -> int:
    with contextlib.redirect_stdout(sys.stderr):  # cadsam's own lines: stdout is the report
        report = compare(work)
    print(json.dumps(report, indent=2))
    worst = max(report["weights_rel_diff"], *report["resumed_rel_diff_to_eager"].values())
    return 0 if worst < 1e-2 else 1


def compare(work: Path) -> dict:
    data = make_synthetic_set(work / "data", 10, 2, size=512) / "train"
    checkpoint = work / "sam_vit_b_random.pth"
    torch.manual_seed(0)
    torch.save(build_sam("vit_b").state_dict(), checkpoint)
    common = ["--backbone", "vit_b", "--checkpoint", str(checkpoint), "--precision", "bf16"]
    assert cadsam(["cache", "--images", str(data / "images"), "--out", str(work / "cache"),
                   *common, "--image-size", "512", "--views", "identity"]) == 0  # fmt: skip
    train = ["train", "--method", "cad", *common, "--images", str(data / "images"),
             "--masks", str(data / "masks"), "--cache", str(work / "cache"), "--epochs", "2",
             "--no-augment", "--no-progress"]  # fmt: skip
    runs = {}
    for name, extra in (("eager", []), ("graphed", ["--cuda-graph"])):
        started = time.perf_counter()
        assert cadsam([*train, "--out", str(work / name), *extra]) == 0, name
        runs[name] = read_run(work / name)
        runs[name]["seconds"] = round(time.perf_counter() - started, 1)
    # stopped after the first epoch, resumed the other way: the saved optimiser's learning
    # rate and step counts move between the GPU (graphed) and the CPU (eager)
    for name, first, then in (
        ("graphed, resumed eagerly", ["--cuda-graph"], ["--no-cuda-graph"]),
        ("eager, resumed graphed", [], ["--cuda-graph"]),
    ):
        with stopped_after_first_epoch():
            assert cadsam([*train, "--out", str(work / name), *first]) == 130, name
        assert cadsam(["train", "--out", str(work / name), "--resume", "--no-progress", *then]) == 0
        runs[name] = read_run(work / name)
    eager = runs["eager"]["weights"]
    trained = [k for k in eager if k.startswith(("adapter.", "sam.mask_decoder."))]
    return {
        "trained_tensors": len(trained),
        "weights_rel_diff": rel_diff(runs["graphed"]["weights"], eager, trained),
        "resumed_rel_diff_to_eager": {
            name: rel_diff(runs[name]["weights"], eager, trained)
            for name in ("graphed, resumed eagerly", "eager, resumed graphed")
        },
        "losses": {n: [m["loss"] for m in r["metrics"]] for n, r in runs.items()},
        "lrs": {n: [m["lr"] for m in r["metrics"]] for n, r in runs.items()},
        "seconds": {n: r["seconds"] for n, r in runs.items() if "seconds" in r},
    }


def read_run(run: Path) -> dict:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {
        "metrics": [json.loads(line) for line in lines],
        "weights": load_file(run / "last.safetensors"),
    }


def rel_diff(a: dict, b: dict, names: list[str]) -> float:
    diff = sum((a[k].double() - b[k].double()).norm() ** 2 for k in names) ** 0.5
    return (diff / sum(b[k].double().norm() ** 2 for k in names) ** 0.5).item()


@contextlib.contextmanager
def stopped_after_first_epoch():
    """An interruption right after the first epoch's state is saved (cadsam exits 130)."""
    save = cadsam_train._save_state

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    cadsam_train._save_state = save_then_stop
    try:
        yield
    finally:
        cadsam_train._save_state = save


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
