"""Bytes are checked where they are trusted, and a non-finite loss stops a run (issue 40, items
2, 3 and 7): damaged cache rows, weights files and state.pt are refused in one line; a NaN loss
ends the run with the last good weights; metrics.jsonl survives a kill beside state.pt."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from safetensors.torch import load_file, save_file

from cadsam.cache import build_cache, open_cache
from cadsam.commands import main
from cadsam.training import metrics_line

ISBI = SHARED_DATA / "isbi2012-membrane"
FAST = ["--backbone", "vit_tiny", "--image-size", "64", "--num-workers", "0", "--no-progress"]
CAD = ["--method", "cad", "--set", "adapter_size=32", "--batch-size", "2"]


@pytest.fixture()
def data(tmp_path):
    for kind in ("images", "masks"):
        (tmp_path / kind).mkdir()
        for path in sorted((ISBI / kind).iterdir())[:4]:
            (tmp_path / kind / path.name).write_bytes(path.read_bytes())
    return ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks")]


def _cache(tmp_path, sam_file):
    images = sorted((tmp_path / "images").iterdir())
    options = dict(image_size=64, batch_size=4, num_workers=0, progress=False)
    return build_cache(images, tmp_path / "cache", "vit_tiny", sam_file, **options)


def _train(tmp_path, sam_file, data, *extra, out="run"):
    cached = ["--cache", str(tmp_path / "cache"), "--checkpoint", str(sam_file)]
    return main(["train", *CAD, *FAST, *data, *cached, "--out", str(tmp_path / out), *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("cadsam: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def _damage(path, offset, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _row_offset(cache, entry: int) -> int:
    return cache.embeddings.offset + entry * cache.embeddings[0].nbytes


@pytest.mark.parametrize("damage", ["ff", "flipped"])
def test_a_damaged_cache_row_stops_training_and_a_rebuild_recomputes_it(
    tmp_path, sam_file, data, damage, capsys
):
    cache = _cache(tmp_path, sam_file)
    kept = np.array(cache.embeddings[2])
    start, size = _row_offset(cache, 2), cache.embeddings[0].nbytes
    if damage == "ff":  # 128 KiB of 0xff: the whole row (vit_tiny's), NaN in float16
        _damage(cache.root / "embeddings.npy", start, b"\xff" * min(size, 128 * 1024))
    else:  # 64 bytes with every bit flipped: other finite numbers, trained on silently before
        with open(cache.root / "embeddings.npy", "rb") as f:
            f.seek(start + size // 2)
            flipped = bytes(b ^ 0xFF for b in f.read(64))
        _damage(cache.root / "embeddings.npy", start + size // 2, flipped)
    capsys.readouterr()

    assert _train(tmp_path, sam_file, data, "--epochs", "1") == 1
    line = _one_error_line(capsys)
    assert "is damaged: the embedding of image 02 (view identity, entry 2)" in line, line
    assert "cadsam cache --verify" in line
    assert not (tmp_path / "run" / "state.pt").exists()

    assert main(["cache", "--verify", "--out", str(cache.root)]) == 1
    line = _one_error_line(capsys)
    assert "1 of 4 embeddings are damaged (image 02 (view identity, entry 2))" in line, line

    rebuilt = _cache(tmp_path, sam_file)  # the same build again: the damaged row is redone
    assert "1 damaged embedding(s)" in capsys.readouterr().err
    assert rebuilt.complete()
    np.testing.assert_allclose(np.array(rebuilt.embeddings[2]), kept, atol=1e-3)
    assert main(["cache", "--verify", "--out", str(cache.root)]) == 0
    assert "all 4 done embeddings match their digests" in capsys.readouterr().out
    assert _train(tmp_path, sam_file, data, "--epochs", "1") == 0


def test_a_cache_made_before_digests_opens_unchecked_until_verified(
    tmp_path, sam_file, data, capsys
):
    cache = _cache(tmp_path, sam_file)
    (cache.root / "digests.npy").unlink()  # as a cache made before them
    capsys.readouterr()
    assert _train(tmp_path, sam_file, data, "--epochs", "1") == 0
    assert "its embeddings are not checked: cadsam cache --verify" in capsys.readouterr().out
    assert main(["cache", "--verify", "--out", str(cache.root)]) == 0
    assert "recorded those of its 4 done embeddings" in capsys.readouterr().out
    assert open_cache(cache.root).digests is not None
    _damage(cache.root / "embeddings.npy", _row_offset(cache, 1), b"\x00" * 64)
    assert main(["cache", "--verify", "--out", str(cache.root)]) == 1
    assert "image 01" in _one_error_line(capsys)


def test_a_nan_embedding_in_an_unchecked_cache_stops_training_at_its_batch(
    tmp_path, sam_file, data, capsys
):
    cache = _cache(tmp_path, sam_file)
    (cache.root / "digests.npy").unlink()  # unchecked: the NaN reaches the loss
    _damage(cache.root / "embeddings.npy", _row_offset(cache, 2), b"\xff" * 1024)
    capsys.readouterr()
    assert _train(tmp_path, sam_file, data, "--epochs", "2") == 1
    captured = capsys.readouterr()
    assert "embeddings are not checked" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("cadsam: error:")]
    assert len(errors) == 1, captured.err
    assert "the loss is nan at batch" in errors[0] and "of epoch 1" in errors[0], errors
    assert "02" in errors[0] and "rows" in errors[0] and "2" in errors[0].split("rows")[1]
    assert "no weights were written" in errors[0]
    assert not (tmp_path / "run" / "last.safetensors").exists()
    assert not (tmp_path / "run" / "state.pt").exists()


@pytest.mark.parametrize("each_step", [True, False], ids=["each-step", "at-epoch-end"])
def test_a_nan_loss_keeps_the_last_good_weights_and_valid_metrics(
    tmp_path, data, monkeypatch, capsys, each_step
):
    """On a CPU the loss is read each step; elsewhere at the epoch's end (both run here)."""
    import cadsam.step as step
    import cadsam.training as training

    calls = {"n": 0}
    loss = step.segmentation_loss

    def nan_in_epoch_two(logits, target):  # 4 images, batch 2: calls 3 and 4 are epoch 2's
        calls["n"] += 1
        value = loss(logits, target)
        return value * float("nan") if calls["n"] == 4 else value

    saved = {}
    save_epoch = training._save_epoch

    def keep_bytes(run, record):
        save_epoch(run, record)
        saved[record["epoch"]] = (run.path / "last.safetensors").read_bytes()

    monkeypatch.setattr(step, "segmentation_loss", nan_in_epoch_two)
    monkeypatch.setattr(training, "_save_epoch", keep_bytes)
    monkeypatch.setattr(training, "_loss_read_each_step", lambda dist: each_step)
    out = tmp_path / "run"
    assert main(["train", *CAD, *FAST, *data, "--epochs", "3", "--out", str(out)]) == 1
    line = _one_error_line(capsys)
    assert "the loss is nan at batch 2 of epoch 2, images " in line, line
    assert f"{out / 'last.safetensors'} keeps the weights of epoch 1" in line
    assert list(saved) == [1]
    assert (out / "last.safetensors").read_bytes() == saved[1]
    assert all(torch.isfinite(t).all() for t in load_file(out / "last.safetensors").values())
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]


