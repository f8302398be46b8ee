"""The figures the paper publishes, and the authors' code measured, to print beside ours.

Kim et al., "CAD: Memory Efficient Convolutional Adapter for Segment Anything" (2024).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def measured_figures() -> dict[str, Any]:
    """The GPU figures shown beside cadsam's own: benchmark_figures.json, generated from
    benchmarks/results by benchmarks/package_figures.py, so that no measurement, GPU or commit
    is typed into the source (benchmarks/BENCHMARKS.md tells how each was measured)."""
    return json.loads(resources.files("cadsam").joinpath("benchmark_figures.json").read_text())


_FIGURES = measured_figures()
# The paper's device and how it read memory (nvidia-smi), for the columns that show its figures.
PAPER_DEVICE: str = _FIGURES["paper"]["device"]
PAPER_MEASURE: str = _FIGURES["paper"]["measure"]

# Tables 1-2: (backbone, method) -> (trainable parameters as printed, GPU memory in MiB as
# PAPER_MEASURE read it on PAPER_DEVICE; ViT-B at batch 4, ViT-H at batch 2). The SAM-Adapter
# counts include its shared layer once per adapter (see the README).
MEMORY_TABLES = {
    ("vit_b", "decoder"): (4_058_340, 14_113),
    ("vit_b", "sam-adapter-paper"): (4_788_740, 36_871),
    ("vit_b", "cad"): (5_831_908, 17_697),
    ("vit_h", "decoder"): (4_058_340, 14_329),
    ("vit_h", "sam-adapter-paper"): (6_091_908, 42_623),
    ("vit_h", "cad"): (5_831_908, 15_457),
}

# The authors' own training step (fp32, random weights): (backbone, method) -> peak MiB
# allocated, measured on AUTHORS_CODE_DEVICE.
AUTHORS_CODE_DEVICE: str = _FIGURES["authors_code"]["device"]
AUTHORS_CODE_MIB: dict[tuple[str, str], int] = {
    (backbone, method): mib
    for backbone, methods in _FIGURES["authors_code"]["peak_allocated_mib"].items()
    for method, mib in methods.items()
}

# Tables 3-4: (backbone, dataset) -> method -> (Dice, IoU).
SCORES = {
    ("vit_b", "istd"): {
        "zero-shot": (0.1495, 0.0889),
        "decoder": (0.7773, 0.6889),
        "sam-adapter-paper": (0.9039, 0.8567),
        "cad": (0.8681, 0.8086),
    },
    ("vit_b", "cod10k"): {
        "zero-shot": (0.0601, 0.0347),
        "decoder": (0.6764, 0.5738),
        "sam-adapter-paper": (0.7343, 0.6400),
        "cad": (0.6489, 0.5409),
    },
    ("vit_b", "camo"): {
        "zero-shot": (0.1637, 0.1025),
        "decoder": (0.6673, 0.5484),
        "sam-adapter-paper": (0.7393, 0.6281),
        "cad": (0.6847, 0.5616),
    },
    ("vit_h", "istd"): {
        "zero-shot": (0.2153, 0.1307),
        "decoder": (0.7544, 0.6638),
        "sam-adapter-paper": (0.9516, 0.9220),
        "cad": (0.8616, 0.8069),
    },
    ("vit_h", "cod10k"): {
        "zero-shot": (0.0498, 0.0294),
        "decoder": (0.7420, 0.6579),
        "sam-adapter-paper": (0.8600, 0.7890),
        "cad": (0.7464, 0.6613),
    },
    ("vit_h", "camo"): {
        "zero-shot": (0.1387, 0.0879),
        "decoder": (0.7690, 0.6730),
        "sam-adapter-paper": (0.8177, 0.7292),
        "cad": (0.7578, 0.6595),
    },
}
