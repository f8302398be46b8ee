"""The demo end to end on a small budget, and its synthetic data."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cadsam.commands.demo import (
    GPU_BENCH,
    LABELS,
    METHODS,
    PAPER_SCALE,
    _comparisons,
    _memory_at_paper_scale,
    _mib,
    _missing_text,
    _noise_text,
    _times_text,
    kept_for_backward,
    mean_interval,
    run_demo,
    tradeoff_figure,
)
from cadsam.commands.figures import pyplot
from cadsam.commands.paper import MEMORY_TABLES
from cadsam.cores import usable_cores
from cadsam.data.synthetic import make_synthetic_set
from cadsam.errors import CadsamError
from cadsam.methods import build_model
from cadsam.methods.lora import LoraAdapter
from cadsam.step import segmentation_loss
from cadsam.weights import load_weights


def test_synthetic_masks_mark_what_differs(tmp_path):
    root = make_synthetic_set(tmp_path, n_train=6, n_test=0, size=96, seed=3)
    for path in sorted((root / "train" / "images").iterdir()):
        image = np.array(Image.open(path)).astype(float).mean(-1)
        mask = np.array(Image.open(root / "train" / "masks" / path.name)) > 127
        assert 0.03 < mask.mean() < 0.6
        if path.name.startswith("shadow"):  # darker inside
            assert image[mask].mean() < 0.85 * image[~mask].mean()
        else:  # about the same brightness, another stripe orientation
            gy, gx = np.gradient(image)
            angle = np.arctan2(gy, gx) % np.pi
            assert abs(image[mask].mean() - image[~mask].mean()) < 15
            assert abs(np.median(angle[mask]) - np.median(angle[~mask])) > 0.3


DEMO_ARGS = ["--train-images", "8", "--test-images", "4", "--image-size", "64", "--epochs", "1"]


def _cli_demo(out) -> str:
    """``cadsam demo`` on a small budget; its console output."""
    from cadsam.commands import main

    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        assert main(["demo", "--out", str(out), *DEMO_ARGS]) == 0
    return console.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run through the CLI, then a rerun in the same folder."""
    out = tmp_path_factory.mktemp("demo")
    first = _cli_demo(out)
    saved = {name: (out / name).read_bytes() for name in ("results.json", "report.md")}
    epochs = {m: (out / "runs" / m / "metrics.jsonl").read_text() for m in METHODS}
    second = _cli_demo(out)
    return out, first, second, saved, epochs


def _table_row(method: str, r: dict) -> str:
    return (
        f"| {method} | {r['trainable']:,} | {r['train_seconds']:.1f} | {r['dice']:.4f} "
        f"| {r['iou']:.4f} | {r['mae']:.4f} | {r['kept_mib']:,.1f} |"
    )


