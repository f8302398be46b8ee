"""The first adapter block as Triton kernels (``cadsam.methods.triton_block``) on a GPU: its
values and gradients against the banded torch passes and the plain adapter (each against
float64, as ``gpu_checks.py`` compares the other fast paths), and the adapter's GPU time,
forward and backward at the bench's size (batch 4, 512 x 512, bf16), with and without the
kernels, and for a few tile sizes and warp counts.

Run: python benchmarks/triton_block.py [checks|grads]  (prints JSON lines, then a profile of
each case; with ``checks``, the checks alone; with ``grads``, the weight-gradient kernel's
launch settings alone, timed)
"""

from __future__ import annotations

import json
import sys

from adapter_kernels import bench_adapter, gpu_ms, rel_diffs
from gpu_checks import as_close_as_plain, cad_adapter_check

from cadsam.methods import triton_block

GRAD_SHARED = ("GRAD_CELLS_PER_TILE", "GRAD_NUM_WARPS")  # set with CELLS_PER_TILE, NUM_WARPS


def checks() -> None:
    for precision in ("fp32", "bf16"):
        for kernels in (False, True):
            try:
                check = cad_adapter_check(precision, tile_mib=128, triton_kernels=kernels)
                check["as_close_as_plain"] = as_close_as_plain(check)
            except Exception as exc:  # report, and go on to the other cases
                check = {"error": str(exc).splitlines()[-1][:300]}
            print(json.dumps({"check": precision, "triton_kernels": kernels, **check}))


def time_case(case: dict, run, adapter, state, reference: tuple | None) -> tuple:
    """Runs the adapter with the kernels' settings as they stand and prints a JSON line: the
    case, its GPU time, and its distance from ``reference`` (from itself where None). Returns
    its result and the profile's table, or Nones where it failed."""
    try:
        result = run()
        ms, table = gpu_ms(run)
    except Exception as exc:  # report, and go on to the other cases
        print(json.dumps({**case, "error": str(exc).splitlines()[-1][:300]}))
        return None, None
    adapter.load_state_dict(state)
    diffs = rel_diffs(adapter, result, reference or result)
    worst = max(diffs, key=diffs.get)
    print(
        json.dumps({**case, "gpu_ms": round(ms, 2), "max_rel_diff": diffs[worst], "worst": worst})
    )
    return result, table


def timings() -> dict[str, str]:
    """Every kernel's launch settings together (the weight-gradient kernel's cells and warps
    set with the others'), against the banded torch passes."""
    adapter, run, state = bench_adapter()
    # (name, kernels, cells per tile, warps, channels per program, the same in grads)
    cases = [("bands", False, 32, 4, 128, 128)]
    for cells, warps, block_c, grad_block_c in [
        (32, 4, 128, 64),  # the defaults
        (32, 4, 128, 128),
        (16, 4, 128, 128),
        (32, 8, 256, 64),
        (64, 8, 256, 64),
        (16, 4, 256, 32),
    ]:
        name = f"kernels {cells} cells, {warps} warps, {block_c}/{grad_block_c} channels"
        cases.append((name, True, cells, warps, block_c, grad_block_c))
    names = ("CELLS_PER_TILE", "NUM_WARPS", "BLOCK_C", "GRAD_BLOCK_C")
    defaults = _settings(names + GRAD_SHARED)
    reference, tables = None, {}
    for name, kernels, cells, warps, block_c, grad_block_c in cases:
        adapter.triton_kernels = kernels
        _set(names + GRAD_SHARED, (cells, warps, block_c, grad_block_c, cells, warps))
        result, table = time_case({"case": name}, run, adapter, state, reference)
        if result is not None:
            reference, tables[name] = reference or result, table
    _set(names + GRAD_SHARED, defaults)
    return tables


def grads_timings() -> None:
    """The weight-gradient kernel's own launch settings, the others at their defaults."""
    adapter, run, state = bench_adapter()
    adapter.triton_kernels = True
    names = ("GRAD_CELLS_PER_TILE", "GRAD_BLOCK_C", "GRAD_NUM_WARPS", "GRAD_PROGRAMS")
    defaults = _settings(names)
    reference = run()
    for settings in [
        defaults,
        (32, 64, 4, 264),
        (32, 64, 4, 66),
        (32, 64, 8, 128),
        (32, 32, 4, 128),
        (32, 128, 8, 128),
        (16, 64, 4, 128),
        (64, 64, 4, 128),
        (64, 64, 8, 128),
        (64, 32, 4, 128),
        (64, 128, 8, 128),
        (64, 64, 8, 264),
    ]:
        _set(names, settings)
        time_case(dict(zip(names, settings, strict=True)), run, adapter, state, reference)
    _set(names, defaults)


def _settings(names: tuple[str, ...]) -> tuple:
    return tuple(getattr(triton_block, name) for name in names)


def _set(names: tuple[str, ...], values: tuple) -> None:
    for name, value in zip(names, values, strict=True):
        setattr(triton_block, name, value)


if __name__ == "__main__":
    if sys.argv[1:] == ["grads"]:  # "grads": the weight-gradient kernel's settings alone
        grads_timings()
        sys.exit()
    checks()
    if sys.argv[1:] != ["checks"]:  # "checks": the checks alone
        for case, table in timings().items():
            print(f"== {case}\n{table}")
