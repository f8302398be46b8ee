"""cadsam bench without a GPU, and its report from the H100 results kept in benchmarks/."""

from __future__ import annotations

import json
from pathlib import Path

from cadsam.bench import markdown_table
from cadsam.cli import main

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


def test_bench_set_checks_options_against_each_method_before_running(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["bench", "--methods", "decoder", "--set", "adapter_tile_mib=8"]) == 1
    assert "method decoder does not take adapter_tile_mib" in capsys.readouterr().err
    assert main(["bench", "--methods", "cad", "--set", "adapter_tile_mib"]) == 1
    assert "--set takes OPTION=VALUE" in capsys.readouterr().err
    # a valid option gets as far as the GPU check
    assert main(["bench", "--methods", "cad-cache", "--set", "adapter-tile-mib=8"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_set_refuses_to_contradict_a_variant(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = ["bench", "--methods", "cad-cache", "cad-cache-untiled", "--set", "adapter_tile_mib=96"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "contradicts variant cad-cache-untiled" in err and "adapter_tile_mib=0" in err


def test_overridden_options_appear_in_the_report():
    report = json.loads(RESULTS.read_text())
    row = {**report["results"][0], "overrides": {"adapter_tile_mib": 32}}
    table = markdown_table({**report, "results": [row]})
    assert f"| {row['variant']} adapter_tile_mib=32 |" in table


def test_every_variant_is_a_valid_method_configuration():
    """The bench's own keys (``_cache``, ``_graph``) never reach the model; the rest are
    options its method takes."""
    from cadsam.bench import VARIANTS, variant_options
    from cadsam.methods import resolve_options

    for variant in VARIANTS:
        method, options, _, _ = variant_options(variant)
        assert not [k for k in options if k.startswith("_")], variant
        resolve_options(method, options)
    assert variant_options("cad-cache-graph")[2:] == (True, True)
    assert variant_options("cad-cache")[2:] == (True, False)