def test_demo_trains_and_scores_all_four_methods(demo):
    out, *_ = demo
    results = json.loads((out / "results.json").read_text())
    assert "lora" in METHODS and "sam-adapter-paper" in METHODS
    assert list(results["methods"]) == list(METHODS)  # SAM-Adapter and LoRA are trained too
    assert results["cache_seconds"] > 0
    # one run, the machine's load and cores as it started, threads within the cores
    (run,) = results["runs"]
    assert run["cores"] == usable_cores() and 1 <= run["threads"] <= run["cores"]
    assert results["cache_run"] == 0
    for method, r in results["methods"].items():
        assert 0 <= r["dice"] <= 1 and 0 <= r["iou"] <= r["dice"] and 0 <= r["mae"] <= 1
        # each held-out image's Dice, whose mean is the table's
        assert r["run"] == 0 and len(r["dice_per_image"]) == 4
        assert r["dice"] == pytest.approx(np.mean(r["dice_per_image"]), abs=1e-6)
        lines = (out / "runs" / method / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1
        assert r["train_seconds"] == pytest.approx(json.loads(lines[0])["seconds"], abs=0.06)
        assert r["train_seconds"] > 0
    model, meta = load_weights(out / "runs" / "cad" / "last.safetensors")
    assert meta["base_checkpoint"]["name"].endswith("sam_vit_tiny_random.pth")
    assert model.sam.image_encoder is not None  # trained from the cache, usable with the encoder
    lora, _ = load_weights(out / "runs" / "lora" / "last.safetensors")
    assert isinstance(lora.encoder_adapter, LoraAdapter)  # the low-rank updates, trained
    assert any(b.weight.abs().sum() > 0 for b in (q.b for q in lora.encoder_adapter.q))
    r = results["methods"]["lora"]
    assert r["trainable"] == lora.parameter_counts()["trainable"]
    assert r["trainable"] > results["methods"]["decoder"]["trainable"]  # decoder + updates


def test_demo_console_ends_with_the_table_and_the_report(demo):
    out, first, *_ = demo
    results = json.loads((out / "results.json").read_text())
    lines = first.rstrip("\n").splitlines()
    assert lines[-1] == f"report: {out / 'report.md'}"
    assert lines[-2] == ""
    rows = lines[-2 - len(METHODS) : -2]
    for method, row in zip(METHODS, rows, strict=True):
        assert row.startswith(_table_row(method, results["methods"][method]))
    assert lines[-3 - len(METHODS)].startswith("| ---")
    assert len(lines) < 25  # a few progress lines, no bar per epoch


def test_demo_rerun_keeps_its_results(demo):
    out, first, second, saved, epochs = demo
    assert (out / "results.json").read_bytes() == saved["results.json"]
    # the same report, but for whose times they are: an earlier run's now, not this one's
    before, after = saved["report.md"].decode(), (out / "report.md").read_text()
    times = [line for line in before.splitlines() if line.startswith("Times measured: ")]
    assert len(times) == 1 and "`lora` by this run (started " in times[0]
    assert after == before.replace(
        " by this run (started ", " by an earlier run of the demo (started "
    )
    for method in METHODS:  # nothing trained again
        assert (out / "runs" / method / "metrics.jsonl").read_text() == epochs[method]
    assert "training" not in second
    table = first[first.index("| method") :]
    assert second.endswith(table)


def test_demo_report_sets_the_run_beside_the_paper_scale(demo):
    out, *_ = demo
    text = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    for method, r in results["methods"].items():
        assert _table_row(method, r) in text
    scale = _memory_at_paper_scale()
    kept = {m: scale[m]["kept_mib"] for m in METHODS}
    assert kept["decoder"] < kept["cad"] < kept["sam-adapter-paper"]
    # LoRA trains the encoder's attention, so the encoder keeps its activations: more than CAD.
    options = {"cad": {"adapter_size": PAPER_SCALE["adapter_size"]}, "lora": {}}
    counted = {
        m: kept_for_backward(m, "vit_b", PAPER_SCALE["image_size"], options[m])[0]
        for m in ("cad", "lora")
    }
    assert counted["lora"] > counted["cad"]
    assert kept["lora"] == round(counted["lora"], 1) and kept["cad"] == round(counted["cad"], 1)
    # The GPU column is one device's run (benchmark_figures.json); the paper has no LoRA: "-".
    bench = GPU_BENCH["peak_allocated_mib"]
    gpu = {m: f"{math.floor(bench[m] + 0.5):,}" for m in METHODS}
    assert _mib(9_820.5) == "9,821"  # halves round up, as BENCHMARKS.md prints them
    assert ("vit_b", "lora") not in MEMORY_TABLES and all(bench[m] is not None for m in METHODS)
    at_scale = text[text.index("## Memory at the paper's scale") :]
    for method, s in scale.items():
        paper = MEMORY_TABLES[("vit_b", method)][1] if method != "lora" else None
        assert (
            f"| {method} | {s['trainable']:,} | {round(s['kept_mib']):,} "
            f"| {gpu[method]} | {'-' if paper is None else f'{paper:,}'} |"
        ) in at_scale
    for key in ("device", "date", "commit", "source"):  # where the GPU figures come from
        assert GPU_BENCH[key] in text
    assert "benchmarks/BENCHMARKS.md" in text
    assert f"(`lora-lean`): {_mib(bench['lora-lean'])} MiB; CAD from cached" in text
    assert "H100" not in text  # one device in the GPU column, named once
    assert "the paper has no LoRA" in text and "did not measure" not in text
    lora_vs_cad = f"{kept['lora'] / kept['cad']:.1f}x more kept for backward"
    assert f"Against CAD, LoRA needs {lora_vs_cad}" in text


def test_memory_sentences_follow_the_figures():
    """The comparisons are computed: flip the figures and the sentences flip with them."""
    scale = {
        "decoder": {"kept_mib": 100.0, "gpu_bench_mib": None, "paper_mib": 1_000},
        "cad": {"kept_mib": 400.0, "gpu_bench_mib": 300.0, "paper_mib": 900},
        "sam-adapter-paper": {"kept_mib": 200.0, "gpu_bench_mib": 600.0, "paper_mib": 3_000},
        "lora": {"kept_mib": 800.0, "gpu_bench_mib": 310.0, "paper_mib": None},
    }
    text = _comparisons(scale)
    assert text.startswith(
        "The most of each column's figures: LoRA kept for backward; SAM-Adapter at peak on the "
        "GPU and in the paper (each acts inside the encoder"
    )
    # CAD is not above decoder-only everywhere here, so no reason is given for it.
    assert "CAD needs 4.0x more kept for backward and 1.1x less in the paper." in text
    assert "SAM-Adapter, CAD needs 2.0x more kept for backward, 2.0x less at peak" in text
    assert "Against CAD, LoRA needs 2.0x more kept for backward and 1.03x more at peak" in text
    scale["lora"]["kept_mib"] = 10.0
    text = _comparisons(scale)
    assert "Against CAD, LoRA needs 40.0x less kept for backward and 1.03x more at" in text
    assert "like SAM-Adapter" not in text  # the reason holds only where LoRA needs more


def test_a_missing_figure_is_said_to_be_missing_not_zero():
    scale = {
        "decoder": {"gpu_bench_mib": None, "paper_mib": 1_000},
        "lora": {"gpu_bench_mib": 310.0, "paper_mib": None},
    }
    assert _missing_text(scale) == (
        '"-": no figure from that source (that GPU run did not measure decoder-only; no other '
        "device's figure is used; the paper has no LoRA)."
    )
    assert _missing_text({"cad": {"gpu_bench_mib": 1.0, "paper_mib": 2}}) == ""


def test_demo_figures_are_labelled(demo):
    out, *_ = demo
    assert Image.open(out / "tradeoff.png").size[0] > 0
    results = json.loads((out / "results.json").read_text())
    fig = tradeoff_figure(results, _memory_at_paper_scale())
    left, right = fig.axes
    assert [t.get_text() for t in left.texts] == [LABELS[m] for m in METHODS]  # a point each
    assert [t.get_text() for t in right.get_legend().get_texts()] == [LABELS[m] for m in METHODS]
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in right.containers}
    # Three sources; no bar, not a zero-height one, where a source has no figure.
    assert {m: len(h) for m, h in bars.items()} == {
        "decoder": 3,
        "CAD": 3,
        "SAM-Adapter": 3,
        "LoRA": 2,  # no paper figure
    }
    assert all(h > 0 for heights in bars.values() for h in heights)
    assert bars["LoRA"][0] > bars["CAD"][0]  # kept for backward at ViT-B
    assert [t.get_text() for t in right.texts] == ["no figure"]  # LoRA's, in the paper
    pyplot().close(fig)
    examples = np.asarray(Image.open(out / "examples.png").convert("L"))
    columns = 2 + len(METHODS)  # image, ground truth, one per method
    header = examples.shape[0] - 64 * 4  # four examples below a row of labels
    assert examples.shape[1] == 64 * columns and 8 < header < 40
    for c in range(columns):  # text in every column's label
        assert (examples[:header, 64 * c : 64 * (c + 1)] < 128).any()


