"""Issue 40: one writer per run folder, operating-system errors in one line, settings checked by
type, masks written whole and never over each other, EXIF turns and suspicious inputs said."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import SafetensorError

from cadsam.commands import main
from cadsam.data import pair_folders, scan_pairs
from cadsam.data.io import read_image, read_mask
from cadsam.errors import CadsamError
from cadsam.files import write_atomic

TINY = ["--backbone", "vit_tiny", "--image-size", "64", "--set", "num_workers=0", "--no-progress"]
HOLDER = (
    "import sys, time\n"
    "from cadsam.lock import FolderLock\n"
    "FolderLock(sys.argv[1], 'cadsam train').acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def _cadsam(argv, capsys):
    """(exit status, stdout, stderr) of ``cadsam ARGV`` in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _tiny_pairs(folder: Path, count: int = 2) -> list:
    """``count`` 24 x 24 images with black-and-white masks; their --images/--masks flags."""
    rng = np.random.default_rng(5)
    for kind in ("images", "masks"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            folder / "images" / f"{i:02d}.png"
        )
        mask = np.zeros((24, 24), np.uint8)
        mask[4:12, 4:14] = 255
        Image.fromarray(mask).save(folder / "masks" / f"{i:02d}.png")
    return ["--images", folder / "images", "--masks", folder / "masks"]