def test_metrics_lines_are_valid_json_whatever_the_numbers():
    line = metrics_line({"epoch": 1, "loss": float("nan"), "val": {"dice": float("inf")}})
    assert json.loads(line) == {"epoch": 1, "loss": None, "val": {"dice": None}}
    assert "NaN" not in line and "Infinity" not in line
    assert not math.isnan(json.loads(metrics_line({"loss": 0.5}))["loss"])


@pytest.fixture()
def finished_run(tmp_path, data):
    out = tmp_path / "run"
    assert main(["train", *CAD, *FAST, *data, "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_resume_refuses_a_truncated_last_safetensors_before_it_says_it_resumes(
    finished_run, capsys
):
    last = finished_run / "last.safetensors"
    os.truncate(last, last.stat().st_size // 2)
    state = (finished_run / "state.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(finished_run), "--resume", "--epochs", "2"]) == 1
    out = capsys.readouterr()
    assert "resuming" not in out.out and "nothing to do" not in out.out
    errors = [line for line in out.err.splitlines() if line.startswith("cadsam: error:")]
    assert len(errors) == 1 and "last.safetensors is truncated or damaged" in errors[0], errors
    assert "delete it and --resume again" in errors[0]
    assert (finished_run / "state.pt").read_bytes() == state  # nothing written


def test_eval_and_predict_refuse_weights_whose_bytes_changed(finished_run, data, capsys):
    last = finished_run / "last.safetensors"
    tensors = load_file(last)
    name = max(tensors, key=lambda k: tensors[k].numel())
    raw = last.read_bytes()
    at = raw.find(tensors[name].contiguous().view(torch.uint8).numpy().tobytes()[:256])
    assert at > 0
    _damage(last, at + 100, bytes(b ^ 0xFF for b in raw[at + 100 : at + 164]))
    capsys.readouterr()
    assert main(["eval", "--weights", str(last), *data, "--num-workers", "0"]) == 1
    line = _one_error_line(capsys)
    assert "last.safetensors is damaged: its tensors" in line and "no longer match" in line
    images = data[1]
    out = finished_run.parent / "predicted"
    assert main(["predict", "--weights", str(last), "--images", images, "--out", str(out)]) == 1
    assert "is damaged" in _one_error_line(capsys)
    assert not out.exists() or not any(out.iterdir())


def test_weights_written_before_digests_still_load(finished_run):
    from cadsam.weights import load_weights, read_weights_metadata

    last = finished_run / "last.safetensors"
    meta = read_weights_metadata(last)
    del meta["tensors_sha256"]
    old = finished_run / "old.safetensors"
    save_file(load_file(last), str(old), metadata={"cadsam": json.dumps(meta)})
    model, loaded = load_weights(old)
    assert "tensors_sha256" not in loaded
    for key, value in load_file(last).items():
        if key in model.trainable_state_dict():
            assert torch.equal(model.trainable_state_dict()[key], value), key


def test_a_corrupt_state_pt_is_one_line(finished_run, capsys):
    path = finished_run / "state.pt"
    state = torch.load(path, weights_only=True)
    name = max(state["model"], key=lambda k: state["model"][k].numel())
    raw = path.read_bytes()
    at = raw.find(state["model"][name].view(torch.uint8).numpy().tobytes()[:256])
    assert at > 0
    _damage(path, at + 64, bytes(b ^ 0xFF for b in raw[at + 64 : at + 128]))  # still loads
    capsys.readouterr()
    assert main(["train", "--out", str(finished_run), "--resume", "--epochs", "2"]) == 1
    out = capsys.readouterr()
    assert "resuming" not in out.out
    errors = [line for line in out.err.splitlines() if line.startswith("cadsam: error:")]
    assert len(errors) == 1 and "state.pt is damaged" in errors[0], out.err

    path.write_bytes(raw[: len(raw) // 3])  # cut short: torch cannot read it at all
    assert main(["train", "--out", str(finished_run), "--resume", "--epochs", "2"]) == 1
    assert "state.pt is damaged" in _one_error_line(capsys)


KILL_BEFORE_THE_METRICS_LINE = """
import os, signal, sys
import cadsam.training as training
line = training.metrics_line
def killed(record):
    if record["epoch"] == 2:  # state.pt of epoch 2 is in place, its metrics line is not
        os.kill(os.getpid(), signal.SIGKILL)
    return line(record)
training.metrics_line = killed
from cadsam.commands import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_between_state_and_metrics_loses_no_line(tmp_path, data):
    out = tmp_path / "run"
    args = ["train", *CAD, *FAST, *data, "--epochs", "3", "--val-fraction", "0.25"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_THE_METRICS_LINE, *args, "--out", str(out)],
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 2
    before = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in before] == [0, 1]  # the zero-shot line, then epoch 1's only

    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[0] == before[0] and records[1] == before[1]
    assert all("loss" in r and math.isfinite(r["loss"]) for r in records[1:])
