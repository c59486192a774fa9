"""Negatives the input already has (`neg_text` / `neg_image_path` columns): merged into each query's retrieved
candidates, marked as coming from the input, so the teacher scores them and every filter judges them like the
retrieved ones. The read stage puts their item rows in the queries' `input_neg_idx` column.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

COLUMN = "input_neg_idx"
CHUNK = 4096


def candidate_pools(pools: dict[str, np.ndarray], queries: pa.Table) -> dict[str, np.ndarray]:
    """The pools to embed as candidates: each dataset's pool plus its queries' input negatives (which are not
    added to the pool that is searched)."""
    if COLUMN not in queries.column_names:
        return pools
    out = dict(pools)
    datasets = queries.column("dataset").to_numpy(zero_copy_only=False)
    lists = queries.column(COLUMN).combine_chunks()
    parents = lists.value_parent_indices().to_numpy() if len(lists.flatten()) else np.zeros(0, np.int64)
    rows = lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    for ds in np.unique(datasets[parents]) if len(parents) else []:
        out[ds] = np.union1d(out.get(ds, np.zeros(0, np.int64)), rows[datasets[parents] == ds])
    return out


def width(queries: pa.Table) -> int:
    """The longest list of input negatives (0 without any): the columns they add to every query's candidates."""
    if COLUMN not in queries.column_names or not queries.num_rows:
        return 0
    return int(pc.max(pc.list_value_length(queries.column(COLUMN))).as_py() or 0)


def _lists(queries: pa.Table, columns: int = 0):
    """(query row, slot, item row) of every input negative, and the (rows x widest list, at least `columns`)
    matrix of them; None when these queries have none (and no `columns` are asked for)."""
    if COLUMN not in queries.column_names:
        return None
    lists = queries.column(COLUMN).combine_chunks()
    flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if not len(flat) and not columns:
        return None
    parents = lists.value_parent_indices().to_numpy().astype(np.int64) if len(flat) else np.zeros(0, np.int64)
    counts = np.bincount(parents, minlength=queries.num_rows)
    slot = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
    extra = np.full((queries.num_rows, max(int(counts.max(initial=0)), columns)), -1, np.int64)
    extra[parents, slot] = flat
    return parents, slot, flat, extra


def merge(queries: pa.Table, cand: np.ndarray, scores: np.ndarray, pos_sims: np.ndarray, qry_v, cand_v,
          columns: int = 0):
    """(cand, scores, pos_sims): the retrieved matrices widened by each query's input negatives that were not
    retrieved anyway (`columns` wide at least: a block of queries is widened like the whole run, `width`),
    teacher-scored, rows re-sorted by score."""
    lists = _lists(queries, columns)
    if lists is None:
        return cand, scores, pos_sims
    parents, slot, flat, extra = lists
    nq, m = extra.shape
    e_scores = np.full((nq, m), -np.inf, np.float32)
    e_pos = np.full((nq, m), -np.inf, np.float32)
    datasets = queries.column("dataset").to_numpy(zero_copy_only=False)
    qry_idx, pos_idx = queries.column("qry_idx").to_numpy(), queries.column("pos_idx").to_numpy()
    for ds in np.unique(datasets[parents]):
        sel = datasets[parents] == ds
        p, s, rows = parents[sel], slot[sel], flat[sel]
        vecs = cand_v.get(ds, rows)
        e_scores[p, s] = np.einsum("id,id->i", qry_v.get(ds, qry_idx[p]), vecs)
        e_pos[p, s] = np.einsum("id,id->i", cand_v.get(ds, pos_idx[p]), vecs)
    dup = np.zeros((nq, m), bool)
    for start in range(0, nq, CHUNK):  # (rows, k, m) comparisons, a chunk of rows at a time
        c, e = cand[start:start + CHUNK], extra[start:start + CHUNK]
        retrieved = ((c[:, :, None] == e[:, None, :]) & (e[:, None, :] >= 0)).any(axis=1)
        # retrieved anyway, or the same item listed twice by the input: counted once
        dup[start:start + CHUNK] = retrieved | (np.triu(e[:, :, None] == e[:, None, :], 1).any(axis=1) & (e >= 0))
    extra[dup] = -1
    e_scores[dup] = -np.inf
    e_pos[dup] = -np.inf
    cand = np.concatenate([cand, extra], axis=1)
    scores = np.concatenate([scores, e_scores], axis=1)
    pos_sims = np.concatenate([pos_sims, e_pos], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return take(cand), take(scores), take(pos_sims)


def marks(queries: pa.Table, cand: np.ndarray) -> np.ndarray | None:
    """(nq, k) bool: which candidates are one of their query's input negatives (None when the input has none)."""
    lists = _lists(queries)
    if lists is None:
        return None
    extra = lists[3]
    out = np.zeros(cand.shape, bool)
    for start in range(0, len(cand), CHUNK):
        c, e = cand[start:start + CHUNK], extra[start:start + CHUNK]
        out[start:start + CHUNK] = ((c[:, :, None] == e[:, None, :]) & (c[:, :, None] >= 0)).any(axis=2)
    return out


def new_counts() -> dict:
    return {"candidates": 0, "sampled": 0, "unsampled": 0, "dropped": {}}


def add_counts(total: dict, verdict: np.ndarray, chosen: np.ndarray, from_input: np.ndarray, reasons) -> None:
    """Add what became of one block's input negatives (the `input_negatives` entry of `_stats.json`): how many
    were candidates, sampled, kept but not sampled, and dropped by each filter (`verdict`: filters.py codes)."""
    sampled = np.zeros_like(verdict, dtype=bool)
    np.put_along_axis(sampled, np.maximum(chosen, 0), chosen >= 0, axis=1)
    present = from_input & (verdict >= 0)
    total["candidates"] += int(present.sum())
    total["sampled"] += int((present & sampled).sum())
    total["unsampled"] += int((present & ~sampled & (verdict == 0)).sum())
    codes = verdict[present & (verdict > 0)]
    for code, n in zip(*np.unique(codes, return_counts=True)):
        reason = reasons[code - 1]
        total["dropped"][reason] = total["dropped"].get(reason, 0) + int(n)
