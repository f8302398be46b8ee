"""The first hour, second pass (issue 33): what a new user runs into after a fresh clone."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SHARED_DATA
from PIL import Image

from cadsam import build_sam
from cadsam.commands import main
from cadsam.evaluation import constant_masks
from cadsam.training import constant_model_warnings

ROOT = Path(__file__).resolve().parents[1]

# two tests that read the real data sets and one that does not
DATA_TESTS = [
    "tests/test_data.py::test_lossy_jpeg_masks_threshold_to_clean_binary",
    "tests/test_data.py::test_augmentation_depends_only_on_seed_epoch_and_index",
]
PLAIN_TEST = "tests/test_data.py::test_shift_scale_rotate_matrix"


def _scripts_test(data: Path, *, require: bool) -> subprocess.CompletedProcess:
    """``scripts/test`` on three tests, with CADSAM_TEST_DATA=``data``; ``require``: as CI."""
    env = {k: v for k, v in os.environ.items() if k != "CADSAM_REQUIRE_TEST_DATA"}
    env.update(CADSAM_TEST_DATA=str(data), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    if require:
        env["CADSAM_REQUIRE_TEST_DATA"] = "1"
    quick = ["-p", "no:xdist", "-p", "no:cacheprovider"]
    return subprocess.run(
        [ROOT / "scripts" / "test", *quick, *DATA_TESTS, PLAIN_TEST],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_without_the_real_data_its_tests_skip_with_one_line_and_ci_fails(tmp_path):
    reason = (
        f"the real data sets are not in {tmp_path}: set CADSAM_TEST_DATA to a folder holding "
        "isbi2012-membrane/, kvasir-seg-sample/, camvid-sample/"
    )
    done = _scripts_test(tmp_path, require=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 2 skipped" in done.stdout
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1 and skipped[0].startswith("SKIPPED [2] "), done.stdout
    assert reason in skipped[0]

    required = _scripts_test(tmp_path, require=True)  # as .ci/run runs it
    assert required.returncode != 0
    output = (required.stdout + required.stderr).strip()
    assert "passed" not in output and "skipped" not in output
    assert len(output.splitlines()) == 1 and reason in output
    assert "CADSAM_REQUIRE_TEST_DATA=1 scripts/test" in (ROOT / ".ci" / "run").read_text()


def _run_cadsam(argv: list) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``cadsam ARGV``, in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def foreground_run(tmp_path_factory):
    """vit_tiny's decoder (random SAM weights) trained one epoch at a high learning rate on noise
    whose masks are nearly all foreground: it learns to predict foreground everywhere, as the
    issue's runs on ISBI did. (data folder, run folder, exit code, stdout, stderr)"""
    data = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for kind in ("images", "masks"):
        (data / kind).mkdir()
    for i in range(6):
        noise = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(noise).save(data / "images" / f"{i:02d}.png")
        mask = np.full((48, 48), 255, np.uint8)
        mask[10:20, 10:20] = 0
        Image.fromarray(mask).save(data / "masks" / f"{i:02d}.png")
    run = data / "run"
    model = ["--method", "decoder", "--backbone", "vit_tiny", "--image-size", "32"]
    pairs = ["--images", data / "images", "--masks", data / "masks", "--val-fraction", "0.34"]
    steps = ["--epochs", "1", "--batch-size", "2", "--lr", "0.01"]
    quick = ["--device", "cpu", "--set", "num_workers=0", "--no-progress"]
    result = _run_cadsam(["train", *model, *pairs, *steps, *quick, "--out", run])
    return data, run, *result


def test_train_says_when_the_model_predicts_foreground_everywhere(foreground_run):
    _, run, code, out, err = foreground_run
    assert code == 0, err
    epoch = [line for line in out.splitlines() if line.startswith("epoch 1:")]
    assert len(epoch) == 1 and ", val dice " in epoch[0], out
    assert epoch[0].endswith(" (predicts foreground everywhere on 2 of 2 images)")
    warnings = [line for line in err.splitlines() if line.startswith("cadsam: warning: ")]
    assert warnings == [
        "cadsam: warning: best.safetensors and last.safetensors (epoch 1) predicted foreground "
        "everywhere on 2 of 2 images: the validation scores describe no segmentation; check the "
        "masks, and train from a pretrained --checkpoint or for longer"
    ]
    assert (run / "best.safetensors").is_file() and (run / "last.safetensors").is_file()


