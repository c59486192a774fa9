"""Sample negatives among the candidates that survived the filters.

Randomness comes from (seed, epoch, query id, rank) through a counter-based hash, never from a shared generator, so
the sample of a query is the same whatever the number of workers, partitions or the order queries are processed in.
Sampling without replacement is the Gumbel-top-k trick: the n largest of `log w + Gumbel noise`.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .config import SampleConfig
from .filters import KEPT

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def query_keys(query_ids: list[str]) -> np.ndarray:
    """A 64-bit key per query id, stable across runs and machines."""
    return np.array([int.from_bytes(hashlib.blake2b(q.encode(), digest_size=8).digest(), "little")
                     for q in query_ids], dtype=np.uint64)


def uniforms(keys: np.ndarray, seed: int, epoch: int, k: int) -> np.ndarray:
    """(nq, k) uniforms in (0, 1) that depend only on (seed, epoch, query key, rank)."""
    base = _splitmix64(keys ^ _splitmix64(np.uint64(seed) * np.uint64(1_000_003) + np.uint64(epoch)))
    with np.errstate(over="ignore"):
        counters = base[:, None] + np.arange(1, k + 1, dtype=np.uint64)[None, :] * _GOLDEN
    bits = _splitmix64(counters) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) / float(1 << 53)


def hardest_pool_size(cfg: SampleConfig) -> int:
    return int(np.ceil(cfg.hardest_pool * cfg.n_negatives))


def sample_negatives(verdict: np.ndarray, scores: np.ndarray, keys: np.ndarray, cfg: SampleConfig,
                     epoch: int) -> np.ndarray:
    """(nq, n_negatives) candidate positions (ranks), hardest first; -1 where fewer survived."""
    nq, k = verdict.shape
    kept = verdict == KEPT
    if cfg.strategy == "top":
        priority = -np.broadcast_to(np.arange(k, dtype=np.float64), (nq, k))
    else:
        gumbel = -np.log(-np.log(uniforms(keys, cfg.seed, epoch, k)))
        priority = scores.astype(np.float64) / cfg.temperature + gumbel if cfg.strategy == "weighted" else gumbel
        if cfg.strategy == "hardest":  # uniform among the hardest ceil(pool * n) survivors
            kept = kept & (np.cumsum(kept, axis=1) <= hardest_pool_size(cfg))
    priority = np.where(kept, priority, -np.inf)
    n = min(cfg.n_negatives, k)
    top = np.argsort(-priority, axis=1, kind="stable")[:, :n]
    valid = np.take_along_axis(priority, top, axis=1) > -np.inf
    chosen = np.where(valid, top, k)  # k sorts after every real rank
    chosen.sort(axis=1)
    chosen[chosen == k] = -1
    if n < cfg.n_negatives:
        chosen = np.pad(chosen, ((0, 0), (0, cfg.n_negatives - n)), constant_values=-1)
    return chosen
