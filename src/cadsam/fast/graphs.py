"""The training step captured once as a CUDA graph, then replayed.

From cached embeddings a CAD step is some 30 ms of GPU work spread over hundreds of small
kernels, and the CPU that launches them one by one takes longer than the GPU runs them. A CUDA
graph records the launches once; every later step copies its batch into the graph's own input
tensors and launches the whole step (forward, backward, AdamW) at once. The kernels and their
data are the eager step's.

What capture asks of the step: one CUDA device and one process; no host synchronisation and
no copies from the CPU inside it; an optimiser whose state and learning rate live on the GPU
(:func:`adamw` with ``graphed``); autocast without its weight cache. A batch of another shape than
the captured one (an epoch's last, short batch) runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

Step = Callable[..., torch.Tensor]  # (batch tensors or None) -> the loss, detached


def adamw(
    parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, graphed: bool = False
) -> torch.optim.AdamW:
    """The training optimiser. ``graphed``: AdamW as a captured step needs it, its step counts
    on the GPU (``capturable``) and the learning rate a GPU tensor that a scheduler fills in
    place, so that replays follow the schedule; ``initial_lr`` stays a float, so the schedule's
    arithmetic stays on the CPU. A graphed AdamW is also the fused one: a few kernels for all
    parameters where the multi-tensor one launches some for each group of them."""
    if not graphed:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    parameters = list(parameters)
    device = parameters[0].device
    optimizer = torch.optim.AdamW(
        parameters,
        lr=torch.tensor(lr, device=device),
        weight_decay=weight_decay,
        capturable=True,
        fused=True,
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    return optimizer


def match_graph_mode(optimizer: torch.optim.Optimizer, graphed: bool) -> None:
    """The optimiser as :func:`adamw` makes it for ``graphed``, whichever way a loaded one was
    saved: learning rates and step counts on the GPU, ``capturable`` and ``fused`` on where the
    step is graphed; on the CPU and off where not."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if graphed else lr
        group["initial_lr"] = float(group.get("initial_lr", lr))
        group["capturable"] = graphed
        group["fused"] = True if graphed else None
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(device if graphed else "cpu", torch.float32)


# What a capture may reserve for its private memory pool, as a multiple of what the eager step
# allocated beyond what was allocated before it, with room above the highest multiple measured
# for CAD on ViT-B, ViT-H and Hiera-B+, fp32 and bf16, batch 2 to 16, from the cache and through
# the encoder (benchmarks/BENCHMARKS.md; benchmarks/experiments/graph_pool.py).
CAPTURE_POOL_FACTOR = 2.5


class GraphedStep:
    """``step`` run eagerly for ``warmup`` calls (on a side stream, as capture requires:
    compilation, cuDNN's choices and the optimiser's state happen there), captured on the
    first call after them whose batch has the shapes of the call before (not an epoch's short
    last batch), and replayed from then on. ``only_if_it_fits``: where the capture's memory
    pool could not be had (:data:`CAPTURE_POOL_FACTOR`), every step stays eager instead, and
    ``log`` says so; its warm-up calls reset the device's peak counter to measure themselves,
    so ``torch.cuda.max_memory_allocated`` then counts from the last of them."""

    def __init__(
        self,
        step: Step,
        warmup: int = 3,
        only_if_it_fits: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        self.step, self.warmup, self.calls = step, warmup, 0
        self.only_if_it_fits, self.log = only_if_it_fits, log
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False  # declined: the capture would not fit
        self.inputs: tuple[torch.Tensor | None, ...] = ()
        self.captured: list[tuple | None] = []  # the inputs' shapes, dtypes and devices
        self.previous: list[tuple | None] = []  # the last eager call's
        self.loss = torch.empty(())
        self.side: torch.cuda.Stream | None = None
        self.allocated_before = 0  # bytes allocated before the first warm-up call
        self.warmup_peak = 0  # the highest allocated bytes in a warm-up call (only_if_it_fits)

    def __call__(self, *batch: torch.Tensor | None) -> torch.Tensor:
        if self.eager:
            return self.step(*batch)
        if self.graph is None:
            self.calls += 1
            signature = _signature(batch)
            if self.calls <= self.warmup or signature != self.previous:
                self.previous = signature
                return self._on_side_stream(batch)
            if self.only_if_it_fits and not self._capture_fits():
                self.eager = True
                return self.step(*batch)
            self._capture(batch)
        if _signature(batch) != self.captured:
            return self.step(*batch)
        for static, value in zip(self.inputs, batch, strict=True):
            if static is not None:
                static.copy_(value)
        self.graph.replay()
        return self.loss.clone()  # the next replay overwrites self.loss

    def _on_side_stream(self, batch: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        # one stream for every warm-up call: the allocator reuses a block only on the stream
        # that freed it, so a stream each would reserve the step's memory once per call
        if self.side is None:
            self.side = torch.cuda.Stream()
            self.allocated_before = torch.cuda.memory_allocated()
        if self.only_if_it_fits:  # this call's own peak: not an earlier one, nor one reset since
            torch.cuda.reset_peak_memory_stats()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            loss = self.step(*batch)
        torch.cuda.current_stream().wait_stream(self.side)
        if self.only_if_it_fits:
            self.warmup_peak = max(self.warmup_peak, torch.cuda.max_memory_allocated())
        return loss

    def _capture_fits(self) -> bool:
        """Whether the capture's pool can be had from the driver's free memory, with the
        allocator's cached blocks released to it where that is needed. The step's growth: the
        highest peak of the warm-up calls, each read right after the call from a counter reset
        right before it, over what was allocated before the first (as
        :data:`CAPTURE_POOL_FACTOR` was measured)."""
        growth = self.warmup_peak - self.allocated_before
        need = CAPTURE_POOL_FACTOR * growth
        free = torch.cuda.mem_get_info()[0]
        if free < need:
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info()[0]
        if free >= need:
            return True
        self.log(
            f"cuda_graph: the capture would reserve up to {need / 2**20:,.0f} MiB and "
            f"{free / 2**20:,.0f} MiB are free, so the steps stay eager "
            "(--set cuda_graph=true forces it)"
        )
        return False

    def _capture(self, batch: tuple[torch.Tensor | None, ...]) -> None:
        assert all(t is None or t.is_cuda for t in batch), "CUDA graphs capture CUDA tensors"
        self.inputs = tuple(None if t is None else t.clone() for t in batch)
        self.captured = _signature(self.inputs)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pinning thread may call CUDA while we capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.loss = self.step(*self.inputs)


def _signature(batch: tuple[torch.Tensor | None, ...]) -> list[tuple | None]:
    return [None if t is None else (t.shape, t.dtype, t.device) for t in batch]