def test_predict_warns_when_every_mask_it_wrote_is_one_value(foreground_run, tmp_path):
    data, run, *_ = foreground_run
    argv = ["predict", "--weights", run / "last.safetensors", "--images", data / "images"]
    code, out, err = _run_cadsam([*argv, "--out", tmp_path, "--device", "cpu", "--no-progress"])
    assert code == 0, err
    assert len(list(tmp_path.glob("*.png"))) == 6 and "wrote 6 mask(s)" in out  # and then said
    assert [line for line in err.splitlines() if "warning" in line] == [
        "cadsam: warning: the model predicted foreground everywhere on 6 of 6 images: the masks "
        "show no segmentation; check that the weights are trained ones for this kind of data"
    ]


def test_constant_masks_in_words_and_the_runs_warnings(tmp_path):
    assert constant_masks(0, 0, 20) is None
    assert constant_masks(3, 0, 20) == "foreground everywhere on 3 of 20 images"
    assert constant_masks(0, 1, 1) == "background everywhere on 1 of 1 image"
    assert constant_masks(2, 3, 5) == (
        "foreground everywhere on 2 and background everywhere on 3 of 5 images"
    )
    assert constant_model_warnings(tmp_path) == []  # no metrics.jsonl: nothing to say

    def epoch(number, dice, all_background):
        val = {"dice": dice, "images": 4, "predicted_all_background": all_background}
        return json.dumps({"epoch": number, "loss": 1.0, "val": val})

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join([epoch(1, 0.6, 1), epoch(2, 0.2, 4)]) + "\n")
    (warning,) = constant_model_warnings(tmp_path)  # best (epoch 1) segments something
    assert warning.startswith(
        "warning: last.safetensors (epoch 2) predicted background everywhere on 4 of 4 images: "
    )
    metrics.write_text("\n".join([epoch(1, 0.2, 4), epoch(2, 0.1, 4)]) + "\n")
    assert [w.split(" predicted ")[0] for w in constant_model_warnings(tmp_path)] == [
        "warning: best.safetensors (epoch 1)",
        "warning: last.safetensors (epoch 2)",
    ]


def test_a_wrong_images_path_is_the_only_thing_train_says(tmp_path):
    missing = tmp_path / "no-such-folder"
    model = ["--method", "cad", "--backbone", "vit_tiny", "--device", "cpu", "--no-progress"]
    pairs = ["--images", missing, "--masks", tmp_path]
    code, out, err = _run_cadsam(["train", *model, *pairs, "--out", tmp_path / "run"])
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [f"cadsam: error: not a folder: {missing}"]
    assert not (tmp_path / "run").exists()


# issue 33, traps 7 to 11: every bad pair named, longer runs, --no-progress, workers, modes

ISBI = SHARED_DATA / "isbi2012-membrane"
TINY = ["--backbone", "vit_tiny", "--image-size", "64"]


def _cadsam(argv, capsys):
    """(exit code, stdout, stderr) of ``cadsam ARGV``."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _isbi_pairs(folder, n):
    """``n`` real ISBI pairs copied into folder/images and folder/masks; their flags."""
    for kind in ("images", "masks"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for path in sorted((ISBI / kind).iterdir())[:n]:
            shutil.copy(path, folder / kind / path.name)
    return ["--images", folder / "images", "--masks", folder / "masks"]


def _save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _tiny_training(epochs, data):
    return ["train", "--method", "decoder", "--epochs", str(epochs), *TINY, *data,
            "--set", "num_workers=0", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run_folder(tmp_path_factory):
    """A finished one-epoch decoder run on two ISBI pairs: (run folder, its data flags)."""
    root = tmp_path_factory.mktemp("tiny-run")
    data = _isbi_pairs(root, 2)
    assert main([str(a) for a in [*_tiny_training(1, data), "--out", root / "run"]]) == 0
    return root / "run", data


@pytest.fixture(scope="module")
def tiny_sam_file(tmp_path_factory):
    """vit_tiny's random weights as a checkpoint file, which cache needs."""
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny.pth"
    torch.save(build_sam("vit_tiny").state_dict(), path)
    return path


