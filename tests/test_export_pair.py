"""The labeling pair (``cadsam export --format labeling-pair``), driven as the tools drive SAM's
ONNX graphs: Meta's ``ResizeLongestSide`` for the coordinates and onnxruntime for both graphs
(SAM), or the square frame of samexporter's and X-AnyLabeling's SAM 2 (SAM 2.1); against what
PyTorch answers for the same prompts on the same image through the model's own decoding. A
zero-shot decoder against the graph Meta's ``SamOnnxModel`` exports, in signature and in value.

Tracing a pair takes seconds per graph on the tiny backbones, so each is exported once per
module."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, randomize_
from test_sam_parity import meta_tiny_sam

from cadsam import AdaptedSam, build_model
from cadsam.commands import main
from cadsam.data.io import list_images, read_image
from cadsam.data.labels import class_table
from cadsam.data.transforms import resize_image
from cadsam.weights import base_checkpoint_record, load_weights, save_weights

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnx")

from cadsam import export, export_pair

KVASIR_IMAGES = SHARED_DATA / "kvasir-seg-sample" / "images"
SIZE = 64  # training size of the trained models here (the encoders still see 256 pixels)


def _export_pair(out: Path, *source: str) -> Path:
    args = ["export", *source, "--out", str(out), "--format", "labeling-pair"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx"]
    return out


def _trained(root: Path, backbone: str) -> Path:
    """CAD (adapter and a random decoder, so that prompts matter) saved as train saves it."""
    model = build_model("cad", backbone, adapter_size=32)
    randomize_(model.sam.mask_decoder, seed=3)
    path = root / f"{backbone}.safetensors"
    save_weights(path, model, base_checkpoint_record(None), SIZE)
    return path


@pytest.fixture(scope="module")
def cad_weights(tmp_path_factory) -> Path:
    return _trained(tmp_path_factory.mktemp("cad"), "vit_tiny")


@pytest.fixture(scope="module")
def cad_pair(cad_weights) -> Path:
    """Checked on the real images (their own sizes, neither square) by export itself."""
    out = cad_weights.parent / "pair"
    return _export_pair(out, "--weights", str(cad_weights), "--sample", str(KVASIR_IMAGES))


@pytest.fixture(scope="module")
def zero_shot_pair(sam_file) -> Path:
    source = ["--method", "zero-shot", "--backbone", "vit_tiny", "--checkpoint", str(sam_file)]
    return _export_pair(sam_file.parent / "pair", *source)


def _session(path: Path):
    return export.onnx_session(path)


def _loaded(weights: Path) -> AdaptedSam:
    return load_weights(weights)[0].for_inference()


# -- SAM: as Meta's example drives its decoder ---------------------------------------------


def _meta_prompts(image_size: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """As in Meta's ONNX example, in the image's own pixels: a click with the padding point;
    a background click and a box (no padding point); a click with the previous mask."""
    height, width = image_size
    corners = [[0.15 * width, 0.1 * height], [0.8 * width, 0.9 * height]]
    return [
        (np.array([[0.55 * width, 0.45 * height], [0.0, 0.0]]), np.array([1.0, -1.0]), False),
        (np.array([[0.3 * width, 0.7 * height], *corners]), np.array([0.0, 2.0, 3.0]), False),
        (np.array([[0.4 * width, 0.6 * height], [0.0, 0.0]]), np.array([1.0, -1.0]), True),
    ]


def _pytorch_answer(model, embeddings, coords, labels, image_size, mask_input):
    """The model's own decoding of a prompt in the squashed square: clicks as points, corners
    as a box. Zero-shot answers by Meta's rule, written here as its example explains it (one
    click, or a box alone: the best of three by predicted IoU), a trained model by its one
    mask."""
    sam, frame = model.sam, model.sam.image_size
    height, width = image_size
    square = torch.from_numpy(coords).float() * torch.tensor([frame / width, frame / height])
    clicks = torch.from_numpy(np.isin(labels, (0.0, 1.0)))
    points = (
        (square[clicks][None], torch.from_numpy(labels)[clicks][None]) if clicks.any() else None
    )
    corners = torch.from_numpy(np.isin(labels, (2.0, 3.0)))
    boxes = square[corners].reshape(1, 4) if corners.any() else None
    multimask = model.method == "zero-shot" and len(labels) < 3
    low_res, iou = sam.decode(
        embeddings, boxes=boxes, points=points, mask_inputs=mask_input, multimask_output=multimask
    )
    best = int(iou[0].argmax())
    low_res, iou = low_res[:, best : best + 1], iou[:, best : best + 1]
    return sam.postprocess_masks(low_res, (frame, frame), image_size), iou, low_res


@pytest.mark.parametrize("source", ["cad", "zero-shot"])
def test_the_pair_driven_as_metas_example_gives_pytorchs_masks(
    source, cad_weights, cad_pair, zero_shot_pair, sam_file, meta_sam
):
    if source == "cad":
        model, size, pair = _loaded(cad_weights), SIZE, cad_pair
    else:
        model = build_model("zero-shot", "vit_tiny", sam_file).for_inference()
        size, pair = model.sam.image_size, zero_shot_pair  # zero-shot sees SAM's own square
    transform = meta_sam.utils.transforms.ResizeLongestSide(model.sam.image_size)
    image = read_image(list_images(KVASIR_IMAGES)[1])  # 1070 x 1348, neither square nor small
    height, width = image.shape[:2]
    embedding = _session(pair / "encoder.onnx").run(None, {"image": image.astype(np.float32)})[0]
    with torch.no_grad():  # the image squashed to the training square, as the model takes it
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        square = F.interpolate(
            pixels, (size, size), mode="bilinear", align_corners=False, antialias=True
        )
        expected = model.image_embeddings(square)
    assert embedding.shape == (1, 256, 16, 16)
    assert export.relative_difference(embedding, expected.numpy()) < 1e-4
    decoder = _session(pair / "decoder.onnx")
    previous = (np.zeros((1, 1, 64, 64), np.float32), None)
    for coords, labels, with_mask in _meta_prompts((height, width)):
        feed = {
            "image_embeddings": embedding,
            "point_coords": transform.apply_coords(coords, (height, width))[None],
            "point_labels": labels[None],
            "mask_input": previous[0] if with_mask else np.zeros((1, 1, 64, 64)),
            "has_mask_input": np.array([float(with_mask)]),
            "orig_im_size": np.array([height, width]),
        }
        masks, iou, low_res = decoder.run(None, {k: v.astype(np.float32) for k, v in feed.items()})
        with torch.no_grad():
            mask_input = previous[1] if with_mask else None
            answer = _pytorch_answer(model, expected, coords, labels, (height, width), mask_input)
        assert masks.shape == (1, 1, height, width) and iou.shape == (1, 1)
        assert low_res.shape == (1, 1, 64, 64)
        for actual, reference in zip((masks, iou, low_res), answer, strict=True):
            assert export.relative_difference(actual, reference.numpy()) < 1e-3  # ~1e-5
        assert np.mean((masks > 0) != (answer[0].numpy() > 0)) < 1e-3
        previous = (low_res, answer[2])


def test_the_encoder_squashes_within_a_grey_level_of_the_training_resize():
    """The graph's resize (torch's antialiased bilinear) against Pillow's, which feeds
    training: shrinking, enlarging, both at once, and the square itself."""
    rows, cols = np.mgrid[0:300, 0:300]
    smooth = np.stack([rows * 255 // 300, cols * 255 // 300, (rows * cols) % 256], -1)
    noise = np.random.default_rng(3).integers(-30, 31, smooth.shape)
    whole = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    for height, width in [(53, 96), (117, 70), (64, 64), (30, 200), (300, 260)]:
        image = whole[:height, :width]
        ours = export_pair.square_image(torch.from_numpy(image), SIZE)[0].permute(1, 2, 0)
        pillow = resize_image(image, SIZE).astype(np.float64)
        difference = np.abs(ours.numpy() - pillow)
        assert difference.max() <= 1.0, (height, width)
        assert difference.mean() < 0.5, (height, width)
        if (height, width) == (SIZE, SIZE):
            assert difference.max() == 0


def test_a_zero_shot_decoder_is_metas_in_signature_and_on_a_square_image(
    zero_shot_pair, sam_file, meta_sam, tmp_path
):
    """Meta's SamOnnxModel, exported as its script exports it, on the same weights: the same
    inputs (names, order, dtypes, shapes, free axes) and outputs (names, order, dtypes, ranks);
    on a square image, where Meta's frame is the square, the same masks."""
    reference = meta_tiny_sam(meta_sam)
    reference.load_state_dict(torch.load(sam_file), strict=True)
    onnx_model = importlib.import_module("segment_anything.utils.onnx")  # not imported by it
    model = onnx_model.SamOnnxModel(reference, return_single_mask=True)
    dummy = {
        "image_embeddings": torch.randn(1, 256, 16, 16),
        "point_coords": torch.randint(0, 256, (1, 5, 2)).float(),
        "point_labels": torch.randint(0, 4, (1, 5)).float(),
        "mask_input": torch.randn(1, 1, 64, 64),
        "has_mask_input": torch.tensor([1.0]),
        # square: Meta's graph freezes the crop of its tracing example's size (its int() of
        # a tensor), so a landscape example would crop a square image's masks
        "orig_im_size": torch.tensor([256.0, 256.0]),
    }
    metas = tmp_path / "meta_decoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(dummy.values()),
            str(metas),
            input_names=list(dummy),
            output_names=["masks", "iou_predictions", "low_res_masks"],
            dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
            opset_version=17,
            dynamo=False,
        )
    theirs, ours = _session(metas), _session(zero_shot_pair / "decoder.onnx")
    for mine, meta in zip(ours.get_inputs(), theirs.get_inputs(), strict=True):
        assert (mine.name, mine.type) == (meta.name, meta.type)
        assert [d if isinstance(d, int) else "free" for d in mine.shape] == [
            d if isinstance(d, int) else "free" for d in meta.shape
        ], mine.name
    for mine, meta in zip(ours.get_outputs(), theirs.get_outputs(), strict=True):
        assert (mine.name, mine.type, len(mine.shape)) == (meta.name, meta.type, len(meta.shape))
    embedding = np.random.default_rng(0).standard_normal((1, 256, 16, 16)).astype(np.float32)
    for coords, labels in [
        ([[100.0, 80.0], [0.0, 0.0]], [1.0, -1.0]),  # one click: the best of three
        ([[30.0, 40.0], [200.0, 220.0]], [2.0, 3.0]),  # a box alone: the best of three too
        ([[100.0, 80.0], [50.0, 200.0], [0.0, 0.0]], [1.0, 0.0, -1.0]),  # the single mask
    ]:
        feed = {
            "image_embeddings": embedding,
            "point_coords": np.array([coords], np.float32),
            "point_labels": np.array([labels], np.float32),
            "mask_input": np.zeros((1, 1, 64, 64), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([180.0, 180.0], np.float32),
        }
        for mine, meta in zip(ours.run(None, feed), theirs.run(None, feed), strict=True):
            assert mine.shape == meta.shape
            assert export.relative_difference(mine, meta) < 1e-4


# -- SAM 2.1: as samexporter and X-AnyLabeling drive its pair ------------------------------


@pytest.fixture(scope="module")
def sam2_weights(tmp_path_factory) -> Path:
    return _trained(tmp_path_factory.mktemp("sam2"), "sam2.1_hiera_tiny_test")


@pytest.fixture(scope="module")
def sam2_pair(sam2_weights) -> Path:
    return _export_pair(sam2_weights.parent / "pair", "--weights", str(sam2_weights))


def test_the_sam2_pair_driven_as_x_anylabeling_gives_pytorchs_masks(sam2_weights, sam2_pair):
    """The tool squashes the image to the encoder's square and normalises it, maps points by
    x / W and y / H into the square, labels a box's corners 2 and 3 (no padding point), and
    resizes the chosen low-resolution mask to the image."""
    model = _loaded(sam2_weights)
    encoder, decoder = _session(sam2_pair / "encoder.onnx"), _session(sam2_pair / "decoder.onnx")
    frame = encoder.get_inputs()[0].shape[2]
    assert encoder.get_inputs()[0].shape == [1, 3, frame, frame] and frame == 256
    assert [o.name for o in encoder.get_outputs()] == [
        "high_res_feats_0",
        "high_res_feats_1",
        "image_embed",
    ]
    image = read_image(list_images(KVASIR_IMAGES)[0])  # 529 x 622
    height, width = image.shape[:2]
    squashed = resize_image(image, frame).astype(np.float64)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    tensor = ((squashed / 255.0 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    fine, middle, embed = encoder.run(None, {"image": tensor})
    with torch.no_grad():  # the model on the tool's square, at the size it was trained at
        pixels = torch.from_numpy(squashed).permute(2, 0, 1)[None].float()
        pixels = F.interpolate(
            pixels, (SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True
        )
        expected = model.layout.unpack(model.image_embeddings(pixels))
    for actual, reference in zip((embed, fine, middle), expected, strict=True):
        assert export.relative_difference(actual, reference.numpy()) < 1e-4
    scale = np.array([frame / width, frame / height])
    box = np.array([0.15 * width, 0.1 * height, 0.8 * width, 0.9 * height])
    click = np.array([0.5 * width, 0.5 * height])
    for coords, labels in [
        (click[None], [1.0]),
        (np.vstack([box.reshape(2, 2), click]), [2, 3, 0]),
    ]:
        feed = {
            "image_embed": embed,
            "high_res_feats_0": fine,
            "high_res_feats_1": middle,
            "point_coords": (coords * scale)[None].astype(np.float32),
            "point_labels": np.array([labels], np.float32),
            "mask_input": np.zeros((1, 1, 64, 64), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
        }
        masks, iou = decoder.run(None, feed)
        with torch.no_grad():
            square = torch.from_numpy(coords * scale).float()
            boxes = square[:2].reshape(1, 4) if len(labels) == 3 else None
            clicks = (square[-1:][None], torch.tensor([[labels[-1]]]))
            low_res, expected_iou = model.sam.decode(expected[0], expected[1:], boxes, clicks)
        assert masks.shape == (1, 1, 64, 64) and iou.shape == (1, 1)
        assert export.relative_difference(masks, low_res.clamp(-32, 32).numpy()) < 1e-3
        assert export.relative_difference(iou, expected_iou.numpy()) < 1e-3
        at_size = F.interpolate(
            torch.from_numpy(masks), (height, width), mode="bilinear", align_corners=False
        )
        reference = model.sam.postprocess_masks(low_res, (height, width))
        assert np.mean((at_size > 0).numpy() != (reference > 0).numpy()) < 1e-3


# -- refusals ------------------------------------------------------------------------------


def test_a_model_of_classes_is_refused_in_one_line(tmp_path, capsys):
    table = class_table({"names": ["background", "road", "car"]})
    model = build_model("decoder", "vit_tiny", classes=table)
    weights = tmp_path / "w.safetensors"
    save_weights(weights, model, base_checkpoint_record(None), SIZE)
    out = tmp_path / "pair"
    args = ["export", "--weights", str(weights), "--out", str(out), "--format", "labeling-pair"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cadsam: error: --format labeling-pair: this model answers 3 class")
    assert not out.exists()


def test_a_pair_that_differs_is_refused_and_nothing_is_left(
    cad_weights, cad_pair, tmp_path, monkeypatch, capsys
):
    # Tracing is the slow part, and what is checked here is what follows it: the traced
    # graphs are stood in for by the ones exported already, and the comparison made to fail.
    def copy(graph, inputs, path, opset, free):
        path.write_bytes((cad_pair / path.name).read_bytes())

    monkeypatch.setattr(export, "write_graph", copy)
    monkeypatch.setattr(export_pair, "relative_difference", lambda actual, expected: 0.5)
    out = tmp_path / "pair"
    out.mkdir()
    (out / "encoder.onnx").write_bytes(b"an earlier graph")  # replaced only by a pair that passes
    args = ["export", "--weights", str(cad_weights), "--out", str(out), "--format"]
    assert main([*args, "labeling-pair"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cadsam: error: the exported pair differs from PyTorch by 5.0e-01")
    stages = [line.strip() for line in err if line.startswith("  ")]
    assert stages == [
        "tracing the encoder into encoder.onnx...",
        "tracing the decoder into decoder.onnx...",
        "running them with onnxruntime on 2 random image(s)...",
    ]
    assert sorted(tmp_path.iterdir()) == [out]  # no staging folder left
    assert [p.name for p in out.iterdir()] == ["encoder.onnx"]
    assert (out / "encoder.onnx").read_bytes() == b"an earlier graph"


def test_flags_that_do_not_apply_to_the_pair_are_refused(tmp_path, capsys):
    zero_shot = ["export", "--method", "zero-shot", "--backbone", "vit_tiny"]
    pair = ["--format", "labeling-pair"]
    assert main([*zero_shot, *pair, "--out", str(tmp_path / "x.onnx")]) == 1
    assert "writes a folder (encoder.onnx, decoder.onnx)" in capsys.readouterr().err
    assert main([*zero_shot, *pair, "--out", str(tmp_path / "d"), "--half"]) == 1
    assert "--half applies to --format whole and encoder-decoder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
