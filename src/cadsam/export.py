"""ONNX export: a trained model as one graph from pixels to mask logits, checked on the spot.

The graph takes N x 3 x S x S float RGB in 0..255 at the training size S (N free) and returns
N x 1 x S x S mask logits (N x K x S x S, one map per class, for a model of K classes), the
whole-image box built in: SAM's preprocessing (resize to the encoder's input, normalise,
pad), the image encoder, the method's own part (CAD's high-pass and normalisation included),
the prompt encoder, the mask decoder and the upsampling. It is traced from the plain path
(the reference formulation every faster path is tested against), after
:meth:`AdaptedSam.for_inference` (LoRA's updates folded into ``qkv``).

ONNX has no FFT that torch's exporter translates, so while tracing, :func:`high_pass` is
replaced by :class:`~cadsam.frequency.MatrixHighPass`, the same function as real matrix
products. ``split`` writes two graphs as SAM's own ONNX demo does: the encoder (images ->
N x 256 x E x E embeddings) and the rest (images and embeddings -> logits; CAD's adapter
still reads the image), so an application can keep embeddings. ``half`` converts the graph
to float16 (inputs and outputs stay float32).

Each graph says what it is in its metadata (``cadsam.*``): a K-class graph records its class
table as JSON (``cadsam.classes``, :meth:`ClassTable.to_dict`), so :class:`OnnxModel` gives
the classes back and ``predict --onnx`` writes the label maps ``predict --weights`` writes.

Every export is run with onnxruntime on a sample batch right away and compared with PyTorch;
above the limit it is refused and nothing is left at the destination. The pair labeling tools
load (an image encoder and Meta's prompt decoder) is :mod:`cadsam.export_pair`'s.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from .data.io import list_images, read_image
from .data.labels import ClassTable, class_table
from .data.transforms import resize_image
from .errors import CadsamError
from .frequency import MatrixHighPass, high_pass_replaced
from .methods import AdaptedSam
from .methods.sam_adapter import OfficialSamAdapter, PaperSamAdapter

INSTALL_HINT = "pip install 'cadsam[onnx]'"
DEFAULT_OPSET = 18  # the lowest torch's exporter writes; onnxruntime >= 1.16 runs it
FP32_LIMIT = 1e-3  # largest |ONNX - PyTorch| accepted, relative to the logits' largest magnitude
FP16_LIMIT = 5e-2  # the same for a float16 graph against the float32 model
SAMPLE_IMAGES = 2
LARGE = 2**31 - 2**26  # weights beyond which a graph keeps them in a .data file (protobuf's 2 GiB)


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CadsamError(f"{purpose} needs {module}: {INSTALL_HINT}") from None


# -- what is traced ------------------------------------------------------------------------


class FixedHighPass(nn.Module):
    """:func:`cadsam.frequency.high_pass` for the one S x S size and area a model feeds it,
    as matrices (buffers, so they become the graph's constants); none where the model has
    no high-pass."""

    def __init__(self, size: int | None, area: float) -> None:
        super().__init__()
        self.matrices = MatrixHighPass(size, size, area) if size else None

    def forward(self, images: torch.Tensor, area: float) -> torch.Tensor:
        matrices = self.matrices
        if matrices is None or images.shape[-2:] != matrices.size or area != matrices.area:
            height, width = images.shape[-2:]
            raise RuntimeError(f"no exportable high-pass for {height} x {width}, area {area}")
        return matrices(images)


def high_pass_input(model: AdaptedSam, size: int) -> tuple[int | None, float]:
    """The size at which ``model`` calls the high-pass for S x S images (``None``: it does
    not), and its area."""
    if model.adapter is not None:
        return model.options.get("adapter_size") or size, model.adapter.high_pass_area
    if isinstance(model.encoder_adapter, (OfficialSamAdapter, PaperSamAdapter)):
        return model.sam.image_size, model.encoder_adapter.high_pass_area
    return None, 0.25


class _Graph(nn.Module):
    """A model's function (or part of it) with the high-pass in its exportable form."""

    input_names: tuple[str, ...] = ("images",)
    output_names: tuple[str, ...] = ("logits",)

    def __init__(self, model: AdaptedSam, size: int) -> None:
        super().__init__()
        self.model, self.size = model, size
        self.high_pass = FixedHighPass(*high_pass_input(model, size))

    def exportable(self) -> contextlib.AbstractContextManager:
        return high_pass_replaced(self.high_pass)

    def metadata(self) -> dict[str, str]:
        model = self.model
        record = {
            "cadsam.graph": type(self).__name__.removesuffix("Graph").lower(),
            "cadsam.method": model.method,
            "cadsam.backbone": model.backbone,
            "cadsam.image_size": str(self.size),
            "cadsam.images": f"N x 3 x {self.size} x {self.size} float RGB in 0..255",
        }
        if "logits" in self.output_names:  # the encoder graph's embeddings know no classes
            record["cadsam.logits"] = logits_description(model.classes, self.size)
            if model.classes is not None:
                record["cadsam.classes"] = json.dumps(model.classes.to_dict())
        return record

    def descriptions(self) -> dict[str, str]:
        """Each input's and output's doc string in the graph, by name."""
        found = {"images": self.metadata()["cadsam.images"]}
        if "embeddings" in (*self.input_names, *self.output_names):
            shape = " x ".join(str(d) for d in self.model.layout.shape)
            found["embeddings"] = f"N x {shape} image embeddings: the encoder graph's output"
        if "logits" in self.output_names:
            found["logits"] = logits_description(self.model.classes, self.size)
        return found


def logits_description(classes: ClassTable | None, size: int) -> str:
    """What a graph's logits are, for its metadata and its output's doc string."""
    if classes is None:
        return f"N x 1 x {size} x {size} mask logits (> 0: the mask)"
    return (
        f"N x {classes.count} x {size} x {size} class logits, one map per class in the order "
        f"of cadsam.classes ({', '.join(classes.names[:8])}{', ...' if classes.count > 8 else ''}"
        "): softmax over them gives each pixel's class probabilities, argmax its label"
    )


class WholeGraph(_Graph):
    """images N x 3 x S x S (RGB 0..255) -> logits N x 1 x S x S (N x K x S x S for K
    classes)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.exportable():
            return self.model(images)


class EncoderGraph(_Graph):
    """images -> the image encoder's embeddings N x 256 x E x E (for CAD, the frozen
    encoder's: the adapter is part of the decoder graph)."""

    output_names = ("embeddings",)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.exportable():
            if self.model.encoder_adapter is not None:
                return self.model.image_embeddings(images)
            return self.model.frozen_embeddings(images)


class DecoderGraph(_Graph):
    """(images, embeddings) -> logits: everything after the encoder (CAD's adapter reads the
    images; other methods take them too, for one interface, and ignore them)."""

    input_names = ("images", "embeddings")

    def forward(self, images: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        with self.exportable():
            if self.model.encoder_adapter is None:
                embeddings = self.model.image_embeddings(images, embeddings)
            return self.model.mask_logits(embeddings, images.shape[-1])


# -- writing -------------------------------------------------------------------------------


@dataclass
class ExportReport:
    files: list[Path]  # the graphs written (a float32 graph over 2 GiB has a .data file beside)
    difference: float  # largest |onnxruntime - PyTorch| over the logits' largest magnitude
    limit: float
    samples: int  # images compared
    sample_source: str


def export_onnx(
    model: AdaptedSam,
    size: int,
    out: str | os.PathLike,
    split: bool = False,
    half: bool = False,
    opset: int = DEFAULT_OPSET,
    sample: str | os.PathLike | None = None,
    progress: Callable[[str], None] = lambda stage: None,
) -> ExportReport:
    """Export ``model`` (for S = ``size`` pixel images) to ``out``, or with ``split`` to
    ``<out stem>.encoder.onnx`` and ``<out stem>.decoder.onnx``; run the result with
    onnxruntime on a sample batch (``SAMPLE_IMAGES`` images from the folder ``sample``, or
    random ones) and compare it with PyTorch. Above the limit (``FP32_LIMIT``, or
    ``FP16_LIMIT`` with ``half``) it is a :class:`CadsamError` and nothing is written.
    ``progress`` hears each stage as it starts: each takes minutes on ViT-H."""
    require("onnxscript", "exporting to ONNX")
    require("onnx", "exporting to ONNX")
    require("onnxruntime", "checking the exported graph")
    if opset < DEFAULT_OPSET:
        raise CadsamError(
            f"--opset {opset}: torch's ONNX exporter writes opset {DEFAULT_OPSET} or later"
        )
    out = Path(out)
    if out.suffix != ".onnx":
        raise CadsamError(f"--out {out}: name the file FILE.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().for_inference()
    images, source = sample_batch(sample, size)
    names = graph_names(out, split)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = [staging / name.name for name in names]
        _write_graphs(model, size, staged, opset, progress)
        if half:
            for path in staged:
                progress(f"converting {path.name} to float16")
                to_half(path)
        progress(f"running it with onnxruntime on {len(images)} {source} image(s)")
        difference = compare_with_pytorch(model, staged, images)
        limit = FP16_LIMIT if half else FP32_LIMIT
        if not difference <= limit:
            raise CadsamError(
                f"the exported graph differs from PyTorch by {difference:.1e} of the logits' "
                f"scale on {len(images)} {source} image(s), above the limit {limit:.0e}: "
                f"nothing written to {out}"
            )
        files = _move_into_place(staged, out.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportReport(files, difference, limit, len(images), source)


def graph_names(out: Path, split: bool) -> list[Path]:
    if not split:
        return [out]
    return [out.with_suffix(".encoder.onnx"), out.with_suffix(".decoder.onnx")]


def _write_graphs(
    model: AdaptedSam, size: int, paths: list[Path], opset: int, progress: Callable[[str], None]
) -> None:
    """Trace and write the whole graph, or the encoder and decoder graphs."""
    traced = torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(0))
    traced = traced.float()  # batch 2: a batch of 1 would fix N at 1
    if len(paths) == 1:
        progress(f"tracing the whole graph into {paths[0].name}")
        write_graph(WholeGraph(model, size), (traced,), paths[0], opset)
        return
    embeddings = torch.zeros(len(traced), *model.layout.shape)  # the encoder's output's shape
    progress(f"tracing the encoder into {paths[0].name}")
    write_graph(EncoderGraph(model, size), (traced,), paths[0], opset)
    progress(f"tracing the decoder into {paths[1].name}")
    write_graph(DecoderGraph(model, size), (traced, embeddings), paths[1], opset)


def write_graph(
    graph: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    opset: int,
    dynamic_shapes: tuple[dict[int, Any], ...] | None = None,
) -> None:
    """torch.onnx.export (the torch.export-based exporter) with the batch dimension free (or
    the free dimensions ``dynamic_shapes`` names, one dict per input), and what the graph is
    in its metadata. ``graph`` names its inputs and outputs (``input_names``,
    ``output_names``) and says what it is (``metadata()``, ``descriptions()``)."""
    if dynamic_shapes is None:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    with _quiet():
        program = torch.onnx.export(
            graph.eval(),
            inputs,
            None,
            input_names=list(graph.input_names),
            output_names=list(graph.output_names),
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.model.metadata_props.update(graph.metadata())
    described = graph.descriptions()
    for value in (*program.model.graph.inputs, *program.model.graph.outputs):
        value.doc_string = described.get(value.name, value.doc_string)
    program.save(path)  # a graph over 2 GiB gets its weights in path.data beside it


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's warnings and log lines say nothing a user can act on."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def to_half(path: Path) -> None:
    """Convert a graph to float16 in place, keeping float32 inputs and outputs."""
    onnx = require("onnx", "converting to float16")
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    graph = onnx.load(str(path))
    # ConstantOfShape stays float32 behind casts: onnxruntime 1.30's converter made its value
    # float16 but left its consumers' declared float32, a graph onnxruntime refuses to load
    blocked = [*DEFAULT_OP_BLOCK_LIST, "ConstantOfShape"]
    with _quiet():
        graph = convert_float_to_float16(graph, keep_io_types=True, op_block_list=blocked)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    weights = sum(len(t.raw_data) for t in graph.graph.initializer)
    onnx.save_model(
        graph, str(path), save_as_external_data=weights > LARGE, location=f"{path.name}.data"
    )


def _move_into_place(staged: list[Path], folder: Path) -> list[Path]:
    """Move the graphs written in a staging folder, and their weights files, into ``folder``
    (removing a weights file an earlier export left beside a graph that has none now)."""
    for graph in staged:
        data = graph.with_name(f"{graph.name}.data")
        if data.exists():
            os.replace(data, folder / data.name)
        else:
            (folder / data.name).unlink(missing_ok=True)
        os.replace(graph, folder / graph.name)
    return [folder / graph.name for graph in staged]


# -- checking ------------------------------------------------------------------------------


def sample_batch(folder: str | os.PathLike | None, size: int) -> tuple[torch.Tensor, str]:
    """Up to ``SAMPLE_IMAGES`` images from ``folder`` resized as ``predict`` resizes them, or
    as many random ones: N x 3 x S x S float RGB 0..255, and what they are."""
    if folder is None:
        generator = torch.Generator().manual_seed(21)
        shape = (SAMPLE_IMAGES, 3, size, size)
        return torch.randint(0, 256, shape, generator=generator).float(), "random"
    files = list_images(folder)[:SAMPLE_IMAGES]
    if not files:
        raise CadsamError(f"no images found in {folder}")
    batch = np.stack([resize_image(read_image(path), size) for path in files])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float(), "sample"


def relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference over the largest magnitude of ``expected``."""
    scale = max(float(np.abs(expected).max()), 1e-12)
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale


@torch.no_grad()
def compare_with_pytorch(model: AdaptedSam, graphs: list[Path], images: torch.Tensor) -> float:
    """Run the graph(s) with onnxruntime and ``model`` in PyTorch on ``images``."""
    expected = model(images).double().numpy()
    if not np.isfinite(expected).all():
        raise CadsamError(
            "the model's own logits (PyTorch's, before any export) are not finite on the "
            "sample images: its weights hold NaN or inf, so there is nothing to check against"
        )
    sessions = [onnx_session(path) for path in graphs]
    feed = {"images": images.numpy()}
    if len(sessions) == 1:
        actual = sessions[0].run(None, feed)[0]
    else:
        embeddings = sessions[0].run(None, feed)[0]
        actual = sessions[1].run(None, {**feed, "embeddings": embeddings})[0]
    return relative_difference(actual, expected)


def onnx_session(path: str | os.PathLike, device: str | None = None) -> Any:
    """An onnxruntime session for a graph: on the CPU, or on CUDA if asked for."""
    ort = require("onnxruntime", "running an ONNX graph")
    providers = ["CPUExecutionProvider"]
    if device not in (None, "cpu") and not str(device).startswith("cuda"):
        raise CadsamError(f"unknown --device {device!r}: an ONNX graph runs on cpu or cuda")
    if device is not None and device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise CadsamError(
                f"--device {device}: this onnxruntime has no CUDA provider "
                "(pip install onnxruntime-gpu), or use --device cpu"
            )
        providers.insert(0, "CUDAExecutionProvider")
    if not Path(path).is_file():
        raise CadsamError(f"ONNX graph not found: {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for foreign or broken files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CadsamError(f"cannot load ONNX graph {path}: {first[:200]}") from None


# -- running -------------------------------------------------------------------------------


class OnnxModel(nn.Module):
    """An exported whole graph behind the model interface :func:`cadsam.prediction.predict`
    uses: ``forward(images)`` with N x 3 x S x S RGB 0..255 -> N x 1 x S x S logits, or
    N x K x S x S for a graph of K classes, whose table :attr:`classes` holds (None: binary,
    as for every graph written before graphs recorded classes)."""

    def __init__(self, path: str | os.PathLike, device: str | None = None) -> None:
        super().__init__()
        self.session = onnx_session(path, device)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != ["images"] or [o.name for o in outputs] != ["logits"]:
            found = ", ".join(i.name for i in inputs)
            raise CadsamError(
                f"{path} is not a whole graph written by cadsam export (its inputs: {found}); "
                "give the single graph, not the --split ones"
            )
        self.image_size = int(inputs[0].shape[-1])
        self.classes = graph_classes(path, self.session)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feed = {"images": images.detach().float().cpu().numpy()}
        return torch.from_numpy(self.session.run(None, feed)[0]).to(images.device)


def graph_classes(path: str | os.PathLike, session: Any) -> ClassTable | None:
    """The class table a graph's metadata records, checked against its logits' channels (a
    graph without one is binary: one channel)."""
    record = session.get_modelmeta().custom_metadata_map.get("cadsam.classes")
    channels = session.get_outputs()[0].shape[1]
    classes = None if record is None else _recorded_table(path, record)
    expected = 1 if classes is None else classes.count
    if isinstance(channels, int) and channels != expected:
        what = "no class table" if classes is None else f"a table of {classes.count} classes"
        raise CadsamError(
            f"{path} outputs {channels} logit maps per image but records {what}: "
            "export it again with cadsam export"
        )
    return classes


def _recorded_table(path: str | os.PathLike, record: str) -> ClassTable:
    """``cadsam.classes``' JSON (a :meth:`ClassTable.to_dict` record) -> the table."""
    try:
        parsed = json.loads(record)
        if not isinstance(parsed, dict):  # class_table would take text as a file to read
            raise CadsamError(f"a {type(parsed).__name__}, not a record of names")
        table = class_table(parsed)
    except (ValueError, TypeError, CadsamError) as exc:  # json's errors are ValueErrors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CadsamError(
            f"{path}: its cadsam.classes metadata is not a class table ({first[:200]})"
        ) from None
    assert table is not None
    return table
