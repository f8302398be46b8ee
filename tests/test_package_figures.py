"""No measurements in src/: the GPU figures the commands show come from a data file generated
from benchmarks/results, and no GPU's name or commit hash is typed into the package."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

from cadsam.commands.bench import markdown_table
from cadsam.commands.paper import AUTHORS_CODE_MIB, PAPER_DEVICE
from cadsam.sam.checkpoint import META_CHECKPOINTS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cadsam"
DATA = PACKAGE / "benchmark_figures.json"
PLAN_CONSTANTS = PACKAGE / "plan_constants.json"  # generated from the results, like DATA
GPU_NAME = re.compile(
    r"\b(?:[ABHPV]100|[BH]200|G[BH]200|A10G?|A[46]000|L40S?|L4|T4|RTX ?\d{4}|MI[23]\d\dX?)\b"
)
# 7 to 40 hex digits with a letter and a digit among them: a commit, short or whole
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def _generator():
    """benchmarks/package_figures.py, imported from its file (benchmarks/ is no package)."""
    path = ROOT / "benchmarks" / "package_figures.py"
    spec = importlib.util.spec_from_file_location("package_figures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path.remove(str(path.parent))  # it puts benchmarks/ first to import tables.py
    return module


def test_the_data_file_is_what_the_benchmark_results_give():
    """Regenerating gives the same bytes: a new canonical run in BENCHMARKS.md, or an edit by
    hand, fails here until `python benchmarks/package_figures.py` is run."""
    generator = _generator()
    assert DATA.read_bytes() == generator.render().encode()
    bench = json.loads(DATA.read_text())["gpu_bench"]
    section = (ROOT / "benchmarks" / "BENCHMARKS.md").read_text().split("<!-- tables:end -->")[0]
    assert f"benchmarks/tables.py {bench['source']}`" in section  # the headline tables' run
    rows = {}
    for path in sorted((ROOT / bench["source"]).rglob("bench.json")):
        report = json.loads(path.read_text())
        for row in report["results"]:
            if (row["backbone"], row["precision"]) == ("vit_b", "fp32") and "error" not in row:
                rows[row["variant"]] = (row["peak_allocated_mib"], report["environment"])
    for method in ("decoder", "cad", "sam-adapter-paper", "lora"):
        mib, environment = rows[method]
        assert bench["peak_allocated_mib"][method] == mib
        assert (environment["gpu"], environment["commit"]) == (bench["device"], bench["commit"])


def test_a_stale_data_file_is_found_and_rewritten(tmp_path, monkeypatch, capsys):
    generator = _generator()
    stale = tmp_path / "benchmark_figures.json"
    stale.write_text(DATA.read_text().replace('"decoder": 1', '"decoder": 2', 1))
    monkeypatch.setattr(generator, "OUTPUT", stale)
    assert generator.main(["--check"]) == 1
    assert "stale: run python benchmarks/package_figures.py" in capsys.readouterr().out
    assert generator.main([]) == 0
    assert stale.read_bytes() == DATA.read_bytes()
    assert generator.main(["--check"]) == 0


def test_the_data_file_ships_with_the_package():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert DATA.name in config["tool"]["setuptools"]["package-data"]["cadsam"]


def test_the_cards_the_tables_name_come_from_the_data_file():
    figures = json.loads(DATA.read_text())
    assert figures["paper"]["device"] == PAPER_DEVICE
    assert (
        AUTHORS_CODE_MIB[("vit_b", "cad")]
        == figures["authors_code"]["peak_allocated_mib"]["vit_b"]["cad"]
    )
    environment = dict.fromkeys(("torch", "cuda", "date", "command", "weights"), "?")
    table = markdown_table({"environment": environment, "results": []})
    header = next(line for line in table.splitlines() if line.startswith("| backbone"))
    assert f"| paper ({figures['paper']['device']}, MiB) " in header
    assert f"| authors' code ({figures['authors_code']['device']}, MiB) " in header


def test_no_gpu_name_or_commit_hash_in_src():
    """Comments cite benchmarks/BENCHMARKS.md or benchmarks/experiments/HISTORY.md instead;
    figures shown to users come from benchmark_figures.json and plan_constants.json (both
    generated). Meta's checkpoint
    digests are file digests, not commits."""
    digests = {checkpoint.md5 for checkpoint in META_CHECKPOINTS.values()}
    found = []
    for path in sorted(PACKAGE.rglob("*")):
        if not path.is_file() or path in (DATA, PLAN_CONSTANTS) or "__pycache__" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            hits = GPU_NAME.findall(line) + [h for h in COMMIT.findall(line) if h not in digests]
            found += [f"{path.relative_to(ROOT)}:{number}: {hit}" for hit in hits]
    assert not found, "\n".join(found)
