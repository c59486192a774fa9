"""Candidate cosines (pipeline/search.py `_sims`: scores and candidate-positive similarities) are computed in
chunks of SIM_CHUNK queries: the largest temporary (chunk x k x d floats) stays bounded whatever the number of
queries, and the chunking changes no value (issue 15 item 5: a small job's memory)."""
from __future__ import annotations

import numpy as np

from pipeline import search


class Vectors:
    """The `take(rows)` look-up `_sims` reads, recording the largest block of vectors it handed out."""

    def __init__(self, vectors: np.ndarray):
        self.vectors, self.largest = vectors, 0

    def take(self, rows):
        out = self.vectors[np.asarray(rows, np.int64)]
        self.largest = max(self.largest, out.nbytes)
        return out


def test_pos_sims_chunked_bounded_and_equal_to_one_pass():
    rng = np.random.default_rng(0)
    n, nq, k, d = 300, 2100, 51, 384  # the short-text benchmark's k and MiniLM's dimension; > one old chunk
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    block = rng.integers(0, n, (nq, k))
    block[::7, -3:] = -1  # queries with fewer candidates than k
    pos = rng.standard_normal((nq, d)).astype(np.float32)
    source = Vectors(vectors)
    got, = search._sims(source.take, block, pos)
    want = np.where(block >= 0, np.einsum("ikd,id->ik", vectors[np.maximum(block, 0)], pos), -np.inf)
    assert got.dtype == np.float32 and np.array_equal(got, want.astype(np.float32))
    assert np.isneginf(got[::7, -3:]).all()
    assert source.largest <= 32 * 2**20  # MB: a chunk at a time (it was 2,048 queries, 160 MB at this shape)
