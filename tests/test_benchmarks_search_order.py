"""benchmarks/search_order.py: every order it times returns FAISS's own results, bit for bit, in the caller's order."""
import numpy as np

import faiss
from benchmarks import search_order as so
from pipeline import index as ix
from pipeline.config import IndexConfig


def test_every_order_returns_the_same_ids_and_scores():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = ix.build_index(x, IndexConfig(kind="ivf_flat", nprobe=4)).index
    q = x[rng.permutation(4000)[:900]]
    D, I = idx.search(q, 10)
    for sort in ("", "pre", "batch_pre", "block_pre", "batch", "block"):
        d, i, _ = so.ordered_search(idx, q, 10, 256, sort)
        assert np.array_equal(i, I) and np.array_equal(d.view(np.uint32), D.view(np.uint32)), sort
    threads = faiss.omp_get_max_threads()
    try:
        out = so.measure(idx, q, 10, 256, 1, [("", 1, 0), ("block_pre", 1, 0)])
    finally:
        faiss.omp_set_num_threads(threads)
    assert all(r["identical"] and r["scanned_per_query"] > 0 for r in out.values())
