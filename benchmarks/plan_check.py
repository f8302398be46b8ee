"""`cadsam plan` against `cadsam bench` on the GPU at hand, for settings no recorded benchmark
row holds (another batch, image size, adapter size or backbone): each setting measured by
`cadsam bench` in its own process, then predicted by `plan` (on this machine's CPU), with
the error. After each check `plan_check.json` and `plan_check.md` are rewritten in --out, so a
call that runs out of time keeps what it measured.

    python benchmarks/plan_check.py --out DIR [--within SECONDS] [--limit SECONDS]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cadsam.commands.bench import IMAGE_SIZE, VARIANTS, shape_options
from cadsam.planning import PlanRequest, predict_memory
from cadsam.provenance import provenance

# (backbone, bench variant, precision, shape): none is a row of the canonical runs
CHECKS: list[tuple[str, str, str, dict[str, int]]] = [
    ("vit_b", "cad", "fp32", {"batch": 8}),
    ("vit_b", "cad", "bf16", {"image_size": 1024, "adapter_size": 256}),
    ("vit_l", "cad", "bf16", {}),
    ("vit_b", "cad-lean", "fp32", {"batch": 2, "adapter_size": 1024}),
    ("sam2.1_hiera_s", "decoder", "bf16", {"batch": 8}),
    ("vit_b", "lora", "bf16", {"batch": 8, "image_size": 256}),
]
LIMIT_S = 150  # one bench run, its compilation included


def bench_command(backbone: str, variant: str, precision: str, shape: dict, out: Path) -> list:
    command = [sys.executable, "-m", "cadsam", "bench", "--backbones", backbone]
    command += ["--variants", variant, "--precisions", precision, "--out", str(out)]
    if "batch" in shape:
        command += ["--batch-size", str(shape["batch"])]
    if "image_size" in shape:
        command += ["--image-size", str(shape["image_size"])]
    for name, value in shape_options(shape).items():
        command += ["--set", f"{name}={value}"]
    return command


def predicted_mib(backbone: str, variant: str, precision: str, shape: dict) -> float:
    method, runtime, settings, cache = VARIANTS[variant]
    request = PlanRequest(
        method=method,
        backbone=backbone,
        batch_size=shape.get("batch"),
        image_size=shape.get("image_size", IMAGE_SIZE),
        options=tuple(shape_options(shape).items()),
        precision=precision,
        cache=cache,
        runtime=runtime,
        settings=tuple(settings.items()),
    )
    return predict_memory(request).total_mib


def check(
    backbone: str, variant: str, precision: str, shape: dict, out: Path, limit: float = LIMIT_S
) -> dict[str, Any]:
    name = "-".join([backbone, variant, precision, *(f"{k}{v}" for k, v in shape.items())])
    command = bench_command(backbone, variant, precision, shape, out / name)
    row: dict[str, Any] = {"backbone": backbone, "variant": variant, "precision": precision}
    row |= {"shape": shape, "command": " ".join(["cadsam", *command[3:]])}
    try:
        subprocess.run(command, timeout=limit, check=False, capture_output=True)
        report = json.loads((out / name / "bench.json").read_text())
        measured = report["results"][0]
    except (subprocess.TimeoutExpired, FileNotFoundError, IndexError) as error:
        return row | {"error": type(error).__name__}
    if "error" in measured:
        return row | {"error": measured["error"]}
    predicted = predicted_mib(backbone, variant, precision, shape)
    peak = measured["peak_allocated_mib"]
    return row | {
        "measured_mib": peak,
        "predicted_mib": round(predicted, 1),
        "error_pct": round(100 * (predicted - peak) / peak, 1),
        "gpu": report["environment"].get("gpu"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| backbone | variant | precision | shape | measured (MiB) | plan (MiB) | error |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        shape = ", ".join(f"{k} {v}" for k, v in r["shape"].items()) or "the paper's"
        figures = (
            f"{r['measured_mib']:,.0f} | {r['predicted_mib']:,.0f} | {r['error_pct']:+.1f} %"
            if "error" not in r
            else f"- | - | {r['error']}"
        )
        lines.append(
            f"| {r['backbone']} | `{r['variant']}` | {r['precision']} | {shape} | {figures} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--within", type=float, default=float("inf"), help="seconds to stop by")
    parser.add_argument("--limit", type=float, default=LIMIT_S, help="seconds for one check")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start, rows = time.monotonic(), []
    for backbone, variant, precision, shape in CHECKS:
        if time.monotonic() - start + args.limit > args.within:
            break
        rows.append(check(backbone, variant, precision, shape, args.out, args.limit))
        print(json.dumps(rows[-1]), flush=True)
        report = {"provenance": provenance(), "rows": rows}
        (args.out / "plan_check.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "plan_check.md").write_text(table(rows))


if __name__ == "__main__":
    main()
