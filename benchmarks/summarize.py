"""Build the paper-style tables of BENCHMARKS.md from the JSON files in this folder.

Run: python benchmarks/summarize.py  (prints markdown)
"""

from __future__ import annotations

import json
from pathlib import Path

from cadsam.paper import AUTHORS_CODE_H100_MIB, MEMORY_TABLES

HERE = Path(__file__).resolve().parent
ROWS = [
    ("SAM Decoder", "decoder", "decoder", "decoder"),
    (
        "SAM Adapter (authors' re-implementation)",
        "sam-adapter-paper",
        "sam-adapter-paper",
        "sam-adapter-paper-ckpt",
    ),
    ("SAM Conv Adapter (CAD)", "cad", "cad", "cad-cache"),
]


# the runs behind each backbone's tables, a later file's rows replacing an earlier one's
RUNS = {
    "vit_b": [
        "h100_vit_b_tables_fp32.json",
        "h100_vit_b_tables_bf16.json",
        "h100_vit_b_compiled_fp32.json",  # the compiled decoder and blocks: all but -plain rows
        "h100_vit_b_compiled_bf16.json",
    ],
    "vit_h": ["h100_vit_h.json"],
}


def load(backbone: str) -> dict[tuple[str, str], dict]:
    results = {}
    for name in RUNS[backbone]:
        report = json.loads((HERE / name).read_text())
        results.update(
            {(r["variant"], r["precision"]): r for r in report["results"] if "error" not in r}
        )
    return results


def mib(results, variant, precision) -> str:
    r = results.get((variant, precision))
    return f"{r['peak_allocated_mib']:,.0f}" if r else "-"


def table(backbone: str, batch: int) -> str:
    results = load(backbone)
    lines = [
        f"**{backbone}, batch {batch}** — peak allocated MiB while training (trainable parameters)",
        "",
        "| module | trainable | paper (A100) | authors' code (H100) | ours, plain path, fp32 | ours, fp32 | ours, bf16 | best fp32 / bf16 (variant) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, method, default, best in ROWS:
        trainable = results[(default, "fp32")]["trainable"]
        lines.append(
            f"| {label} | {trainable:,} | {MEMORY_TABLES[(backbone, method)][1]:,} | {AUTHORS_CODE_H100_MIB.get((backbone, method), 0):,} "
            f"| {mib(results, default + '-plain', 'fp32')} | {mib(results, default, 'fp32')} | {mib(results, default, 'bf16')} "
            f"| {mib(results, best, 'fp32')} / {mib(results, best, 'bf16')} ({best}) |"
        )
    return "\n".join(lines).replace("| 0 |", "| - |")


def speed(backbone: str) -> str:
    results = load(backbone)
    variants = [
        "decoder",
        "cad",
        "cad-fast",
        "cad-cache",
        "cad-cache-nockpt-graph",
        "sam-adapter-paper",
        "sam-adapter-paper-ckpt",
        "sam-adapter-ckpt",
    ]
    lines = [
        f"| {backbone} | "
        + " | ".join(
            str(results[(v, p)]["images_per_second"]) if (v, p) in results else "-"
            for v in variants
        )
        + f" | {p} |"
        for p in ("fp32", "bf16")
    ]
    return "\n".join(lines)


def banded() -> str:
    """The banded adapter against the whole-block one (h100_*_tiles*.json): *_freed.json are
    later runs of the final code, compared with the whole-block figures of the first run."""
    lines = [
        "| backbone | variant | precision | band budget (MiB) | whole blocks: MiB | banded: MiB "
        "| whole blocks: images/s | banded: images/s | speed, banded / whole |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    runs = [  # (banded, whole blocks)
        ("h100_vit_b_tiles.json", "h100_vit_b_tiles.json"),
        ("h100_vit_b_tiles_32mib.json", "h100_vit_b_tiles.json"),
        ("h100_vit_h_tiles.json", "h100_vit_h_tiles.json"),
        ("h100_vit_b_tiles_freed.json", "h100_vit_b_tiles.json"),
        ("h100_vit_h_tiles_freed.json", "h100_vit_h_tiles.json"),
        ("h100_vit_b_tiles_freed_48mib.json", "h100_vit_b_tiles.json"),
        ("h100_vit_b_tiles_freed_40mib.json", "h100_vit_b_tiles.json"),
    ]
    for name, base_name in runs:
        results = json.loads((HERE / name).read_text())["results"]
        base = json.loads((HERE / base_name).read_text())["results"]
        whole = {(r["variant"], r["precision"]): r for r in base}
        for r in results:
            if r["variant"] not in ("cad", "cad-cache"):
                continue
            w = whole[(r["variant"] + "-untiled", r["precision"])]
            budget = r["options"].get("adapter_tile_mib", 64)
            lines.append(
                f"| {r['backbone']} | {r['variant']} | {r['precision']} | {budget} "
                f"| {w['peak_allocated_mib']:,.0f} | {r['peak_allocated_mib']:,.0f} "
                f"| {w['images_per_second']} | {r['images_per_second']} "
                f"| {r['images_per_second'] / w['images_per_second']:.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table("vit_b", 4))
    print()
    print(table("vit_h", 2))
    print()
    print(
        "| backbone | decoder | cad | cad-fast | cad-cache | cad-cache-nockpt-graph | sam-adapter-paper | sam-adapter-paper-ckpt | sam-adapter-ckpt | precision |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    print(speed("vit_b"))
    print(speed("vit_h"))
    print()
    print(banded())
