"""The labeling pair (``cadsam export --format labeling-pair``): a trained model as the two ONNX
graphs that labeling tools load for SAM, an image encoder and a prompt decoder, checked on the
spot as :func:`cadsam.export.export_onnx` checks its graphs.

**SAM** (the ViT backbones), in Meta's contract: the decoder is ``segment_anything``'s
``SamOnnxModel`` as its ``scripts/export_onnx_model.py --return-single-mask`` writes it (the
form the tools load), and the encoder the form samexporter's ``--use-preprocess`` encoder has
(the tools' other half; Meta writes none):

* ``encoder.onnx``: ``image``, H x W x 3 float32 RGB in 0..255 of any size -> ``image_embeddings``
  1 x 256 x E x E. Inside: the image resized to the weights' S x S square (bilinear,
  antialiased, as Pillow resizes images for training: within one grey level of it), then the
  model's own path (SAM's input, CAD's adapter and high-pass, SAM-Adapter's and LoRA's encoder).
* ``decoder.onnx``: ``image_embeddings``, ``point_coords`` (1 x N x 2), ``point_labels`` (1 x N:
  -1 padding, 0 background, 1 foreground, 2/3 a box's corners), ``mask_input`` (1 x 1 x 4E x 4E),
  ``has_mask_input`` (1), ``orig_im_size`` (2: H, W) -> ``masks`` (1 x 1 x H x W logits),
  ``iou_predictions`` (1 x 1), ``low_res_masks`` (1 x 1 x 4E x 4E).

cadsam trains on images squashed to a square, not resized along their longest side and padded
as Meta's SAM does, and the encoder squashes alike. The decoder keeps Meta's coordinates: the
tool gives them in ``ResizeLongestSide``'s frame (long side L, SAM's input size), the graph maps
them to the square's (x * L / w', y * L / h', (h', w') being Meta's resized size of
``orig_im_size``) and resizes the masks from the square to ``orig_im_size`` (nothing to unpad).
``low_res_masks`` are in the square's frame, so fed back as ``mask_input`` they mean the same.

**SAM 2.1** (the Hiera backbones), in the form of samexporter's ``export_sam2.py``, which
X-AnyLabeling's ``segment_anything_2`` models load. SAM 2 itself squashes images to its square,
and so do these tools: the encoder takes the square, the points are in its frame.

* ``encoder.onnx``: ``image``, 1 x 3 x L x L float32 normalised as SAM 2 does (RGB / 255, minus
  ImageNet's mean, over its std) -> ``high_res_feats_0`` (1 x 32 x 4E x 4E), ``high_res_feats_1``
  (1 x 64 x 2E x 2E), ``image_embed`` (1 x 256 x E x E). Inside: back to 0..255, resized to the
  weights' S x S (antialiased), then the model's path.
* ``decoder.onnx``: those three, ``point_coords`` (B x N x 2, in the L x L frame),
  ``point_labels`` (B x N; a padding point is appended inside), ``mask_input`` (B x 1 x 4E x 4E),
  ``has_mask_input`` (1) -> ``masks`` (B x 1 x 4E x 4E logits in the square, clamped to +-32 as
  SAM 2's predictor clamps them) and ``iou_predictions`` (B x 1).

Which mask (:func:`pair_mask_choice`): zero-shot SAM answers by Meta's ``SamOnnxModel`` rule
(below three points, a click and its padding point or a box alone, the best of the three
multimask outputs by predicted IoU; else the single-mask output). A trained method answers with
the single-mask output always: training asks for it alone (multimask off), so the other mask
tokens and the IoU head that would pick among them are not what was trained. SAM 2.1 answers as
cadsam's SAM 2.1 model does (Meta's stability rule for zero-shot, the first token once trained).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.io import list_images, read_image
from .data.transforms import resize_image
from .errors import CadsamError
from .export import (
    DEFAULT_OPSET,
    FP32_LIMIT,
    SAMPLE_IMAGES,
    ExportReport,
    FixedHighPass,
    _move_into_place,
    high_pass_input,
    onnx_session,
    relative_difference,
    require,
)
from .frequency import high_pass_replaced
from .methods import AdaptedSam
from .sam import Sam
from .sam.prompt_encoder import PromptEncoder

FILES = ("encoder.onnx", "decoder.onnx")
META_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
META_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
SAM2_FEATURES = ("high_res_feats_0", "high_res_feats_1", "image_embed")
SAM2_INPUTS = (
    "image_embed",
    "high_res_feats_0",
    "high_res_feats_1",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
)
SAM2_OUTPUTS = ("masks", "iou_predictions")
MASK_CLAMP = 32.0  # SAM 2's predictor clamps low-resolution logits so, as samexporter's graph
SINGLE_MASK_WEIGHT = 1000.0  # Meta's select_masks: points beyond 2.5 favour the single mask


def pair_mask_choice(model: AdaptedSam) -> str:
    """``"meta"``: Meta's rule between the single and the multimask outputs (zero-shot, SAM as
    released); ``"first"``: the single-mask output always (a trained method: what it trained)."""
    return "meta" if model.method == "zero-shot" else "first"


# -- the graphs' pieces --------------------------------------------------------------------


def square_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """H x W x 3 RGB in 0..255 -> 1 x 3 x size x size float: bilinear, antialiased when
    shrinking, as Pillow's resize that feeds training (within one grey level: Pillow rounds to
    8 bits)."""
    pixels = image.permute(2, 0, 1)[None].float()
    return F.interpolate(pixels, (size, size), mode="bilinear", align_corners=False, antialias=True)


def longest_side_size(orig_im_size: torch.Tensor, frame: int) -> torch.Tensor:
    """(H, W) -> the (h', w') Meta's ``ResizeLongestSide(frame)`` resizes an image to."""
    size = orig_im_size.float()
    return torch.floor(size * (frame / size.max()) + 0.5)


