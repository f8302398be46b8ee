"""BENCHMARKS.md's headline tables, generated from one results folder of benchmarks/suite.py.

Reads every JSON report under RESULTS_DIR (``cadsam bench``'s bench.json files and the suite's
cache.json files, which share their layout: ``{"environment": ..., "results": [...]}``),
merges their rows (a later report's row replaces an earlier one's; a failed row never
replaces a measured one; rows measured with ``--set`` are left out), and rewrites the part of
BENCHMARKS.md between a section's markers (the canonical run's, ``tables``, unless
``--section``). The reports must come from one commit: tables stitched across code versions are
refused unless ``--allow-mixed-commits``; a run of another commit gets a section of its own.

Run: python benchmarks/tables.py RESULTS_DIR [--markdown FILE] [--section NAME] [--stdout]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SECTION = "tables"  # the section rewritten: between <!-- tables:begin --> and <!-- tables:end -->
BEGIN, END = f"<!-- {SECTION}:begin -->", f"<!-- {SECTION}:end -->"
TITLES = {
    "vit_b": "ViT-B",
    "vit_l": "ViT-L",
    "vit_h": "ViT-H",
    "sam2.1_hiera_t": "SAM 2.1 Hiera-T",
    "sam2.1_hiera_s": "SAM 2.1 Hiera-S",
    "sam2.1_hiera_b+": "SAM 2.1 Hiera-B+",
    "sam2.1_hiera_l": "SAM 2.1 Hiera-L",
}
# Methods in the tables' order, and their names there; others follow under their own names.
METHODS = {
    "decoder": "SAM decoder",
    "sam-adapter-paper": "SAM-Adapter (the paper's re-implementation)",
    "sam-adapter": "SAM-Adapter (the official prompt generator)",
    "cad": "CAD",
    "lora": "LoRA",
}
# A variant's place within its method: its runtime, then cache, then how the step launches.
SUFFIXES = ("-plain", "", "-eager", "-graph", "-lean")
SUFFIXES += ("-cache", "-cache-eager", "-cache-graph", "-cache-lean")
NOT_TRAINING = ("encoder-forward", "cache-build")
LEGEND = (
    "Variants: no suffix runs `auto`, what the commands run by default (the fastest path that "
    "fits); `-lean` the least memory; `-plain` the reference formulation, which allocates what "
    "the authors' code allocates (measured in fp32, the paper's precision); `-cache` trains "
    "from cached embeddings, with no image encoder in memory; `auto` replays CAD's step as a "
    "CUDA graph, `-eager` launches it kernel by kernel (in runs of commits up to 8f8793f, "
    "`-graph` replayed it on SAM 2.1, where `auto` did not; before 33ffedd no suffix was the "
    "eager step). "
    "Peak allocated memory is `torch.cuda.max_memory_allocated` over the whole "
    "run; images/s is the batch over the median step time after 3 warm-up steps. The paper's "
    "figures are `{paper_measure}` readings on an {paper_device}, which add the CUDA context "
    "and the allocator's cache; the authors' code was measured as peak allocated on an "
    "{authors_device}."
)


def paper_figures() -> tuple[dict, dict]:
    """The paper's Tables 1-2 and the authors' code's peak memory, from cadsam.commands.paper."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from cadsam.commands.paper import AUTHORS_CODE_MIB, MEMORY_TABLES

    return MEMORY_TABLES, AUTHORS_CODE_MIB


def devices() -> dict[str, str]:
    """Where the paper's and the authors' code's figures were measured (cadsam's data file)."""
    paper_figures()  # puts src/ on the path
    from cadsam.commands.paper import AUTHORS_CODE_DEVICE, PAPER_DEVICE, PAPER_MEASURE

    return {
        "paper_device": PAPER_DEVICE,
        "paper_measure": PAPER_MEASURE,
        "authors_device": AUTHORS_CODE_DEVICE,
    }


