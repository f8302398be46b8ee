"""One interface for every method: SAM (or SAM 2.1), frozen, plus what the method trains.

The methods differ only in how the image embedding is made, and that lives in
:meth:`AdaptedSam.image_embeddings`:

* ``zero-shot`` / ``decoder``: the frozen encoder, run without autograd;
* ``cad``: the same, plus ``0.1 * adapter(image)`` (the adapter runs beside the encoder);
* ``sam-adapter`` / ``sam-adapter-paper``: the encoder with prompts added to its tokens, so
  its activations are part of the graph;
* ``lora``: the encoder with low-rank updates of its q and v projections, likewise.

Everything after the embedding (whole-image box prompt, mask decoder, upsampling) is shared.
How each stage runs (chunked, compiled, recomputed, in bands) is the model's ``runner``'s
business: :class:`PlainRunner` here, the reference; :func:`cadsam.fast.runner.fit` swaps in another.

What the decoder reads is one tensor per batch, laid out as the backbone says
(:class:`~cadsam.backbones.FeatureLayout`): for SAM the image embedding, B x 256 x E x E; for
SAM 2.1 the image embedding (with ``no_mem_embed``) and the two projected high-resolution maps,
flattened and concatenated, B x N. The frozen encoder's output in that form is what an
embedding cache stores, row by row.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import feature_layout
from ..data.labels import ClassTable
from ..errors import CadsamError
from ..fast.runtime import Runtime
from ..sam import Sam
from ..sam2 import Sam2
from .cad import ConvAdapter
from .classes import give_class_tokens
from .lora import LoraAdapter
from .prompting import Prompts
from .sam_adapter import OfficialSamAdapter, PaperSamAdapter

CAD_SCALE = 0.1  # how much of the adapter's tanh map joins the embedding


class PlainRunner:
    """How a model's stages run on the plain path, the reference for every faster one."""

    runtime = Runtime()

    def frozen_embeddings(self, model: AdaptedSam, images: torch.Tensor) -> torch.Tensor:
        return model.decoder_input(model.sam.image_encoder(model.sam_input(images)))

    def encoder_block(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return block(tokens)

    def adapter(self, adapter: ConvAdapter, images: torch.Tensor) -> torch.Tensor:
        return adapter(images)

    def mask_logits(
        self,
        model: AdaptedSam,
        embeddings: torch.Tensor,
        size: int,
        prompts: Prompts | None = None,
    ) -> torch.Tensor:
        return model.mask_logits(embeddings, size, prompts)


class AdaptedSam(nn.Module):
    def __init__(
        self,
        sam: Sam | Sam2,
        method: str,
        backbone: str,
        options: dict[str, Any],
        adapter: ConvAdapter | None = None,
        encoder_adapter: OfficialSamAdapter | PaperSamAdapter | LoraAdapter | None = None,
        classes: ClassTable | None = None,
    ) -> None:
        super().__init__()
        self.sam = sam
        self.method = method
        self.backbone = backbone
        self.options = dict(options)
        self.adapter = adapter
        self.encoder_adapter = encoder_adapter
        self.classes = classes  # None: the binary task, one mask
        # the channels of multi-channel images it reads (None: the first three), as trained
        self.image_channels: tuple[int, ...] | None = None
        self.prompt = "whole"  # the prompt it was trained with: how eval scores it by default
        if classes is not None:
            give_class_tokens(sam.mask_decoder, classes.count)
        self.layout = feature_layout(backbone)  # what the decoder reads, packed
        self.runner: PlainRunner = PlainRunner()  # not a module: never in the state_dict
        sam.requires_grad_(False)
        if method != "zero-shot":
            sam.mask_decoder.requires_grad_(True)
        if isinstance(sam, Sam2):
            # conv_s0/conv_s1 are decoder weights, but they project the encoder's FPN levels
            # once per image: frozen in every method, they belong to what the decoder reads,
            # computed with the frozen encoder, so training from a cache equals training with
            # the encoder. The rest of the decoder trains.
            sam.mask_decoder.conv_s0.requires_grad_(False)
            sam.mask_decoder.conv_s1.requires_grad_(False)
            # Meta's single-mask rule (see SAM 2.1's MaskDecoder) for zero-shot, which thus
            # answers as Meta's image predictor does. A trained method trains the first mask
            # token alone, so it answers with it too, in eval and predict as in training: the
            # other tokens and the IoU head that would pick among them get no gradient.
            if method != "zero-shot":
                sam.mask_decoder.dynamic_multimask_via_stability = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes: trainable parameters and the adapter's BatchNorm buffers."""
        keep = {name for name, p in self.named_parameters() if p.requires_grad}
        if self.adapter is not None:
            keep |= {f"adapter.{name}" for name, _ in self.adapter.named_buffers()}
        return {name: t.detach() for name, t in self.state_dict().items() if name in keep}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise CadsamError(
                f"trainable weights do not fit this {self.method} model: "
                f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        self.load_state_dict(state, strict=False)

    def for_inference(self) -> AdaptedSam:
        """Evaluation mode, with LoRA's updates folded into the encoder's weights once: the
        same function, less work per image. Not for training further."""
        self.eval()
        if isinstance(self.encoder_adapter, LoraAdapter):
            self.encoder_adapter.merge()
        return self

    def parameter_counts(self) -> dict[str, int]:
        return {
            "trainable": sum(p.numel() for p in self.trainable_parameters()),
            "total": sum(p.numel() for p in self.parameters()),
        }

    # -- the forward pass -------------------------------------------------------------

    def sam_input(self, images: torch.Tensor) -> torch.Tensor:
        """RGB 0..255 at data resolution -> SAM's normalised encoder input (SAM 2.1's own
        preprocessing: resized to its square, scaled to 0..1, ImageNet's mean and std)."""
        if isinstance(self.sam, Sam2):
            return self.sam.preprocess(images)
        size = self.sam.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(
                images.float(), (size, size), mode="bilinear", align_corners=False, antialias=True
            )
        return self.sam.preprocess(images.float())

    def adapter_input(self, images: torch.Tensor) -> torch.Tensor:
        """RGB 0..255 at data resolution -> RGB 0..255 at the adapter's resolution."""
        size = self.options.get("adapter_size")
        if size is None or (images.shape[-1] == size and images.shape[-2] == size):
            return images.float()
        return F.interpolate(
            images.float(), (size, size), mode="bilinear", align_corners=False, antialias=True
        )

    def image_embeddings(
        self, images: torch.Tensor, embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The one place the methods differ: images -> what the decoder reads (packed, see
        :attr:`layout`). ``embeddings``: the frozen encoder's, computed earlier (e.g. from a
        cache); then the encoder does not run. CAD adds to the image embedding alone: on
        SAM 2.1 the high-resolution maps stay the encoder's."""
        if self.encoder_adapter is not None:
            assert embeddings is None, "this method changes the encoder's output"
            encoded = self.encoder_adapter.encode(
                self.sam.image_encoder, self.sam_input(images), self.runner.encoder_block
            )
            return self.decoder_input(encoded)
        if embeddings is None:
            assert self.sam.image_encoder is not None, "built without an encoder: pass embeddings"
            embeddings = self.frozen_embeddings(images)
        if self.adapter is not None:
            adapter = self.runner.adapter(self.adapter, self.adapter_input(images))
            embeddings = self.layout.add_to_first(embeddings, CAD_SCALE * adapter)
        return embeddings

    def decoder_input(self, encoded: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """The image encoder's output -> what the decoder reads, packed: SAM's embedding as it
        is; SAM 2.1's FPN levels as the embedding plus ``no_mem_embed`` and the finer levels
        through ``conv_s0``/``conv_s1``."""
        if isinstance(self.sam, Sam2):
            embedding, high_res = self.sam.project_features(encoded)
            return self.layout.pack([embedding, *high_res])
        return encoded

    @torch.no_grad()
    def frozen_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's embeddings, outside autograd: it keeps nothing for backward."""
        return self.runner.frozen_embeddings(self, images)

    @property
    def outputs(self) -> int:
        """Logit maps per image: 1 for the binary task, else one per class."""
        return 1 if self.classes is None else self.classes.count

    def forward(
        self,
        images: torch.Tensor,
        embeddings: torch.Tensor | None = None,
        prompts: Prompts | None = None,
    ) -> torch.Tensor:
        """B x 3 x S x S RGB in 0..255 -> B x :attr:`outputs` x S x S logits (whole-image box
        prompt); with ``prompts`` for N objects per image, B x N x S x S, a mask per object
        (B x N x K x S x S for K classes)."""
        height, width = images.shape[-2:]
        assert height == width, "images are resized to a square before the model"
        embedded = self.image_embeddings(images, embeddings)
        return self.runner.mask_logits(self, embedded, height, prompts)

    def mask_logits(
        self, image_embeddings: torch.Tensor, size: int, prompts: Prompts | None = None
    ) -> torch.Tensor:
        """Image embeddings -> B x :attr:`outputs` x size x size logits, prompted by the
        whole-image box.

        Low-resolution logits are upsampled to the encoder's frame, then to ``size``, as SAM's
        postprocessing does and as the paper's numbers were computed. SAM 2.1's go straight
        to ``size``, as its image predictor does; zero-shot's by Meta's single-mask rule in
        evaluation mode, a trained method's from the first mask token (see :meth:`__init__`).
        ``prompts``: each image's objects' boxes and points instead (:meth:`prompted_logits`).
        """
        if prompts is not None:
            return self.prompted_logits(image_embeddings, size, prompts)
        if isinstance(self.sam, Sam2):
            embedding, *high_res = self.layout.unpack(image_embeddings)
            boxes = self.sam.whole_image_boxes(embedding.shape[0])
            low_res, _ = self.sam.decode(
                embedding, high_res, boxes=boxes, every_token=self.classes is not None
            )
            return self.sam.postprocess_masks(low_res, (size, size))
        with torch.no_grad():
            boxes = self.sam.whole_image_boxes(image_embeddings.shape[0])
            sparse, dense = self.sam.prompt_encoder(boxes=boxes)
            image_pe = self.sam.prompt_encoder.get_dense_pe()
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            every_token=self.classes is not None,
        )
        frame = self.sam.image_size
        logits = F.interpolate(low_res, (frame, frame), mode="bilinear", align_corners=False)
        if frame != size:
            logits = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)
        return logits

    def prompted_logits(
        self, image_embeddings: torch.Tensor, size: int, prompts: Prompts
    ) -> torch.Tensor:
        """B x N x size x size logits: one mask per object, each answering its own prompt
        (given in the S x S input's pixels, S = ``size``), on its image's embedding. K classes:
        B x N x K x size x size, each object's mask in its class's map (sigmoid, not softmax:
        outside the object no class holds)."""
        batch, count = image_embeddings.shape[0], prompts.objects
        every_token = self.classes is not None
        embeddings = image_embeddings.repeat_interleave(count, dim=0)
        boxes, points = prompts.in_frame(self.sam.image_size / size)
        if isinstance(self.sam, Sam2):
            embedding, *high_res = self.layout.unpack(embeddings)
            low_res, _ = self.sam.decode(
                embedding, high_res, boxes=boxes, points=points, every_token=every_token
            )
            logits = self.sam.postprocess_masks(low_res, (size, size))
        else:
            low_res, _ = self.sam.decode(
                embeddings, boxes=boxes, points=points, every_token=every_token
            )
            frame = self.sam.image_size
            logits = F.interpolate(low_res, (frame, frame), mode="bilinear", align_corners=False)
            if frame != size:
                logits = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)
        logits = logits.reshape(batch, count, self.outputs, size, size)
        return logits if every_token else logits[:, :, 0]
