"""Per-query search cost of the automatic IVF index as the pool grows (issue 15: "wall time per pair does not rise").

    python benchmarks/index_growth.py --sizes 100000 400000 1600000 --out benchmarks/results/index_growth.json

Data: `benchmarks.driver_memory.topic_pairs(n)` (n / 500 topics, the data the driver-memory benchmark mines) embedded
by the package's `HashingTeacher` (96-d): the pool is the n positives, the queries the first `--queries` pairs'
queries. That is the data on which the index + search stage went from 134 to 414 us a pair between 100k and 400k.
The vectors are computed here in numpy (`hashing_vectors`, checked equal to the teacher's own on a sample; the
teacher hashes trigram by trigram in Python, ~0.4 ms a text) and kept under `--work` for the next run.

For each size, each rule builds its index in this process (`index.distributed: never`) through
`pipeline.retrieve.open_index`, which tunes nprobe against `index.recall_floor` (0.95) on 500 of the queries as a run
does; then all the queries are searched once (timed) and compared with exact search:

* `today`: the rule before this benchmark -- nlist a power of two near 2 sqrt(n), a flat coarse quantizer, nprobe
  from nlist / 64 (at least 16), training on 40 x nlist points (at least 65,536);
* `auto`: `choose_index` at the default `IndexConfig` (whatever pipeline/index.py decides now).

Reported per size and rule: factory, nlist, tuned nprobe, train / add seconds, search us per query, recall@k of all
the queries against exact search, vectors scanned per query (FAISS's `indexIVF_stats.ndis`) and coarse-quantizer
distances per query (nlist for a flat quantizer, `hnsw_stats.ndis` for an HNSW one). Timings on a shared 2-core
machine are noisy: compare the two rules within a size (they run back to back), and the scanned counts, which are
exact.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
TEXT_DIM = 48  # HashingTeacher.TEXT_DIM; its other 48 (image) dimensions are zero for text


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------

def hashing_vectors(texts: list[str], chunk: int = 100_000) -> np.ndarray:
    """`HashingTeacher`'s vectors of ASCII texts (no prompt), computed a chunk at a time in numpy: every distinct
    character trigram is hashed once instead of once per occurrence."""
    from pipeline.teachers.base import normalise
    from pipeline.teachers.examples import HashingTeacher

    assert HashingTeacher.TEXT_DIM == TEXT_DIM
    out = np.zeros((len(texts), 2 * TEXT_DIM), np.float32)
    slot: dict[int, tuple[int, float]] = {}
    for s in range(0, len(texts), chunk):
        padded = [f"  {t.casefold()}  " for t in texts[s:s + chunk]]
        lens = np.fromiter((len(p) for p in padded), np.int64, len(padded))
        b = np.frombuffer("".join(padded).encode("ascii"), np.uint8).astype(np.int64)
        code = b[:-2] << 16 | b[1:-1] << 8 | b[2:]
        row = np.repeat(np.arange(len(padded)), lens)[:-2]
        local = np.arange(len(code)) - np.repeat(np.cumsum(lens) - lens, lens)[:-2]
        keep = local <= lens[row] - 3  # trigrams that start and end inside one padded text
        uniq, inv = np.unique(code[keep], return_inverse=True)
        for c in uniq.tolist():
            if c not in slot:
                h = int.from_bytes(hashlib.blake2b(bytes((c >> 16, (c >> 8) & 255, c & 255)), digest_size=4).digest(),
                                   "little")
                slot[c] = (h % TEXT_DIM, 1.0 if h & (1 << 31) else -1.0)
        col = np.array([slot[c][0] for c in uniq.tolist()], np.int64)[inv]
        sign = np.array([slot[c][1] for c in uniq.tolist()])[inv]
        v = np.bincount(row[keep] * TEXT_DIM + col, weights=sign, minlength=len(padded) * TEXT_DIM)
        out[s:s + len(padded), :TEXT_DIM] = normalise(v.reshape(len(padded), TEXT_DIM).astype(np.float32))
    return normalise(out)


def topic_vectors(n: int, nq: int, work: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pool (n, 96), queries (nq, 96)) of `topic_pairs(n, seed)`; cached under `work`."""
    path = Path(work) / f"topics-{n}-{nq}-{seed}.npz"
    if path.exists():
        z = np.load(path)
        return z["pool"], z["queries"]
    from benchmarks.driver_memory import topic_pairs

    rows = topic_pairs(n, seed=seed)
    pool = hashing_vectors([r["pos_text"] for r in rows])
    queries = hashing_vectors([r["qry"] for r in rows[:nq]])
    del rows
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, pool=pool, queries=queries)
    os.replace(tmp, path)
    return pool, queries
