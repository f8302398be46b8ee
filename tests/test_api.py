"""The Python face: the README's example runs as written, and cadsam.load / train / evaluate
give what the commands give on the same real images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SHARED_DATA
from PIL import Image

import cadsam
from cadsam.commands import main
from cadsam.errors import CadsamError

ROOT = Path(__file__).resolve().parents[1]
ISBI = SHARED_DATA / "isbi2012-membrane"


def _pairs(folder: Path, n: int) -> tuple[Path, Path]:
    """The first ``n`` ISBI pairs, linked into ``folder``."""
    for kind in ("images", "masks"):
        (folder / kind).mkdir(parents=True)
        for path in sorted((ISBI / kind).iterdir())[:n]:
            (folder / kind / path.name).symlink_to(path.resolve())
    return folder / "images", folder / "masks"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small run, trained through the Python API."""
    root = tmp_path_factory.mktemp("api")
    images, masks = _pairs(root / "data", 4)
    run = cadsam.train(
        out=str(root / "run"),
        method="cad",
        backbone="vit_tiny",
        images=str(images),
        masks=str(masks),
        epochs=1,
        batch_size=2,
        image_size=64,
        adapter_size=32,
        runtime="plain",
        progress=False,
    )
    return run, images, masks


def test_train_takes_the_commands_settings_by_their_names(trained):
    run, _, _ = trained
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["options"] == {"adapter_size": 32}  # a model option, sorted by its name
    assert config["runtime"]["name"] == "plain"  # the runtime, by the flag's name
    assert (config["epochs"], config["batch_size"], config["image_size"]) == (1, 2, 64)
    assert config["written_by"]["cadsam"] == cadsam.__version__  # what wrote it, on record


def test_load_predicts_the_masks_cadsam_predict_writes(trained, tmp_path, capsys):
    run, images, _ = trained
    argv = ["predict", "--weights", str(run), "--images", str(images)]
    assert (
        main([*argv, "--out", str(tmp_path / "masks"), "--runtime", "plain", "--no-progress"]) == 0
    )
    capsys.readouterr()
    model = cadsam.load(run, device="cpu", runtime="plain")
    paths = sorted(images.iterdir())
    masks = model.predict(paths)
    assert len(masks) == len(paths)
    for path, mask in zip(paths, masks, strict=True):
        written = np.asarray(Image.open(tmp_path / "masks" / f"{path.stem}.png")) > 0
        assert mask.dtype == bool and mask.shape == written.shape
        assert np.array_equal(mask, written), path.name
    # one image in, one mask out; an array and a Pillow image read as the file is
    array = np.asarray(Image.open(paths[0]))
    assert np.array_equal(model.predict(array), masks[0])
    assert np.array_equal(model.predict(Image.open(paths[0])), masks[0])
    probabilities = model.predict(paths[0], probabilities=True)
    assert probabilities.dtype == np.float32
    assert np.array_equal(probabilities > 0.5, masks[0])


def test_evaluate_gives_what_cadsam_eval_prints(trained, capsys):
    run, images, masks = trained
    argv = ["eval", "--weights", str(run), "--images", str(images), "--masks", str(masks)]
    assert main([*argv, "--json", "--runtime", "plain", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    scores = cadsam.evaluate(cadsam.load(run, runtime="plain"), images=images, masks=masks)
    assert scores.keys() == printed.keys()
    assert scores.pop("prompt") == printed.pop("prompt") == "whole"
    for name, value in printed.items():
        assert scores[name] == pytest.approx(value, rel=1e-6), name


def test_a_bad_image_array_is_one_clear_error(trained):
    run, _, _ = trained
    with pytest.raises(CadsamError, match=r"H x W x 3 uint8"):
        cadsam.load(run).predict(np.zeros((8, 8, 3), np.float32))


def test_an_unknown_setting_is_named(tmp_path):
    with pytest.raises(CadsamError, match=r"^learning_rate: no such setting"):
        cadsam.train(out=str(tmp_path / "r"), method="cad", backbone="vit_tiny", learning_rate=1)
    assert not (tmp_path / "r").exists()


def test_the_readmes_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    images, _ = _pairs(tmp_path / "data", 3)
    assert 'images, masks = "data/images", "data/masks"' in block  # what this test stands in
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()[-3:]  # after training's own log
    height, width = np.asarray(Image.open(sorted(images.iterdir())[0])).shape[:2]
    assert printed[0].startswith("dice ")
    assert printed[1] == f"({height}, {width}) bool"
    assert printed[2].startswith("torch.Size([2, 1, 128, 128])")