def to_square_frame(coords: torch.Tensor, orig_im_size: torch.Tensor, frame: int) -> torch.Tensor:
    """Points (x, y) in Meta's longest-side frame of an H x W image -> the same points in the
    frame x frame square the image is squashed to."""
    resized = longest_side_size(orig_im_size, frame)
    return coords * (frame / resized.flip(0))


def dense_prompt(
    encoder: PromptEncoder, mask_input: torch.Tensor, has_mask_input: torch.Tensor
) -> torch.Tensor:
    """The mask prompt's embedding where ``has_mask_input`` is 1, no-mask's where it is 0."""
    has = has_mask_input.reshape(-1, 1, 1, 1)
    no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    return has * encoder.mask_downscaling(mask_input) + (1 - has) * no_mask


def choose_mask(
    masks: torch.Tensor, iou: torch.Tensor, labels: torch.Tensor, choice: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every mask token's masks and IoU -> one mask and its IoU per prompt set
    (:func:`pair_mask_choice`)."""
    if choice == "first":
        return masks[:, :1], iou[:, :1]
    count = torch.ones_like(labels).sum(dim=1, keepdim=True)  # points given, padding included
    weight = torch.zeros(iou.shape[1], dtype=iou.dtype)
    weight[0] = SINGLE_MASK_WEIGHT
    best = (iou + (count - 2.5) * weight).argmax(dim=1, keepdim=True)
    chosen = masks.gather(1, best[..., None, None].expand(-1, -1, *masks.shape[-2:]))
    return chosen, iou.gather(1, best)


def masks_at_size(low_res: torch.Tensor, frame: int, orig_im_size: torch.Tensor) -> torch.Tensor:
    """Low-resolution logits in the square -> the frame x frame square -> H x W, bilinear (the
    square is the whole image: nothing to unpad)."""
    square = F.interpolate(low_res, (frame, frame), mode="bilinear", align_corners=False)
    size = orig_im_size.to(torch.int64)
    height, width = size[0].item(), size[1].item()
    torch._check(height > 0)
    torch._check(width > 0)
    return F.interpolate(square, (height, width), mode="bilinear", align_corners=False)


# -- the graphs ----------------------------------------------------------------------------


class _PairGraph(nn.Module):
    """One graph of the pair: its inputs' and outputs' names and what it says of itself."""

    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    role = ""
    form = ""
    described: dict[str, str] = {}  # noqa: RUF012 (each class's own, never changed)

    def __init__(self, model: AdaptedSam, size: int) -> None:
        super().__init__()
        self.model, self.size = model, size
        self.choice = pair_mask_choice(model)

    def metadata(self) -> dict[str, str]:
        model = self.model
        return {
            "cadsam.graph": f"labeling-{self.role}",
            "cadsam.method": model.method,
            "cadsam.backbone": model.backbone,
            "cadsam.image_size": str(self.size),
            "cadsam.form": self.form,
            "cadsam.mask_choice": self.choice,
        }

    def descriptions(self) -> dict[str, str]:
        frame, grid = self.model.sam.image_size, self.model.layout.parts[0][1][-1]
        values = {"S": self.size, "L": frame, "E": grid, "E2": 2 * grid, "E4": 4 * grid}
        return {name: text.format(**values) for name, text in self.described.items()}


class _PairEncoder(_PairGraph):
    role = "encoder"

    def __init__(self, model: AdaptedSam, size: int) -> None:
        super().__init__(model, size)
        self.high_pass = FixedHighPass(*high_pass_input(model, size))

    def embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """1 x 3 x S x S RGB 0..255 -> what the decoder reads (packed), the FFT-free way."""
        with high_pass_replaced(self.high_pass):
            return self.model.image_embeddings(pixels)


class SamPairEncoder(_PairEncoder):
    """image H x W x 3 (RGB 0..255, any size) -> image_embeddings 1 x 256 x E x E."""

    input_names, output_names = ("image",), ("image_embeddings",)
    form = "segment-anything (Meta's decoder; samexporter's --use-preprocess encoder input)"
    described = {  # noqa: RUF012
        "image": "H x W x 3 float32 RGB in 0..255, any H and W: squashed to {S} x {S} inside",
        "image_embeddings": "1 x 256 x {E} x {E}: the adapted image embedding",
    }

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.embeddings(square_image(image, self.size))


class SamPairDecoder(_PairGraph):
    """Meta's prompt decoder (``SamOnnxModel``, one mask), for the squashed image."""

    input_names, output_names = META_INPUTS, META_OUTPUTS
    role, form = "decoder", SamPairEncoder.form
    described = {  # noqa: RUF012
        "point_coords": "1 x N x 2 (x, y) in ResizeLongestSide({L})'s frame of the image, as for "
        "Meta's decoder; mapped to the {L} x {L} square the encoder squashes the image to",
        "point_labels": "1 x N: -1 padding, 0 background, 1 foreground, 2/3 box corners",
        "mask_input": "1 x 1 x {E4} x {E4} logits in the square's frame (low_res_masks)",
        "has_mask_input": "1: 1 if mask_input is given, else 0",
        "orig_im_size": "2: the image's (H, W)",
        "masks": "1 x 1 x H x W mask logits (> 0: the object)",
        "low_res_masks": "1 x 1 x {E4} x {E4} logits in the square's frame",
    }

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sam = self.model.sam
        encoder = sam.prompt_encoder
        coords = to_square_frame(point_coords, orig_im_size, sam.image_size)
        # as Meta's graph embeds them: the padding point is the tool's to give
        sparse = encoder._embed_points(coords, point_labels, pad=False)
        dense = dense_prompt(encoder, mask_input, has_mask_input)
        masks, iou = sam.mask_decoder.predict_masks(
            image_embeddings, encoder.get_dense_pe(), sparse, dense
        )
        low_res, iou = choose_mask(masks, iou, point_labels, self.choice)
        return masks_at_size(low_res, sam.image_size, orig_im_size), iou, low_res


SAM2_FORM = "samexporter's SAM 2 (export_sam2.py; X-AnyLabeling's segment_anything_2)"


class Sam2PairEncoder(_PairEncoder):
    """image 1 x 3 x L x L (SAM 2's normalisation) -> the two high-resolution maps and the
    image embedding, as samexporter's SAM 2 encoder."""

    input_names, output_names = ("image",), SAM2_FEATURES
    form = SAM2_FORM
    described = {  # noqa: RUF012
        "image": "1 x 3 x {L} x {L} float32: the RGB image squashed to the square, / 255, minus "
        "ImageNet's mean (0.485, 0.456, 0.406), over its std (0.229, 0.224, 0.225); resized "
        "to {S} x {S} inside, the size the model was trained at",
        "high_res_feats_0": "1 x 32 x {E4} x {E4}: the stride-4 map, through conv_s0",
        "high_res_feats_1": "1 x 64 x {E2} x {E2}: the stride-8 map, through conv_s1",
        "image_embed": "1 x 256 x {E} x {E}: the adapted image embedding, no_mem_embed added",
    }

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sam = self.model.sam
        pixels = (image * sam.pixel_std + sam.pixel_mean) * 255.0
        if self.size != sam.image_size:
            pixels = F.interpolate(
                pixels, (self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        embed, fine, middle = self.model.layout.unpack(self.embeddings(pixels))
        return fine, middle, embed


class Sam2PairDecoder(_PairGraph):
    """samexporter's SAM 2 decoder: one mask per prompt set, low resolution, in the square."""

    input_names, output_names = SAM2_INPUTS, SAM2_OUTPUTS
    role, form = "decoder", SAM2_FORM
    described = {  # noqa: RUF012
        "point_coords": "B x N x 2 (x, y) in the {L} x {L} square's frame: x * {L} / W, "
        "y * {L} / H of the image's own pixels",
        "point_labels": "B x N: 0 background, 1 foreground, 2/3 box corners (a padding point "
        "is appended inside)",
        "mask_input": "B x 1 x {E4} x {E4} logits in the square's frame (masks)",
        "has_mask_input": "1: 1 if mask_input is given, else 0",
        "masks": "B x 1 x {E4} x {E4} mask logits in the square's frame, clamped to +-32: "
        "resize them to the image's H x W",
        "iou_predictions": "B x 1: the mask's predicted IoU",
    }

    def forward(
        self,
        image_embed: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sam = self.model.sam
        encoder = sam.prompt_encoder
        sparse, _ = encoder(points=(point_coords, point_labels))  # SAM 2's: padding appended
        low_res, iou = sam.mask_decoder(
            image_embeddings=image_embed,
            image_pe=encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense_prompt(encoder, mask_input, has_mask_input),
            multimask_output=False,
            high_res_features=[high_res_feats_0, high_res_feats_1],
        )
        return low_res.clamp(-MASK_CLAMP, MASK_CLAMP), iou


def pair_graphs(model: AdaptedSam, size: int) -> tuple[_PairGraph, _PairGraph]:
    """The encoder and decoder graphs of ``model`` (SAM's or SAM 2.1's form)."""
    if isinstance(model.sam, Sam):
        return SamPairEncoder(model, size), SamPairDecoder(model, size)
    return Sam2PairEncoder(model, size), Sam2PairDecoder(model, size)


def tracing_inputs(
    model: AdaptedSam, size: int
) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...], tuple[torch.Tensor, ...], tuple[Any, ...]]:
    """Example inputs and free dimensions of the encoder, then of the decoder: sizes unlike any
    fixed one, so the exporter keeps them free."""
    generator = torch.Generator().manual_seed(0)
    frame, grid = model.sam.image_size, model.layout.parts[0][1][-1]
    points = torch.export.Dim("num_points", min=1)
    if isinstance(model.sam, Sam):
        image = torch.randint(0, 256, (size + 7, size + 21, 3), generator=generator).float()
        free = {0: torch.export.Dim("height", min=2), 1: torch.export.Dim("width", min=2)}
        decoder = (
            torch.randn(1, 256, grid, grid, generator=generator),
            torch.rand(1, 5, 2, generator=generator) * frame,
            torch.tensor([[1.0, 0.0, 2.0, 3.0, -1.0]]),
            torch.randn(1, 1, 4 * grid, 4 * grid, generator=generator),
            torch.tensor([1.0]),
            torch.tensor([float(size + 7), float(size + 21)]),
        )
        return (image,), (free,), decoder, (None, {1: points}, {1: points}, None, None, None)
    image = torch.randn(1, 3, frame, frame, generator=generator)
    sets = torch.export.Dim("num_labels", min=1)
    features = tuple(torch.randn(1, *shape, generator=generator) for _, shape in model.layout.parts)
    decoder = (
        features[0],
        features[1],
        features[2],
        torch.rand(2, 5, 2, generator=generator) * frame,
        torch.tensor([[2.0, 3.0, 1.0, 0.0, 1.0]]).expand(2, -1).contiguous(),
        torch.randn(2, 1, 4 * grid, 4 * grid, generator=generator),
        torch.tensor([1.0]),
    )
    free_sets = ({0: sets, 1: points}, {0: sets, 1: points}, {0: sets})
    return (image,), (None,), decoder, (None, None, None, *free_sets, None)


# -- writing -------------------------------------------------------------------------------


def export_pair(
    model: AdaptedSam,
    size: int,
    out: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    sample: str | os.PathLike | None = None,
    progress: Callable[[str], None] = lambda stage: None,
) -> ExportReport:
    """Write ``model`` (trained on S = ``size`` pixel squares) as ``out/encoder.onnx`` and
    ``out/decoder.onnx``, after running both with onnxruntime, composed, on sample images
    (``SAMPLE_IMAGES`` from the folder ``sample`` at their own size, or random ones) with
    clicks, boxes and a mask prompt, against PyTorch. Above ``FP32_LIMIT`` it is a
    :class:`CadsamError` and nothing is written."""
    for module in ("onnxscript", "onnx"):
        require(module, "exporting to ONNX")
    require("onnxruntime", "checking the exported graphs")
    if opset < DEFAULT_OPSET:
        raise CadsamError(
            f"--opset {opset}: torch's ONNX exporter writes opset {DEFAULT_OPSET} or later"
        )
    if model.classes is not None:
        raise CadsamError(
            f"--format labeling-pair: this model answers {model.classes.count} class maps per "
            "image, and labeling tools expect one object per prompt: export it --format whole"
        )
    out = Path(out)
    if out.suffix == ".onnx" or out.is_file():
        raise CadsamError(
            f"--out {out}: --format labeling-pair writes a folder (encoder.onnx, decoder.onnx)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().for_inference()
    images, source = pair_samples(sample, model.image_channels)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = [staging / name for name in FILES]
        write_pair(model, size, staged, opset, progress)
        progress(f"running them with onnxruntime on {len(images)} {source} image(s)")
        difference = compare_pair(model, size, staged, images)
        if not difference <= FP32_LIMIT:
            raise CadsamError(
                f"the exported pair differs from PyTorch by {difference:.1e} of an output's "
                f"scale on {len(images)} {source} image(s), above the limit {FP32_LIMIT:.0e}: "
                f"nothing written to {out}"
            )
        out.mkdir(exist_ok=True)
        files = _move_into_place(staged, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportReport(files, difference, FP32_LIMIT, len(images), source)


def write_pair(
    model: AdaptedSam, size: int, paths: list[Path], opset: int, progress: Callable[[str], None]
) -> None:
    """Trace and write the encoder and the decoder graph."""
    from . import export  # through the module: what the tests stand in for is its attribute

    encoder, decoder = pair_graphs(model, size)
    encoder_inputs, encoder_free, decoder_inputs, decoder_free = tracing_inputs(model, size)
    progress(f"tracing the encoder into {paths[0].name}")
    export.write_graph(encoder, encoder_inputs, paths[0], opset, encoder_free)
    progress(f"tracing the decoder into {paths[1].name}")
    export.write_graph(decoder, decoder_inputs, paths[1], opset, decoder_free)


# -- checking ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One prompt set in an image's own pixels: clicks (x, y, label 1 or 0), a box (x0, y0,
    x1, y1) or none, and whether the previous prompt's low-resolution mask goes with it."""

    clicks: tuple[tuple[float, float, int], ...] = ()
    box: tuple[float, float, float, float] | None = None
    with_mask: bool = False


def sample_prompts(height: int, width: int) -> list[Prompt]:
    """A click; a box; clicks (foreground and background), a box and the first's mask."""
    box = (0.2 * width, 0.25 * height, 0.7 * width, 0.8 * height)
    return [
        Prompt(clicks=((0.5 * width, 0.5 * height, 1),)),
        Prompt(box=box),
        Prompt(clicks=((0.4 * width, 0.6 * height, 1), (0.1 * width, 0.1 * height, 0)), box=box),
        Prompt(clicks=((0.6 * width, 0.3 * height, 1),), with_mask=True),
    ]


def pair_samples(
    folder: str | os.PathLike | None, channels: tuple[int, ...] | None = None
) -> tuple[list[np.ndarray], str]:
    """Up to ``SAMPLE_IMAGES`` images from ``folder`` at their own size (H x W x 3 uint8), or
    as many random ones of two shapes unlike the square, and what they are."""
    if folder is None:
        generator = np.random.default_rng(21)
        shapes = [(53, 96), (117, 70)][:SAMPLE_IMAGES]
        images = [generator.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]
        return images, "random"
    files = list_images(folder)[:SAMPLE_IMAGES]
    if not files:
        raise CadsamError(f"no images found in {folder}")
    return [read_image(path, channels) for path in files], "sample"


def longest_side_coords(coords: np.ndarray, height: int, width: int, frame: int) -> np.ndarray:
    """Points (x, y) in an H x W image's pixels -> Meta's ``ResizeLongestSide(frame)`` frame,
    as its ``apply_coords`` maps them."""
    scale = frame / max(height, width)
    new_height, new_width = int(height * scale + 0.5), int(width * scale + 0.5)
    return coords * np.array([new_width / width, new_height / height])


def prompt_points(prompt: Prompt, corners_first: bool) -> tuple[np.ndarray, np.ndarray]:
    """A prompt as the tools give it: labelled points, box corners labelled 2 and 3 (after the
    clicks for SAM, before them for SAM 2, as each one's predictor orders them)."""
    clicks = [((x, y), label) for x, y, label in prompt.clicks]
    corners = []
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        corners = [((x0, y0), 2), ((x1, y1), 3)]
    points = corners + clicks if corners_first else clicks + corners
    coords = np.array([xy for xy, _ in points], dtype=np.float64).reshape(-1, 2)
    return coords, np.array([label for _, label in points], dtype=np.float32)


def compare_pair(
    model: AdaptedSam, size: int, graphs: list[Path], images: list[np.ndarray]
) -> float:
    """Run the pair with onnxruntime as a labeling tool does, and ``model`` in PyTorch, on
    each image with :func:`sample_prompts`: the largest relative difference of any output."""
    sessions = [onnx_session(path) for path in graphs]
    compare = _compare_sam if isinstance(model.sam, Sam) else _compare_sam2
    return max(compare(model, size, sessions, image) for image in images)


def _finite(expected: torch.Tensor) -> np.ndarray:
    expected = expected.double().numpy()
    if not np.isfinite(expected).all():
        raise CadsamError(
            "the model's own outputs (PyTorch's, before any export) are not finite on the "
            "sample images: its weights hold NaN or inf, so there is nothing to check against"
        )
    return expected


@torch.no_grad()
def _compare_sam(model: AdaptedSam, size: int, sessions: list[Any], image: np.ndarray) -> float:
    """SAM: the image at its own size, points in Meta's frame, masks at the image's size."""
    sam, choice = model.sam, pair_mask_choice(model)
    height, width = image.shape[:2]
    frame, grid = sam.image_size, model.layout.parts[0][1][-1]
    expected = model.image_embeddings(square_image(torch.from_numpy(image), size))
    embeddings = sessions[0].run(None, {"image": image.astype(np.float32)})[0]
    differences = [relative_difference(embeddings, _finite(expected))]
    previous: tuple[np.ndarray, torch.Tensor] | None = None
    for prompt in sample_prompts(height, width):
        coords, labels = prompt_points(prompt, corners_first=False)
        if prompt.box is None:  # the padding point a tool adds without a box
            coords, labels = np.vstack([coords, [[0.0, 0.0]]]), np.append(labels, -1.0)
        feed = {
            "image_embeddings": embeddings,
            "point_coords": longest_side_coords(coords, height, width, frame)[None],
            "point_labels": labels[None],
            "mask_input": np.zeros((1, 1, 4 * grid, 4 * grid)),
            "has_mask_input": np.array([0.0]),
            "orig_im_size": np.array([height, width]),
        }
        mask = None
        if prompt.with_mask and previous is not None:
            feed["mask_input"], feed["has_mask_input"], mask = previous[0], np.ones(1), previous[1]
        feed = {name: value.astype(np.float32) for name, value in feed.items()}
        actual = sessions[1].run(None, feed)
        reference = sam_prompted(model, expected, prompt, (height, width), mask, choice)
        differences += [_difference(a, _finite(e)) for a, e in zip(actual, reference, strict=True)]
        previous = (actual[2], reference[2])
    return max(differences)


def sam_prompted(
    model: AdaptedSam,
    embeddings: torch.Tensor,
    prompt: Prompt,
    image_size: tuple[int, int],
    mask_input: torch.Tensor | None,
    choice: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's answer to a prompt on SAM, through the model's own prompt encoder (boxes as
    boxes, the padding point its own): masks at the image's size, IoU, low-resolution masks."""
    sam = model.sam
    height, width = image_size
    frame = sam.image_size
    scale = torch.tensor([frame / width, frame / height])
    points = boxes = None
    if prompt.clicks:
        clicks = torch.tensor([[x, y] for x, y, _ in prompt.clicks]) * scale
        labels = torch.tensor([[label for _, _, label in prompt.clicks]])
        points = (clicks[None], labels)
    if prompt.box is not None:
        boxes = (torch.tensor(prompt.box).view(2, 2) * scale).view(1, 4)
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
    masks, iou = sam.mask_decoder.predict_masks(
        embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense
    )
    best = 0
    if choice == "meta":  # Meta's select_masks, the tool's point count: padding included
        weights = torch.zeros(iou.shape[1])
        weights[0] = SINGLE_MASK_WEIGHT
        best = int((iou[0] + (sparse.shape[1] - 2.5) * weights).argmax())
    low_res, iou = masks[:, best : best + 1], iou[:, best : best + 1]
    return sam.postprocess_masks(low_res, (frame, frame), image_size), iou, low_res


@torch.no_grad()
def _compare_sam2(model: AdaptedSam, size: int, sessions: list[Any], image: np.ndarray) -> float:
    """SAM 2.1: the image squashed to the square and normalised by the tool, points in the
    square's frame, masks in it at low resolution."""
    sam = model.sam
    height, width = image.shape[:2]
    frame, grid = sam.image_size, model.layout.parts[0][1][-1]
    square = torch.from_numpy(resize_image(image, frame)).permute(2, 0, 1)[None].float()
    normalised = ((square / 255.0 - sam.pixel_mean) / sam.pixel_std).numpy()
    pixels = F.interpolate(
        square, (size, size), mode="bilinear", align_corners=False, antialias=True
    )
    expected = model.layout.unpack(model.image_embeddings(pixels))
    features = sessions[0].run(None, {"image": normalised})
    found = dict(zip(SAM2_FEATURES, features, strict=True))
    differences = [
        relative_difference(found[name], _finite(part))
        for name, part in zip(("image_embed", *SAM2_FEATURES[:2]), expected, strict=True)
    ]
    scale = np.array([frame / width, frame / height])
    previous: tuple[np.ndarray, torch.Tensor] | None = None
    for prompt in sample_prompts(height, width):
        coords, labels = prompt_points(prompt, corners_first=True)
        feed = {**found, "point_coords": (coords * scale)[None], "point_labels": labels[None]}
        feed["mask_input"], feed["has_mask_input"] = np.zeros((1, 1, 4 * grid, 4 * grid)), [0.0]
        mask = None
        if prompt.with_mask and previous is not None:
            feed["mask_input"], feed["has_mask_input"], mask = previous[0], [1.0], previous[1]
        feed = {name: np.asarray(value, dtype=np.float32) for name, value in feed.items()}
        actual = sessions[1].run(None, feed)
        low_res, iou = sam2_prompted(model, expected, prompt, (height, width), mask)
        reference = (low_res, iou)
        differences += [_difference(a, _finite(e)) for a, e in zip(actual, reference, strict=True)]
        previous = (actual[0], reference[0])
    return max(differences)


def sam2_prompted(
    model: AdaptedSam,
    features: list[torch.Tensor],
    prompt: Prompt,
    image_size: tuple[int, int],
    mask_input: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's answer to a prompt on SAM 2.1, through the model's own decoding (boxes as
    boxes): low-resolution masks in the square, clamped as SAM 2's predictor does, and IoU."""
    height, width = image_size
    frame = model.sam.image_size
    scale = torch.tensor([frame / width, frame / height])
    points = boxes = None
    if prompt.clicks:
        clicks = torch.tensor([[x, y] for x, y, _ in prompt.clicks]) * scale
        points = (clicks[None], torch.tensor([[label for _, _, label in prompt.clicks]]))
    if prompt.box is not None:
        boxes = (torch.tensor(prompt.box).view(2, 2) * scale).view(1, 4)
    low_res, iou = model.sam.decode(
        features[0], features[1:], boxes=boxes, points=points, mask_inputs=mask_input
    )
    return low_res.clamp(-MASK_CLAMP, MASK_CLAMP), iou


def _difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """:func:`relative_difference`, against a scale of at least 1 for IoU predictions (a
    score near 0 is no scale to measure by)."""
    if expected.size <= expected.shape[0]:  # B x 1 IoU
        expected = np.append(expected.ravel(), 1.0)
        actual = np.append(actual.ravel(), 1.0)
    return relative_difference(actual, expected)
