"""PyTorch datasets over one epoch's training shards (`OUT/epoch=NNNN/part-*.parquet`, docs/output-schema.md).

Every consumer (a DDP rank, and inside it a loader worker) gets a contiguous, disjoint slice of one global row order,
so no row is read twice and the union is the whole epoch. The order is a permutation of the shard files seeded by
(seed, epoch), and rows are shuffled inside each file with the same seed: different every epoch, identical for a
given (seed, epoch) whatever the number of ranks or workers. Rows with fewer than `k` negatives are padded (with a
mask), dropped or refused, as configured, and counted in `stats`; a warning says how many.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from pipeline import blocklist
from pipeline.run import epoch_dir

log = logging.getLogger(__name__)

COLUMNS = ["query_id", "dataset", "qry", "qry_image_path", "pos_text", "pos_image_path", "group", "qry_item_id",
           "pos_item_id", "pos_score", "neg_text", "neg_image_path", "neg_item_ids", "neg_scores", "neg_rel_scores",
           "num_negatives"]
EXTRA_POSITIVES = ["pos_extra_text", "pos_extra_image_path", "pos_extra_item_ids", "pos_extra_scores"]  # relabel
# `_candidates` verdicts that mean "too close to the positive to be a safe negative": such an item must not be an
# in-batch negative of that query either (the hard-batch sampler reads them).
# `score_bounds` is mostly the positive-score cap (filters.positive_quantile): scored above most known matches.
SUSPECT_VERDICTS = ("same_as_positive", "other_positive", "same_group", "score_bounds", "margin_abs", "margin_rel",
                    "near_duplicate", "blocklist")


@dataclass
class ShardStats:
    """What happened to the epoch's rows; `rows_used` = rows - dropped_short - dropped_uneven (over all ranks)."""
    rows: int = 0
    short_rows: int = 0          # rows with fewer than k negatives
    padded_rows: int = 0         # ... padded (on_short="pad")
    padded_negatives: int = 0    # negative slots filled with padding (neg_mask False)
    dropped_short: int = 0       # ... dropped (on_short="drop")
    truncated_rows: int = 0      # rows with more than k negatives: the k hardest are kept
    dropped_uneven: int = 0      # rows left out so that every rank gets the same count (even=True)
    rows_used: int = 0
    rows_this_rank: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def list_shards(out: str | Path, epoch: int) -> list[Path]:
    """The epoch's training shards in name order; an epoch folder exists only once complete (renamed into place)."""
    folder = epoch_dir(out, epoch)
    shards = sorted(folder.glob("part-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no training shards {folder}/part-*.parquet (epoch not mined, or still being written)")
    return shards


def _ddp_rank_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    return rank, world_size


def _slice(n: int, parts: int, i: int) -> tuple[int, int]:
    return i * n // parts, (i + 1) * n // parts


class _EpochIndex:
    """The global row order of an epoch and its split; reads only the `num_negatives` column of each shard."""

    def __init__(self, out, epoch, k, on_short, seed, rank, world_size, even):
        if on_short not in ("pad", "drop", "error"):
            raise ValueError(f"on_short must be 'pad', 'drop' or 'error', got {on_short!r}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.out, self.epoch, self.k, self.on_short, self.seed = Path(out), epoch, k, on_short, seed
        self.rank, self.world_size = _ddp_rank_world(rank, world_size)
        self.shards = list_shards(out, epoch)
        rng = np.random.default_rng([seed, epoch])
        files, rows, stats = [], [], ShardStats()
        for f in rng.permutation(len(self.shards)):
            nneg = pq.read_table(self.shards[f], columns=["num_negatives"]).column(0).to_numpy(zero_copy_only=False)
            short = nneg < k
            stats.rows += len(nneg)
            stats.short_rows += int(short.sum())
            stats.truncated_rows += int((nneg > k).sum())
            keep = np.flatnonzero(~short) if on_short == "drop" else np.arange(len(nneg))
            if on_short == "pad":
                stats.padded_rows += int(short.sum())
                stats.padded_negatives += int((k - nneg[short]).sum())
            keep = rng.permutation(keep)
            files.append(np.full(len(keep), f, dtype=np.int64))
            rows.append(keep.astype(np.int64))
        if on_short == "error" and stats.short_rows:
            raise ValueError(f"{stats.short_rows} of {stats.rows} rows in {epoch_dir(out, epoch)} have fewer than "
                             f"k={k} negatives; use on_short='pad' or 'drop', or mine more")
        if on_short == "drop":
            stats.dropped_short = stats.short_rows
        self.files = np.concatenate(files) if files else np.zeros(0, np.int64)
        self.rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        n = len(self.rows)
        if even:
            per = n // self.world_size
            stats.dropped_uneven = n - per * self.world_size
            self.start, self.stop = self.rank * per, (self.rank + 1) * per
        else:
            self.start, self.stop = _slice(n, self.world_size, self.rank)
        stats.rows_used = n - stats.dropped_uneven
        stats.rows_this_rank = self.stop - self.start
        self.stats = stats
        if stats.short_rows:
            log.warning("%s: %d of %d rows have fewer than k=%d negatives: %s", epoch_dir(out, epoch),
                        stats.short_rows, stats.rows, k,
                        f"padded ({stats.padded_negatives} masked slots)" if on_short == "pad" else "dropped")

    def read(self, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of this rank's slice, in the shuffled order, as one Arrow table."""
        files, rows = self.files[self.start + start:self.start + stop], self.rows[self.start + start:self.start + stop]
        parts = []
        for f in dict.fromkeys(files.tolist()):  # files in order of first appearance (contiguous runs)
            sel = rows[files == f]
            names = pq.read_schema(self.shards[f]).names
            parts.append(pq.read_table(self.shards[f], columns=COLUMNS + [c for c in EXTRA_POSITIVES if c in names])
                         .take(pa.array(sel)))
        return pa.concat_tables(parts) if parts else pa.table({c: [] for c in COLUMNS})

    def row_dict(self, table: pa.Table, i: int) -> dict:
        """One training row with exactly k negatives (padding masked out)."""
        r = {c: table.column(c)[i].as_py() for c in COLUMNS}
        k, n = self.k, min(r["num_negatives"], self.k)
        pad = k - n
        mask = np.zeros(k, dtype=bool)
        mask[:n] = True
        out = {c: r[c] for c in COLUMNS if not c.startswith("neg_") and c != "num_negatives"}
        out["pos_score"] = np.float32(r["pos_score"])
        for c, fill in (("neg_text", ""), ("neg_image_path", ""), ("neg_item_ids", "")):
            out[c] = list(r[c][:n]) + [fill] * pad
        for c in ("neg_scores", "neg_rel_scores"):
            out[c] = np.asarray(list(r[c][:n]) + [0.0] * pad, dtype=np.float32)
        out["neg_mask"] = mask
        for c in EXTRA_POSITIVES:  # a run mined with filters.relabel: a list per row (lengths differ)
            if c in table.column_names:
                out[c] = list(table.column(c)[i].as_py())
        return out


class ShardDataset(Dataset):
    """Map-style: this rank's rows of one epoch, held as an Arrow table, in the (seed, epoch) shuffled order.

    Use with `DataLoader(ds, batch_size, shuffle=False, collate_fn=collate_rows)` (the order is already shuffled and
    loader workers split indices among themselves), or with `HardBatchSampler.from_dataset(ds, ...)`.
    on_short: "pad" (default; masked slots), "drop" or "error" for rows with fewer than k negatives.
    even: give every rank the same number of rows (DDP needs the same number of steps everywhere).
    """

    def __init__(self, out: str | Path, epoch: int, k: int, on_short: Literal["pad", "drop", "error"] = "pad",
                 seed: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None, even: bool = True):
        self.index = _EpochIndex(out, epoch, k, on_short, seed, rank, world_size, even)
        self.stats = self.index.stats
        self.table = self.index.read(0, self.stats.rows_this_rank)
        self.blocklist = blocklist.Blocklist()  # what `suspects()` read: entries, and malformed lines skipped

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        return self.index.row_dict(self.table, i)

    def suspects(self) -> list[set[str]]:
        """Per row, the item ids that must not be its in-batch negatives: the blocklist (OUT/blocklist.jsonl) and
        candidates the miner dropped as too close to the positive (`_candidates` verdicts in SUSPECT_VERDICTS)."""
        qids = self.table.column("query_id").to_pylist()
        found: dict[str, set[str]] = {q: set() for q in qids}
        self.blocklist = blocklist.read(self.index.out / blocklist.FILENAME)  # a malformed line: skipped, counted
        for q, items in self.blocklist.by_query().items():
            if q in found:
                found[q] |= items
        for path in sorted((epoch_dir(self.index.out, self.index.epoch) / "_candidates").glob("part-*.parquet")):
            cand = pq.read_table(path, columns=["query_id", "cand_item_ids", "cand_verdicts"])
            cand = cand.filter(pc.is_in(cand.column("query_id"), value_set=pa.array(qids, pa.string())))
            for q, items, verdicts in zip(*(cand.column(c).to_pylist() for c in cand.column_names)):
                found[q].update(it for it, v in zip(items, verdicts) if v in SUSPECT_VERDICTS)
        return [found[q] for q in qids]


class IterableShardDataset(IterableDataset):
    """Iterable: streams this (rank, worker)'s disjoint slice of the epoch, one shard file at a time, so memory is
    bounded by a shard rather than by the epoch. Same arguments and row order as `ShardDataset`."""

    def __init__(self, out: str | Path, epoch: int, k: int, on_short: Literal["pad", "drop", "error"] = "pad",
                 seed: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None, even: bool = True):
        self.index = _EpochIndex(out, epoch, k, on_short, seed, rank, world_size, even)
        self.stats = self.index.stats

    def __len__(self) -> int:
        return self.stats.rows_this_rank

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        start, stop = _slice(len(self), info.num_workers, info.id) if info else (0, len(self))
        files = self.index.files[self.index.start + start:self.index.start + stop]
        # cut the slice at file boundaries so each read touches one shard
        cuts = np.flatnonzero(np.diff(files)) + 1
        bounds = [start, *(start + cuts).tolist(), stop]
        for a, b in zip(bounds[:-1], bounds[1:]):
            table = self.index.read(a, b)
            for i in range(table.num_rows):
                yield self.index.row_dict(table, i)


def collate_rows(rows: list[dict]) -> dict:
    """Batch rows: strings stay lists (of lists for negatives); scores and masks become tensors."""
    out = {}
    for c, v in rows[0].items():
        vals = [r[c] for r in rows]
        if isinstance(v, np.ndarray):
            out[c] = torch.from_numpy(np.stack(vals))
        elif isinstance(v, (float, np.floating)):
            out[c] = torch.tensor(vals, dtype=torch.float32)
        else:
            out[c] = vals
    return out
