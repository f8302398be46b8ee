"""What a newcomer runs into first: each mistake is one line and an exit code, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

import cadsam
from cadsam.commands import main
from cadsam.distributed import pick_device
from cadsam.errors import CadsamError
from cadsam.evaluation import constant_prediction_warning, format_table

KVASIR = SHARED_DATA / "kvasir-seg-sample"
KVASIR_STEMS = sorted(p.stem for p in (KVASIR / "images").glob("*"))


class ConstantModel(torch.nn.Module):
    """Stands in for a trained model: the same logit on every pixel."""

    classes, image_channels, prompt = None, None, "whole"  # one class, as read, whole image

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, images: torch.Tensor, embeddings: torch.Tensor | None = None):
        return torch.full((len(images), 1, *images.shape[-2:]), self.logit)

    def for_inference(self) -> ConstantModel:  # as AdaptedSam's, which eval and predict call
        return self.eval()


def _run(argv, capsys):
    """(exit code, stdout, stderr) of ``cadsam ARGV``."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *fragments):
    assert code == 1
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("cadsam: error: "), err
    assert err.rstrip().endswith(errors[0])
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def _commands(tmp_path):
    """Each command that runs on a device, with otherwise acceptable arguments."""
    data = ["--images", KVASIR / "images", "--masks", KVASIR / "masks"]
    weights = ["--weights", tmp_path / "w.safetensors"]
    return {
        "train": [
            "train",
            *["--method", "decoder", "--backbone", "vit_tiny"],
            "--out",
            tmp_path,
            *data,
        ],
        "eval": ["eval", *weights, *data],
        "predict": ["predict", *weights, "--images", KVASIR / "images", "--out", tmp_path],
        "cache": [
            *["cache", "--backbone", "vit_tiny", "--checkpoint", tmp_path / "sam.pth"],
            *["--images", KVASIR / "images", "--out", tmp_path / "cache"],
        ],
    }


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"cadsam {cadsam.__version__}\n"


@pytest.mark.parametrize("command", ["train", "eval", "predict", "cache"])
def test_unknown_device_name_is_one_line_error(command, tmp_path, capsys):
    code, _, err = _run([*_commands(tmp_path)[command], "--device", "gpu"], capsys)
    _one_line_error(code, err, "unknown --device 'gpu'", "cuda")