def test_every_bad_training_pair_is_named_with_the_fix_for_its_kind(tmp_path, capsys):
    """A truncated image among the training pairs and a mask of another size among the
    validation pairs: one error names both, each under its fix, and no run folder is made."""
    data = _isbi_pairs(tmp_path / "train", 2)
    image = np.zeros((12, 16, 3), np.uint8)
    broken = tmp_path / "train" / "images" / "broken.png"
    _save_png(broken, image)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    _save_png(tmp_path / "train" / "masks" / "broken.png", image[..., 0])
    _save_png(tmp_path / "val" / "images" / "big.png", image)
    _save_png(tmp_path / "val" / "masks" / "big.png", np.zeros((6, 8), np.uint8))
    val = ["--val-images", tmp_path / "val" / "images", "--val-masks", tmp_path / "val" / "masks"]
    out = tmp_path / "run"
    argv = [*_tiny_training(1, data), *val, "--out", out]
    code, _, err = _cadsam(argv, capsys)
    assert code == 1 and "Traceback" not in err
    assert err.startswith("cadsam: error: 2 of 4 image/mask pairs cannot be used:\n"), err
    lines = err.splitlines()
    assert len(lines) == 5 and lines[1].startswith("  1 unreadable (") and "--skip-bad" in lines[1]
    assert lines[2].startswith("    cannot read image ") and "broken.png" in lines[2]
    assert lines[3].startswith("  1 with a mask of another size (pass --resize-masks")
    assert "big.png is 16x12 but mask" in lines[4] and lines[4].endswith(" is 8x6")
    assert not out.exists()
    # with both fixes asked for, training goes ahead without the broken pair
    code, stdout, _ = _cadsam([*argv, "--resize-masks", "--skip-bad"], capsys)
    assert code == 0 and "skipped 1 unreadable or mismatched pair(s)" in stdout


def test_one_bad_pair_is_one_line_and_a_long_list_is_cut_with_a_count(tmp_path):
    from cadsam.data import pair_folders, scan_pairs
    from cadsam.errors import CadsamError

    for i in range(23):
        _save_png(tmp_path / "img" / f"{i:02d}.png", np.zeros((12, 16, 3), np.uint8))
        _save_png(tmp_path / "gt" / f"{i:02d}.png", np.zeros((6, 8), np.uint8))
    pairs = pair_folders(tmp_path / "img", tmp_path / "gt")
    with pytest.raises(CadsamError) as one:
        scan_pairs(pairs[:1], progress=False)
    assert "\n" not in str(one.value) and "is 8x6 (pass --resize-masks" in str(one.value)
    with pytest.raises(CadsamError) as many:
        scan_pairs(pairs, progress=False)
    lines = str(many.value).splitlines()
    assert lines[0] == "23 of 23 image/mask pairs cannot be used:"
    assert lines[1].startswith("  23 with a mask of another size (pass --resize-masks")
    assert len(lines) == 2 + 20 + 1 and lines[-1] == "    ... and 3 more"
    assert all(" is 16x12 but mask " in line for line in lines[2:22])


