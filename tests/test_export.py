"""ONNX export: the graphs against PyTorch on real images, the FFT-free high-pass, --split,
--half, the refusal of a graph that differs, and predict --onnx against predict.

Tracing a model for ONNX takes seconds, so each graph is exported once per module."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, randomize_
from PIL import Image
from test_train import _isbi_subset

from cadsam import AdaptedSam, build_model
from cadsam.commands import main
from cadsam.data.io import list_images, read_image
from cadsam.data.transforms import resize_image
from cadsam.errors import CadsamError
from cadsam.frequency import MatrixHighPass, high_pass
from cadsam.prediction import predict_logits
from cadsam.weights import base_checkpoint_record, load_weights, save_weights

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from cadsam import export

ISBI = SHARED_DATA / "isbi2012-membrane"
KVASIR = SHARED_DATA / "kvasir-seg-sample"
ISBI_IMAGES, KVASIR_IMAGES = ISBI / "images", KVASIR / "images"
SIZE = 64  # training size of every model here (vit_tiny's encoder still sees 256 pixels)


def _real_batch(folder: Path, count: int) -> torch.Tensor:
    """The first ``count`` images of a folder, resized as predict resizes them."""
    images = [resize_image(read_image(p), SIZE) for p in list_images(folder)[:count]]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


def _run(path: Path, images: torch.Tensor) -> np.ndarray:
    return export.onnx_session(path).run(None, {"images": images.numpy()})[0]


def _loaded(weights: Path) -> AdaptedSam:
    model, _ = load_weights(weights)
    return model.for_inference()


@pytest.fixture(scope="module")
def cad_weights(tmp_path_factory):
    """CAD on vit_tiny, trained for one epoch on four real ISBI pairs by the command line."""
    root = tmp_path_factory.mktemp("cad")
    args = ["train", "--method", "cad", "--backbone", "vit_tiny", "--image-size", str(SIZE)]
    args += ["--set", "adapter_size=32", "--set", "num_workers=0", "--epochs", "1"]
    args += ["--no-progress", *_isbi_subset(root, 4)]
    assert main([*args, "--out", str(root / "run")]) == 0
    return root / "run" / "last.safetensors"


@pytest.fixture(scope="module")
def cad_graph(cad_weights):
    out = cad_weights.parent / "cad.onnx"
    assert main(["export", "--weights", str(cad_weights), "--out", str(out)]) == 0
    return out


def test_cad_graph_equals_pytorch_on_real_images(cad_weights, cad_graph):
    model = _loaded(cad_weights)
    images = _real_batch(ISBI_IMAGES, 2)
    session = export.onnx_session(cad_graph)
    assert [str(d) for d in session.get_inputs()[0].shape[1:]] == ["3", str(SIZE), str(SIZE)]
    assert not str(session.get_inputs()[0].shape[0]).isdigit()  # the batch is free
    for batch in (images[:1], images):  # one image, and two
        with torch.no_grad():
            expected = model(batch).numpy()
        actual = _run(cad_graph, batch)
        assert actual.shape == (len(batch), 1, SIZE, SIZE)
        assert export.relative_difference(actual, expected) < 1e-3  # measured: ~1e-6


def test_split_graphs_compose_to_the_whole_graph(cad_weights, cad_graph):
    out = cad_weights.parent / "split.onnx"
    assert main(["export", "--weights", str(cad_weights), "--out", str(out), "--split"]) == 0
    encoder, decoder = out.with_suffix(".encoder.onnx"), out.with_suffix(".decoder.onnx")
    assert not out.exists() and encoder.is_file() and decoder.is_file()
    model = _loaded(cad_weights)
    images = _real_batch(ISBI_IMAGES, 2)
    embeddings = _run(encoder, images)
    with torch.no_grad():
        frozen = model.frozen_embeddings(images).numpy()  # CAD's adapter is the decoder's part
        expected = model(images).numpy()
    assert embeddings.shape == (2, 256, 16, 16)
    assert export.relative_difference(embeddings, frozen) < 1e-4
    session = export.onnx_session(decoder)
    composed = session.run(None, {"images": images.numpy(), "embeddings": embeddings})[0]
    assert export.relative_difference(composed, _run(cad_graph, images)) < 1e-4
    assert export.relative_difference(composed, expected) < 1e-3
    with pytest.raises(CadsamError, match="not a whole graph"):
        export.OnnxModel(encoder)


@pytest.mark.parametrize("method", ["decoder", "lora"])
def test_decoder_and_lora_graphs_equal_pytorch(method, tmp_path):
    model = build_model(method, "vit_tiny")
    randomize_(model.sam.mask_decoder, seed=3)
    if method == "lora":
        randomize_(model.encoder_adapter, seed=4)  # B != 0: the updates change the encoder
    save_weights(tmp_path / "w.safetensors", model, base_checkpoint_record(None), SIZE)
    out = tmp_path / f"{method}.onnx"
    args = ["export", "--weights", str(tmp_path / "w.safetensors"), "--out", str(out)]
    assert main([*args, "--sample", str(KVASIR_IMAGES)]) == 0
    loaded = _loaded(tmp_path / "w.safetensors")
    images = _real_batch(KVASIR_IMAGES, 2)
    for batch in (images[:1], images):
        with torch.no_grad():
            expected = loaded(batch).numpy()
        assert export.relative_difference(_run(out, batch), expected) < 1e-3


# the other backbone family and the other kind of method, split (where graphs are most apt to
# go wrong; the whole graph composes the same modules): SAM 2.1's decoder reads three packed
# parts (the embedding after no_mem_embed, two projected high-resolution maps); SAM-Adapter's
# adapters sit inside the encoder, so its encoder graph carries them. Each export traces for
# about 10 s on two cores, so one case each.
@pytest.mark.parametrize(
    ("method", "backbone"), [("cad", "sam2.1_hiera_tiny_test"), ("sam-adapter", "vit_tiny")]
)
def test_sam2_and_sam_adapter_split_graphs_equal_pytorch(method, backbone, tmp_path):
    options = {"adapter_size": 32} if method == "cad" else {}
    model = build_model(method, backbone, **options)
    randomize_(model.sam.mask_decoder, seed=3)
    if model.encoder_adapter is not None:
        randomize_(model.encoder_adapter, seed=4)  # its up-projections start at 0
    weights, out = tmp_path / "w.safetensors", tmp_path / "model.onnx"
    save_weights(weights, model, base_checkpoint_record(None), SIZE)
    args = ["export", "--weights", str(weights), "--out", str(out), "--split"]
    assert main([*args, "--sample", str(KVASIR_IMAGES)]) == 0
    loaded = _loaded(weights)
    images = _real_batch(KVASIR_IMAGES, 2)
    with torch.no_grad():
        expected = loaded(images).numpy()
        # the split point: SAM-Adapter's encoder graph holds its adapters, CAD's holds none
        in_encoder = loaded.encoder_adapter is not None
        encoded = (loaded.image_embeddings if in_encoder else loaded.frozen_embeddings)(images)
    embeddings = _run(out.with_suffix(".encoder.onnx"), images)
    assert embeddings.shape == encoded.shape
    assert export.relative_difference(embeddings, encoded.numpy()) < 1e-4
    decoder = export.onnx_session(out.with_suffix(".decoder.onnx"))
    composed = decoder.run(None, {"images": images.numpy(), "embeddings": embeddings})[0]
    assert export.relative_difference(composed, expected) < 1e-3


def test_zero_shot_sam2_exports_as_one_graph(tmp_path):
    """Zero-shot from a base checkpoint (Meta's SAM 2.1 format), as the whole graph: the method
    without a part of its own, and SAM 2.1's whole graph (the other tests split it)."""
    from cadsam.sam2 import build_sam2

    backbone, checkpoint = "sam2.1_hiera_tiny_test", tmp_path / "sam2.pt"
    torch.manual_seed(5)
    torch.save({"model": build_sam2(backbone).state_dict()}, checkpoint)
    out = tmp_path / "sam2.onnx"
    args = ["export", "--method", "zero-shot", "--backbone", backbone, "--checkpoint"]
    args += [str(checkpoint), "--image-size", str(SIZE), "--out", str(out)]
    assert main([*args, "--sample", str(ISBI_IMAGES)]) == 0
    model = build_model("zero-shot", backbone, checkpoint).for_inference()
    images = _real_batch(ISBI_IMAGES, 2)
    with torch.no_grad():
        expected = model(images).numpy()
    assert export.relative_difference(_run(out, images), expected) < 1e-3


def test_predict_onnx_writes_the_masks_predict_writes(cad_weights, cad_graph, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    grey, colour = list_images(ISBI_IMAGES)[5], list_images(KVASIR_IMAGES)[0]  # 622 x 529
    for path in (grey, colour):
        (inputs / path.name).symlink_to(path.resolve())
    common = ["predict", "--images", str(inputs), "--probabilities"]
    assert main([*common, "--weights", str(cad_weights), "--out", str(tmp_path / "pt")]) == 0
    assert main([*common, "--onnx", str(cad_graph), "--out", str(tmp_path / "ox")]) == 0
    model = _loaded(cad_weights)
    for path in list_images(inputs):
        written = [tmp_path / folder / f"{path.stem}.png" for folder in ("pt", "ox")]
        ours, theirs = (np.array(Image.open(p)) for p in written)
        assert ours.shape == read_image(path).shape[:2]
        # The logits agree to 1e-3 of their scale (tested above), so a pixel whose logit is
        # within that of 0 may fall on either side of it: only such pixels may differ.
        logits = predict_logits(model, read_image(path), SIZE, torch.device("cpu")).numpy()
        differ = ours != theirs
        assert np.all(np.abs(logits[differ]) < 1e-3 * np.abs(logits).max())
        assert differ.mean() < 1e-3
        probabilities = [
            np.array(Image.open(p.with_name(f"{path.stem}_prob.png")), np.int16) for p in written
        ]
        assert np.abs(probabilities[0] - probabilities[1]).max() <= 1  # 8-bit rounding


def test_a_half_graph_stays_within_its_bound(cad_weights, cad_graph, tmp_path):
    import onnx

    half = tmp_path / "half.onnx"
    half.write_bytes(cad_graph.read_bytes())
    export.to_half(half)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    kinds = {t.data_type for t in onnx.load(str(half)).graph.initializer if t.data_type in floats}
    assert kinds == {onnx.TensorProto.FLOAT16}  # every weight is float16
    images = _real_batch(ISBI_IMAGES, 2)
    difference = export.compare_with_pytorch(_loaded(cad_weights), [half], images)
    assert difference < export.FP16_LIMIT  # measured: ~3e-3


def test_a_graph_that_differs_is_refused_and_nothing_is_left(
    cad_weights, cad_graph, tmp_path, monkeypatch, capsys
):
    # Tracing is the slow part, and what is checked here is what follows it: the traced
    # graph is stood in for by the one exported already, and the comparison made to fail.
    monkeypatch.setattr(
        export, "write_graph", lambda g, i, path, o: path.write_bytes(cad_graph.read_bytes())
    )
    monkeypatch.setattr(export, "relative_difference", lambda actual, expected: 0.5)
    out = tmp_path / "bad.onnx"
    out.write_bytes(b"an earlier graph")  # replaced only by a graph that passes
    assert main(["export", "--weights", str(cad_weights), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cadsam: error: the exported graph differs from PyTorch by 5.0e-01")
    assert "nothing written" in err[-1]
    stages = [line.strip() for line in err if line.startswith("  ")]  # each said as it starts
    assert stages[0] == "tracing the whole graph into bad.onnx..."
    assert stages[1].startswith("running it with onnxruntime on ") and len(stages) == 2
    assert list(tmp_path.iterdir()) == [out]  # no new graph, no staging folder
    assert out.read_bytes() == b"an earlier graph"


def test_a_model_that_is_not_finite_is_not_blamed_on_the_graph():
    images = torch.zeros(1, 3, SIZE, SIZE)
    nan = torch.full((1, 1, SIZE, SIZE), float("nan"))
    with pytest.raises(CadsamError, match=r"the model's own logits .* are not finite"):
        export.compare_with_pytorch(lambda x: nan, [], images)


def test_what_is_traced_needs_no_fft(monkeypatch):
    """What is traced equals the model with torch.fft out of reach, for the methods with a
    high-pass (CAD's at its adapter size, SAM-Adapter's at the encoder's) and for the other
    branch of the split (LoRA's: its encoder makes the embedding): the whole graph, and
    encoder then decoder. (Zero-shot and decoder-only take CAD's branch, without adapter.)"""
    x = torch.randint(
        0, 256, (1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(2)
    ).float()
    expected = {}
    models = {}
    for method in ("cad", "sam-adapter", "sam-adapter-paper", "lora"):
        options = {"adapter_size": 32} if method == "cad" else {}
        models[method] = build_model(method, "vit_tiny", **options).for_inference()
        with torch.no_grad():
            expected[method] = models[method](x)
    monkeypatch.setattr(torch.fft, "fft2", None)  # any call of it would fail now
    for method, model in models.items():
        with torch.no_grad():
            whole = export.WholeGraph(model, SIZE)(x)
            parts = export.DecoderGraph(model, SIZE)(x, export.EncoderGraph(model, SIZE)(x))
        scale = expected[method].abs().max()
        assert (whole - expected[method]).abs().max() < 1e-5 * scale, method
        assert (parts - expected[method]).abs().max() < 1e-5 * scale, method


@pytest.mark.parametrize(
    "size", [(8, 8), (9, 9), (15, 21), (32, 17), (7, 64), (1, 5), (64, 64), (127, 127)]
)
def test_the_matrix_high_pass_equals_the_fft(size):
    x = (
        torch.rand(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        * 255
    )
    reference = high_pass(x)
    assert reference.dtype == torch.float64
    matrices = MatrixHighPass(*size, dtype=torch.float64)(x)
    assert (matrices - reference).abs().max() < 1e-10 * reference.abs().max()
    single = MatrixHighPass(*size)(x.float())
    assert (single - high_pass(x.float())).abs().max() < 1e-5 * reference.abs().max()


def test_without_onnxruntime_the_error_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    image = list_images(ISBI_IMAGES)[0]
    args = ["predict", "--onnx", "m.onnx", "--images", str(image), "--out", str(tmp_path)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err == "cadsam: error: running an ONNX graph needs onnxruntime: pip install 'cadsam[onnx]'"
    )
    args = ["export", "--method", "zero-shot", "--backbone", "vit_tiny", "--out", "x.onnx"]
    assert main(args) == 1
    assert "pip install 'cadsam[onnx]'" in capsys.readouterr().err


def test_flags_that_do_not_apply_are_refused(capsys, tmp_path):
    zero_shot = ["export", "--method", "zero-shot", "--backbone", "vit_tiny"]
    assert main([*zero_shot, "--out", str(tmp_path / "x.onnx"), "--opset", "17"]) == 1
    assert "opset 18 or later" in capsys.readouterr().err
    assert main([*zero_shot, "--out", str(tmp_path / "x.pt")]) == 1
    assert "name the file FILE.onnx" in capsys.readouterr().err
    image = str(list_images(ISBI_IMAGES)[0])
    predict = ["predict", "--images", image, "--out", str(tmp_path)]
    assert main([*predict, "--onnx", "m.onnx", "--weights", "w"]) == 1
    assert "--weights does not apply" in capsys.readouterr().err
    assert main(predict) == 1
    assert "give --weights FILE (or --onnx FILE.onnx" in capsys.readouterr().err
    assert main([*predict, "--onnx", str(tmp_path / "none.onnx")]) == 1
    assert "ONNX graph not found" in capsys.readouterr().err
