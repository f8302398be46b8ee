"""``cadsam export``: trained weights (or zero-shot SAM) as ONNX, checked against PyTorch with
onnxruntime before anything is written. The graph is traced from the plain path, the
reference, so export takes no runtime."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from . import common, flags

if TYPE_CHECKING:
    from ..export import ExportReport
    from ..methods import AdaptedSam

HELP = (
    "Export trained weights (or zero-shot SAM) to ONNX: RGB images to mask logits, or the "
    "encoder and prompt decoder labeling tools load, checked against PyTorch with onnxruntime "
    "(pip install 'cadsam[onnx]')."
)
FORMATS = {
    "whole": "one graph, images -> logits",
    "encoder-decoder": "two graphs, as SAM's ONNX demo: FILE.encoder.onnx (images -> "
    "embeddings) and FILE.decoder.onnx (images, embeddings -> logits)",
    "labeling-pair": "two graphs for labeling tools, in the folder --out DIR: encoder.onnx (an "
    "RGB image of any size -> the adapted embedding) and decoder.onnx (Meta's prompt decoder: "
    "points and boxes -> one mask); SAM 2.1 in samexporter's SAM 2 form",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..export import DEFAULT_OPSET  # (the module reads onnx only when it exports)

    common.model_source_flags(parser)
    flags.add(parser, "--out", required=True)  # FILE.onnx, or the pair's folder: the epilog
    graph = parser.add_argument_group("the graph")
    graph.add_argument(
        "--format",
        choices=list(FORMATS),
        default="whole",
        help="; ".join(f"{name}: {what}" for name, what in FORMATS.items()) + " (default whole)",
    )
    flags.renamed(
        graph, "--split", "--format encoder-decoder", "format", switch_value="encoder-decoder"
    )
    flags.add(graph, "--image-size")
    graph.add_argument(
        "--half",
        action="store_true",
        help="a float16 graph (float32 inputs and outputs), checked to 5e-2 of the logits' "
        "scale instead of 1e-3",
    )
    graph.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (default {DEFAULT_OPSET}, the lowest torch's exporter writes)",
    )
    graph.add_argument(
        "--sample", help="a folder of images to check the graph on (default: 2 random images)"
    )
    parser.epilog = (
        "--out is the graph's file (FILE.onnx; encoder-decoder writes FILE.encoder.onnx and "
        "FILE.decoder.onnx beside it), or for --format labeling-pair the folder of encoder.onnx "
        "and decoder.onnx (zero-shot's pair sees SAM's own square unless --image-size). Nothing "
        "is written unless onnxruntime's outputs match PyTorch's."
    )


def run(args: argparse.Namespace) -> None:
    from ..export import export_onnx

    model, size = common.load_model_source(args, None)
    pair = args.format == "labeling-pair"
    if pair and model.method == "zero-shot" and not args.image_size:
        size = model.sam.image_size  # SAM as released sees its own square: no smaller one
    classes = "" if model.classes is None else f", {model.classes.count} classes"
    print(
        f"exporting {model.method} on {model.backbone}, {size} x {size} images{classes}",
        file=sys.stderr,
    )
    if pair and model.method != "zero-shot" and getattr(model, "prompt", None) == "whole":
        print(
            "note: trained with the whole-image prompt only (train --prompt): it may answer "
            "boxes and clicks worse than SAM does",
            file=sys.stderr,
        )
    if pair:
        report = _labeling_pair(args, model, size)
    else:
        report = export_onnx(
            model,
            size,
            args.out,
            args.format == "encoder-decoder",
            args.half,
            args.opset,
            args.sample,
            progress=_stage,
        )
    for path in report.files:
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    scale = "an output's scale" if pair else "the logits' scale"
    print(
        f"onnxruntime vs PyTorch on {report.samples} {report.sample_source} image(s): largest "
        f"difference {report.difference:.1e} of {scale} (limit {report.limit:.0e})"
    )


def _labeling_pair(args: argparse.Namespace, model: AdaptedSam, size: int) -> ExportReport:
    from ..errors import CadsamError
    from ..export_pair import export_pair

    if args.half:
        raise CadsamError("--half applies to --format whole and encoder-decoder, not to the pair")
    return export_pair(model, size, args.out, args.opset, args.sample, progress=_stage)


def _stage(stage: str) -> None:
    print(f"  {stage}...", file=sys.stderr, flush=True)
