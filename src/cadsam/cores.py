"""How many cores this process may use: defaults for data-loader workers, and PyTorch's
threads beside them, never exceed them."""

from __future__ import annotations

import os

# OpenMP threads that sleep while they wait for each other rather than spin: on cores shared
# with another busy process a spinning thread holds the core its partner needs, and each
# parallel operation then waits for the scheduler (the demo ran many times slower beside one
# busy process: benchmarks/experiments/demo_shared_cpu.py). OpenMP reads this once, when
# PyTorch loads it: cadsam/__init__.py imports this module before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells it, as under
    taskset or a container's cpuset), else all the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(wanted: int) -> int:
    """Data-loader processes when none are asked for: ``wanted``, but never more than the usable
    cores (more would only compete for them, and PyTorch warns of it)."""
    return max(0, min(wanted, usable_cores()))


def cpu_threads(workers: int = 0, processes: int | None = None) -> int:
    """Intra-op threads for each of ``processes`` processes on this machine (torchrun's
    LOCAL_WORLD_SIZE, else 1), each feeding ``workers`` data-loader processes: the usable
    cores shared out so that threads and workers together never exceed them, and at least one.
    More would take turns on the cores, and each parallel operation then waits for its
    slowest thread."""
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, usable_cores() // max(1, processes) - workers)


def share_cores(workers: int = 0) -> int:
    """Lower PyTorch's intra-op threads to :func:`cpu_threads` (``workers`` data-loader
    processes beside them) where they are more, and return the count. Never raises them: fewer
    set by the caller (``torch.set_num_threads``, a test runner sharing the cores among its
    processes) stay, and OMP_NUM_THREADS, where the user set it, wins."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(min(torch.get_num_threads(), cpu_threads(workers)))
    return torch.get_num_threads()
