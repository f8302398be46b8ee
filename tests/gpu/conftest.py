"""The GPU tier: every test here is marked ``gpu``, and skipped where CUDA is not available.

Its memory (see :mod:`gpu.budget`): each process may use an equal part of the tier's budget
(``CADSAM_GPU_MEMORY_GIB``, which scripts/test sets to the GPU's free memory unless it is
given), held to it by ``torch.cuda.set_per_process_memory_fraction``. A test that needs more
than that in one process says so (``@pytest.mark.gpu_memory(gib)``) and is skipped, saying
why, where its process's part is smaller. The summary lists the tests' peaks.

A package (``__init__.py``), so that this file is ``gpu.conftest`` and the suite's own
``conftest`` stays importable by that name from the tests.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import gpu_tier_asked

from .budget import (
    CAP_VARIABLE,
    CONTEXT_GIB,
    GIB,
    memory_fraction,
    parse_cap,
    process_share,
    tier_budget,
)

HERE = Path(__file__).resolve().parent
PEAKS: dict[str, float] = {}  # each test's peak of reserved GPU memory, GiB
PEAK = "gpu_peak_gib"  # its name among a test report's user_properties
DEVICE_MEM_GET_INFO = torch.cuda.mem_get_info  # the whole card's (see memory_share)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (the tests in tests/gpu)")
    if gpu_tier_asked(config):
        try:  # a mistyped cap stops the tier at once, in one line
            parse_cap(os.environ.get(CAP_VARIABLE))
        except ValueError as error:
            raise pytest.UsageError(str(error)) from None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not gpu_tier_asked(config):  # the suite, which hides CUDA
        skip = pytest.mark.skip(reason="the GPU tier runs on its own: scripts/test --gpu")
    elif not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        # Triton's interpreter, chosen when a kernel is defined, would run CAD's kernels and
        # those torch.compile generates on the host instead of the GPU
        skip = pytest.mark.skip(reason="needs Triton compiling for the GPU: TRITON_INTERPRET=1")
    else:
        skip = None
    for item in items:
        if item.path.resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


def workers() -> int:
    """The processes this tier runs in (pytest-xdist's workers, or this one)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)


@functools.cache
def memory_share() -> float:
    """GiB this process may hold on the GPU, from now on: its part of the tier's budget, less
    its CUDA context. The budget: ``CADSAM_GPU_MEMORY_GIB`` (scripts/test sets it to the free
    memory it found where it is not given), else the memory free now. The share is enforced
    (the allocator's fraction) and reported: ``torch.cuda.mem_get_info`` says what the share
    leaves free, so that what cadsam chooses by free memory (``auto``'s runtime, the graph
    capture's fit) it chooses as on a card of that size."""
    free, total = DEVICE_MEM_GET_INFO()
    cap = parse_cap(os.environ.get(CAP_VARIABLE))
    share = process_share(cap if cap is not None else tier_budget(free, None), workers())
    torch.cuda.set_per_process_memory_fraction(memory_fraction(share, total))
    share_bytes = int(share * GIB)

    def mem_get_info(device: torch.device | int | None = None) -> tuple[int, int]:
        free = DEVICE_MEM_GET_INFO(device)[0]
        return min(free, max(share_bytes - torch.cuda.memory_reserved(device), 0)), share_bytes

    torch.cuda.mem_get_info = mem_get_info
    return share


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the test touches CUDA, its process's share is set; a test that needs more than
    the share is skipped, saying what it needs and what it was given."""
    if item.get_closest_marker("skip"):  # not the tier's run, or no GPU
        return
    share = memory_share()
    marker = item.get_closest_marker("gpu_memory")
    if marker is not None and marker.args[0] > share:
        budget = (share + CONTEXT_GIB) * workers()
        pytest.skip(
            f"needs {marker.args[0]:g} GiB of GPU memory in one process; this tier gives each "
            f"of its {workers()} processes {share:.1f} GiB ({budget:.1f} GiB over "
            f"{workers()}, less {CONTEXT_GIB:g} GiB for its CUDA context): raise "
            f"{CAP_VARIABLE} or run fewer processes (scripts/test --gpu -n 1)"
        )


@pytest.fixture(autouse=True)
def gpu_memory_peak(request: pytest.FixtureRequest) -> Iterator[None]:
    """The test's peak of reserved GPU memory (what the share limits), from an emptied cache,
    for the summary. After a failure, the failed test's frames are let go: pytest keeps them
    for a debugger (``sys.last_traceback``), and with them every tensor the test held, which
    the next tests in this process would find missing from their share (an out-of-memory error
    then fails the tests after it too)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    yield
    peak = torch.cuda.max_memory_reserved() / GIB
    request.node.user_properties.append((PEAK, round(peak, 2)))
    for name in ("last_exc", "last_type", "last_value", "last_traceback"):
        if hasattr(sys, name):
            delattr(sys, name)
    gc.collect()
    torch.cuda.empty_cache()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":
        PEAKS.update(
            (report.nodeid, value) for name, value in report.user_properties if name == PEAK
        )


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The heaviest tests, by their peak in one process: what sizes WORKER_GIB and the
    gpu_memory marks."""
    if not PEAKS:
        return
    terminalreporter.write_sep("-", "GPU memory: the highest peaks (reserved, in one process)")
    for nodeid, peak in sorted(PEAKS.items(), key=lambda pair: -pair[1])[:10]:
        terminalreporter.write_line(f"{peak:6.2f} GiB  {nodeid}")
