"""``cadsam demo``: the whole workflow in a few minutes on a CPU, with nothing to download.

Makes a synthetic set (camouflaged textures, soft shadows), caches the frozen encoder's
embeddings once, trains ``decoder`` and ``cad`` from the cache, scores both on held-out images
and writes a report: a table, the accuracy/memory trade-off and example masks.

Without a checkpoint it runs ``vit_tiny`` with random weights (saved as a file so that every
step, weights and all, is as with a real checkpoint). With a real SAM checkpoint, given or
found in the checkpoint cache, it uses that instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .cache import build_cache
from .data import SegmentationDataset, collate, pair_folders
from .data.synthetic import make_synthetic_set
from .errors import CadsamError
from .evaluate import evaluate
from .figures import mask_rows, pyplot, save_grid
from .methods import build_model
from .sam import SAM_CONFIGS, build_sam
from .sam.checkpoint import META_CHECKPOINTS, checkpoint_dir, encoder_signature, read_sam_state_dict
from .train import TrainConfig, segmentation_loss, train
from .weights import load_weights

METHODS = ("decoder", "cad")  # trained; SAM-Adapter's activation memory is measured too


def pick_backbone(checkpoint: str | None, out: Path) -> tuple[str, str]:
    """(backbone, checkpoint path): the given checkpoint, else a Meta checkpoint already in the
    cache (smallest first), else a random ``vit_tiny`` saved under ``out``."""
    if checkpoint is not None:
        found = encoder_signature(read_sam_state_dict(checkpoint))
        for name, config in SAM_CONFIGS.items():
            if (config.embed_dim, config.depth) == found:
                return name, str(checkpoint)
        raise CadsamError(
            f"{checkpoint} holds an image encoder of no known backbone "
            f"(embed dim {found[0]}, {found[1]} blocks)"
        )
    for name in ("vit_b", "vit_l", "vit_h"):
        path = checkpoint_dir() / META_CHECKPOINTS[name].filename
        if path.is_file():
            return name, str(path)
    path = out / "sam_vit_tiny_random.pth"
    if not path.is_file():
        torch.manual_seed(0)
        torch.save(build_sam("vit_tiny").state_dict(), path)
    return "vit_tiny", str(path)


def saved_activation_mib(
    model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor
) -> float:
    """MiB of tensors autograd keeps for backward in one training step (a CPU stand-in for
    the GPU memory the paper measures; weights and optimiser state excluded)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = segmentation_loss(model(images), masks)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()) / 2**20


