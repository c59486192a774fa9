"""Statistics of one epoch, streamed from its shards.

Why streamed: the plots need every score of a run, but memory must not grow with it. Scores are cosines, so
histograms with fixed fine bins over [-1, 1] (margins over [-2, 2]) accumulate batch by batch from five projected
columns; the plots then crop to the occupied range. Drop counts come from `_stats.json` (the miner counts them
while filtering), rejects from `_rejects.jsonl`.
"""
from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from pipeline.inspector.store import Epoch, Run

FINE_BINS = 800
STAT_COLUMNS = ["dataset", "pos_score", "neg_scores", "num_negatives", "shortfall"]


@dataclass
class Histogram:
    """Counts in FINE_BINS equal bins over [lo, hi]; values outside are clipped into the end bins."""

    lo: float
    hi: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, dtype=np.int64))
    total: float = 0.0
    n: int = 0

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if not len(values):
            return
        idx = ((values - self.lo) / (self.hi - self.lo) * FINE_BINS).astype(np.int64)
        self.counts += np.bincount(np.clip(idx, 0, FINE_BINS - 1), minlength=FINE_BINS)
        self.total += float(values.sum())
        self.n += len(values)

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def coarse(self, bins: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """(edges, counts) over the occupied range only, regrouped to about `bins` bars."""
        nz = np.flatnonzero(self.counts)
        if not len(nz):
            return np.array([self.lo, self.hi]), np.zeros(1, dtype=np.int64)
        a, b = int(nz[0]), int(nz[-1]) + 1
        step = max(1, -(-(b - a) // bins))
        b = a + -(-(b - a) // step) * step
        counts = np.pad(self.counts[a:b], (0, max(0, b - FINE_BINS))).reshape(-1, step).sum(axis=1)
        width = (self.hi - self.lo) / FINE_BINS
        return self.lo + width * np.arange(a, b + 1, step), counts


@dataclass
class DatasetStats:
    queries: int = 0
    negatives: int = 0
    shortfall_queries: int = 0
    pos_sum: float = 0.0
    margin_sum: float = 0.0


@dataclass
class EpochStats:
    epoch: int
    queries: int = 0
    pos: Histogram = field(default_factory=lambda: Histogram(-1.0, 1.0))
    neg: Histogram = field(default_factory=lambda: Histogram(-1.0, 1.0))
    margin: Histogram = field(default_factory=lambda: Histogram(-2.0, 2.0))
    negs_per_query: Counter = field(default_factory=Counter)
    shortfall_queries: int = 0
    per_dataset: dict[str, DatasetStats] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    rejects: Counter = field(default_factory=Counter)
    run_counts: dict[str, int] = field(default_factory=dict)
    blocklist: dict = field(default_factory=dict)  # entries / skipped_lines the miner read (`_stats.json`)
    false_negatives: dict = field(default_factory=dict)  # `_stats.json` false_negatives.per_dataset

    @property
    def mean_negatives(self) -> float | None:
        return sum(k * v for k, v in self.negs_per_query.items()) / self.queries if self.queries else None


def compute(epoch: Epoch) -> EpochStats:
    out = EpochStats(epoch.number)
    for shard in epoch.shards:
        for batch in shard.open().iter_batches(batch_size=65536, columns=STAT_COLUMNS, use_threads=False):
            _add_batch(out, batch)
    out.drops = {str(k): int(v) for k, v in (epoch.stats.get("drops") or {}).items()}
    out.run_counts = {k: epoch.stats[k] for k in ("queries_in", "queries_written", "queries_rejected")
                      if isinstance(epoch.stats.get(k), int)}
    out.blocklist = epoch.stats.get("blocklist") if isinstance(epoch.stats.get("blocklist"), dict) else {}
    fn = epoch.stats.get("false_negatives")
    out.false_negatives = fn.get("per_dataset", {}) if isinstance(fn, dict) else {}
    rejects = epoch.dir / "_rejects.jsonl"
    if rejects.is_file():
        with rejects.open(encoding="utf-8") as f:
            for line in f:
                try:
                    out.rejects[str(json.loads(line).get("reason"))] += 1
                except (ValueError, AttributeError):
                    out.rejects["unreadable line"] += 1
    return out


def _add_batch(out: EpochStats, batch) -> None:
    pos = pc.fill_null(batch["pos_score"], np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    negs = batch["neg_scores"]
    neg = pc.list_flatten(negs).to_numpy(zero_copy_only=False).astype(np.float64)
    parents = pc.list_parent_indices(negs).to_numpy()
    margin = pos[parents] - neg
    num = pc.fill_null(batch["num_negatives"], 0).to_numpy(zero_copy_only=False)
    short = pc.fill_null(batch["shortfall"], 0).to_numpy(zero_copy_only=False) > 0
    out.queries += batch.num_rows
    out.pos.add(pos)
    out.neg.add(neg)
    out.margin.add(margin)
    out.negs_per_query.update(dict(zip(*(a.tolist() for a in np.unique(num, return_counts=True)))))
    out.shortfall_queries += int(short.sum())
    enc = pc.dictionary_encode(pc.fill_null(batch["dataset"], ""))
    codes = enc.indices.to_numpy(zero_copy_only=False)
    k = len(enc.dictionary)
    neg_margin = np.bincount(codes[parents], weights=np.nan_to_num(margin), minlength=k)
    counts = np.bincount(codes, minlength=k)
    nneg = np.bincount(codes, weights=num, minlength=k)
    nshort = np.bincount(codes, weights=short, minlength=k)
    psum = np.bincount(codes, weights=np.nan_to_num(pos), minlength=k)
    for j, name in enumerate(enc.dictionary.to_pylist()):
        d = out.per_dataset.setdefault(name, DatasetStats())
        d.queries += int(counts[j])
        d.negatives += int(nneg[j])
        d.shortfall_queries += int(nshort[j])
        d.pos_sum += float(psum[j])
        d.margin_sum += float(neg_margin[j])


class StatsCache:
    """Statistics per epoch, computed once per writing of that epoch (an epoch folder is only ever replaced whole)."""

    def __init__(self, run: Run):
        self.run = run
        self._done: dict[int, EpochStats] = {}
        self._stamps: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def get(self, number: int) -> EpochStats:
        epoch = self.run.epoch(number)
        with self._lock:
            if self._stamps.get(number) != epoch.stamp:
                self._done[number] = compute(epoch)
                self._stamps[number] = epoch.stamp
            return self._done[number]
