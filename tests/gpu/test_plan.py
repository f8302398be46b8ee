"""``cadsam plan`` against prompted training steps measured on CUDA. The whole-image steps are
checked on the CPU against the recorded benchmark rows (tests/test_plan.py); no such row is
prompted, so these are measured here."""

from __future__ import annotations

import pytest
import torch

from cadsam.data.prompts import PromptSettings
from cadsam.fast.graphs import adamw
from cadsam.fast.runtime import resolve_runtime
from cadsam.methods import build_model
from cadsam.methods.prompting import Prompts
from cadsam.planning import PlanRequest, predict_memory
from cadsam.step import training_step

DEVICE = torch.device("cuda")


def _prompted_batch(request: PlanRequest) -> tuple[torch.Tensor, torch.Tensor, Prompts]:
    g = torch.Generator(DEVICE).manual_seed(0)
    batch, size, prompt = request.batch, request.image_size, request.prompt
    objects, points = prompt.per_image, prompt.points + prompt.negatives
    images = torch.rand(batch, 3, size, size, device=DEVICE, generator=g) * 255
    masks = (torch.rand(batch, objects, size, size, device=DEVICE, generator=g) > 0.5).float()
    corner = torch.rand(batch, objects, 2, device=DEVICE, generator=g) * size / 2
    boxes = torch.cat((corner, corner + size / 2), dim=-1)
    coords = torch.rand(batch, objects, points, 2, device=DEVICE, generator=g) * size
    labels = (torch.arange(points, device=DEVICE) < prompt.points).long().expand(batch, objects, -1)
    return images, masks, Prompts(boxes=boxes, points=coords, labels=labels.contiguous())


@pytest.mark.parametrize(("method", "runtime"), [("cad", "lean"), ("decoder", "auto")])
def test_plan_counts_a_prompted_step_within_15_percent(method, runtime):
    """Eight box-and-point prompted objects an image, bf16, as ``train --prompt box+points``
    runs them: the step's peak allocated memory, weights included, against plan's."""
    prompt = PromptSettings("box+points", per_image=8, points=2, negatives=1)
    request = PlanRequest(method, "vit_b", 2, 512, precision="bf16", runtime=runtime, prompt=prompt)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    resolved, _ = resolve_runtime(
        runtime, {}, DEVICE, (method, "vit_b"), whole_steps=False, precision="bf16"
    )
    model = build_model(method, "vit_b", runtime=resolved).to(DEVICE).train()  # as train does
    step = training_step(model, adamw(model.trainable_parameters(), 1e-4, 0.01), "bf16")
    images, masks, prompts = _prompted_batch(request)
    for _ in range(3):
        step(images, masks, None, prompts)
    torch.cuda.synchronize()
    measured = (torch.cuda.max_memory_allocated() - before) / 2**20
    predicted = predict_memory(request).total_mib
    assert predicted == pytest.approx(measured, rel=0.15), (predicted, measured)
