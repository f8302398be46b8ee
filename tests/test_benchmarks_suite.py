"""benchmarks/suite.py's plan and benchmarks/tables.py's tables, without a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tables = load("tables")
suite = load("suite")


def report(commit: str, date: str, results: list[dict]) -> dict:
    environment = {"commit": commit, "date": date, "gpu": "Test GPU 9000", "torch": "9.9.9"}
    return {"environment": {**environment, "command": "cadsam bench --steps 5"}, "results": results}


def row(variant: str, precision: str, mib: float, rate: float, **extra) -> dict:
    method = variant.split("-cache")[0].removesuffix("-plain").removesuffix("-lean")
    return {
        "backbone": "vit_b",
        "variant": variant,
        "method": method,
        "precision": precision,
        "batch": 4,
        "trainable": 5_831_908,
        "peak_allocated_mib": mib,
        "images_per_second": rate,
        **extra,
    }


def write(folder: Path, name: str, data: dict) -> None:
    (folder / name).mkdir(parents=True)
    (folder / name / "bench.json").write_text(json.dumps(data))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results" / "2026-01-02_TEST_abc1234"
    write(
        folder,
        "vit_b-fp32-plain",
        report("abc1234", "2026-01-02T10:00:00+00:00", [row("cad-plain", "fp32", 10089.1, 9.87)]),
    )
    rows = [
        row("cad", "fp32", 1329.4, 22.64),
        row("cad", "bf16", 1103.0, 47.58),
        row("cad-cache-graph", "bf16", 0, 0, error="out of memory"),
    ]
    write(folder, "vit_b-auto", report("abc1234", "2026-01-02T10:05:00+00:00", rows))
    build = {"backbone": "vit_h", "variant": "cache-build", "mode": "compiled", "precision": "bf16"}
    build |= {"batch": 16, "images": [256, 2304], "images_per_second": 118.74}
    build |= {"startup_seconds": 48.8, "written_to": "RAM disk"}
    cache = report("abc1234", "2026-01-02T10:30:00+00:00", [build])
    (folder / "cache-vit_h").mkdir()
    (folder / "cache-vit_h" / "cache.json").write_text(json.dumps(cache))
    return folder


def test_tables_render_the_memory_table_from_the_reports(results: Path):
    section = tables.render(results, "results/x", tables.load_reports(results), allow_mixed=False)
    lines = {line.split(" | ")[1]: line for line in section.splitlines() if "| `cad" in line}
    assert "10,089" in lines["`cad-plain`"] and "9.9" in lines["`cad-plain`"]
    # the paper's figures stand beside the method's first row, the plain one
    assert "17,697" in lines["`cad-plain`"] and "17,697" not in lines["`cad`"]
    cad = [c.strip() for c in lines["`cad`"].split("|")]
    assert cad[6:10] == ["1,329", "1,103", "22.6", "47.6"]
    assert "OOM" in lines["`cad-cache-graph`"]
    assert "Table 1. ViT-B, batch 4" in section and "`abc1234`" in section
    assert "Test GPU 9000" in section and "2026-01-02T10:30:00+00:00" in section
    assert "| ViT-H | compiled | 16 | 256 / 2,304 | 118.7 | 48.8 | RAM disk |" in section


def test_tables_rewrite_only_the_section_between_the_markers(results: Path, tmp_path: Path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"# Title\n\n{tables.BEGIN}\nawaiting\n{tables.END}\n\n## Kept\n")
    assert tables.main([str(results), "--markdown", str(markdown)]) == 0
    text = markdown.read_text()
    assert text.startswith(f"# Title\n\n{tables.BEGIN}\n") and text.endswith(
        f"{tables.END}\n\n## Kept\n"
    )
    assert "awaiting" not in text and "1,329" in text
    assert tables.main([str(results), "--markdown", str(markdown)]) == 0
    assert markdown.read_text() == text  # rewriting is idempotent


def test_tables_keep_the_later_row_and_never_replace_a_measurement_by_an_error(results: Path):
    later = [row("cad", "fp32", 1400.0, 30.0), row("cad", "bf16", 0, 0, error="boom")]
    write(results, "rerun", report("abc1234", "2026-01-02T11:00:00+00:00", later))
    rows = tables.merge(tables.load_reports(results))
    assert rows[("vit_b", "cad", "fp32")]["peak_allocated_mib"] == 1400.0
    assert rows[("vit_b", "cad", "bf16")]["peak_allocated_mib"] == 1103.0


def test_tables_refuse_reports_of_different_commits(results: Path, capsys):
    other = report("def5678", "2026-01-03T09:00:00+00:00", [row("cad", "fp32", 1.0, 1.0)])
    write(results, "other", other)
    with pytest.raises(SystemExit, match="2 commits"):
        tables.render(results, "x", tables.load_reports(results), allow_mixed=False)
    section = tables.render(results, "x", tables.load_reports(results), allow_mixed=True)
    assert "`abc1234`, `def5678`" in section


def test_suite_plan_covers_the_canonical_run_in_short_chunks():
    jobs = suite.canonical_jobs()
    parts = suite.chunks(jobs)
    assert Counter(job for part in parts for job in part) == Counter(jobs)  # each job once
    assert all(suite.plan_seconds(part) <= suite.CHUNK_S for part in parts)
    plain = [job for job in jobs if job.variant.endswith("-plain")]
    assert plain and all(job.precision == "fp32" for job in plain)
    assert {job.backbone for job in jobs if job.variant == suite.CACHE_BUILD} == {"vit_b", "vit_h"}


def test_suite_dry_run_prints_the_commands(capsys, tmp_path: Path):
    out = tmp_path / "r"
    argv = ["--dry-run", "--out", str(out), "--backbones", "vit_b", "--precision", "bf16"]
    assert suite.main([*argv, "--variants", "cad", "cad-cache", "cache-build"]) == 0
    printed = capsys.readouterr().out
    assert f"--methods cad --precision bf16 --steps 5 --out {out}/vit_b-bf16-cad" in printed
    assert (
        f"--methods cad-cache --precision bf16 --steps 5 --out {out}/vit_b-bf16-cad-cache"
        in printed
    )
    assert "python -m cadsam cache --backbone vit_b" in printed and "--compile" in printed
    assert not out.exists()
    assert suite.main(["--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chunk 1 " in printed and f"--out {out}/vit_b-fp32-auto" in printed


def test_suite_names_the_gpu_for_the_results_folder():
    assert suite.gpu_word("NVIDIA H100 80GB HBM3") == "H100"
    assert suite.gpu_word("NVIDIA A100-SXM4-80GB") == "A100"
    assert suite.gpu_word("NVIDIA H200") == "H200"


def test_suite_stamps_a_given_commit_and_keeps_gits():
    environment = suite.stamp({"commit": "5a13d5f+changes"}, "420d9cd")
    assert environment == {"commit": "420d9cd", "commit_from_git": "5a13d5f+changes"}
    assert suite.stamp({"commit": "abc"}, None) == {"commit": "abc"}