def test_resume_with_more_epochs_trains_a_finished_run_longer(tmp_path, capsys):
    """A finished two-epoch run trains a third epoch on ``--resume --epochs 3``, says the
    learning-rate schedule it then follows, and config.yaml records the three epochs; fewer
    epochs are an error and the same number has nothing to do, both leaving the run as it is."""
    run = tmp_path / "run"
    assert _cadsam([*_tiny_training(2, _isbi_pairs(tmp_path, 2)), "--out", run], capsys)[0] == 0
    stopped = tmp_path / "stopped"  # as if stopped once config.yaml said 3, before epoch 3 ended
    shutil.copytree(run, stopped)
    config = yaml.safe_load((stopped / "config.yaml").read_text())
    (stopped / "config.yaml").write_text(yaml.safe_dump({**config, "epochs": 3}))
    resume = ["train", "--out", run, "--resume", "--no-progress"]
    code, out, _ = _cadsam([*resume, "--epochs", "3"], capsys)
    assert code == 0
    assert _cadsam(["train", "--out", stopped, "--resume", "--no-progress"], capsys)[0] == 0
    assert (stopped / "last.safetensors").read_bytes() == (run / "last.safetensors").read_bytes()
    # one step an epoch: after 2 of 3 steps the cosine's factor is (1 + cos(2 pi / 3)) / 2
    assert "after epoch 2, trained longer: 2 -> 3 epochs" in out
    assert "the cosine from 2.00e-04 to 0 is planned again over 3 epochs" in out
    assert "goes on at 5.00e-05, the rate at this step of a 3-epoch run" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 3
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3] and lines[2]["lr"] == pytest.approx(0.0)

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()}
    code, _, err = _cadsam([*resume, "--epochs", "2"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("cadsam: error: --epochs 2 is fewer than the run's 3: --resume")
    assert "--epochs above 3" in err
    code, out, err = _cadsam(resume, capsys)
    assert code == 0 and "error" not in err
    assert f"nothing to do: {run} has trained all its 3 epochs" in out
    assert "--resume --epochs N with N above 3 trains it longer" in out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()} == before


def test_no_progress_silences_the_bars_of_eval_predict_and_cache(
    tiny_run_folder, tiny_sam_file, tmp_path, capsys
):
    """tqdm draws on stderr even where it is not a terminal (as train's bars do): each bar is
    there without --no-progress and gone with it."""
    run, data = tiny_run_folder
    images = data[1]
    cache = ["cache", *TINY, "--checkpoint", tiny_sam_file, "--images", images, "--precision",
             "fp32", "--num-workers", "0"]  # fmt: skip
    commands = {  # each command's bar, and the command writing into OUT
        "evaluating": lambda out: ["eval", "--weights", run, *data, "--num-workers", "0"],
        "predicting": lambda out: ["predict", "--weights", run, "--images", images, "--out", out],
        "caching embeddings": lambda out: [*cache, "--out", out],
    }
    for i, (bar, argv) in enumerate(commands.items()):
        code, _, err = _cadsam(argv(tmp_path / f"{i}-bars"), capsys)
        assert code == 0 and bar in err, (bar, err)
        assert bar != "evaluating" or "checking data" in err
        code, _, err = _cadsam([*argv(tmp_path / f"{i}-quiet"), "--no-progress"], capsys)
        assert code == 0 and bar not in err and "checking data" not in err, (bar, err)
        assert "it/s]" not in err and "%|" not in err, err


def test_default_data_loader_workers_never_exceed_the_usable_cores(tmp_path, monkeypatch):
    from cadsam.commands import build_parser
    from cadsam.config import TrainConfig
    from cadsam.cores import default_workers, usable_cores
    from cadsam.data import pair_folders
    from cadsam.distributed import Dist
    from cadsam.training import _loader

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert usable_cores() == 1 and default_workers(4) == 1 and default_workers(0) == 0
    cfg = TrainConfig(method="decoder", backbone="vit_tiny", out=str(tmp_path / "run"))
    pairs = pair_folders(ISBI / "images", ISBI / "masks")[:2]
    assert cfg.num_workers is None and _loader(cfg, Dist(), pairs, None).num_workers == 1
    cfg.num_workers = 3  # asked for: as asked, and PyTorch warns
    with pytest.warns(UserWarning, match="create 3 worker processes"):
        assert _loader(cfg, Dist(), pairs, None).num_workers == 3
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("eval", "cache", "reproduce"):
        assert commands[command].get_default("num_workers") is None, command
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # as on macOS or Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert usable_cores() == 3 and default_workers(4) == 3 and default_workers(2) == 2


def test_a_cache_with_nothing_to_do_starts_no_workers(tiny_sam_file, tmp_path, capsys, monkeypatch):
    """On two cores the old default of 4 workers drew PyTorch's warning, twice, even with every
    embedding already computed."""
    argv = ["cache", *TINY, "--checkpoint", tiny_sam_file, "--precision", "fp32",
            "--images", _isbi_pairs(tmp_path, 2)[1], "--out", tmp_path / "c", "--no-progress"]  # fmt: skip
    assert _cadsam([*argv, "--num-workers", "0"], capsys)[0] == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = _cadsam(argv, capsys)
    assert code == 0 and "complete: True" in out
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]
    assert "worker" not in err


