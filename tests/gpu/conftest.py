"""The GPU tier: every test here is marked ``gpu``, and skipped where CUDA is not available.

A package (``__init__.py``), so that this file is ``gpu.conftest`` and the suite's own
``conftest`` stays importable by that name from the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import gpu_tier_asked

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (the tests in tests/gpu)")


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
