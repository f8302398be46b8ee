"""The tests that run the Triton kernels on CPU tensors, under Triton's interpreter, in a
process of their own: the interpreter is chosen when Triton is imported, and it would meet the
GPU tier's CUDA tensors (or they it) in a shared process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import INTERPRETED

TESTS = Path(__file__).resolve().parent


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreted process itself")
def test_the_kernels_pass_their_tests_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-m", "triton_interpreter", "--rootdir", str(TESTS.parent), str(TESTS)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary, summary
