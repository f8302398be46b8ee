"""ONNX export of a model of K classes: K logit maps per image from the whole graph, the class
table carried in the graph's metadata, and predict --onnx writing the label maps predict
--weights writes (the encoder-decoder pair shares the whole graph's code: tests/test_export.py).

The model is CAD on vit_tiny with random weights and three classes (named and coloured, so
the whole table must travel); each graph is traced once per module (seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_
from PIL import Image

from cadsam import AdaptedSam, build_model
from cadsam.commands import main
from cadsam.data.io import read_image
from cadsam.data.labels import class_table
from cadsam.data.transforms import resize_image
from cadsam.errors import CadsamError
from cadsam.prediction import predict_logits
from cadsam.weights import base_checkpoint_record, load_weights, save_weights

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnx")
import onnx

from cadsam import export

SIZE = 64
TABLE = class_table(
    {
        "names": ["background", "road", "car"],
        "ignore_index": 200,
        "colours": [[0, 0, 0], [128, 64, 128], [64, 0, 128]],
    }
)
IMAGE_SIZES = [(50, 70), (37, 29)]  # H x W: neither square nor the model's size


def _images(folder: Path) -> list[Path]:
    """Two small images with structure (gradients and a block), one RGB and one grey."""
    folder.mkdir()
    generator = np.random.default_rng(7)
    paths = []
    for index, (height, width) in enumerate(IMAGE_SIZES):
        rows, cols = np.mgrid[0:height, 0:width]
        image = np.stack([rows * 255 // height, cols * 255 // width, (rows + cols) % 256], -1)
        image[height // 4 : height // 2, width // 3 : width // 2] = 250
        image = np.clip(image + generator.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
        if index == 1:
            image = image[..., 0]
        paths.append(folder / f"image{index}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def _loaded(weights: Path) -> AdaptedSam:
    model, _ = load_weights(weights)
    return model.for_inference()


def _batch(paths: list[Path]) -> torch.Tensor:
    images = [resize_image(read_image(p), SIZE) for p in paths]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    model = build_model("cad", "vit_tiny", classes=TABLE, adapter_size=32)
    randomize_(model.sam.mask_decoder, seed=3)  # class tokens and heads apart
    path = tmp_path_factory.mktemp("classes") / "w.safetensors"
    save_weights(path, model, base_checkpoint_record(None), SIZE)
    return path


@pytest.fixture(scope="module")
def graph(weights) -> Path:
    out = weights.parent / "model.onnx"
    assert main(["export", "--weights", str(weights), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return _images(tmp_path_factory.mktemp("images") / "in")


def test_the_whole_graph_outputs_k_logits_and_records_the_table(weights, graph, images):
    model = _loaded(weights)
    assert model.classes == TABLE  # the weights carried it: the reference for the graph
    batch = _batch(images)
    session = export.onnx_session(graph)
    assert [str(d) for d in session.get_outputs()[0].shape[1:]] == ["3", str(SIZE), str(SIZE)]
    for part in (batch[:1], batch):
        with torch.no_grad():
            expected = model(part).numpy()
        actual = session.run(None, {"images": part.numpy()})[0]
        assert actual.shape == (len(part), 3, SIZE, SIZE)
        assert export.relative_difference(actual, expected) < 1e-3
    # the classes are not copies of one another: argmax picks more than one of them
    assert len(np.unique(expected.argmax(1))) > 1
    stored = onnx.load(str(graph))
    metadata = {p.key: p.value for p in stored.metadata_props}
    assert json.loads(metadata["cadsam.classes"]) == TABLE.to_dict()
    assert metadata["cadsam.logits"].startswith(f"N x 3 x {SIZE} x {SIZE} class logits")
    assert stored.graph.output[0].doc_string == metadata["cadsam.logits"]
    assert "background, road, car" in metadata["cadsam.logits"]
    assert export.OnnxModel(graph).classes == TABLE


def test_predict_onnx_writes_the_label_maps_predict_writes(weights, graph, images, tmp_path):
    folder = images[0].parent
    common = ["predict", "--images", str(folder), "--probabilities", "--overlay"]
    assert main([*common, "--weights", str(weights), "--out", str(tmp_path / "pt")]) == 0
    assert main([*common, "--onnx", str(graph), "--out", str(tmp_path / "ox")]) == 0
    model = _loaded(weights)
    seen = set()
    for path, size in zip(images, IMAGE_SIZES, strict=True):
        ours, theirs = (np.array(Image.open(tmp_path / d / path.name)) for d in ("pt", "ox"))
        assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == theirs.shape == size
        assert theirs.max() < 3
        seen |= set(np.unique(theirs).tolist())
        # the logits agree to 1e-3 of their scale, so only a pixel whose two best classes lie
        # within that of each other may take the other one
        logits = predict_logits(model, read_image(path), SIZE, torch.device("cpu")).numpy()
        assert np.array_equal(ours, logits.argmax(0))
        top = np.sort(logits, 0)
        differ = ours != theirs
        assert np.all((top[-1] - top[-2])[differ] < 1e-3 * np.abs(logits).max())
        assert differ.mean() < 1e-3
        prob = [np.load(tmp_path / d / f"{path.stem}_prob.npy") for d in ("pt", "ox")]
        assert prob[1].shape == (3, *size)
        assert np.abs(prob[1] - prob[0]).max() < 1e-3
        overlays = [
            np.array(Image.open(tmp_path / d / f"{path.stem}_overlay.png")) for d in ("pt", "ox")
        ]
        assert overlays[0].shape == overlays[1].shape
        if not differ.any():  # the same labels: the same overlay, legend and all
            assert np.array_equal(*overlays)
    assert len(seen) > 1  # a binary mask or a constant map would not pass for label maps


def _hand_graph(path: Path, channels: int, metadata: dict[str, str]) -> Path:
    """A graph written here, not by cadsam export: a 1 x 1 convolution from the images to
    ``channels`` logit maps, with the given metadata (none: as graphs were written before
    graphs recorded classes)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.linspace(-1, 1, channels * 3, dtype=np.float32).reshape(channels, 3, 1, 1)
    node = helper.make_node("Conv", ["images", "weight"], ["logits"])
    shape = ["batch", 3, SIZE, SIZE]
    graph = helper.make_graph(
        [node],
        "hand",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch", channels, SIZE, SIZE]
            )
        ],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