# Held-out Dice of four images per method: two close means, one spread out, one image alone.
FEW_SCORES = {
    "decoder": [0.60, 0.70, 0.65, 0.62],
    "cad": [0.66, 0.64, 0.70, 0.61],
    "sam-adapter-paper": [0.9, 0.2, 0.5, 0.7],
    "lora": [0.63],
}


def _few_image_results() -> dict:
    methods = {m: {"dice": float(np.mean(s)), "dice_per_image": s} for m, s in FEW_SCORES.items()}
    return {"settings": {"backbone": "vit_tiny", "n_test": 4}, "methods": methods}


def test_mean_interval_is_the_bootstrap_interval_of_the_mean():
    assert mean_interval([]) is None and mean_interval([0.5]) is None  # no spread to tell
    assert mean_interval([0.7] * 5) == pytest.approx((0.7, 0.7))
    scores = list(np.random.default_rng(1).uniform(0.4, 0.9, 16))
    low, high = mean_interval(scores)
    assert low < np.mean(scores) < high
    assert mean_interval(scores) == (low, high)  # seeded: a rerun writes the same report
    normal = 2 * 1.96 * np.std(scores, ddof=1) / math.sqrt(16)
    assert high - low == pytest.approx(normal, rel=0.2)
    few = mean_interval(scores[:4])
    assert few[1] - few[0] > high - low  # fewer images, a noisier mean


