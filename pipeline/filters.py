"""False-negative filters: a verdict for every retrieved candidate, vectorised over a block of queries.

Each candidate is counted under the first filter, in `REASONS` order, that drops it, so the counts add up to the
number of dropped candidates and each reason can be read on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from .config import FilterConfig

REASONS = ("same_as_query", "same_as_positive", "other_positive", "same_group", "rank_window", "score_bounds",
           "margin_abs", "margin_rel", "near_duplicate", "modality", "blocklist", "judge")
KEPT = 0
PAD = -1  # no candidate at this rank (the pool is smaller than top_k)


@dataclass
class CandidateBlock:
    """Retrieved candidates of `nq` queries: item rows (-1 = none), scores, and what the filters compare with."""

    cand: np.ndarray        # (nq, k) int64 item rows
    scores: np.ndarray      # (nq, k) float32 query-candidate cosine
    pos_sims: np.ndarray    # (nq, k) float32 positive-candidate cosine
    pos_score: np.ndarray   # (nq,) float32 query-positive cosine
    qry_idx: np.ndarray     # (nq,) item row of the query
    pos_idx: np.ndarray     # (nq,) item row of the positive
    group_code: np.ndarray  # (nq,) group of the query, -1 without one
    query_row: np.ndarray   # (nq,) global query row, for the blocklist
    judge_drop: Optional[np.ndarray] = None  # (nq, k) bool: the judge (pipeline/judge.py) says it matches the query


@dataclass
class FilterContext:
    """Run-wide facts the filters look up: group memberships, modalities, blocked (query, item) pairs."""

    item_groups: np.ndarray    # sorted codes item_row * n_groups + group
    n_groups: int
    item_modality: np.ndarray  # (n_items,) int8
    blocked: np.ndarray        # sorted codes query_row * n_items + item_row
    n_items: int
    top_k: int
    positives: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Sorted codes qry_item * n_items + pos_item: every positive of every query content (`query_positives`)."""


def filter_candidates(block: CandidateBlock, cfg: FilterConfig, ctx: FilterContext) -> np.ndarray:
    """(nq, k) int8: KEPT, PAD, or 1 + the index in REASONS of the filter that dropped the candidate."""
    cand, scores = block.cand, block.scores
    nq, k = cand.shape
    verdict = np.where(cand < 0, PAD, KEPT).astype(np.int8)
    ranks = np.broadcast_to(np.arange(k), (nq, k))
    pos = block.pos_score[:, None]
    max_rank = cfg.max_rank if cfg.max_rank is not None else ctx.top_k
    safe = np.maximum(cand, 0)

    def drop(reason: str, mask: np.ndarray) -> None:
        verdict[(verdict == KEPT) & mask] = REASONS.index(reason) + 1

    drop("same_as_query", cand == block.qry_idx[:, None])
    drop("same_as_positive", cand == block.pos_idx[:, None])
    if cfg.other_positive and len(ctx.positives):
        drop("other_positive", _isin_sorted(block.qry_idx[:, None].astype(np.int64) * ctx.n_items + safe,
                                            ctx.positives))
    if cfg.same_group and len(ctx.item_groups):
        codes = safe * ctx.n_groups + block.group_code[:, None]
        drop("same_group", (block.group_code[:, None] >= 0) & _isin_sorted(codes, ctx.item_groups))
    drop("rank_window", (ranks < cfg.min_rank) | (ranks >= max_rank))
    lo = -np.inf if cfg.min_score is None else cfg.min_score
    hi = np.inf if cfg.max_score is None else cfg.max_score
    floor = cfg.margin_rel is not None and cfg.margin_cap == "floor" and cfg.max_score is not None  # no cap: margin
    if cfg.min_score is not None or cfg.max_score is not None:
        drop("score_bounds", (scores < lo) | ((scores > hi) & (not floor)))
    if cfg.margin_abs is not None:
        drop("margin_abs", scores > pos - cfg.margin_abs)
    if cfg.margin_rel is not None:
        limit = pos - np.abs(pos) * cfg.margin_rel  # sign-safe: never above the positive
        drop("margin_rel", scores > (np.maximum(limit, hi) if floor else limit))
    if cfg.near_duplicate is not None:
        drop("near_duplicate", block.pos_sims > cfg.near_duplicate)
    if cfg.modality:
        drop("modality", ctx.item_modality[safe] != ctx.item_modality[block.pos_idx][:, None])
    if len(ctx.blocked):
        drop("blocklist", _isin_sorted(block.query_row[:, None] * ctx.n_items + safe, ctx.blocked))
    if block.judge_drop is not None:  # last: the judge only sees what every other filter kept
        drop("judge", block.judge_drop)
    if cfg.margin_rel is not None and cfg.margin_cap == "fallback":
        margin = verdict == REASONS.index("margin_rel") + 1
        emptied = margin.any(axis=1) & ~(verdict == KEPT).any(axis=1)
        if emptied.any():  # these queries: filtered as if without the margin
            sub = CandidateBlock(**{f: None if v is None else v[emptied] for f, v in vars(block).items()})
            verdict[emptied] = filter_candidates(sub, replace(cfg, margin_rel=None), ctx)
    return verdict


def query_positives(qry_idx: np.ndarray, pos_idx: np.ndarray, n_items: int,
                    extra: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Sorted codes of (query content, positive) pairs: rows whose queries have the same content share positives.

    `extra` adds (query item rows, positive item rows) pairs, e.g. extra positives an input row carries."""
    q, p = np.asarray(qry_idx, np.int64), np.asarray(pos_idx, np.int64)
    if extra is not None:
        q, p = np.concatenate([q, np.asarray(extra[0], np.int64)]), np.concatenate([p, np.asarray(extra[1], np.int64)])
    return np.unique(q * n_items + p)


def _isin_sorted(values: np.ndarray, sorted_codes: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_codes, values)
    return sorted_codes[np.minimum(pos, len(sorted_codes) - 1)] == values


def count_drops(verdict: np.ndarray) -> dict[str, int]:
    counts = np.bincount(verdict[verdict > 0].ravel(), minlength=len(REASONS) + 1)
    return {reason: int(counts[i + 1]) for i, reason in enumerate(REASONS)}