def test_a_binary_graph_has_no_classes_and_a_wrong_table_is_refused(tmp_path):
    binary = export.OnnxModel(_hand_graph(tmp_path / "binary.onnx", 1, {}))
    assert binary.classes is None
    images = torch.rand(2, 3, SIZE, SIZE) * 255
    weight = torch.linspace(-1, 1, 3)
    assert torch.allclose(binary(images)[:, 0], torch.einsum("c,nchw->nhw", weight, images))
    record = {"cadsam.classes": json.dumps(TABLE.to_dict())}
    assert export.OnnxModel(_hand_graph(tmp_path / "k.onnx", 3, record)).classes == TABLE
    with pytest.raises(CadsamError, match=r"outputs 3 logit maps .* records no class table"):
        export.OnnxModel(_hand_graph(tmp_path / "none.onnx", 3, {}))
    with pytest.raises(CadsamError, match=r"outputs 2 logit maps .* a table of 3 classes"):
        export.OnnxModel(_hand_graph(tmp_path / "two.onnx", 2, record))
    for bad in ("{not json", '"classes.yaml"', '{"names": ["only one"]}'):
        path = _hand_graph(tmp_path / "bad.onnx", 3, {"cadsam.classes": bad})
        with pytest.raises(CadsamError, match=r"bad\.onnx: its cadsam\.classes metadata is not"):
            export.OnnxModel(path)
