"""A batch sampler for online in-batch hard negatives.

In-batch negatives are the other queries' positives. With random batches they are easy; if a batch holds queries
whose mined negatives overlap (or whose embeddings are near), each query's in-batch negatives are hard too, for free.
The risk is the opposite one: putting a query's false negatives in its batch. Two rows are never batched together
when they share a `group`, have the same positive content (`pos_item_id`), one's positive is the other's query
content, or one's positive is in the other's suspects (blocklist, or dropped by the miner as too close to the
positive; see `ShardDataset.suspects`).

Batches are built greedily from a (seed, epoch) random order: a seed row, then repeatedly the free row with the most
affinity to the rows already in the batch (row b's positive is row a's mined negative: weight 2; a and b share a mined
negative: 1; b is among a's `knn` nearest embeddings: 1), falling back to the next free row in the random order.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, asdict
from typing import Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler


@dataclass
class BatchStats:
    batches: int = 0
    full_batches: int = 0
    dropped_rows: int = 0        # rows in incomplete batches left out by drop_last
    hard_pairs: int = 0          # ordered pairs (a, b) in a batch where b's positive is one of a's mined negatives
    affinity_picks: int = 0      # rows added for their affinity (the rest came from the random order)

    def as_dict(self) -> dict:
        return asdict(self)


class HardBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; call `set_epoch(e)` each epoch as with `DistributedSampler`.

    Under DDP build it on each rank's own `ShardDataset` (rows are already split); with drop_last=True the number
    of batches can still differ by a few between ranks when conflicts leave rows over: stop at the smallest
    `len(sampler)` (an all_reduce MIN) so every rank takes the same number of steps.
    """

    def __init__(self, pos_item_ids: Sequence[str], neg_item_ids: Sequence[Sequence[str]], batch_size: int,
                 groups: Optional[Sequence[Optional[str]]] = None, qry_item_ids: Optional[Sequence[str]] = None,
                 suspects: Optional[Sequence[set[str]]] = None, embeddings: Optional[np.ndarray] = None,
                 knn: int = 8, max_fanout: int = 32, seed: int = 0, epoch: int = 0, drop_last: bool = False):
        n = len(pos_item_ids)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.epoch, self.drop_last = n, batch_size, seed, epoch, drop_last
        self.pos = list(pos_item_ids)
        self.neg = [list(x) for x in neg_item_ids]
        self.groups = list(groups) if groups is not None else [None] * n
        self.qry = list(qry_item_ids) if qry_item_ids is not None else [None] * n
        self.suspects = [set(s) for s in suspects] if suspects is not None else [set() for _ in range(n)]
        self.edges = self._affinity(embeddings, knn, max_fanout)
        self.stats = BatchStats()
        self._batches: Optional[list[list[int]]] = None

    @classmethod
    def from_dataset(cls, ds, batch_size: int, **kw) -> "HardBatchSampler":
        """From a `ShardDataset`: its ids, groups, mined negatives and suspects."""
        t = ds.table
        return cls(t.column("pos_item_id").to_pylist(), t.column("neg_item_ids").to_pylist(), batch_size,
                   groups=t.column("group").to_pylist(), qry_item_ids=t.column("qry_item_id").to_pylist(),
                   suspects=ds.suspects(), **kw)

    def _affinity(self, embeddings, knn, max_fanout) -> list[dict[int, float]]:
        by_pos, by_neg = defaultdict(list), defaultdict(list)
        for i, p in enumerate(self.pos):
            by_pos[p].append(i)
        for i, negs in enumerate(self.neg):
            for x in negs:
                if x and len(by_neg[x]) < max_fanout:  # cap hub items so the graph stays O(n * k * fanout)
                    by_neg[x].append(i)
        edges: list[dict[int, float]] = [defaultdict(float) for _ in range(self.n)]

        def link(a, b, w):
            if a != b:
                edges[a][b] += w
                edges[b][a] += w

        for a, negs in enumerate(self.neg):
            for x in negs:
                for b in by_pos.get(x, ()):
                    link(a, b, 2.0)
                for b in by_neg.get(x, ()):
                    if b > a:
                        link(a, b, 1.0)
        if embeddings is not None and knn > 0 and self.n > 1:
            import faiss
            x = np.ascontiguousarray(embeddings, dtype=np.float32)
            index = faiss.IndexFlatIP(x.shape[1])
            index.add(x)
            _, nn = index.search(x, min(knn + 1, self.n))
            for a, row in enumerate(nn):
                for b in row:
                    if b >= 0:
                        link(a, int(b), 1.0)
        return edges

    def conflicts(self, a: int, b: int) -> bool:
        """True when b's positive could be a false negative for a, or a's for b."""
        return _Batch(self, a).conflicts(b)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._batches = epoch, None

    def batches(self) -> list[list[int]]:
        if self._batches is None:
            self._batches = self._build()
        return self._batches

    def _build(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n)
        rank_of = np.empty(self.n, dtype=np.int64)
        rank_of[order] = np.arange(self.n)
        free = np.ones(self.n, dtype=bool)
        stats, batches, cursor = BatchStats(), [], 0
        max_scan = 16 * self.batch_size  # bound the fallback scan when most free rows conflict with the batch
        while True:
            while cursor < self.n and not free[order[cursor]]:
                cursor += 1
            if cursor == self.n:
                break
            batch = _Batch(self, int(order[cursor]))
            free[batch.rows[0]] = False
            score: dict[int, float] = defaultdict(float)
            heap: list[tuple[float, int, int]] = []  # (-affinity, position in the random order, row), lazily updated
            while len(batch.rows) < self.batch_size:
                for b, w in self.edges[batch.rows[-1]].items():
                    if free[b]:
                        score[b] += w
                        heapq.heappush(heap, (-score[b], rank_of[b], b))
                pick = None
                while heap:
                    s, _, b = heapq.heappop(heap)
                    if free[b] and -s == score.get(b):
                        del score[b]  # popped at its current score: taken now or never fits this batch
                        if not batch.conflicts(b):
                            pick = b
                            stats.affinity_picks += 1
                            break
                if pick is None:
                    scan = (int(b) for b in order[cursor:cursor + max_scan] if free[b])
                    pick = next((b for b in scan if not batch.conflicts(b)), None)
                if pick is None:
                    break
                batch.add(pick)
                free[pick] = False
            batches.append(batch.rows)
        full = [b for b in batches if len(b) == self.batch_size]
        stats.full_batches = len(full)
        if self.drop_last:
            stats.dropped_rows = sum(len(b) for b in batches if len(b) < self.batch_size)
            batches = full
        batches = [batches[i] for i in rng.permutation(len(batches))]
        negs = [set(x) for x in self.neg]
        stats.batches = len(batches)
        stats.hard_pairs = sum(self.pos[b] in negs[a] for batch in batches for a in batch for b in batch if a != b)
        self.stats = stats
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class _Batch:
    """A batch being filled, with the sets that make a conflict check O(suspects of the row)."""

    def __init__(self, sampler: HardBatchSampler, first: int):
        self.s, self.rows = sampler, []
        self.groups, self.pos, self.qry, self.suspects = set(), set(), set(), set()
        self.add(first)

    def add(self, row: int) -> None:
        s = self.s
        self.rows.append(row)
        if s.groups[row] is not None:
            self.groups.add(s.groups[row])
        self.pos.add(s.pos[row])
        if s.qry[row] is not None:
            self.qry.add(s.qry[row])
        self.suspects |= s.suspects[row]

    def conflicts(self, b: int) -> bool:
        s = self.s
        return ((s.groups[b] is not None and s.groups[b] in self.groups) or s.pos[b] in self.pos
                or s.pos[b] in self.qry or (s.qry[b] is not None and s.qry[b] in self.pos)
                or s.pos[b] in self.suspects or not self.pos.isdisjoint(s.suspects[b]))
