"""The CUDA-graph training step's CPU-side contract. Its capture and replay need a GPU:
the GPU tier (``tests/gpu``) compares them there with the eager step."""

from __future__ import annotations

import math
import types

import pytest
import torch
from test_train import FAST, _isbi_subset

from cadsam.commands import main
from cadsam.fast.graphs import adamw, match_graph_mode
from cadsam.training import lr_factor


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_the_schedule_fills_the_graphs_learning_rate_in_place():
    """A captured step reads the learning rate from one tensor: a scheduler that replaced it
    instead of filling it would freeze the rate at its captured value, silently."""
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = adamw(params, lr=2e-4, weight_decay=0.01, graphed=True)
    captured = optimizer.param_groups[0]["lr"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor("cosine", s, 10))
    for step in range(1, 8):
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] is captured
        assert captured.item() == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi * step / 10)))
    assert optimizer.param_groups[0]["initial_lr"] == 2e-4  # a float: no GPU read per step


def test_a_graphed_runs_state_resumes_eagerly_as_if_never_graphed():
    """state.pt of a --cuda-graph run (tensor learning rate, capturable, fused) resumed without it:
    the next steps are those of a run that was eager all along."""
    torch.manual_seed(0)
    start = torch.randn(5)
    grads = [torch.randn(5) for _ in range(4)]

    def run(optimizer, param, steps):
        for g in steps:
            param.grad = g.clone()
            optimizer.step()

    eager = torch.nn.Parameter(start.clone())
    eager_opt = torch.optim.AdamW([eager], lr=1e-2, weight_decay=0.01)
    run(eager_opt, eager, grads)

    graphed = torch.nn.Parameter(start.clone())
    # what a graphed run saves (capturable AdamW cannot step on the CPU: the state is made so)
    saved_opt = torch.optim.AdamW([graphed], lr=1e-2, weight_decay=0.01)
    run(saved_opt, graphed, grads[:2])
    state = saved_opt.state_dict()
    state["param_groups"][0].update(
        lr=torch.tensor(1e-2), capturable=True, fused=True, initial_lr=1e-2
    )

    resumed_param = torch.nn.Parameter(graphed.detach().clone())
    resumed = torch.optim.AdamW([resumed_param], lr=1e-2, weight_decay=0.01)
    resumed.load_state_dict(state)
    match_graph_mode(resumed, graphed=False)
    group = resumed.param_groups[0]
    assert isinstance(group["lr"], float) and group["capturable"] is False
    assert group["fused"] is None  # the multi-tensor AdamW of an eager run
    run(resumed, resumed_param, grads[2:])
    torch.testing.assert_close(resumed_param, eager, rtol=0, atol=0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "grad_accum=2"], "cuda_graph captures whole optimiser steps"),
        (["--device", "cpu"], "cuda_graph needs a CUDA device; this run is on cpu"),
    ],
)
def test_cuda_graph_refusals_come_before_any_work(tmp_path, capsys, extra, message):
    data = _isbi_subset(tmp_path, 2)
    out = tmp_path / "run"
    args = ["train", "--method", "cad", "--set", "cuda_graph=true", *FAST, *data]
    args += ["--out", str(out), *extra]
    assert main(args) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("written", ["runtime", "before runtimes"])
def test_resume_keeps_the_runs_cuda_graph_unless_told_otherwise(tmp_path, capsys, written):
    """cuda_graph is how a run runs, not what it trains: a run made with it (here on paper,
    as if on a GPU; its config written now, or before the runtime was a section of its own)
    resumes on a CPU with --set cuda_graph=false."""
    import yaml

    run = tmp_path / "run"
    data = _isbi_subset(tmp_path, 2)
    assert (
        main(["train", "--method", "decoder", "--epochs", "1", *FAST, *data, "--out", str(run)])
        == 0
    )
    config = yaml.safe_load((run / "config.yaml").read_text())
    if written == "runtime":
        config["runtime"]["cuda_graph"] = True
    else:
        config = {**config, "cuda_graph": True, "method_options": config.pop("options")}
        del config["runtime"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 1
    assert "cuda_graph needs a CUDA device" in capsys.readouterr().err
    resume = ["train", "--out", str(run), "--resume", "--set", "cuda_graph=false"]
    assert main([*resume, "--no-progress"]) == 0


def test_the_graph_is_captured_on_a_full_batch_not_the_short_last_one(monkeypatch):
    """Captured on a short batch, the graph would leave every full batch after it eager."""
    from cadsam.fast.graphs import GraphedStep

    class CapturedError(Exception):
        pass

    def capture(batch):
        raise CapturedError(len(batch[0]))

    eager = []
    graphed = GraphedStep(lambda x: x.sum(), warmup=2)
    monkeypatch.setattr(graphed, "_on_side_stream", lambda batch: eager.append(len(batch[0])))
    monkeypatch.setattr(graphed, "_capture", capture)
    for size in (4, 4, 3, 4):  # two warm-up calls, a short batch, a full one after it
        graphed(torch.ones(size))
    with pytest.raises(CapturedError) as captured:
        graphed(torch.ones(4))
    assert eager == [4, 4, 3, 4] and captured.value.args == (4,)


@pytest.mark.parametrize(("free_mib", "captured"), [(400, True), (399, False)])
def test_auto_captures_only_where_the_pool_fits(monkeypatch, free_mib, captured):
    """``only_if_it_fits``: a step that grew allocated memory by 160 MiB captures where 2.5
    times that is free once the allocator's cache is released, and otherwise stays eager for
    good, said once. The GPU is stood in for: its free memory, peak and cache."""
    from cadsam.fast.graphs import CAPTURE_POOL_FACTOR, GraphedStep

    class CapturedError(Exception):
        pass

    def capture(batch):
        raise CapturedError

    assert CAPTURE_POOL_FACTOR == 2.5
    mib = 2**20
    readings = {"free": (free_mib - 100) * mib}  # 100 MiB cached until released

    def empty_cache():
        readings["free"] = free_mib * mib

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (readings["free"], 2**40))
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    said, calls = [], []
    graphed = GraphedStep(lambda x: calls.append("eager"), 2, only_if_it_fits=True, log=said.append)
    graphed.allocated_before = 1000 * mib  # as the first warm-up call records it
    graphed.warmup_peak = 1160 * mib  # as the warm-up calls record it
    monkeypatch.setattr(graphed, "_on_side_stream", lambda batch: calls.append("warm-up"))
    monkeypatch.setattr(graphed, "_capture", capture)
    for _ in range(2):
        graphed(torch.ones(2))
    if captured:
        with pytest.raises(CapturedError):
            graphed(torch.ones(2))
        assert said == []
    else:
        for _ in range(2):
            graphed(torch.ones(2))
        assert calls == ["warm-up", "warm-up", "eager", "eager"] and len(said) == 1, said
        assert "up to 400 MiB and 399 MiB are free" in said[0], said