def test_every_file_of_a_run_has_the_mode_a_plain_file_gets(tiny_run_folder, tmp_path):
    """safetensors writes its file 0600; written atomically, it gets the mode the umask gives
    any new file, as config.yaml and metrics.jsonl have."""
    run, _ = tiny_run_folder
    with open(tmp_path / "plain", "w"):
        pass
    plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    assert {"last.safetensors", "state.pt", "config.yaml", "metrics.jsonl"} <= set(modes)
    assert modes == dict.fromkeys(modes, plain), (oct(plain), modes)


# ---- traps 1 to 6: parser mistakes, checkpoints, mask names, output paths -------------------


def _parser_error(argv: list) -> tuple[int, str]:
    """(exit status, stderr) of ``cadsam ARGV`` refused by the parser, in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main([str(arg) for arg in argv])
    return exit_.value.code, err.getvalue()


def _tiny_pairs(folder: Path, count: int, mask_name: str = "{stem}.png") -> Path:
    """``count`` 24 x 24 images in folder/images, their masks in folder/masks named
    ``mask_name``; returns ``folder``."""
    rng = np.random.default_rng(3)
    for kind in ("images", "masks"):
        (folder / kind).mkdir(parents=True)
    for i in range(count):
        stem = f"{i:02d}"
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            folder / "images" / f"{stem}.png"
        )
        mask = np.zeros((24, 24), np.uint8)
        mask[4:12, 4:12] = 255
        Image.fromarray(mask).save(folder / "masks" / mask_name.format(stem=stem))
    return folder


def _random_vit_tiny(path: Path) -> Path:
    """A vit_tiny checkpoint of random weights, as the demo saves one."""
    import torch

    from cadsam import build_sam

    torch.manual_seed(0)
    torch.save(build_sam("vit_tiny").state_dict(), path)
    return path


def test_a_flag_the_command_does_not_take_is_its_own_one_line_error(tmp_path):
    """Trap 1: said by cache, not under the top-level usage; a misspelt flag names the flag
    meant, even where it hides a required one."""
    data = _tiny_pairs(tmp_path / "data", 2)
    cache = ["cache", "--backbone", "vit_tiny", "--checkpoint", tmp_path / "sam.pth"]
    argv = [*cache, "--images", data / "images", "--masks", data / "masks"]
    code, err = _parser_error([*argv, "--out", tmp_path / "cache"])
    assert code == 1
    assert err == (
        "cadsam cache: error: --masks: cache reads images only (no masks needed): drop --masks "
        "(see cadsam cache --help)\n"
    )
    code, err = _parser_error(["predict", "--weights", "w", "--images", "x", "--ouput", "y"])
    assert code == 1 and err == (
        "cadsam predict: error: --ouput: no such flag; did you mean --out? "
        "(see cadsam predict --help)\n"
    )
    code, err = _parser_error(["train", "--method", "decoder", "stray"])
    assert code == 1 and err.startswith("cadsam train: error: unexpected argument 'stray'")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "y").exists()


def test_a_bad_choice_is_one_line_naming_the_close_one():
    """Trap 6: --backbone vit-b is one line with exit status 1, not a usage block and 2."""
    code, err = _parser_error(["train", "--backbone", "vit-b"])
    assert code == 1 and len(err.splitlines()) == 1 and "usage:" not in err
    assert err.startswith(
        "cadsam train: error: --backbone vit-b: no such backbone; did you mean vit_b? "
        "(choices: vit_b, vit_l, vit_h, vit_tiny, "
    )
    assert err.endswith(" (see cadsam train --help)\n")
    code, err = _parser_error(["trian"])
    assert code == 1 and err.startswith(
        "cadsam: error: no such command trian; did you mean train? (choices: params, plan, train, "
    )
    code, err = _parser_error(["eval", "--runtime", "fastest"])
    assert code == 1 and err == (
        "cadsam eval: error: --runtime fastest: no such runtime (choices: auto, plain, lean) "
        "(see cadsam eval --help)\n"
    )


def test_parser_errors_exit_1_from_the_installed_command(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cadsam", "cache", "--backbone", "vit-b", "--out", tmp_path / "c"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("cadsam cache: error: --backbone vit-b: no such backbone; ")
    assert len(done.stderr.splitlines()) == 1 and not (tmp_path / "c").exists()


def test_a_cache_without_checkpoint_says_where_one_comes_from(tmp_path):
    """Trap 2, first half: vit_tiny has no released weights; the demo saves random ones."""
    data = _tiny_pairs(tmp_path / "data", 2)
    cache = ["cache", "--images", data / "images", "--out", tmp_path / "cache", "--device", "cpu"]
    code, _, err = _run_cadsam([*cache, "--backbone", "vit_tiny"])
    assert code == 1 and err == (
        "cadsam: error: a cache needs --checkpoint (embeddings of weights drawn at random now "
        "could not be checked against training later): vit_tiny has no released weights; "
        "cadsam demo --backbone vit_tiny --out DIR saves its random ones as "
        "DIR/sam_vit_tiny_random.pth: pass --checkpoint DIR/sam_vit_tiny_random.pth\n"
    )
    code, _, err = _run_cadsam([*cache, "--backbone", "vit_b"])
    assert code == 1 and err.endswith(
        ": --checkpoint vit_b (downloaded once) or the path of its .pth file\n"
    )
    assert not (tmp_path / "cache").exists()


def test_training_from_a_cache_without_checkpoint_names_the_caches(tmp_path):
    """Trap 2, second half: not 'training uses None (sha256 differs)'."""
    data = _tiny_pairs(tmp_path / "data", 2)
    sam = _random_vit_tiny(tmp_path / "sam_vit_tiny_random.pth")
    cache = tmp_path / "cache"
    build = ["cache", "--backbone", "vit_tiny", "--checkpoint", sam, "--images", data / "images"]
    quick = ["--image-size", "32", "--precision", "fp32", "--num-workers", "0", "--device", "cpu"]
    assert _run_cadsam([*build, *quick, "--out", cache])[0] == 0
    digest = json.loads((cache / "manifest.json").read_text())["base_checkpoint"]["sha256"]
    train = ["train", "--method", "decoder", "--backbone", "vit_tiny", "--cache", cache]
    pairs = ["--images", data / "images", "--masks", data / "masks", "--image-size", "32"]
    code, _, err = _run_cadsam([*train, *pairs, "--device", "cpu", "--out", tmp_path / "run"])
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"cadsam: error: the cache in {cache} was made from checkpoint {sam.resolve()} (sha256 "
        f"{digest[:16]}...): pass --checkpoint {sam.resolve()}"
    )
    assert not (tmp_path / "run").exists()


def test_masks_named_with_a_suffix_get_the_suffix_to_pass(tmp_path):
    """Trap 3: 00.png and 00_mask.png: the error names --mask-suffix _mask, and never
    --skip-bad, which would leave nothing."""
    data = _tiny_pairs(tmp_path / "data", 3, mask_name="{stem}_mask.png")
    train = ["train", "--method", "decoder", "--backbone", "vit_tiny", "--device", "cpu"]
    pairs = ["--images", data / "images", "--masks", data / "masks"]
    fix = "(the masks are named <image stem>_mask: pass --mask-suffix _mask)"
    for extra in ([], ["--skip-bad"]):
        code, _, err = _run_cadsam([*train, *pairs, *extra, "--out", tmp_path / "run"])
        lines = err.strip().splitlines()
        assert code == 1 and lines[-1].startswith("cadsam: error: ")
        assert lines[-1].endswith(fix) and "--skip-bad" not in lines[-1]
        assert "3 image(s) in " in lines[-1] and "00_mask" in lines[-1]
    assert not (tmp_path / "run").exists()
    from cadsam.data import pair_folders

    paired = pair_folders(data / "images", data / "masks", mask_suffix="_mask")
    assert [p.mask.name for p in paired] == ["00_mask.png", "01_mask.png", "02_mask.png"]
    (data / "masks" / "02_mask.png").rename(data / "masks" / "02.png")  # 1 of 3 plain
    code, _, err = _run_cadsam([*train, *pairs, "--out", tmp_path / "run"])
    assert code == 1 and err.strip().endswith(fix)


def _existing_file_argv(tmp_path: Path, command: str, out: Path) -> list:
    data = _tiny_pairs(tmp_path / "data", 2)
    return {
        "train": [
            *["train", "--method", "decoder", "--backbone", "vit_tiny", "--device", "cpu"],
            *["--images", data / "images", "--masks", data / "masks", "--out", out],
        ],
        "predict": [
            *["predict", "--weights", tmp_path / "absent.safetensors", "--device", "cpu"],
            *["--images", data / "images", "--out", out],
        ],
        "cache": [
            *["cache", "--backbone", "vit_tiny", "--checkpoint", tmp_path / "absent.pth"],
            *["--images", data / "images", "--device", "cpu", "--out", out],
        ],
    }[command]


@pytest.mark.parametrize("command", ["train", "predict", "cache"])
@pytest.mark.parametrize("under", [False, True])
def test_an_existing_file_as_out_is_one_line_before_any_work(tmp_path, command, under):
    """Trap 4: not a FileExistsError traceback at the first write, after the work; said before
    the weights or checkpoint are read (both are absent here)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    out = notes / "run" if under else notes
    flag = "--out"
    argv = _existing_file_argv(tmp_path, command, out)
    before = sorted(tmp_path.rglob("*"))
    code, _, err = _run_cadsam(argv)
    where = f"{flag} {out}: {notes}" if under else f"{flag} {notes}"
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"cadsam: error: {where} is a file, not a folder: {flag} names a folder to write into"
    )
    assert notes.read_text() == "keep me\n" and sorted(tmp_path.rglob("*")) == before