def test_the_tradeoff_plot_spans_dice_0_to_1_with_each_means_interval():
    """No zoomed axis to magnify differences between a few images' means; error bars show
    how far another draw of images could move each mean."""
    results = _few_image_results()
    scale = {
        m: {"kept_mib": 1024.0 * (i + 1), "gpu_bench_mib": 1.0, "paper_mib": 2}
        for i, m in enumerate(METHODS)
    }
    fig = tradeoff_figure(results, scale)
    left = fig.axes[0]
    assert left.get_ylim() == (0.0, 1.0)
    bars = {}
    for container in left.containers:  # an ErrorbarContainer: (line, caps, (vertical bars,))
        ((x, low), (_, high)) = container.lines[2][0].get_segments()[0]
        bars[round(x)] = pytest.approx((low, high))
    # one bar per method with two images or more, spanning its mean's interval
    assert bars == {i + 1: mean_interval(FEW_SCORES[m]) for i, m in enumerate(METHODS[:3])}
    assert "95% interval" in left.get_ylabel()
    pyplot().close(fig)


def test_the_report_says_how_noisy_a_mean_over_few_images_is():
    text = "\n".join(_noise_text(_few_image_results()))
    assert text.startswith("How noisy a mean over 4 held-out images is: each method's mean Dice")
    for method in ("decoder", "cad", "sam-adapter-paper"):
        low, high = mean_interval(FEW_SCORES[method])
        assert f"`{method}` {np.mean(FEW_SCORES[method]):.3f} ({low:.3f} to {high:.3f})" in text
    widest = max(np.subtract(*mean_interval(s)[::-1]) for s in list(FEW_SCORES.values())[:3])
    assert f"up to {widest:.3f} wide: a difference between methods inside them is noise" in text
    assert "`lora`" not in text  # one image: no interval to give
    assert _noise_text({"methods": {"cad": {"dice": 0.5}}}) == []  # an older demo's record


def test_the_report_says_which_run_measured_each_time_and_how_busy_it_was():
    """A rerun keeps earlier times: the report says so, and when the machine was busy."""
    results = {
        "cache_seconds": 3.0,
        "cache_run": 0,
        "runs": [
            {"started": "2026-12-07 10:00", "load": 1.6, "cores": 2, "threads": 2},
            {"started": "2026-12-07 11:00", "load": 0.1, "cores": 2, "threads": 2},
        ],
        "methods": {"decoder": {"run": 0}, "cad": {"run": 1}, "lora": {}},
    }
    assert _times_text(results) == (
        "Times measured: the cache's build and `decoder` by an earlier run of the demo (started "
        "2026-12-07 10:00, load average 1.60 on 2 cores: busy, so longer than on an idle "
        "machine); `cad` by this run (started 2026-12-07 11:00, load average 0.10 on 2 cores); "
        "`lora` by an earlier run of the demo, its load not recorded."
    )


def test_threads_and_workers_never_exceed_the_usable_cores(monkeypatch):
    """Issue 33's trap 13: threads beyond the cores wait for each other on a shared machine."""
    import cadsam.cores as cores

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for count in (1, 2, 3, 16):
        monkeypatch.setattr(cores, "usable_cores", lambda count=count: count)
        assert cores.cpu_threads() == count
        for workers in range(count):
            for processes in (1, 2, 4):
                threads = cores.cpu_threads(workers, processes)
                assert threads >= 1
                assert processes * (threads + workers) <= count or threads == 1
    monkeypatch.setattr(cores, "usable_cores", lambda: 16)
    assert cores.cpu_threads(workers=2) == 14
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four processes on this machine
    assert cores.cpu_threads(workers=1) == 3
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(cores, "usable_cores", lambda: 2)
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        torch.set_num_threads(2)
        assert cores.share_cores(workers=1) == 1 == torch.get_num_threads()
        assert cores.share_cores(workers=0) == 1  # never raised: fewer set by the caller stay
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert cores.share_cores(workers=1) == 2  # the user's own setting wins
    finally:
        torch.set_num_threads(before)