def test_the_warm_up_calls_share_one_side_stream(monkeypatch):
    """The allocator reuses a freed block only on the stream that freed it: a new side stream
    per warm-up call left the step's memory reserved once per call (ViT-B bf16 on an H200:
    4,316 MiB cached by the warm-up against 1,630 with one stream). The CUDA calls are stood
    in for."""
    import contextlib

    from cadsam.fast.graphs import GraphedStep

    made = []

    class Stream:
        def __init__(self):
            made.append(self)

        def wait_stream(self, other):
            pass

    running_on = []
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream.__new__(Stream))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 123)
    monkeypatch.setattr(
        torch.cuda, "stream", lambda s: running_on.append(s) or contextlib.nullcontext()
    )
    graphed = GraphedStep(lambda x: x.sum(), warmup=3)
    for size in (4, 4, 4, 3):  # the warm-up, then a short batch: eager on the side stream too
        graphed(torch.ones(size))
    assert len(made) == 1 and running_on == made * 4
    assert graphed.allocated_before == 123  # read once, before the first warm-up call


class _Allocator:
    """The CUDA caching allocator's counters, stood in for: bytes allocated and their peak."""

    def __init__(self, allocated: int, peak: int) -> None:
        self.allocated, self.peak = allocated, peak

    def step(self, transient: int) -> None:
        """A step that allocates ``transient`` bytes and frees them."""
        self.peak = max(self.peak, self.allocated + transient)

    def reset_peak(self) -> None:
        self.peak = self.allocated


@pytest.mark.parametrize(
    ("before", "between", "captured"),
    [
        # a peak 4 GiB above the step's before its warm-up (a validation pass, a cache build):
        # read at capture, 2.5 times it would not fit, though the step's own pool would
        (5000, False, True),
        # the counter reset between the warm-up and the capture (another part measuring its
        # own peak): read at capture, the step would seem to grow nothing and be captured
        (1000, True, False),
    ],
)
def test_the_fit_check_measures_each_warm_up_call(monkeypatch, before, between, captured):
    """The capture check reads the peak of the warm-up calls themselves: the counter reset
    before each and read after it. 1000 MiB allocated, a step that peaks 160 MiB above it and
    400 MiB free: the capture fits in the first case only if that is what it reads, and in the
    second must be declined (399 MiB free). The CUDA calls are stood in for."""
    import contextlib

    from cadsam.fast.graphs import GraphedStep

    mib = 2**20
    allocator = _Allocator(1000 * mib, before * mib)
    free = (400 if captured else 399) * mib
    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    for name, stand_in in {
        "Stream": lambda: stream,
        "current_stream": lambda: stream,
        "stream": lambda s: contextlib.nullcontext(),
        "memory_allocated": lambda: allocator.allocated,
        "max_memory_allocated": lambda: allocator.peak,
        "reset_peak_memory_stats": allocator.reset_peak,
        "mem_get_info": lambda: (free, 2**40),
        "empty_cache": lambda: None,
    }.items():
        monkeypatch.setattr(torch.cuda, name, stand_in)

    class CapturedError(Exception):
        pass

    def capture(batch):
        raise CapturedError

    said = []
    graphed = GraphedStep(
        lambda x: allocator.step(160 * mib), 2, only_if_it_fits=True, log=said.append
    )
    monkeypatch.setattr(graphed, "_capture", capture)
    for _ in range(2):
        graphed(torch.ones(2))
    if between:
        allocator.reset_peak()
    if captured:
        with pytest.raises(CapturedError):
            graphed(torch.ones(2))
        assert said == []
    else:
        graphed(torch.ones(2))
        assert graphed.eager and len(said) == 1
        assert "up to 400 MiB and 399 MiB are free" in said[0], said
    assert graphed.warmup_peak == 1160 * mib
