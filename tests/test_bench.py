"""cadsam bench without a GPU, and its report from the H100 results kept in benchmarks/."""

from __future__ import annotations

import json
from pathlib import Path

from cadsam.bench import markdown_table
from cadsam.cli import main
from cadsam.runtime import LEAN, Runtime

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "h100_vit_b.json"


def test_bench_refuses_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["bench", "--out", "unused"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_paper_figures_stand_beside_their_methods_only():
    rows = {
        line.split(" | ")[1]: line.split(" | ")
        for line in markdown_table(json.loads(RESULTS.read_text())).splitlines()
        if line.startswith("| vit_b |") and "| fp32 |" in line
    }
    assert rows["decoder-plain"][5] == "14113" and rows["decoder"][5] == "14113"
    assert rows["cad"][5] == "17697" and rows["cad"][6] == "15775"
    assert rows["cad-cache"][5] == "" and rows["sam-adapter-paper-ckpt"][5] == ""
    assert rows["decoder"][7] == "910"  # peak allocated, from the JSON


def test_bench_set_checks_runtime_settings_before_running(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["bench", "--methods", "decoder", "--set", "warp_speed=8"]) == 1
    assert "unknown runtime setting warp_speed" in capsys.readouterr().err
    assert main(["bench", "--methods", "cad", "--set", "adapter_tile_mib"]) == 1
    assert "--set takes NAME=VALUE" in capsys.readouterr().err
    # a valid setting gets as far as the GPU check
    assert main(["bench", "--methods", "cad-cache", "--set", "adapter-tile-mib=8"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_set_refuses_to_contradict_a_variant(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = ["bench", "--methods", "cad-cache", "cad-cache-graph", "--set", "cuda_graph=false"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "contradicts variant cad-cache-graph" in err and "cuda_graph=True" in err


def test_overridden_options_appear_in_the_report():
    report = json.loads(RESULTS.read_text())
    row = {**report["results"][0], "overrides": {"adapter_tile_mib": 32}}
    table = markdown_table({**report, "results": [row]})
    assert f"| {row['variant']} adapter_tile_mib=32 |" in table


def test_every_variant_is_a_valid_method_and_runtime():
    """Each variant's method exists and its runtime settings are valid, on any device; the
    cached and graphed ones are what their names say."""
    from cadsam.bench import VARIANTS, variant_runtime
    from cadsam.methods import resolve_options

    for variant in VARIANTS:
        method, runtime, _ = variant_runtime(variant, device="cpu")
        resolve_options(method, {})
        assert runtime.cuda_graph == variant.endswith("-graph"), variant
        assert (runtime == Runtime()) == variant.endswith("-plain"), variant
    assert variant_runtime("cad-cache-graph", device="cpu")[2] is True
    assert variant_runtime("cad-lean", device="cpu")[1] == LEAN
