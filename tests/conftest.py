"""Shared test helpers: Meta's reference package (torchvision stubbed), the real data, the
CPU suite's device and Triton's interpreter.

The suite runs on the CPU on any machine, a GPU's too: unless pytest is asked for the GPU tier
(``-m gpu``), no CUDA device is visible, so commands pick the CPU as they would on a machine
without one. The GPU tier (``tests/gpu``) runs on its own, on CUDA, and is skipped otherwise.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import types
from pathlib import Path

import pytest
import torch

# the small real data sets the tests read (see its README): beside the checkout, or elsewhere
SHARED_DATA = Path(
    os.environ.get("CADSAM_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
DATA_SETS = ("isbi2012-membrane", "kvasir-seg-sample", "camvid-sample")
# one reason for every test that reads them, so that pytest's -ra summary is one line
NO_REAL_DATA = (
    f"the real data sets are not in {SHARED_DATA}: set CADSAM_TEST_DATA to a folder holding "
    f"{', '.join(f'{name}/' for name in DATA_SETS)} (the project's shared test data: small "
    "samples of ISBI 2012, Kvasir-SEG and CamVid)"
)
# CI sets it: there a missing data set stops the run at once rather than skip the tests
REQUIRE_DATA = os.environ.get("CADSAM_REQUIRE_TEST_DATA") == "1"
TESTS = Path(__file__).resolve().parent


def has_real_data() -> bool:
    return all((SHARED_DATA / name).is_dir() for name in DATA_SETS)


def gpu_tier_asked(config: pytest.Config) -> bool:
    """Whether this run is the GPU tier's: pytest given ``-m gpu``."""
    markers = config.getoption("markexpr") or ""
    return "gpu" in markers and "not gpu" not in markers


def pytest_configure(config: pytest.Config) -> None:
    """Without the real data, the tests that read it skip (see :func:`reads_real_data`), unless
    ``CADSAM_REQUIRE_TEST_DATA=1`` (CI), which stops the run at once. Outside the GPU tier
    (``-m gpu``), no CUDA device is visible: hidden here, before anything touches CUDA
    (module-scoped fixtures run before any test's own), so this process and every process a
    test starts pick the CPU as on a machine without a GPU."""
    config.addinivalue_line("markers", "real_data: reads the real data sets in CADSAM_TEST_DATA")
    if REQUIRE_DATA and not has_real_data():  # one line, not dozens of failures
        pytest.exit(f"CADSAM_REQUIRE_TEST_DATA=1, but {NO_REAL_DATA}", returncode=4)
    if not gpu_tier_asked(config):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # pytest-xdist: share the cores, rather than each worker taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def interpreted_triton():
    """``cadsam.fast.triton_block`` with its kernels run by Triton's interpreter on CPU tensors.
    The interpreter must be chosen before Triton is first imported, and a process that has it
    cannot run Triton on a GPU: tests asking for it run in a process of their own
    (``test_interpreted_triton.py`` starts it), and are skipped in this one."""
    if not INTERPRETED:
        pytest.skip(
            "runs under Triton's interpreter, in the process test_interpreted_triton starts"
        )
    pytest.importorskip("triton")
    return importlib.import_module("cadsam.fast.triton_block")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "interpreted_triton" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.triton_interpreter)
        if reads_real_data(item):
            item.add_marker(pytest.mark.real_data)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skipped here, not by a skip mark, so that every skip has the same place and reason and
    pytest's summary shows them as one line."""
    if item.get_closest_marker("real_data") and not has_real_data():
        pytest.skip(NO_REAL_DATA)


def reads_real_data(item: pytest.Item) -> bool:
    """Whether a test names a path into SHARED_DATA: in its code, its parameters, its fixtures'
    code or the code of the test modules' functions they call. Found from the code, so no test
    can forget to say so; ``@pytest.mark.real_data`` marks one this misses."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if any(_names_real_data(value) for value in params.values()):
        return True
    fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    functions = [getattr(item, "function", None)]
    functions += [definitions[-1].func for definitions in fixtures.values() if definitions]
    seen: set[types.CodeType] = set()
    return any(_code_reads_real_data(function, seen) for function in functions if function)


def _names_real_data(value: object) -> bool:
    """A path (or a tuple, list or dict of paths) in SHARED_DATA."""
    if isinstance(value, (tuple, list)):
        return any(_names_real_data(one) for one in value)
    if isinstance(value, dict):
        return any(_names_real_data(one) for one in value.values())
    return isinstance(value, (str, Path)) and Path(value).is_relative_to(SHARED_DATA)


def _code_reads_real_data(function: object, seen: set[types.CodeType]) -> bool:
    function = inspect.unwrap(function)
    code = getattr(function, "__code__", None)
    if code is None or code in seen or not Path(code.co_filename).is_relative_to(TESTS):
        return False
    seen.add(code)
    scope = function.__globals__
    for name in _names_in(code):
        value = scope.get(name)
        if _names_real_data(value):
            return True
        if inspect.isfunction(value) and _code_reads_real_data(value, seen):
            return True
    return False


def _names_in(code: types.CodeType) -> set[str]:
    """The global (and attribute) names a function's code, nested functions' included, uses."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _names_in(constant)
    return names


def _stub_torchvision() -> None:
    """Meta's package imports torchvision at import time for code these tests never call."""
    if "torchvision" in sys.modules:
        return

    def unused(*args, **kwargs):
        raise AssertionError("torchvision stub called")

    modules = {
        name: types.ModuleType(name)
        for name in (
            "torchvision",
            "torchvision.transforms",
            "torchvision.transforms.functional",
            "torchvision.ops",
            "torchvision.ops.boxes",
        )
    }
    modules["torchvision.transforms.functional"].resize = unused
    modules["torchvision.transforms.functional"].to_pil_image = unused
    modules["torchvision.ops.boxes"].batched_nms = unused
    modules["torchvision.ops.boxes"].box_area = unused
    sys.modules.update(modules)


@pytest.fixture(scope="session")
def meta_sam():
    """Meta's ``segment_anything`` package, the independent reference for parity tests."""
    _stub_torchvision()
    return importlib.import_module("segment_anything")


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every state_dict entry random values (zero-initialised rel-pos tables too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(noise * (0.5 if tensor.ndim == 1 else tensor.shape[-1] ** -0.5))


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory):
    """A tiny SAM (vit_tiny) on random weights, saved as Meta's checkpoints are."""
    from cadsam.sam import build_sam

    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    sam = build_sam("vit_tiny")
    randomize_(sam, seed=31)
    torch.save(sam.state_dict(), path)
    return path


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def join_as_rank(rank: int, world: int, port: int) -> None:
    """Set what torchrun would set for process ``rank`` of ``world`` on this machine."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
