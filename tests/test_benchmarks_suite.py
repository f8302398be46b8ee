"""benchmarks/suite.py's plan and benchmarks/tables.py's tables, without a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

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
        row("cad-cache-eager", "bf16", 0, 0, error="out of memory"),
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
    assert "OOM" in lines["`cad-cache-eager`"]
    assert "Table 1. ViT-B, batch 4" in section and "`abc1234`" in section
    assert "Test GPU 9000" in section and "2026-01-02T10:30:00+00:00" in section
    assert "| ViT-H | compiled | 16 | 256 / 2,304 | 118.7 | 48.8 | RAM disk |" in section


def test_tables_name_the_rows_a_partial_run_lacks(results: Path):
    section = tables.render(results, "results/x", tables.load_reports(results), allow_mixed=False)
    missing = section.split("**Not in this folder yet**")[1].splitlines()
    vit_b_fp32 = next(line for line in missing if line.startswith("- ViT-B, fp32: "))
    assert "`cad-lean`" in vit_b_fp32 and "`lora`" in vit_b_fp32
    assert "`cad`," not in vit_b_fp32 and "`cad-plain`" not in vit_b_fp32  # measured
    vit_b_bf16 = next(line for line in missing if line.startswith("- ViT-B, bf16: "))
    assert "the cache build" in vit_b_bf16  # ViT-H's is here; ViT-B's is not
    assert "`cad-cache-eager`" not in vit_b_bf16  # it failed: listed as a failure instead
    assert not any(line.startswith("- ViT-H, bf16: ") and "cache build" in line for line in missing)
    assert not any("SAM 2.1" in line for line in missing)  # only the backbones measured


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
    # a second section, for another run: the first stays as it is
    markdown.write_text(f"{text}\n<!-- sam2-tables:begin -->\n<!-- sam2-tables:end -->\n")
    assert tables.main([str(results), "--markdown", str(markdown), "--section", "sam2-tables"]) == 0
    first, second = markdown.read_text().split("<!-- sam2-tables:begin -->")
    assert first == f"{text}\n" and "1,329" in second
    with pytest.raises(SystemExit, match="no section between <!-- other:begin -->"):
        tables.main([str(results), "--markdown", str(markdown), "--section", "other"])


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


SAM2 = ("sam2.1_hiera_b+", "sam2.1_hiera_l")


def test_suite_dry_run_lists_the_sam2_rows(capsys, tmp_path: Path):
    out = tmp_path / "r"
    argv = ["--dry-run", "--out", str(out), "--backbones", *SAM2]
    assert suite.main([*argv, "--variants", "decoder", "cad", "cad-cache", "lora"]) == 0
    printed = capsys.readouterr().out
    commands = [line.split("] ", 1)[1] for line in printed.splitlines() if "cadsam bench" in line]
    assert len(commands) == 8  # two backbones, two precisions, auto and cache
    for backbone in SAM2:
        for precision in suite.PRECISIONS:
            prefix = f"python -m cadsam bench --backbones {backbone}"
            assert (  # all of auto's variants on SAM 2.1: a folder named after the kind
                f"{prefix} --methods decoder cad lora --precision {precision} --steps 5 "
                f"--out {out}/{backbone}-{precision}-auto"
            ) in commands
            assert (  # some of the cache's: a folder named after them
                f"{prefix} --methods cad-cache --precision {precision} --steps 5 "
                f"--out {out}/{backbone}-{precision}-cad-cache"
            ) in commands
    assert "sam-adapter" not in printed and "vit_" not in printed and not out.exists()


def test_suite_runs_sam2_on_request_only():
    assert not {job.backbone for job in suite.canonical_jobs()} & set(suite.SAM2_BACKBONES)
    jobs = suite.canonical_jobs(suite.plan_backbones(list(SAM2)))
    assert {job.backbone for job in jobs} == set(SAM2)
    assert not [job for job in jobs if job.variant.startswith("sam-adapter")]
    assert {job.variant for job in jobs} >= {"lora", "cad-cache", "encoder-forward", "cache-build"}
    # every SAM 2.1 job has its own estimate, and the chunks keep to the limit
    assert all((job.backbone, suite.group(job.variant)) in suite.ESTIMATE_S for job in jobs)
    assert all(suite.plan_seconds(part) <= suite.CHUNK_S for part in suite.chunks(jobs))


def test_suite_chunks_the_sam2_run_with_its_backbones(capsys, tmp_path: Path):
    assert suite.main(["--dry-run", "--out", str(tmp_path), "--backbones", *SAM2]) == 0
    printed = capsys.readouterr().out
    assert f"--chunk 1 --backbones {' '.join(SAM2)} --out {tmp_path}" in printed
    assert "--checkpoint WORK/sam2.1_hiera_l.pt" in printed


def test_suite_cache_build_settings_fit_sam2_rows(tmp_path: Path, monkeypatch):
    """The random checkpoint the cache build makes loads as cadsam loads Meta's; a row's
    size (for the RAM disk's room) is what the backbone's cache holds."""
    from cadsam.backbones import feature_layout
    from cadsam.methods import build_model

    for backbone in suite.CACHE_SIZES:
        mib = sum(feature_layout(backbone).sizes) * 2 / 2**20  # float16
        assert suite.MIB_PER_EMBEDDING[backbone] == mib, backbone
        assert backbone in suite.CACHE_BATCH
    path = tmp_path / "sam2.pt"
    monkeypatch.setattr(sys, "argv", ["-c", "sam2.1_hiera_tiny_test", str(path)])
    exec(suite.SAVE_CHECKPOINT, {})
    model = build_model("decoder", "sam2.1_hiera_tiny_test", checkpoint=path)
    saved = torch.load(path, weights_only=True)["model"]
    assert torch.equal(model.sam.no_mem_embed, saved["no_mem_embed"])


def test_tables_give_sam2_its_own_table_without_the_papers_columns(results: Path):
    rows = [
        {**row("cad", "fp32", 2345.6, 12.3), "backbone": "sam2.1_hiera_l", "batch": 2},
        {**row("lora", "bf16", 3456.7, 8.9), "backbone": "sam2.1_hiera_l", "batch": 2},
    ]
    write(results, "sam2", report("abc1234", "2026-01-02T12:00:00+00:00", rows))
    section = tables.render(results, "x", tables.load_reports(results), allow_mixed=False)
    title = "**SAM 2.1 Hiera-L, batch 2**: peak memory while training, and training speed"
    before, after = section.split(title)
    table = after.split("\n\n")[1].splitlines()
    assert table[0].startswith("| method | variant | trainable | fp32: peak MiB |")
    assert "| CAD | `cad` | 5,831,908 | 2,346 | - | 12.3 | - |" in table
    assert "| LoRA | `lora` | 5,831,908 | - | 3,457 | - | 8.9 |" in table
    assert "paper" not in "\n".join(table)
    # ViT-B's table comes first and keeps the paper's columns
    assert "Table 1. ViT-B" in before and "| paper, A100 (MiB) |" in before


CACHE_VARIANTS = ["cad-cache", "cad-cache-lean", "cad-cache-eager"]
SELECTION = ["--backbones", "vit_b", "--precision", "bf16", "--variants", *CACHE_VARIANTS]
SELECTION += ["encoder-forward", suite.CACHE_BUILD]


@pytest.fixture
def ran(monkeypatch) -> list[str]:
    """What the suite measures, recorded instead of run."""
    calls: list[str] = []

    def bench_call(folder: Path, command: list[str], out: Path, commit: str | None) -> int:
        calls.append(folder.name)
        return 0

    def cache_build(backbone: str, out: Path, work: Path, commit: str | None) -> int:
        calls.append(f"cache-{backbone}")
        return 0

    monkeypatch.setattr(suite, "run_bench_call", bench_call)
    monkeypatch.setattr(suite, "run_cache_build", cache_build)
    return calls


def test_suite_goes_on_where_a_run_stopped(tmp_path: Path, ran: list[str], capsys):
    out = tmp_path / "r"
    rows = [row(variant, "bf16", 900.0, 100.0) for variant in CACHE_VARIANTS]
    write(out, "vit_b-bf16-cache", report("abc1234", "2026-01-02", rows))  # complete
    interrupted = [row("encoder-forward", "bf16", 0, 0, error="killed")]
    write(out, "vit_b-bf16-encoder", report("abc1234", "2026-01-02", interrupted))
    assert suite.main(["--out", str(out), "--commit", "abc1234", *SELECTION]) == 0
    assert ran == ["vit_b-bf16-encoder", "cache-vit_b"]
    assert "== kept vit_b-bf16-cache: measured already" in capsys.readouterr().out
    # a report of another commit is never mixed in
    with pytest.raises(SystemExit, match="measured commit abc1234, not def5678: remove"):
        suite.main(["--out", str(out), "--commit", "def5678", *SELECTION])


def test_suite_within_starts_only_what_fits(tmp_path: Path, ran: list[str], capsys):
    out = tmp_path / "r"
    jobs = suite.select(suite.parse_args(SELECTION))
    seconds = {folder.name: s for folder, _, s in suite.bench_calls(jobs, out, suite.STEPS)}
    assert seconds["vit_b-bf16-encoder"] < seconds["vit_b-bf16-cache"]
    within = seconds["vit_b-bf16-encoder"] + 1  # the cache call and the build do not fit
    assert suite.main(["--out", str(out), "--within", str(within), *SELECTION]) == 0
    assert ran == ["vit_b-bf16-encoder"]
    printed = capsys.readouterr().out
    assert "not started, too little of --within left: vit_b-bf16-cache, cache-vit_b" in printed