@pytest.mark.parametrize("command", ["train", "eval", "predict", "cache"])
def test_cuda_without_cuda_says_so(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _run([*_commands(tmp_path)[command], "--device", "cuda"], capsys)
    _one_line_error(code, err, "--device cuda: this torch", "use --device cpu")


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(None) == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    for name in ("gpu", "cuda:x", "CPU"):
        with pytest.raises(CadsamError, match="unknown --device"):
            pick_device(name)
    with pytest.raises(CadsamError, match=r"cuda:1: this torch .* use --device cpu"):
        pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(CadsamError, match=r"cuda:2: only 2 GPU\(s\) visible"):
        pick_device("cuda:2")


def test_no_traceback_from_the_installed_command(tmp_path):
    """The same through ``python -m cadsam``, as a user runs it."""
    argv = [*_commands(tmp_path)["eval"], "--device", "gpu"]
    done = subprocess.run(
        [sys.executable, "-m", "cadsam", *map(str, argv)], capture_output=True, text=True
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("cadsam: error: unknown --device 'gpu'")
    done = subprocess.run(
        [sys.executable, "-m", "cadsam", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout == f"cadsam {cadsam.__version__}\n"


def test_eval_table_gives_ber_in_percent():
    table = format_table({"images": 3, "dice": 0.5, "ber": 12.5, "ber_dataset": 10.0})
    lines = table.splitlines()
    assert lines[2].split() == ["ber", "(%)", "12.5000"]
    assert lines[3].split() == ["ber_dataset", "(%)", "10.0000"]
    assert lines[1].split() == ["dice", "0.5000"]


def test_constant_prediction_warning():
    def metrics(fg, bg, n=4):
        return {"images": n, "predicted_all_foreground": fg, "predicted_all_background": bg}

    assert constant_prediction_warning(metrics(0, 0)) is None
    assert constant_prediction_warning(metrics(3, 0)) is None  # one image has a real mask
    assert constant_prediction_warning(metrics(0, 0, n=0)) is None
    assert constant_prediction_warning(metrics(4, 0)).startswith(
        "warning: the model predicted foreground everywhere on 4 of 4 images: "
    )
    assert "background everywhere on 4 of 4 images" in constant_prediction_warning(metrics(0, 4))
    assert "foreground everywhere on 1 and background everywhere on 3 of 4 images" in (
        constant_prediction_warning(metrics(1, 3))
    )


def _eval_with(model, monkeypatch, capsys, *extra):
    monkeypatch.setattr(
        "cadsam.commands.common.load_model_source", lambda *args, **kwargs: (model, 32)
    )
    data = ["--images", KVASIR / "images", "--masks", KVASIR / "masks"]
    return _run(["eval", *data, "--device", "cpu", "--num-workers", "0", *extra], capsys)


def test_eval_warns_when_every_image_is_all_foreground(monkeypatch, capsys):
    code, out, err = _eval_with(ConstantModel(5.0), monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err
    assert "ber (%)" in out and "ber_dataset (%)" in out
    warning = [line for line in err.splitlines() if "warning" in line]
    expected = constant_prediction_warning(
        {"images": 5, "predicted_all_foreground": 5, "predicted_all_background": 0}
    )
    assert warning == [f"cadsam: {expected}"]
    assert "foreground everywhere on 5 of 5 images" in warning[0]
    code, out, err = _eval_with(ConstantModel(-5.0), monkeypatch, capsys, "--json")
    metrics = json.loads(out)
    assert code == 0 and metrics["predicted_all_background"] == 5
    assert 0 <= metrics["ber"] <= 100 and "ber_dataset" in metrics  # JSON keys keep their names
    assert "background everywhere on 5 of 5 images" in err


def _kvasir_links(folder, names):
    """Symlinks to the real Kvasir files under other names: {new name: real stem}."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, stem in names.items():
        kind = "masks" if folder.name.startswith("mask") else "images"
        (folder / name).symlink_to(KVASIR / kind / f"{stem}.jpg")
    return folder


def test_eval_mask_suffix_and_skip_bad_unpaired(tmp_path, monkeypatch, capsys):
    images = _kvasir_links(tmp_path / "images", {f"{s}.jpg": s for s in KVASIR_STEMS})
    masks = _kvasir_links(tmp_path / "masks", {f"{s}_mask.jpg": s for s in KVASIR_STEMS[:4]})
    monkeypatch.setattr(
        "cadsam.commands.common.load_model_source", lambda *args, **kwargs: (ConstantModel(0.5), 32)
    )
    common = ["eval", "--images", images, "--masks", masks, "--device", "cpu"]
    common += ["--num-workers", "0", "--json", "--mask-suffix", "_mask"]
    code, _, err = _run(common, capsys)
    _one_line_error(code, err, "1 image(s)", f"no mask in {masks}: {KVASIR_STEMS[4]}", "--skip-bad")
    code, out, err = _run([*common, "--skip-bad"], capsys)
    assert code == 0 and json.loads(out)["images"] == 4
    assert f"cadsam: warning: skipped unpaired files: 1 image(s) in {images}" in err
    assert KVASIR_STEMS[4] in err


def _predict(tmp_path, monkeypatch, capsys, *extra):
    def load_weights(*args, **kwargs):
        return ConstantModel(1.0), {"image_size": 32}

    monkeypatch.setattr("cadsam.weights.load_weights", load_weights)
    inputs = _kvasir_links(tmp_path / "in", {f"{s}.jpg": s for s in KVASIR_STEMS[:2]})
    (inputs / "0-corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    (inputs / "9-empty.png").write_bytes(b"")
    argv = ["predict", "--weights", tmp_path / "w.safetensors", "--images", inputs]
    return _run([*argv, "--out", tmp_path / "out", "--device", "cpu", *extra], capsys)


def test_predict_reports_unreadable_inputs_and_writes_the_rest(tmp_path, monkeypatch, capsys):
    code, _, err = _predict(tmp_path, monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [f"{s}.png" for s in KVASIR_STEMS[:2]]
    mask = np.array(Image.open(tmp_path / "out" / written[0]))
    assert mask.shape == Image.open(KVASIR / "images" / f"{KVASIR_STEMS[0]}.jpg").size[::-1]
    lines = [line for line in err.splitlines() if line.startswith("cadsam:")]  # not the bar
    assert len(lines) == 4
    assert "cadsam: warning: cannot read image" in lines[0] and "0-corrupt.jpg" in lines[0]
    assert "9-empty.png" in lines[1]
    assert "foreground everywhere on 2 of 2 images" in lines[2]  # the stand-in is constant
    assert lines[3].startswith("cadsam: error: 2 of 4 input(s) could not be read (first: ")
    assert "0-corrupt.jpg" in lines[3] and "--skip-bad" in lines[3]


def test_predict_skip_bad_still_reports_but_exits_0(tmp_path, monkeypatch, capsys):
    code, out, err = _predict(tmp_path, monkeypatch, capsys, "--skip-bad")
    assert code == 0 and "Traceback" not in err
    assert out.strip() == f"wrote 2 mask(s) to {tmp_path / 'out'}; skipped 2 unreadable input(s)"
    assert err.count("cadsam: warning: cannot read image") == 2


def test_a_pretrained_backbone_without_its_weights_is_refused(tmp_path, capsys):
    """One forgotten --checkpoint would otherwise train (or score) random SAM for hours."""
    args = ["train", "--method", "decoder", "--backbone", "vit_b", "--out", str(tmp_path / "r")]
    assert main([*args, "--images", "i", "--masks", "m"]) == 1
    err = capsys.readouterr().err
    assert "vit_b needs its pretrained weights: --checkpoint vit_b" in err
    assert "--random-weights" in err and not (tmp_path / "r").exists()
    assert main(["eval", "--method", "zero-shot", "--backbone", "vit_h", "--images", "i",
                 "--masks", "m"]) == 1  # fmt: skip
    assert "vit_h needs its pretrained weights" in capsys.readouterr().err
    both = [*args, "--images", "i", "--masks", "m", "--random-weights", "--checkpoint", "x.pth"]
    assert main(both) == 1
    assert "contradict each other" in capsys.readouterr().err


def test_random_weights_on_purpose_are_said_and_recorded(tmp_path, capsys, monkeypatch):
    """--random-weights trains on random SAM, says so at the start and keeps it in the run's
    config; a test configuration is random by nature and says that once."""
    import yaml

    from cadsam.backbones import base_weights_note

    note = base_weights_note("vit_b", None, True)
    assert "RANDOM weights" in note and "vit_b" in note
    assert "small test configuration" in base_weights_note("vit_tiny", None, False)
    seen = {}
    monkeypatch.setattr("cadsam.training.train", lambda config: seen.setdefault("config", config))
    args = ["train", "--method", "decoder", "--backbone", "vit_b", "--random-weights"]
    assert main([*args, "--images", "i", "--masks", "m", "--out", str(tmp_path)]) == 0
    assert seen["config"].random_weights is True
    assert yaml.safe_load(yaml.safe_dump(seen["config"].to_dict()))["random_weights"] is True
