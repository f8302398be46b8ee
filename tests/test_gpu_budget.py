"""The GPU tier's sizing (tests/gpu/budget.py), on the CPU: how many processes share the GPU,
what each may hold, and what the cap ``CADSAM_GPU_MEMORY_GIB`` changes."""

from __future__ import annotations

import inspect

import pytest
import torch
from gpu import budget, test_commands, test_fast_paths
from gpu.budget import (
    CONTEXT_GIB,
    GIB,
    WORKER_GIB,
    memory_fraction,
    parse_cap,
    process_share,
    tier_budget,
    worker_count,
)


@pytest.mark.parametrize(
    ("free_gib", "cap", "workers", "share_gib"),
    [
        (79.0, None, 6, 79 / 6 - 1),  # an H100 80GB: six processes of 12.2 GiB
        (139.0, None, 6, 139 / 6 - 1),  # an H200: no more than six
        (139.0, 24.0, 2, 11.0),  # an H200 standing in for a 24 GiB card
        (79.0, 24.0, 2, 11.0),  # an H100 likewise
        (22.5, None, 1, 21.5),  # a 24 GiB card with its desktop: one process
        (10.0, 24.0, 1, 9.0),  # a cap above what is free: what is free
        (7.5, None, 1, 6.5),  # an 8 GiB card
    ],
)
def test_processes_and_their_share(free_gib, cap, workers, share_gib):
    budget_gib = tier_budget(int(free_gib * GIB), cap)
    assert budget_gib == pytest.approx(min(free_gib, cap or free_gib))
    assert worker_count(budget_gib) == workers
    assert process_share(budget_gib, workers) == pytest.approx(share_gib)


def test_one_process_without_xdist_and_the_fraction_of_the_card():
    assert worker_count(79.0, most=1) == 1
    assert process_share(79.0, 1) == 78.0
    # an H100's 79.2 GiB: a 11 GiB share is 0.139 of it; a share beyond the card, all of it
    total = int(79.2 * GIB)
    assert memory_fraction(11.0, total) == pytest.approx(11 / 79.2)
    assert memory_fraction(100.0, total) == 1.0
    assert process_share(0.5, 1) == 0.0  # less than a context: nothing for the allocator


@pytest.mark.parametrize(("text", "cap"), [(None, None), ("", None), (" ", None), ("24", 24.0)])
def test_the_cap_is_gib_or_unset(text, cap):
    assert parse_cap(text) == cap


@pytest.mark.parametrize("text", ["24GB", "0", "-8", "nan", "inf", "twenty"])
def test_a_cap_that_is_not_gib_is_refused_naming_the_variable(text):
    with pytest.raises(ValueError, match=r"CADSAM_GPU_MEMORY_GIB=.*give the GPU memory in GiB"):
        parse_cap(text)


def test_scripts_test_reads_workers_and_budget(monkeypatch, capsys):
    """What scripts/test --gpu reads: the worker count and the budget, for the free memory and
    the cap it finds; a bad cap is one line and exit status 2."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(139.5 * GIB), 141 * GIB))
    monkeypatch.setenv("CADSAM_GPU_MEMORY_GIB", "24")
    assert budget.main(["6"]) == 0
    assert capsys.readouterr().out == "2 24.0\n"
    monkeypatch.delenv("CADSAM_GPU_MEMORY_GIB")
    assert budget.main(["1"]) == 0  # without pytest-xdist: one process
    assert capsys.readouterr().out == "1 139.5\n"
    monkeypatch.setenv("CADSAM_GPU_MEMORY_GIB", "24GB")
    assert budget.main([]) == 2
    assert "scripts/test --gpu: CADSAM_GPU_MEMORY_GIB='24GB'" in capsys.readouterr().err


def test_every_test_fits_the_share_of_a_worker():
    """With WORKER_GIB a process (a 24 GiB card's two, an 80 GiB card's six), no test of the
    tier is skipped for memory: each one's gpu_memory mark fits that share."""
    marks = {
        name: mark.args[0]
        for module in (test_fast_paths, test_commands)
        for name, function in inspect.getmembers(module, inspect.isfunction)
        for mark in getattr(function, "pytestmark", [])
        if mark.name == "gpu_memory"
    }
    assert marks, "the tier's heavy tests say what they need"
    share = process_share(WORKER_GIB, 1)
    assert share == WORKER_GIB - CONTEXT_GIB
    assert {name: gib for name, gib in marks.items() if gib > share} == {}
