"""``cadsam export``: trained weights (or zero-shot SAM) as ONNX, checked against PyTorch with
onnxruntime before anything is written. The graph is traced from the plain path, the
reference, so export takes no runtime."""

from __future__ import annotations

import argparse
import sys

from . import common, flags

HELP = (
    "Export trained weights (or zero-shot SAM) to ONNX: RGB images to mask logits, checked "
    "against PyTorch with onnxruntime (pip install 'cadsam[onnx]')."
)
FORMATS = {
    "whole": "one graph, images -> logits",
    "encoder-decoder": "two graphs, as SAM's ONNX demo: FILE.encoder.onnx (images -> "
    "embeddings) and FILE.decoder.onnx (images, embeddings -> logits)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..export import DEFAULT_OPSET  # (the module reads onnx only when it exports)

    common.model_source_flags(parser)
    flags.add(parser, "--out", required=True, metavar="FILE.onnx")
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


def run(args: argparse.Namespace) -> None:
    from ..export import export_onnx

    model, size = common.load_model_source(args, None)
    classes = "" if model.classes is None else f", {model.classes.count} classes"
    print(
        f"exporting {model.method} on {model.backbone}, {size} x {size} images{classes}",
        file=sys.stderr,
    )
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
    print(
        f"onnxruntime vs PyTorch on {report.samples} {report.sample_source} image(s): largest "
        f"difference {report.difference:.1e} of the logits' scale (limit {report.limit:.0e})"
    )


def _stage(stage: str) -> None:
    print(f"  {stage}...", file=sys.stderr, flush=True)
