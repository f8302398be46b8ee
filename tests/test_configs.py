"""The shipped configs: every one loads, and says what its file name says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cadsam.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_every_paper_setting_is_there():
    names = {p.stem for p in CONFIGS}
    for dataset in ("istd", "camo", "cod10k"):
        for backbone in ("vit_b", "vit_h"):
            for method in ("decoder", "sam-adapter-paper", "cad"):
                assert f"{dataset}_{backbone}_{method}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_matches_its_name(path, tmp_path):
    cfg = TrainConfig.from_sources(str(path), {"out": str(tmp_path), "data_root": str(tmp_path)})
    dataset, backbone, method = re.fullmatch(r"(\w+?)_(vit_[blh])_(.+)", path.stem).groups()
    assert (cfg.dataset, cfg.backbone, cfg.method, cfg.checkpoint) == (
        dataset,
        backbone,
        method,
        backbone,
    )
    assert cfg.epochs == 20 and cfg.lr == 2e-4 and cfg.weight_decay == 0.01 and cfg.seed == 21
    assert cfg.batch_size == (2 if backbone == "vit_h" else 4)
    assert cfg.image_size == 512