class _HalfModel:
    """Stands in for trained weights: foreground on the left half of every image."""

    def __init__(self) -> None:
        import torch

        self.module = torch.nn.Identity()

    def __call__(self, images, embeddings=None):
        import torch

        logits = torch.full((len(images), 1, *images.shape[-2:]), -4.0)
        logits[..., : images.shape[-1] // 2] = 4.0
        return logits

    def to(self, device):
        return self

    def eval(self):
        return self

    def for_inference(self):
        return self


def test_predict_output_naming_an_image_writes_that_file(tmp_path, monkeypatch):
    """Trap 5: --out mask00.png with one input is that mask (and its siblings), not a folder
    of that name; with several inputs, one line asking for a folder, and nothing written."""
    monkeypatch.setattr(
        "cadsam.weights.load_weights", lambda *a, **k: (_HalfModel(), {"image_size": 16})
    )
    data = _tiny_pairs(tmp_path / "data", 2)
    predict = ["predict", "--weights", "w.safetensors", "--device", "cpu", "--no-progress"]
    one = data / "images" / "00.png"
    code, _, err = _run_cadsam(
        [
            *predict,
            "--images",
            one,
            "--out",
            tmp_path / "mask00.png",
            "--probabilities",
            "--overlay",
        ]
    )
    assert code == 0, err
    written = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert written == ["mask00.png", "mask00_overlay.png", "mask00_prob.png"]
    mask = np.array(Image.open(tmp_path / "mask00.png"))
    assert mask.shape == (24, 24) and mask[:, :10].min() == 255 and mask[:, 14:].max() == 0

    several = [*predict, "--images", data / "images", "--out", tmp_path / "masks.png"]
    code, _, err = _run_cadsam(several)
    assert code == 1 and err.strip() == (
        f"cadsam: error: --out {tmp_path / 'masks.png'} names one mask file, but there are 2 "
        "input images: name a folder for their masks"
    )
    assert not (tmp_path / "masks.png").exists()
    into_inputs = [*predict, "--images", data / "images", "--out", data / "images"]
    code, _, err = _run_cadsam(into_inputs)
    assert code == 1 and "would overwrite the input" in err
    assert sorted(p.name for p in (data / "images").iterdir()) == ["00.png", "01.png"]


def test_a_downloaded_checkpoint_has_the_mode_a_plain_file_gets(tmp_path):
    """Downloads go through a temporary file too (mkstemp's, 0600)."""
    from cadsam.sam.checkpoint import download_file

    served = tmp_path / "served.pth"
    served.write_bytes(b"weights")
    dest = tmp_path / "checkpoints" / "sam.pth"
    download_file(served.as_uri(), dest, None, progress=False)
    with open(tmp_path / "plain", "w"):
        pass
    plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert dest.read_bytes() == b"weights" and stat.S_IMODE(dest.stat().st_mode) == plain
    assert sorted(p.name for p in dest.parent.iterdir()) == ["sam.pth"]  # no probe left