def run_demo(
    out: str | Path = "cadsam-demo",
    checkpoint: str | None = None,
    n_train: int = 48,
    n_test: int = 16,
    size: int = 128,
    epochs: int = 10,
    adapter_size: int = 64,
    progress: bool = True,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a: None)
    data = make_synthetic_set(out / "data", n_train, n_test, size)
    backbone, checkpoint = pick_backbone(checkpoint, out)
    say(f"data: {n_train} train / {n_test} test synthetic images in {out / 'data'}; SAM {backbone}")

    train_images = sorted((data / "train" / "images").iterdir())
    cache = out / "cache"
    started = time.perf_counter()
    build_cache(
        train_images,
        cache,
        backbone,
        checkpoint,
        ["identity", "hflip", "vflip", "rot90"],
        size,
        batch_size=8,
        precision="fp32",
        num_workers=0,
        progress=progress,
    )
    cache_seconds = time.perf_counter() - started

    test_pairs = pair_folders(data / "test" / "images", data / "test" / "masks")
    test_set = SegmentationDataset(test_pairs, size)
    step = collate([test_set[i] for i in range(4)])  # one step's batch, to measure activations
    rows: list[dict[str, Any]] = []
    models = {}
    for method in METHODS:
        run = out / "runs" / method
        options = {"adapter_size": adapter_size} if method == "cad" else {}
        config = TrainConfig(
            method=method,
            backbone=backbone,
            checkpoint=checkpoint,
            out=str(run),
            images=str(data / "train" / "images"),
            masks=str(data / "train" / "masks"),
            cache=str(cache),
            image_size=size,
            epochs=epochs,
            batch_size=4,
            num_workers=0,
            progress=progress,
            method_options=options,
            resume=(run / "state.pt").exists(),  # a rerun of the demo continues or reuses it
        )
        say(f"training {method} from the cache ...")
        started = time.perf_counter()
        train(config)
        seconds = time.perf_counter() - started
        model, _ = load_weights(run / "last.safetensors")  # with its encoder, as a user gets it
        metrics = evaluate(model, test_set, batch_size=4, progress=False)
        rows.append(
            {
                "method": method,
                "trainable": model.parameter_counts()["trainable"],
                "activations_mib": saved_activation_mib(model.train(), step["image"], step["mask"]),
                "train_seconds": round(seconds, 1),
                **{k: metrics[k] for k in ("dice", "iou", "mae")},
            }
        )
        models[method] = model.eval()
    adapter = build_model("sam-adapter-paper", backbone, checkpoint)
    rows.append(
        {
            "method": "sam-adapter-paper (not trained)",
            "trainable": adapter.parameter_counts()["trainable"],
            "activations_mib": saved_activation_mib(adapter.train(), step["image"], step["mask"]),
        }
    )
    report = _write_report(out, rows, models, test_pairs, size, backbone, cache_seconds, epochs)
    say(f"report: {report}")
    return report


def _write_report(
    out: Path, rows, models, test_pairs, size, backbone, cache_seconds, epochs
) -> Path:
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# cadsam demo",
        "",
        f"Synthetic camouflage and shadow images ({len(test_pairs)} held out), SAM `{backbone}`, "
        f"{epochs} epochs from an embedding cache built in {cache_seconds:.1f} s. "
        "Activation memory: the tensors autograd keeps for backward in one training step of 4 "
        "images (the frozen encoder keeps none; SAM-Adapter's encoder keeps all of its own).",
        "",
        "| method | trainable | activations per step (MiB) | train (s) | Dice | IoU | MAE |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        scores = (
            f"{r['train_seconds']} | {r['dice']:.4f} | {r['iou']:.4f} | {r['mae']:.4f}"
            if "dice" in r
            else "- | - | - | -"
        )
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['activations_mib']:.1f} | {scores} |"
        )
    lines += [
        "",
        "![trade-off](tradeoff.png)",
        "",
        f"Held-out examples (columns: image, ground truth, {', '.join(models)}; two camouflaged "
        "objects, then two shadows):",
        "",
        "![examples](examples.png)",
        "",
    ]
    if backbone == "vit_tiny":
        lines[3:3] = [
            "",
            "With random SAM weights the encoder's embedding carries little about the image; the "
            "adapter, which reads the image itself, is what can learn the task. At this toy scale "
            "the adapter's activations outweigh a tiny encoder's; at the paper's scale (ViT-B/H, "
            "512-pixel adapter) see benchmarks/BENCHMARKS.md.",
        ]
    _plot_tradeoff(rows, out / "tradeoff.png")
    camo = [p for p in test_pairs if p.id.startswith("camo")][:2]
    shadow = [p for p in test_pairs if p.id.startswith("shadow")][:2]
    save_grid(mask_rows(list(models.values()), camo + shadow, size), out / "examples.png")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _plot_tradeoff(rows, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        if "dice" in r:
            ax.scatter(r["activations_mib"], r["dice"], s=60)
            ax.annotate(
                r["method"],
                (r["activations_mib"], r["dice"]),
                textcoords="offset points",
                xytext=(6, 4),
            )
    ax.set_xlabel("activation memory per step (MiB)")
    ax.set_ylabel("Dice (held-out)")
    ax.set_title("Accuracy / memory trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
