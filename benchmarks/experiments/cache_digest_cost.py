"""What checked cache rows cost on a CPU: recording each row's CRC-32 as it is written, and
reading every row back against it when training opens the cache, for SAM's 2 MiB rows
(256 x 64 x 64 float16), beside the dataset's float16 -> float32 copy of a row.

    python benchmarks/experiments/cache_digest_cost.py >> benchmarks/experiments/cpu_cache_digest_cost.jsonl
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from cadsam.cache import EmbeddingCache, damaged_entries, entry_digests

ROWS = 256


def main() -> None:
    with tempfile.TemporaryDirectory(dir=".") as folder:
        path = Path(folder) / "embeddings.npy"
        rows = np.lib.format.open_memmap(path, "w+", np.float16, (ROWS, 256, 64, 64))
        rows[:] = np.random.default_rng(0).standard_normal((1, 256, 64, 64)).astype(np.float16)
        rows.flush()
        started = time.perf_counter()
        digests = entry_digests(rows)
        record = (time.perf_counter() - started) / ROWS
        opened = np.load(path, mmap_mode="r")
        cache = EmbeddingCache(
            Path(folder),
            {"views": ["identity"], "ids": []},
            opened,
            np.ones(ROWS, np.uint8),
            digests,
        )
        damaged_entries(cache)  # the page cache warm, as for a cache just written
        started = time.perf_counter()
        assert damaged_entries(cache) == []
        verify = (time.perf_counter() - started) / ROWS
        started = time.perf_counter()
        for row in opened:
            np.asarray(row, np.float32)
        copy = (time.perf_counter() - started) / ROWS
    print(
        json.dumps(
            {
                "record_ms_per_row": round(record * 1e3, 3),
                "verify_ms_per_row": round(verify * 1e3, 3),
                "float32_copy_ms_per_row": round(copy * 1e3, 3),
                "row_mib": 2,
                "cpu": platform.processor() or platform.machine(),
                "cores": len(os.sched_getaffinity(0)),
                "load_average": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
