"""The GPU tier: every test here is marked ``gpu`` and skipped where CUDA is not available.

A package (``__init__.py``), so that this file is ``gpu.conftest`` and the suite's own
``conftest`` stays importable by name from the tests.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
KERNELS = "cadsam.fast.triton_block"
_compiled_kernels = []  # the kernels' module as defined for the GPU, once per session


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/gpu)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.path.resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def compiled_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton compiles for the GPU here. The CPU suite runs Triton's interpreter
    (``TRITON_INTERPRET=1``, read where a kernel is defined and compiled, so also by the
    kernels ``torch.compile`` generates); here it is unset, and CAD's kernels are a copy of
    :mod:`cadsam.fast.triton_block` defined without it, for the test's duration."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if importlib.util.find_spec("triton") is None:
        return
    from triton.runtime.jit import JITFunction

    import cadsam.fast

    loaded = sys.modules.get(KERNELS)
    if loaded is not None and isinstance(loaded._moments_kernel, JITFunction):
        return
    if not _compiled_kernels:
        spec = importlib.util.find_spec(KERNELS)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _compiled_kernels.append(module)
    module = _compiled_kernels[0]
    assert isinstance(module._moments_kernel, JITFunction)
    monkeypatch.setitem(sys.modules, KERNELS, module)
    monkeypatch.setattr(cadsam.fast, "triton_block", module, raising=False)