def _training(out: Path, data: list, epochs: int | None = 1) -> list:
    """``cadsam train`` of a decoder on ``data`` (with no --epochs where ``epochs`` is None)."""
    given = [] if epochs is None else ["--epochs", epochs]
    return ["train", "--method", "decoder", *given, *TINY, *data, "--out", out]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` (hidden ones too) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished one-epoch decoder run: (its folder, its data flags)."""
    root = tmp_path_factory.mktemp("nothing-lost")
    data = _tiny_pairs(root / "data")
    assert main([str(a) for a in _training(root / "run", data)]) == 0
    return root / "run", data


# -- one writer per run folder ----------------------------------------------------------------


def _hold(folder: Path) -> subprocess.Popen:
    """Another process holding the lock on ``folder`` (as a running ``cadsam train`` does)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("command", ["train", "cache", "reproduce"])
def test_a_second_writer_is_refused_naming_the_holder_and_touches_nothing(
    tmp_path, capsys, command
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    _tiny_pairs(tmp_path / "data", 1)
    images, masks = tmp_path / "data" / "images", tmp_path / "data" / "masks"
    argv = {
        "train": ["train", "--method", "decoder", "--backbone", "vit_tiny", "--images", images,
                  "--masks", masks],
        "cache": ["cache", "--backbone", "vit_tiny", "--images", images, "--checkpoint",
                  tmp_path / "sam.pth"],
        "reproduce": ["reproduce", "--data-root", tmp_path, "--checkpoint-dir", tmp_path],
    }[command]  # fmt: skip
    holder = _hold(out)
    try:
        before = _files(out)
        code, _, err = _cadsam([*argv, "--out", out], capsys)
        after = _files(out)
    finally:
        holder.kill()
        holder.wait()
    assert code == 1
    assert err.splitlines() == [
        f"cadsam: error: --out {out} is in use by process {holder.pid} (cadsam train); wait for "
        "it or choose another --out"
    ]
    assert after == before  # the holder's lock file and the run's files as they were


def test_the_demo_is_refused_a_folder_in_use(tmp_path):
    from cadsam.commands.demo import run_demo

    holder = _hold(tmp_path / "demo")
    try:
        with pytest.raises(CadsamError, match=f"in use by process {holder.pid} "):
            run_demo(tmp_path / "demo", progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [".lock"]


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold(out)
    holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays behind
    holder.wait()
    assert (out / ".lock").read_text().split()[0] == str(holder.pid)
    code, _, err = _cadsam(_training(out, ["--images", "nowhere", "--masks", "nowhere"]), capsys)
    assert code == 1  # the missing images, said after the lock was taken
    assert (
        f"cadsam: note: --out {out}: took over the lock from process {holder.pid} (cadsam train), "
        "which is gone" in err.splitlines()
    )
    assert not (out / ".lock").exists()  # let go as the run ended


def test_a_run_that_fails_leaves_no_folder_made_for_its_lock(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    code, _, _ = _cadsam(_training(out, ["--images", "nowhere", "--masks", "nowhere"]), capsys)
    assert code == 1 and not (tmp_path / "new").exists()


def test_a_finished_run_leaves_no_lock_behind(tiny_run):
    run, _ = tiny_run
    assert not (run / ".lock").exists() and (run / "last.safetensors").is_file()


# -- operating-system errors in one line ------------------------------------------------------


def test_a_full_disk_while_saving_weights_is_one_line_and_leaves_no_file(
    tmp_path, capsys, monkeypatch
):
    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # part of the file, then the disk is full
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    monkeypatch.setattr("cadsam.weights.save_file", full_disk)
    out = tmp_path / "run"
    code, _, err = _cadsam(_training(out, _tiny_pairs(tmp_path / "data")), capsys)
    assert code == 1
    assert err.splitlines() == [
        f"cadsam: error: cannot write {out / 'last.safetensors'}: No space left on device; "
        "free some space there, or write elsewhere"
    ]
    assert not any("safetensors" in name for name in _files(out))  # nor its temporary file


def test_write_atomic_keeps_the_old_file_and_names_the_new_one_on_a_full_disk(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def half_then_full(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")  # as f.write says it: no file

    with pytest.raises(OSError) as raised:
        write_atomic(path, half_then_full)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(path))
    assert _files(tmp_path) == {"metrics.jsonl": b"old\n"}


@pytest.mark.parametrize("free", [0, 10**12], ids=["disk-full", "space-left"])
def test_torch_saves_failure_is_a_full_disk_only_where_the_disk_is_full(
    tmp_path, monkeypatch, free
):
    """torch.save says a full disk without its errno ("unexpected pos ..."): that is ENOSPC
    where the folder has no space left, and left as it is otherwise."""
    usage = shutil.disk_usage(tmp_path)._replace(free=free)
    monkeypatch.setattr("cadsam.files.shutil.disk_usage", lambda folder: usage)

    def torch_save_on_a_full_disk(tmp: Path) -> None:
        tmp.write_bytes(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    path = tmp_path / "state.pt"
    with pytest.raises((OSError, RuntimeError)) as raised:
        write_atomic(path, torch_save_on_a_full_disk)
    if free == 0:
        assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(path))
    else:
        assert type(raised.value) is RuntimeError
    assert _files(tmp_path) == {}


def _predict_argv(run: Path, images: Path, out: Path, *flags) -> list:
    return ["predict", "--weights", run / "last.safetensors", "--images", images, "--out", out,
            "--no-progress", *flags]  # fmt: skip


@pytest.mark.parametrize(
    ("raised", "line"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device"),
            "cannot write {mask}: No space left on device; free some space there, or write "
            "elsewhere",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied"),
            "cannot use {mask}: Permission denied; check the permissions of it and its folder, "
            "or write elsewhere",
        ),
    ],
)
def test_predict_says_a_write_the_system_refuses_in_one_line(
    tiny_run, tmp_path, capsys, monkeypatch, raised, line
):
    """A full disk, or permissions (root ignores a chmod, so the refusal is simulated)."""
    run, data = tiny_run

    def refused(image, fp, format=None, **params):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG's first bytes, then the refusal
        raise raised

    monkeypatch.setattr(Image.Image, "save", refused)
    out = tmp_path / "masks"
    code, _, err = _cadsam(_predict_argv(run, data[1], out), capsys)
    assert code == 1
    assert err.splitlines()[-1] == "cadsam: error: " + line.format(mask=out / "00.png")
    assert _files(out) == {}


def test_a_read_only_out_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """Root ignores a chmod 0o555, so the refusal to make the lock file is simulated."""
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr("cadsam.lock.os.open", read_only)
    out = tmp_path / "run"
    out.mkdir()
    code, _, err = _cadsam(_training(out, ["--images", "i", "--masks", "m"]), capsys)
    assert code == 1
    assert err.splitlines() == [
        f"cadsam: error: --out {out}: cannot write there (Permission denied); choose another --out"
    ]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated: PytorchStreamReader
        lambda data: b"",  # emptied: EOFError
        lambda data: b"not a torch file at all" * 40,  # overwritten
    ],
    ids=["truncated", "empty", "overwritten"],
)
def test_a_damaged_state_is_one_line_and_the_run_is_left_as_it_was(
    tiny_run, tmp_path, capsys, damage
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    state = run / "state.pt"
    state.write_bytes(damage(state.read_bytes()))
    before = _files(run)
    code, _, err = _cadsam(["train", "--out", run, "--resume", "--epochs", "2"], capsys)
    assert code == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{state} " in err and "the run cannot be resumed from it" in err, err
    assert _files(run) == before


# -- settings checked by type -----------------------------------------------------------------


def _train_config(tmp_path, monkeypatch, yaml_text: str, *flags):
    """The TrainConfig ``cadsam train --config`` would train (training itself replaced)."""
    seen = {}
    monkeypatch.setattr("cadsam.training.train", lambda config: seen.setdefault("config", config))
    (tmp_path / "c.yaml").write_text(yaml_text)
    argv = ["train", "--config", tmp_path / "c.yaml", "--method", "decoder", "--backbone",
            "vit_tiny", "--images", "i", "--masks", "m", "--out", tmp_path / "run", *flags]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    return seen["config"]


@pytest.mark.parametrize(
    ("yaml_text", "flags", "setting", "expected"),
    [
        ("lr: 2e-4\n", [], "lr", 2e-4),  # YAML reads 2e-4 as text
        ('batch_size: "4"\n', [], "batch_size", 4),
        ("", ["--set", "weight_decay=1e-2"], "weight_decay", 0.01),
        ('augment: "no"\n', [], "augment", False),
        ("augment: no\n", [], "augment", False),
        ("epochs: 3.0\n", [], "epochs", 3),
    ],
)
def test_numbers_and_booleans_given_as_text_are_read_as_such(
    tmp_path, monkeypatch, yaml_text, flags, setting, expected
):
    value = getattr(_train_config(tmp_path, monkeypatch, yaml_text, *flags), setting)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("yaml_text", "flags", "message"),
    [
        ("mask_threshold: high\n", [], "mask_threshold must be a whole number, not 'high'"),
        ("epochs: 1.5\n", [], "epochs must be a whole number, not 1.5"),
        ("epochs: true\n", [], "epochs must be a whole number, not true"),
        ('augment: "maybe"\n', [], "augment must be true or false, not 'maybe'"),
        ("lr: fast\n", [], "lr must be a number, not 'fast'"),
        ("", ["--set", "seed=abc"], "seed must be a whole number, not 'abc'"),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line_before_anything_is_written(
    tmp_path, capsys, yaml_text, flags, message
):
    (tmp_path / "c.yaml").write_text(yaml_text)
    data = _tiny_pairs(tmp_path / "data", 1)
    argv = _training(tmp_path / "run", data, epochs=None)
    code, _, err = _cadsam([*argv, "--config", tmp_path / "c.yaml", *flags], capsys)
    assert code == 1
    assert err.splitlines() == [f"cadsam: error: {message}"]
    assert not (tmp_path / "run").exists()  # no config.yaml, no folder


def test_resume_reads_a_set_number_as_the_number_the_run_saved(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    code, out, err = _cadsam(
        ["train", "--out", run, "--resume", "--set", "weight_decay=1e-2", "--no-progress"], capsys
    )
    assert code == 0, err
    assert "nothing to do" in out and "differs" not in err


# -- predict: masks whole, never over each other ----------------------------------------------


def test_an_interrupted_mask_write_leaves_no_truncated_file(
    tiny_run, tmp_path, capsys, monkeypatch
):
    run, data = tiny_run

    def interrupted(image, fp, format=None, **params):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    out = tmp_path / "masks"
    code, _, _ = _cadsam(_predict_argv(run, data[1], out), capsys)
    assert code == 130
    assert _files(out) == {}  # no 00.png cut short, no temporary file


@pytest.mark.parametrize(
    ("names", "flags", "clash"),
    [
        (["x.png", "x.jpg"], [], "x.png"),
        (["x.png", "x_prob.png"], ["--probabilities"], "x_prob.png"),
    ],
)
def test_two_inputs_that_would_write_one_file_are_refused_before_any_is_written(
    tiny_run, tmp_path, capsys, names, flags, clash
):
    run, _ = tiny_run
    images = tmp_path / "images"
    images.mkdir()
    for name in names:
        Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(images / name)
    out = tmp_path / "masks"
    code, _, err = _cadsam(_predict_argv(run, images, out, *flags), capsys)
    assert code == 1
    first, second = sorted(images / name for name in names)
    assert err.splitlines() == [
        f"cadsam: error: the inputs {first} and {second} would both be written as {out / clash}: "
        "rename one, or predict them into different --out folders; nothing was written"
    ]
    assert not out.exists()


def test_masks_are_written_whole_with_their_siblings(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    out = tmp_path / "masks"
    code, _, err = _cadsam(_predict_argv(run, data[1], out, "--probabilities", "--overlay"), capsys)
    assert code == 0, err
    names = ["00.png", "00_overlay.png", "00_prob.png", "01.png", "01_overlay.png", "01_prob.png"]
    assert sorted(_files(out)) == names  # nothing else: no temporary file left beside them
    for name in names:
        assert Image.open(out / name).size == (24, 24)


# -- EXIF turns, links that lead nowhere, masks of noise --------------------------------------


def _save_turned(path: Path, array: np.ndarray, turn: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if turn is not None:
        exif[0x0112] = turn
    Image.fromarray(array).save(path, exif=exif)


def _block(shape: tuple[int, int]) -> np.ndarray:
    """Black, with a white block in the top-left corner: where it lands shows the turn."""
    array = np.zeros(shape, np.uint8)
    array[: shape[0] // 3, : shape[1] // 4] = 255
    return array


@pytest.mark.parametrize("shape", [(16, 16), (16, 24)], ids=["square", "not-square"])
def test_an_image_turned_by_exif_and_its_mask_not_is_an_error_naming_both(tmp_path, shape):
    _save_turned(tmp_path / "images" / "a.png", np.stack([_block(shape)] * 3, -1), 6)
    _save_turned(tmp_path / "masks" / "a.png", _block(shape), None)  # as stored
    pairs = pair_folders(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(CadsamError) as raised:
        scan_pairs(pairs, progress=False)
    assert str(raised.value) == (
        f"image {tmp_path / 'images/a.png'} is shown turned 90 degrees (EXIF orientation 6) but "
        f"its mask {tmp_path / 'masks/a.png'} is as stored: which way the mask fits the image "
        "cannot be told (save the image with its turn applied (and no EXIF orientation), or give "
        "the mask the image's EXIF orientation; or pass --skip-bad to leave the pair out)"
    )


def test_an_image_and_mask_turned_alike_are_read_aligned(tmp_path):
    block = _block((16, 16))
    _save_turned(tmp_path / "images" / "a.png", np.stack([block] * 3, -1), 6)
    _save_turned(tmp_path / "masks" / "a.png", block, 6)
    pairs, problems = scan_pairs(
        pair_folders(tmp_path / "images", tmp_path / "masks"), progress=False
    )
    assert problems == [] and len(pairs) == 1
    image, mask = read_image(pairs[0].image), read_mask(pairs[0].mask)
    assert np.array_equal(image[..., 0] > 127, mask)
    assert not np.array_equal(mask, block > 127)  # turned, both of them


def test_a_mask_drawn_on_the_image_as_shown_is_accepted(tmp_path):
    """A non-square image's turn by 90 degrees shows in the sizes: a mask of the shown size
    was drawn on the image as shown."""
    _save_turned(tmp_path / "images" / "a.png", np.stack([_block((16, 24))] * 3, -1), 6)
    _save_turned(tmp_path / "masks" / "a.png", _block((24, 16)), None)
    pairs, problems = scan_pairs(
        pair_folders(tmp_path / "images", tmp_path / "masks"), progress=False
    )
    assert problems == [] and len(pairs) == 1


def test_links_that_lead_nowhere_are_named_not_skipped_silently(tmp_path, capsys):
    _tiny_pairs(tmp_path, 1)
    images = tmp_path / "images"
    (images / "loop_a.png").symlink_to(images / "loop_b.png")
    (images / "loop_b.png").symlink_to(images / "loop_a.png")
    (images / "gone.png").symlink_to(tmp_path / "nothing.png")
    pairs = pair_folders(images, tmp_path / "masks")
    assert [p.id for p in pairs] == ["00"]
    assert capsys.readouterr().err.splitlines() == [
        f"cadsam: warning: skipped 3 link(s) in {images} that lead to no file: gone.png (its "
        "target is missing), loop_a.png (a symlink loop), loop_b.png (a symlink loop)"
    ]


def test_a_mask_of_noise_is_noted_in_one_line_and_a_lossy_one_is_not(tmp_path, capsys):
    _tiny_pairs(tmp_path, 2)
    rng = np.random.default_rng(0)
    noise = tmp_path / "masks" / "01.png"
    Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(noise)
    lossy = np.zeros((24, 24), np.uint8)
    lossy[4:12, 4:14] = 255
    (tmp_path / "masks" / "00.png").unlink()
    Image.fromarray(lossy).save(tmp_path / "masks" / "00.jpg", quality=60)
    pairs, problems = scan_pairs(
        pair_folders(tmp_path / "images", tmp_path / "masks"), progress=False
    )
    assert len(pairs) == 2 and problems == []  # a note, not a refusal
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("cadsam: warning: 1 mask(s) are not black and white")
    assert str(noise) in err[0] and "00.jpg" not in err[0]


def test_cache_with_an_unreadable_image_stops_before_writing_or_skips_it_by_name(
    tmp_path, sam_file, capsys
):
    """Item 6: one unreadable image is one line before anything is written (so the command,
    run again once it is fixed or removed, finishes); with --skip-bad it is named and left out."""
    data = _tiny_pairs(tmp_path / "data", 3)
    broken = tmp_path / "data" / "images" / "01.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    cache = ["cache", "--backbone", "vit_tiny", "--checkpoint", sam_file, "--image-size", "64"]
    argv = [*cache, "--images", data[1], "--out", tmp_path / "cache", "--no-progress"]
    code, _, err = _cadsam(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "1 of 3 image(s) cannot be read" in err and "01.png" in err and "--skip-bad" in err
    assert not (tmp_path / "cache").exists()
    code, out, err = _cadsam([*argv, "--skip-bad"], capsys)
    assert code == 0, err
    assert "skipped: cannot read image" in err and "01.png" in err
    assert "(2 embeddings, complete: True)" in out
    broken.unlink()  # the file removed: the same command, run again, finds its cache complete
    code, out, _ = _cadsam(argv, capsys)
    assert code == 0 and "(2 embeddings, complete: True)" in out