def test_cadsam_makes_openmp_wait_without_spinning_before_torch_loads():
    """OpenMP reads OMP_WAIT_POLICY once, as PyTorch loads it: cadsam sets it (unless the user
    did) in the first module it imports, before anything imports torch."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, cadsam; print(os.environ['OMP_WAIT_POLICY'])"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], env=env, capture_output=True, text=True
    )
    assert done.stdout.strip() == "PASSIVE", done.stderr[-2000:]
    finished = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert finished.index("cadsam.cores") < finished.index("torch")


def test_demo_refuses_a_folder_with_other_settings(demo):
    out, *_ = demo
    with pytest.raises(CadsamError, match=r"other settings.*epochs 1 -> 2"):
        run_demo(out, n_train=8, n_test=4, size=64, epochs=2, progress=False)


def test_kept_for_backward_on_meta_matches_a_real_step():
    """The meta-device count equals what autograd keeps in a real CPU step."""
    for method, options in (
        ("decoder", {}),
        ("cad", {"adapter_size": 32}),
        ("sam-adapter-paper", {}),
        ("lora", {}),
    ):
        torch.manual_seed(0)
        model = build_model(method, "vit_tiny", **options).train()
        images = torch.rand(2, 3, 64, 64) * 255
        masks = (torch.rand(2, 1, 64, 64) > 0.5).float()
        weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        kept = {}

        def pack(tensor, weights=weights, kept=kept):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                kept[storage.data_ptr()] = (storage, storage.nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            segmentation_loss(model(images), masks)
        on_cpu = sum(n for _, n in kept.values()) / 2**20
        on_meta, trainable = kept_for_backward(method, "vit_tiny", 64, options, batch=2)
        assert on_meta == pytest.approx(on_cpu, rel=1e-6)
        assert trainable == model.parameter_counts()["trainable"]


def test_demo_picks_the_given_then_a_cached_then_a_random_sam(tmp_path, monkeypatch):
    import torch

    from cadsam.commands.demo import pick_backbone
    from cadsam.sam import build_sam

    monkeypatch.setenv("CADSAM_HOME", str(tmp_path / "home"))
    assert pick_backbone(None, tmp_path) == ("vit_tiny", str(tmp_path / "sam_vit_tiny_random.pth"))
    given = tmp_path / "mine.pth"
    torch.save(build_sam("vit_tiny").state_dict(), given)
    assert pick_backbone(str(given), tmp_path) == ("vit_tiny", str(given))
    cached = tmp_path / "home" / "checkpoints" / "sam_vit_b_01ec64.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"found by name")
    assert pick_backbone(None, tmp_path) == ("vit_b", str(cached))
    # a small configuration asked for: its random weights, whatever the cache holds
    random_hiera = str(tmp_path / "sam2.1_hiera_tiny_test_random.pt")
    assert pick_backbone(None, tmp_path, SAM2_TEST) == (SAM2_TEST, random_hiera)
    assert pick_backbone(random_hiera, tmp_path) == (SAM2_TEST, random_hiera)  # read back
    with pytest.raises(CadsamError, match="give --checkpoint vit_b"):
        pick_backbone(None, tmp_path, "vit_b")
    with pytest.raises(CadsamError, match="leave out --backbone"):
        pick_backbone(str(given), tmp_path, "vit_tiny")


def test_demo_takes_a_checkpoint_by_name_as_train_does(tmp_path, monkeypatch):
    """``--checkpoint sam2.1_hiera_t`` finds Meta's file in the checkpoint cache, as ``train``
    and ``cache`` do, rather than looking for a file of that name."""
    import torch

    from cadsam.commands.demo import pick_backbone
    from cadsam.sam2 import build_sam2

    monkeypatch.setenv("CADSAM_HOME", str(tmp_path / "home"))
    cached = tmp_path / "home" / "checkpoints" / "sam2.1_hiera_tiny.pt"
    cached.parent.mkdir(parents=True)
    torch.save({"model": build_sam2("sam2.1_hiera_t").state_dict()}, cached)
    assert pick_backbone("sam2.1_hiera_t", tmp_path) == ("sam2.1_hiera_t", str(cached))


def test_demo_refuses_a_checkpoint_of_no_known_backbone(tmp_path):
    import pytest
    import torch

    from cadsam.commands.demo import pick_backbone
    from cadsam.errors import CadsamError
    from cadsam.sam.image_encoder import ImageEncoderViT
    from cadsam.sam.prompt_encoder import PromptEncoder

    odd = {
        f"image_encoder.{k}": v
        for k, v in ImageEncoderViT(img_size=64, embed_dim=32, depth=1, num_heads=1)
        .state_dict()
        .items()
    }
    odd |= {f"prompt_encoder.{k}": v for k, v in PromptEncoder().state_dict().items()}
    odd["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(CadsamError, match=r"no known backbone \(embed dim 32, 1 blocks\)"):
        pick_backbone(str(tmp_path / "odd.pth"), tmp_path)


def test_demo_runs_on_sam2s_small_configuration(tmp_path):
    """``--backbone sam2.1_hiera_tiny_test``: random weights saved in Meta's SAM 2.1 format,
    read back as any SAM 2.1 checkpoint; SAM-Adapter, SAM 1 only, is left out with its reason,
    the other three train."""
    from cadsam.commands import main
    from cadsam.sam2 import Sam2

    out = tmp_path / "demo"
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        args = ["demo", "--out", str(out), "--backbone", "sam2.1_hiera_tiny_test", *DEMO_ARGS]
        assert main(args) == 0
    assert "model" in torch.load(out / "sam2.1_hiera_tiny_test_random.pt", weights_only=True)
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["backbone"] == "sam2.1_hiera_tiny_test"
    assert list(results["methods"]) == ["decoder", "cad", "lora"]
    for r in results["methods"].values():
        assert 0 <= r["dice"] <= 1 and 0 <= r["iou"] <= r["dice"] and r["train_seconds"] > 0
    lora, _ = load_weights(out / "runs" / "lora" / "last.safetensors")
    assert isinstance(lora.sam, Sam2) and isinstance(lora.encoder_adapter, LoraAdapter)
    why = "SAM-Adapter prompts the tokens of SAM's ViT encoder; SAM 2.1 has a Hiera trunk"
    assert f"sam-adapter-paper: not trained ({why})" in console.getvalue()
    text = (out / "report.md").read_text()
    assert "SAM `sam2.1_hiera_tiny_test`" in text
    assert "| method | trainable (sam2.1_hiera_tiny_test) |" in text
    assert "| sam-adapter-paper | - | not trained | - |" in text
    assert f"`sam-adapter-paper` is not trained here: {why}." in text
    for method in results["methods"]:
        assert _table_row(method, results["methods"][method]) in text


SAM2_TEST = "sam2.1_hiera_tiny_test"


def test_the_backbone_is_told_from_one_read_of_the_checkpoint(tmp_path, monkeypatch):
    """SAM 2.1's file or SAM's, each read once to pick the backbone; a file that is neither
    gets SAM's one-line error."""
    import cadsam.commands.demo as demo
    from cadsam.sam import build_sam
    from cadsam.sam2 import build_sam2

    files = {SAM2_TEST: tmp_path / "hiera.pt", "vit_tiny": tmp_path / "vit.pth"}
    torch.save({"model": build_sam2(SAM2_TEST).state_dict()}, files[SAM2_TEST])
    torch.save(build_sam("vit_tiny").state_dict(), files["vit_tiny"])
    reads = []
    read = demo.read_checkpoint_file
    monkeypatch.setattr(demo, "read_checkpoint_file", lambda path: reads.append(path) or read(path))
    for backbone, path in files.items():
        assert demo.pick_backbone(str(path), tmp_path) == (backbone, str(path))
    assert reads == list(files.values())
    neither = tmp_path / "neither.pth"
    torch.save({"weights": torch.zeros(2)}, neither)
    with pytest.raises(CadsamError, match=r"neither\.pth is not a SAM state_dict"):
        demo.pick_backbone(str(neither), tmp_path)
