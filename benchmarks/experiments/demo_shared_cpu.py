"""``cadsam demo`` alone, then beside one busy process on the same cores: how much slower a
machine shared with one other process makes it (the issue asked for within 3x).

    python benchmarks/experiments/demo_shared_cpu.py --out benchmarks/experiments/demo_shared_cpu.jsonl

Each repeat runs the demo twice in fresh folders, alone and beside ``python -c "while True:
pass"`` (the order alternating between repeats, so that a drifting load on a shared machine
weighs on both), and appends a line per run: the wall time, the demo's own times (cache build,
each method's epochs), the load average just before and the cores. ``--src DIR`` measures
another checkout's ``src/`` (for example an earlier commit's, from ``git archive``);
``--env NAME=VALUE`` sets a variable for the demo (``GOMP_SPINCOUNT=300000`` brings back
OpenMP's spinning waits). Demo flags after ``--`` (default: the full default demo); a reduced
setting to check the script: ``-- --epochs 1 --train-images 8 --test-images 4 --image-size 64``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY = [sys.executable, "-c", "while True: pass"]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run_demo(demo_args: list[str], env: dict[str, str], busy: bool, timeout: float) -> dict:
    """One demo in a fresh folder, beside one busy process or not: its times and the load."""
    load = os.getloadavg()
    neighbour = subprocess.Popen(BUSY) if busy else None
    try:
        with tempfile.TemporaryDirectory(prefix="cadsam-demo-") as out:
            command = [sys.executable, "-m", "cadsam", "demo", "--out", out, "--no-progress"]
            started = time.perf_counter()
            done = subprocess.run(
                [*command, *demo_args], env=env, capture_output=True, text=True, timeout=timeout
            )
            wall = time.perf_counter() - started
            if done.returncode != 0:
                sys.exit(f"the demo failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
            results = json.loads((Path(out) / "results.json").read_text())
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return {
        "busy_neighbour": busy,
        "wall_seconds": round(wall, 1),
        "cache_seconds": results.get("cache_seconds"),
        "train_seconds": {m: r["train_seconds"] for m, r in results["methods"].items()},
        "load_before": [round(x, 2) for x in load],
        "cores": usable_cores(),
    }


def context(env: dict[str, str], src: str | None, demo_args: list[str]) -> dict:
    """What the numbers depend on besides the load: the code, the threads' settings, torch."""
    code = [sys.executable, "-c", "import torch; print(torch.__version__)"]
    torch_version = subprocess.run(code, env=env, capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
    return {
        "demo_args": demo_args,
        "src": src or "installed cadsam",
        "commit": commit.stdout.strip() or None,
        "torch": torch_version,
        "env": {name: env[name] for name in names if name in env},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="a JSON-lines file to append to")
    parser.add_argument("--src", help="run the cadsam of this src/ folder (PYTHONPATH)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per demo")
    parser.add_argument("demo_args", nargs="*", help="after --: flags for cadsam demo")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.src, env.get("PYTHONPATH")]))
    env.update(item.split("=", 1) for item in args.env)
    shared = context(env, args.src, args.demo_args)
    ratios = []
    for repeat in range(args.repeats):
        rows = {}
        for busy in (False, True) if repeat % 2 == 0 else (True, False):
            rows[busy] = row = run_demo(args.demo_args, env, busy, args.timeout)
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps({**row, "repeat": repeat, **shared}) + "\n")
        ratios.append(rows[True]["wall_seconds"] / rows[False]["wall_seconds"])
    shown = ", ".join(f"{r:.2f}x" for r in ratios)
    print(f"beside one busy process / alone: {shown} (median {statistics.median(ratios):.2f}x)")


if __name__ == "__main__":
    main()
