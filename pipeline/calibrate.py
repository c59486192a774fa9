"""Calibrate the false-negative filters on evidence found in the data, and estimate the false-negative rate.

Evidence is a label per retrieved candidate of some queries: 1 = a known true match (a false negative if it were
sampled), 0 = a known negative, -1 = unknown. It comes from the data itself, no person needed:
- `group`: items sharing the query's group key (held out: the filter that removes them is switched off here);
- `multi_positive`: the positives of other rows that ask the same query, and the extra positives an input row
  carries (pipeline/extra_positives.py; both reach `ctx.positives`);
- `blocklist`: a query with at least one blocklist line was reviewed: marked candidates are true matches, its other
  retrieved candidates confirmed negatives;
- `judge`: the judge's verdicts on the candidates it saw.
Group and multi-positive evidence treats the query's other candidates as negatives: the known true matches stand in
for the unknown ones. Without any evidence the data still says how the teacher scores true matches: every row's
positive is one, so `filters.positive_quantile` caps candidate scores at a quantile of the dataset's positive scores.
Per dataset, each threshold setting on a small grid is scored by the expected share of true matches among the
negatives it would sample (the estimated FN rate), the share of queries it keeps full and the mean score of those
negatives; the setting that meets `filters.target_fn_rate` with the most full queries (then the hardest negatives)
wins. Everything is a pure function of the arrays, so a calibrated run stays byte-deterministic.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import numpy as np
import pyarrow as pa

from .config import FilterConfig, SampleConfig
from .filters import KEPT, REASONS, CandidateBlock, FilterContext, _isin_sorted, filter_candidates
from .sample import hardest_pool_size, sample_negatives

EVIDENCE_KINDS = ("group", "multi_positive", "blocklist", "judge")
MARGINS = ((None, None), ("margin_rel", 0.0), ("margin_rel", 0.02), ("margin_rel", 0.05), ("margin_rel", 0.1),
           ("margin_abs", -0.1), ("margin_abs", -0.05), ("margin_abs", 0.0), ("margin_abs", 0.05), ("margin_abs", 0.1))
NEAR_DUPLICATE = (None, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7)
MIN_RANK = (0, 1, 2, 3, 5)
POSITIVE_QUANTILE = (None, 0.25, 0.5, 0.75, 0.9)
THRESHOLD_KEYS = ("min_rank", "positive_quantile", "margin_rel", "margin_abs", "near_duplicate")
MIN_EVIDENCE_QUERIES = 20  # fewer labelled queries than this estimate the FN rate but do not move thresholds
PRIOR_CLUSTERED = 5  # queries' worth of prior belief that a query's negatives are all true matches or none
MAX_QUERIES = 2000  # queries per dataset (evidence, and others for coverage): a fixed, key-ordered subset
Z95 = 1.959963984540054


def evidence_labels(block: CandidateBlock, ctx: FilterContext, judge_seen: Optional[np.ndarray] = None,
                    reviewed: Optional[np.ndarray] = None
                    ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(nq, k) int8 labels 1 / 0 / -1, per kind of evidence a (nq, k) bool of its true matches, and per query the
    strength of its labels (0 none, 1 known matches only: group / multi-positive, 2 judged, 3 reviewed by a person).

    `reviewed`: query rows a person looked at (any blocklist line, also one with no item: nothing to mark)."""
    cand = block.cand
    safe = np.maximum(cand, 0)
    present = (cand >= 0) & (cand != block.qry_idx[:, None]) & (cand != block.pos_idx[:, None])
    found: dict[str, np.ndarray] = {}
    complete = np.zeros(len(cand), bool)  # queries whose other candidates count as negatives
    if len(ctx.item_groups):
        has = block.group_code >= 0
        found["group"] = has[:, None] & _isin_sorted(safe * ctx.n_groups + block.group_code[:, None], ctx.item_groups)
        complete |= has
    if len(ctx.positives):
        found["multi_positive"] = _isin_sorted(block.qry_idx[:, None].astype(np.int64) * ctx.n_items + safe,
                                               ctx.positives)
        qry, n_pos = np.unique(ctx.positives // ctx.n_items, return_counts=True)
        complete |= np.isin(block.qry_idx, qry[n_pos > 1])  # asked with more than one positive
    looked = np.unique(np.concatenate([ctx.blocked // ctx.n_items, [] if reviewed is None else reviewed]))
    if len(looked):
        looked_at = np.isin(block.query_row, looked)
        found["blocklist"] = looked_at[:, None] & _isin_sorted(block.query_row[:, None] * ctx.n_items + safe,
                                                               ctx.blocked) if len(ctx.blocked) else \
            np.zeros(cand.shape, bool)
        complete |= looked_at
    strength = complete.astype(np.int8)
    labels = np.full(cand.shape, -1, np.int8)
    labels[complete[:, None] & present] = 0
    if judge_seen is not None and block.judge_drop is not None:  # the judge's verdicts on what it saw
        found["judge"] = block.judge_drop & judge_seen
        labels[judge_seen & present & (labels < 0)] = 0
        strength[(judge_seen & present).any(axis=1)] = 2
    if len(looked):
        strength[looked_at] = 3
    for kind in found:
        found[kind] &= present
        labels[found[kind]] = 1
    return labels, found, strength


def with_thresholds(cfg: FilterConfig, thresholds: dict) -> FilterConfig:
    return dataclasses.replace(cfg, **{k: thresholds.get(k) if k != "min_rank" else thresholds.get(k, 0)
                                       for k in THRESHOLD_KEYS})


def score_cap(quantile: Optional[float], pos_score: np.ndarray | dict) -> Optional[float]:
    """The `positive_quantile` score cap of one dataset: that quantile of its query-positive scores (known matches).
    Sorted before use, so it depends on the scores only, not on their order or on how many workers produced them.
    `pos_score`: the scores, or their caps found per block ({quantile: cap}, `stats.positive_score_caps`: a run's
    driver holds no score), which hold every quantile of `cap_quantiles`."""
    if isinstance(pos_score, dict):
        return None if quantile is None else pos_score[quantile]
    finite = np.sort(np.asarray(pos_score, np.float64)[np.isfinite(pos_score)])
    if quantile is None or not len(finite):
        return None
    return float(np.float32(np.quantile(finite, quantile)))


def cap_quantiles(cfg: FilterConfig) -> tuple:
    """The quantiles a dataset's score cap may be taken at: the configured one and the calibration grid's."""
    return tuple(sorted({q for q in (cfg.positive_quantile, *POSITIVE_QUANTILE) if q is not None}))


def resolve(cfg: FilterConfig, pos_score: np.ndarray | dict) -> FilterConfig:
    """`cfg` with its positive_quantile turned into a max_score for a dataset whose positives score `pos_score`."""
    cap = score_cap(cfg.positive_quantile, pos_score)
    if cap is None:
        return dataclasses.replace(cfg, positive_quantile=None)
    return dataclasses.replace(cfg, positive_quantile=None,
                               max_score=cap if cfg.max_score is None else min(cfg.max_score, cap))


def data_filters(cfg: FilterConfig, caps: dict, datasets) -> dict[str, FilterConfig]:
    """Per dataset, the configured filters with the score cap its own positive scores give (no evidence needed;
    `caps`: {dataset: {quantile: cap}}, `stats.positive_score_caps`)."""
    return {str(ds): resolve(cfg, caps.get(str(ds), {})) for ds in datasets}


def grid(cfg: FilterConfig) -> list[dict]:
    """Threshold settings to try: the configured one first, then margin x near-duplicate cap x rank-window start x
    positive-score cap."""
    configured = {k: getattr(cfg, k) for k in THRESHOLD_KEYS}
    out = [configured]
    for (margin, value), near, lo, quantile in itertools.product(MARGINS, NEAR_DUPLICATE, MIN_RANK, POSITIVE_QUANTILE):
        if lo < cfg.min_rank:  # a configured (or scheduled) rank-window start is a floor
            continue
        setting = {"min_rank": lo, "positive_quantile": quantile, "margin_rel": None, "margin_abs": None,
                   "near_duplicate": near}
        if margin:
            setting[margin] = value
        if setting != configured:
            out.append(setting)
    return out


def selection_weights(kept: np.ndarray, scores: np.ndarray, keys: np.ndarray, cfg: SampleConfig,
                      epoch: int) -> np.ndarray:
    """(nq, k) probability that each candidate is among the sampled negatives (exact for top / hardest /
    uniform; the drawn sample itself for weighted)."""
    n = cfg.n_negatives
    if cfg.strategy == "weighted":
        chosen = sample_negatives(np.where(kept, KEPT, 1).astype(np.int8), scores, keys, cfg, epoch)
        w = np.zeros(kept.shape)
        np.put_along_axis(w, np.maximum(chosen, 0), (chosen >= 0).astype(float), axis=1)
        return w
    order = np.cumsum(kept, axis=1)
    if cfg.strategy == "top":
        return (kept & (order <= n)).astype(float)
    pool = kept & (order <= hardest_pool_size(cfg)) if cfg.strategy == "hardest" else kept
    size = pool.sum(axis=1, keepdims=True)
    return pool * np.minimum(1.0, n / np.maximum(size, 1))


def wilson(x: float, n: float, n_eff: float) -> tuple[float, float]:
    """95% Wilson interval of the rate x / n, with the sample size deflated to n_eff for clustered pairs."""
    if n <= 0:
        return 0.0, 1.0
    p, m = x / n, max(n_eff, 1.0)
    centre = (p + Z95 ** 2 / (2 * m)) / (1 + Z95 ** 2 / m)
    half = Z95 * math.sqrt(p * (1 - p) / m + Z95 ** 2 / (4 * m * m)) / (1 + Z95 ** 2 / m)
    return max(0.0, centre - half), min(1.0, centre + half)


def estimate(fn: np.ndarray, total: np.ndarray) -> dict:
    """FN rate of the sampled negatives from per-query expected counts, with a 95% interval.

    Negatives of one query are not independent draws, so the interval uses the ratio estimator's cluster variance
    (effective sample size r(1-r)/var, at most the number of pairs; the number of queries when no FN was seen).
    That variance says little when few queries hold a true match (one such query gives nearly no variance), so the
    design effect it implies is shrunk towards full clustering (one draw per query) with the weight of
    PRIOR_CLUSTERED queries: a lucky sample of reviewed queries no longer gives a narrow interval."""
    x, n, nq = float(fn.sum()), float(total.sum()), int((total > 0).sum())
    if n <= 0:
        return {"fn_rate": None, "low": None, "high": None, "pairs": 0, "queries": 0}
    r = x / n
    n_eff = float(nq)
    if 0 < r < 1 and nq > 1:
        mean = n / nq
        var = float(((fn - r * total)[total > 0] ** 2).sum()) / (nq - 1) / (nq * mean * mean)
        n_eff = min(n, r * (1 - r) / var) if var > 0 else n
        with_fn = int((fn > 0).sum())
        deff = (with_fn * n / n_eff + PRIOR_CLUSTERED * n / nq) / (with_fn + PRIOR_CLUSTERED)
        n_eff = n / deff
    low, high = wilson(x, n, n_eff)
    return {"fn_rate": round(r, 6), "low": round(low, 6), "high": round(high, 6), "pairs": int(round(n)),
            "queries": nq}


@dataclasses.dataclass
class DatasetEvidence:
    """One dataset's candidates as calibration sees them (a fixed subset of queries for coverage)."""

    block: CandidateBlock     # evidence queries first, then others (for coverage)
    labels: np.ndarray        # (nq, k) int8
    keys: np.ndarray
    counts: dict              # pairs of true matches per kind of evidence
    evidence_rows: np.ndarray  # rows of `block` that carry evidence
    source: str = "group/multi_positive"  # which labels the estimate rests on
    pos_score: Optional[np.ndarray | dict] = None  # the dataset's query-positive scores, or their caps (score_cap)
    masks: dict = dataclasses.field(default_factory=dict)  # (bare, threshold, value) -> what it keeps (one base config)

    def cap_scores(self) -> np.ndarray | dict:
        return self.block.pos_score if self.pos_score is None else self.pos_score

    def kept(self, filters: FilterConfig, thresholds: dict, ctx: FilterContext, bare: bool) -> np.ndarray:
        """What `filters` with `thresholds` keep: every filter, on every query (`bare`: without the filters that
        remove the evidence, on the evidence queries). A candidate is kept when no filter drops it, and each filter
        looks at the candidate alone, so this is the AND of what each threshold keeps on its own (computed once
        per value by filter_candidates itself): the same verdicts, hundreds of times faster over the grid."""
        if bare:
            filters = dataclasses.replace(filters, same_group=False, other_positive=False)
            ctx = dataclasses.replace(ctx, item_groups=np.zeros(0, np.int64), positives=np.zeros(0, np.int64),
                                      blocked=np.zeros(0, np.int64))
        if filters.margin_cap != "either" and thresholds.get("margin_rel") is not None:
            # the margin and the cap combine per query (not an AND of what each keeps): filter with the whole setting
            block = self.evidence_block() if bare else self.block
            whole = resolve(with_thresholds(filters, thresholds), self.cap_scores())
            return filter_candidates(block, whole, ctx) == KEPT
        out = None
        for key in THRESHOLD_KEYS:
            value = thresholds.get(key, 0 if key == "min_rank" else None)
            if (bare, key, value) not in self.masks:
                block = self.evidence_block() if bare else self.block
                alone = resolve(with_thresholds(filters, {key: value}), self.cap_scores())
                self.masks[bare, key, value] = filter_candidates(block, alone, ctx) == KEPT
            out = self.masks[bare, key, value] if out is None else out & self.masks[bare, key, value]
        return out

    def evidence_block(self) -> CandidateBlock:
        return CandidateBlock(*(getattr(self.block, f.name)[self.evidence_rows]
                                for f in dataclasses.fields(CandidateBlock) if f.name != "judge_drop"))


def score_setting(ev: DatasetEvidence, filters: FilterConfig, thresholds: dict, ctx: FilterContext,
                  sample: SampleConfig, epoch: int) -> dict:
    """Estimated FN rate, share of queries full and mean sampled-negative score of one threshold setting.

    Coverage and hardness come from every filter as the run applies it; the FN rate from the same thresholds with
    the filters that would remove the evidence (group, other positives, blocklist, judge) switched off."""
    real = ev.kept(filters, thresholds, ctx, bare=False)
    w = selection_weights(real, ev.block.scores, ev.keys, sample, epoch)
    full = float((real.sum(axis=1) >= sample.n_negatives).mean()) if len(real) else 0.0
    mean_neg = float((w * np.where(real, ev.block.scores, 0)).sum() / w.sum()) if w.sum() else 0.0
    rows = ev.evidence_rows
    kept = ev.kept(filters, thresholds, ctx, bare=True)
    lab = ev.labels[rows]
    we = selection_weights(kept, ev.block.scores[rows], ev.keys[rows], sample, epoch) * (lab >= 0)
    est = estimate((we * (lab == 1)).sum(axis=1), we.sum(axis=1))
    return {**thresholds, **est, "score_cap": score_cap(thresholds.get("positive_quantile"), ev.cap_scores()),
            "queries_full": round(full, 6), "mean_neg_score": round(mean_neg, 6)}


def calibrate_dataset(ev: DatasetEvidence, base: FilterConfig, ctx: FilterContext, sample: SampleConfig,
                      epoch: int, target: float, search: bool) -> dict:
    """The chosen thresholds (searched when `search`, else the configured ones), their estimate and the curve."""
    settings = grid(base) if search else grid(base)[:1]
    scored = [score_setting(ev, base, s, ctx, sample, epoch) for s in settings]
    configured = scored[0]
    sure = [s for s in scored if s["high"] is not None and s["high"] <= target]
    if not search:
        chosen = configured
    elif sure:  # the evidence shows the target met (the interval's upper end): the most full queries, hardest
        chosen = max(sure, key=lambda s: (s["queries_full"], s["mean_neg_score"]))
    elif configured["low"] is not None and configured["low"] <= target:
        chosen = configured  # too little evidence to move the configured thresholds safely either way
    else:  # the evidence shows the configured thresholds miss the target: the lowest estimated FN rate, then the
        # most full queries
        chosen = min((s for s in scored if s["fn_rate"] is not None), default=configured,
                     key=lambda s: (s["fn_rate"], -s["queries_full"], -s["mean_neg_score"]))
    return {"evidence": {**ev.counts, "queries": int(len(ev.evidence_rows)), "estimated_from": ev.source,
                         "true_match_pairs": int((ev.labels[ev.evidence_rows] == 1).sum()),
                         "negative_pairs": int((ev.labels[ev.evidence_rows] == 0).sum())},
            "calibrated": search, "target_fn_rate": target, "target_met": bool(chosen["fn_rate"] is not None
                                                                                 and chosen["fn_rate"] <= target),
            "thresholds": {k: chosen[k] for k in THRESHOLD_KEYS}, "score_cap": chosen["score_cap"],
            "estimate": {k: chosen[k] for k in ("fn_rate", "low", "high", "pairs", "queries")},
            "queries_full": chosen["queries_full"], "mean_neg_score": chosen["mean_neg_score"],
            "configured": {k: configured[k] for k in ("fn_rate", "queries_full", "mean_neg_score")},
            "curve": pareto(scored)}


def pareto(scored: list[dict]) -> list[dict]:
    """The trade-off curve: settings no other setting beats on FN rate, queries full and negative hardness at once."""
    pts = [s for s in scored if s["fn_rate"] is not None]
    front = [s for s in pts if not any(o["fn_rate"] <= s["fn_rate"] and o["queries_full"] >= s["queries_full"]
                                       and o["mean_neg_score"] >= s["mean_neg_score"] and o != s
                                       and (o["fn_rate"], -o["queries_full"], -o["mean_neg_score"])
                                       != (s["fn_rate"], -s["queries_full"], -s["mean_neg_score"]) for o in pts)]
    keys = ("fn_rate", "queries_full", "mean_neg_score", *THRESHOLD_KEYS)
    metrics = lambda s: (s["fn_rate"], -s["queries_full"], -s["mean_neg_score"])  # noqa: E731
    curve, seen = [], set()
    for s in sorted(front, key=lambda s: (metrics(s), repr(s))):
        if metrics(s) not in seen:
            seen.add(metrics(s))
            curve.append({k: s[k] for k in keys})
    return curve


def calibrate(block: CandidateBlock, datasets: np.ndarray, keys: np.ndarray, ctx: FilterContext,
              filters: FilterConfig, sample: SampleConfig, epoch: int,
              judge_seen: Optional[np.ndarray] = None, reviewed: Optional[np.ndarray] = None,
              pos_scores: Optional[dict] = None) -> tuple[dict[str, FilterConfig], dict]:
    """Per dataset: the filter config to mine with and what `_stats.json` says under `false_negatives`.

    `block` holds every query of the epoch; `judge_seen` (nq, k) marks the candidates the judge scored;
    `reviewed` the query rows a person reviewed. `pos_scores` ({dataset: its caps per quantile of `cap_quantiles`,
    or every query-positive score}) gives the score cap when `block` holds a subset of the queries (the per-block
    evidence of pipeline/epoch.py)."""
    labels, found, strength = evidence_labels(block, ctx, judge_seen, reviewed)
    # with a judge, the thresholds stay as configured (the judge saw what they keep): its verdicts give the estimate
    search = filters.calibrate == "auto" and judge_seen is None
    configs, report = {}, {}
    for ds in sorted(np.unique(datasets).tolist()):
        rows = np.flatnonzero(datasets == ds)
        rows = rows[np.argsort(keys[rows], kind="stable")]  # a fixed order: the same subset whatever the workers
        # the most complete labels that enough queries have: reviewed by a person, else judged, else known matches
        # only (group / multi-positive evidence calls every other candidate a negative, true of fewer data sets)
        levels = [lv for lv in (3, 2, 1) if (strength[rows] >= lv).sum() >= MIN_EVIDENCE_QUERIES] or \
            [int(strength[rows].max()) if len(rows) else 0]
        has = (strength[rows] >= levels[0]) & (strength[rows] > 0)
        evidence = np.concatenate([rows[has][:MAX_QUERIES], rows[~has][:MAX_QUERIES]])
        n_ev = int(min(has.sum(), MAX_QUERIES))
        counts = {kind: int(found[kind][rows].sum()) for kind in EVIDENCE_KINDS if kind in found
                  and found[kind][rows].any()}
        pos_score = block.pos_score[rows] if pos_scores is None else pos_scores[ds]
        if not n_ev:
            configs[ds] = resolve(filters, pos_score)
            report[ds] = {"evidence": None, "calibrated": False,
                          "note": "no evidence of true matches in this dataset: the configured thresholds apply",
                          "thresholds": {k: getattr(filters, k) for k in THRESHOLD_KEYS},
                          "score_cap": score_cap(filters.positive_quantile, pos_score)}
            continue
        sub = CandidateBlock(*(None if v is None else v[evidence]
                               for v in (getattr(block, f.name) for f in dataclasses.fields(CandidateBlock))))
        source = ("group/multi_positive", "judge", "blocklist")[levels[0] - 1]
        ev = DatasetEvidence(sub, labels[evidence], keys[evidence], counts, np.arange(n_ev), source, pos_score)
        enough = n_ev >= MIN_EVIDENCE_QUERIES  # a handful of queries estimates, but does not move thresholds
        report[ds] = calibrate_dataset(ev, filters, ctx, sample, epoch, filters.target_fn_rate, search and enough)
        if search and not enough:
            report[ds]["note"] = (f"{n_ev} queries of evidence: fewer than {MIN_EVIDENCE_QUERIES}, the configured "
                                  "thresholds stay")
        configs[ds] = resolve(with_thresholds(filters, report[ds]["thresholds"]) if report[ds]["calibrated"]
                              else filters, pos_score)
    return configs, report


def filter_by_dataset(block: CandidateBlock, datasets: np.ndarray, configs: dict[str, FilterConfig],
                      ctx: FilterContext) -> np.ndarray:
    """filter_candidates with each dataset's own (calibrated) thresholds."""
    names = np.unique(datasets)
    if len(names) == 1:
        return filter_candidates(block, configs[str(names[0])], ctx)
    verdict = np.empty(block.cand.shape, np.int8)
    for ds in names:
        rows = np.flatnonzero(datasets == ds)
        part = CandidateBlock(*(None if v is None else v[rows]
                                for v in (getattr(block, f.name) for f in dataclasses.fields(CandidateBlock))))
        verdict[rows] = filter_candidates(part, configs[str(ds)], ctx)
    return verdict


def summary_lines(report: dict) -> list[str]:
    """The run summary's lines on false negatives, one per dataset."""
    lines = []
    for ds, r in sorted(report.items()):
        if r.get("evidence") is None:
            cap = r.get("score_cap")
            lines.append(f"  {ds}: no evidence of false negatives (no group key, repeated queries, marks or judge);"
                         " configured thresholds apply" + ("" if cap is None else
                                                           f", scores capped at {cap:.3f} (positive_quantile "
                                                           f"{r['thresholds'].get('positive_quantile')})")
                         + ", FN rate not estimated")
            continue
        e, est = r["evidence"], r["estimate"]
        kinds = ", ".join(f"{k} {v}" for k, v in e.items() if k in EVIDENCE_KINDS) or (
            f"{e.get('estimated_from', 'the evidence')}: no true match among the retrieved candidates")
        chosen = ", ".join(f"{k}={v}" for k, v in r["thresholds"].items() if v not in (None, 0)) + (
            f" (score cap {r['score_cap']:.3f})" if r.get("score_cap") is not None else "")
        rate = "n/a" if est["fn_rate"] is None else (f"{100 * est['fn_rate']:.2f}% "
                                                     f"[{100 * est['low']:.2f}, {100 * est['high']:.2f}]")
        lines.append(f"  {ds}: estimated FN rate {rate} on {est['pairs']} pairs of {e['queries']} queries "
                     f"(evidence: {kinds}); {'calibrated' if r['calibrated'] else 'configured'}: {chosen or 'none'}; "
                     f"{100 * r['queries_full']:.1f}% of queries full"
                     + ("" if r["target_met"] or not r["calibrated"] else
                        f"; target {100 * r['target_fn_rate']:.1f}% not met on this grid"))
    return lines


RELABEL_REASONS = ("other_positive", "same_group", "blocklist", "judge")  # drops the evidence calls true matches


def with_extra_positives(train: pa.Table, verdict: np.ndarray, block: CandidateBlock, keep: np.ndarray,
                         item_ids: pa.Array, texts: pa.Array, images: pa.Array) -> pa.Table:
    """`filters.relabel`: the candidates dropped as known true matches become the row's extra positives
    (`pos_extra_item_ids`, `pos_extra_text`, `pos_extra_image_path`, `pos_extra_scores`: teacher scores)."""
    sel = np.isin(verdict, [REASONS.index(r) + 1 for r in RELABEL_REASONS])[keep]
    flat = pa.array(block.cand[keep][sel])
    offsets = pa.array(np.concatenate([[0], np.cumsum(sel.sum(axis=1))]).astype(np.int32))
    columns = {"pos_extra_item_ids": item_ids.take(flat), "pos_extra_text": texts.take(flat),
               "pos_extra_image_path": images.take(flat),
               "pos_extra_scores": pa.array(block.scores[keep][sel], pa.float32())}
    for name, values in columns.items():
        train = train.append_column(name, pa.ListArray.from_arrays(offsets, values))
    return train