def load_reports(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every JSON report under ``folder``, oldest first."""
    reports = []
    for path in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), list):
            reports.append((path, {**data, "environment": data.get("environment") or {}}))
    return sorted(reports, key=lambda pr: str(pr[1]["environment"].get("date", "")))


def merge(reports: list[tuple[Path, dict[str, Any]]]) -> dict[tuple[str, str, str], dict]:
    """(backbone, variant, precision) -> its row; later reports win, measurements over errors."""
    rows: dict[tuple[str, str, str], dict] = {}
    for _, report in reports:
        for row in report["results"]:
            if row.get("overrides"):
                continue
            key = (row["backbone"], row["variant"], row["precision"])
            if "error" in row and key in rows and "error" not in rows[key]:
                continue
            rows[key] = row
    return rows


def check_commits(reports: list[tuple[Path, dict[str, Any]]], allow_mixed: bool) -> list[str]:
    commits = sorted({str(r["environment"].get("commit")) for _, r in reports})
    if len(commits) > 1 and not allow_mixed:
        listed = "\n".join(
            f"  {path}: {report['environment'].get('commit')}" for path, report in reports
        )
        sys.exit(
            f"the reports come from {len(commits)} commits; the tables must come from one "
            f"run of one commit (rerun, or --allow-mixed-commits):\n{listed}"
        )
    return commits


def cell(row: dict | None, key: str, digits: int) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "OOM" if row["error"] == "out of memory" else "failed"
    value = row.get(key)
    return "-" if value is None else f"{value:,.{digits}f}"


def variant_order(variant: str, method: str) -> tuple[int, int, str]:
    methods = list(METHODS)
    rank = methods.index(method) if method in methods else len(methods)
    suffix = variant[len(method) :] if variant.startswith(method) else variant
    place = SUFFIXES.index(suffix) if suffix in SUFFIXES else len(SUFFIXES)
    return rank, place, variant


def training_table(backbone: str, rows: dict, paper: tuple[dict, dict]) -> list[str]:
    """Table 1 (ViT-B) or 2 (ViT-H), or the same for another backbone: each variant's memory
    and speed in fp32 and bf16. The paper's columns only where the paper has the backbone
    (not SAM 2.1, which came after it)."""
    variants: dict[str, str] = {}  # variant -> method
    for (b, variant, _), row in rows.items():
        if b == backbone and variant not in NOT_TRAINING:
            variants[variant] = row.get("method") or variants.get(variant) or variant
    if not variants:
        return []
    memory, authors = paper
    published = any(b == backbone for b, _ in memory)
    columns = ["method", "variant", "trainable"]
    where = devices()
    paper_columns = [
        f"paper, {where['paper_device']} (MiB)",
        f"authors' code, {where['authors_device']} (MiB)",
    ]
    columns += paper_columns if published else []
    columns += ["fp32: peak MiB", "bf16: peak MiB", "fp32: images/s", "bf16: images/s"]
    lines = [
        f"| {' | '.join(columns)} |",
        f"| {' | '.join(['---'] * 2 + ['---:'] * (len(columns) - 2))} |",
    ]
    shown: set[str] = set()
    for variant in sorted(variants, key=lambda v: variant_order(v, variants[v])):
        method = variants[variant]
        fp32, bf16 = rows.get((backbone, variant, "fp32")), rows.get((backbone, variant, "bf16"))
        # the paper's figures beside the method's first row: its plain one where measured
        first = method not in shown
        shown.add(method)
        trainable = next((r["trainable"] for r in (fp32, bf16) if r and "trainable" in r), None)
        cells = [
            METHODS.get(method, method) if first else "",
            f"`{variant}`",
            "-" if trainable is None else f"{trainable:,}",
        ]
        if published:
            figure = memory.get((backbone, method)) if first else None
            measured = authors.get((backbone, method)) if first else None
            cells += [f"{figure[1]:,}" if figure else "", f"{measured:,}" if measured else ""]
        cells += [cell(fp32, "peak_allocated_mib", 0), cell(bf16, "peak_allocated_mib", 0)]
        cells += [cell(fp32, "images_per_second", 1), cell(bf16, "images_per_second", 1)]
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def encoder_table(rows: dict) -> list[str]:
    found = sorted(
        (key, row)
        for key, row in rows.items()
        if key[1] == "encoder-forward" and "error" not in row
    )
    if not found:
        return []
    lines = [
        "**The frozen encoder's forward rate** (no autograd, fused attention, the whole batch "
        "at once: what a cache build runs)",
        "",
        "| backbone | precision | batch | images/s | peak MiB |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for (backbone, _, precision), row in found:
        lines.append(
            f"| {TITLES.get(backbone, backbone)} | {precision} | {row['batch']} "
            f"| {cell(row, 'images_per_second', 1)} | {cell(row, 'peak_allocated_mib', 0)} |"
        )
    return lines


def cache_table(rows: dict) -> list[str]:
    found = sorted(
        (key, row) for key, row in rows.items() if key[1] == "cache-build" and "error" not in row
    )
    if not found:
        return []
    lines = [
        "**Building the embedding cache** (`cadsam cache`, bf16, fp16 storage; two builds of "
        "different sizes, and the extra images over the extra time: the rate past the "
        "command's startup)",
        "",
        "| backbone | encoder | batch | images (two builds) | images/s | startup (s) | written to |",
        "| --- | --- | ---: | --- | ---: | ---: | --- |",
    ]
    for (backbone, _, _), row in found:
        images = " / ".join(f"{n:,}" for n in row.get("images", []))
        lines.append(
            f"| {TITLES.get(backbone, backbone)} | {row.get('mode', '-')} | {row.get('batch', '-')} "
            f"| {images} | {cell(row, 'images_per_second', 1)} "
            f"| {cell(row, 'startup_seconds', 1)} | {row.get('written_to', '-')} |"
        )
    return lines


def failures(rows: dict) -> list[str]:
    failed = [(key, row["error"]) for key, row in sorted(rows.items()) if "error" in row]
    if not failed:
        return []
    lines = ["Failed runs:", ""]
    lines += [f"- {b} `{v}` {p}: {error}" for (b, v, p), error in failed]
    return lines


def still_to_measure(rows: dict) -> list[str]:
    """The rows of benchmarks/suite.py's whole run, for the backbones this folder measured,
    that it lacks: a run in parts says what it does not hold yet (failures: above)."""
    sys.path.insert(0, str(HERE))
    import suite

    present = {backbone for backbone, _, _ in rows}
    backbones = tuple(b for b in (*suite.BACKBONES, *suite.SAM2_BACKBONES) if b in present)
    missing: dict[tuple[str, str], list[str]] = {}
    for job in suite.canonical_jobs(backbones):
        if (job.backbone, job.variant, job.precision) not in rows:
            name = "the cache build" if job.variant == suite.CACHE_BUILD else f"`{job.variant}`"
            missing.setdefault((job.backbone, job.precision), []).append(name)
    if not missing:
        return []
    lines = ["**Not in this folder yet** (rows of `benchmarks/suite.py`'s whole run):", ""]
    for (backbone, precision), names in missing.items():
        lines.append(f"- {TITLES.get(backbone, backbone)}, {precision}: {', '.join(names)}")
    return lines


def shown(folder: Path) -> str:
    """``folder`` as a maintainer would type it: from the repository's root if inside it."""
    folder = folder.resolve()
    root = HERE.parent
    return folder.relative_to(root).as_posix() if folder.is_relative_to(root) else str(folder)


def joined(reports: list[tuple[Path, dict[str, Any]]], key: str) -> str:
    values = {str(r["environment"][key]) for _, r in reports if r["environment"].get(key)}
    return " / ".join(sorted(values)) or "unknown"


def header(
    folder: Path, link: str, reports: list[tuple[Path, dict[str, Any]]], commits: list[str]
) -> list[str]:
    """Where the tables come from: the folder, device, versions, commit, dates and commands."""
    dates = sorted(
        str(r["environment"]["date"]) for _, r in reports if r["environment"].get("date")
    )
    changes = any(c.endswith("+changes") for c in commits)
    lines = [
        f"Generated by `python benchmarks/tables.py {shown(folder)}` from the {len(reports)} reports in "
        f"[`{link}`]({link}); regenerate rather than edit (see below).",
        "",
        f"- GPU: {joined(reports, 'gpu')}, driver {joined(reports, 'driver')}",
        f"- Software: PyTorch {joined(reports, 'torch')} (CUDA {joined(reports, 'cuda')}), "
        f"Triton {joined(reports, 'triton')}, Python {joined(reports, 'python')}",
        f"- Commit: {', '.join(f'`{c}`' for c in commits)}"
        + (" (`+changes`: the checkout had uncommitted changes)" if changes else ""),
        f"- Measured: {dates[0] if dates else '?'} to {dates[-1] if dates else '?'} (UTC)",
        "",
        "<details><summary>The commands behind each report</summary>",
        "",
    ]
    for path, report in reports:
        command = report["environment"].get("command") or "?"
        lines.append(f"- `{path.parent.name}/{path.name}`: `{command}`")
    return [*lines, "", "</details>"]


def render(
    folder: Path, link: str, reports: list[tuple[Path, dict[str, Any]]], allow_mixed: bool
) -> str:
    """The generated section: header, Tables 1-2, the encoder's and the cache build's rates."""
    commits = check_commits(reports, allow_mixed)
    rows = merge(reports)
    paper = paper_figures()
    parts = [header(folder, link, reports, commits)]
    backbones = sorted({b for b, _, _ in rows}, key=lambda b: [*TITLES, b].index(b))
    number = {"vit_b": "Table 1. ", "vit_h": "Table 2. "}
    for backbone in backbones:
        table = training_table(backbone, rows, paper)
        if table:
            batch = next(
                r["batch"]
                for (b, v, _), r in rows.items()
                if b == backbone and v not in NOT_TRAINING and "batch" in r
            )
            title = (
                f"**{number.get(backbone, '')}{TITLES.get(backbone, backbone)}, batch {batch}**: "
                "peak memory while training, and training speed"
            )
            parts.append([title, "", *table])
    if len(parts) > 1:
        parts.append([LEGEND.format(**devices())])
    parts += [encoder_table(rows), cache_table(rows), failures(rows), still_to_measure(rows)]
    return "\n\n".join("\n".join(part) for part in parts if part) + "\n"


def replace_section(text: str, section: str, name: str = SECTION) -> str:
    """``text`` with ``section`` between the markers of the section called ``name``."""
    begin, end_marker = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    start, end = text.find(begin), text.find(end_marker)
    if start < 0 or end < start:
        sys.exit(f"no section between {begin} and {end_marker} to rewrite")
    return f"{text[: start + len(begin)]}\n{section.strip()}\n{text[end:]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results folder of benchmarks/suite.py")
    parser.add_argument(
        "--markdown", default=str(HERE / "BENCHMARKS.md"), help="the file to rewrite"
    )
    parser.add_argument(
        "--section",
        default=SECTION,
        help=f"the section to rewrite, between <!-- NAME:begin --> and <!-- NAME:end --> "
        f"(default {SECTION}; e.g. sam2-tables for a run of SAM 2.1 at another commit)",
    )
    parser.add_argument("--stdout", action="store_true", help="print the section; write nothing")
    parser.add_argument("--allow-mixed-commits", action="store_true")
    args = parser.parse_args(argv)
    folder, markdown = Path(args.results), Path(args.markdown)
    reports = load_reports(folder) if folder.is_dir() else []
    if not reports:
        sys.exit(f"no reports (bench.json, cache.json) under {folder}")
    link = Path(os.path.relpath(folder.resolve(), markdown.resolve().parent)).as_posix()
    section = render(folder, link, reports, args.allow_mixed_commits)
    if args.stdout:
        print(section, end="")
        return 0
    markdown.write_text(replace_section(markdown.read_text(), section, args.section))
    print(f"rewrote the tables in {markdown} from {len(reports)} reports in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
