"""Statistics of one epoch, accumulated shard by shard: what `_stats.json` and the run summary say.

Score statistics are exact without the driver holding the scores: block tasks return counts, an exact integer sum
and histograms, and the quantiles are found by selection on each float32 score's 32-bit order key. Pass 1 counts
the keys' top 16 bits; the driver finds the bins that hold the ranks np.quantile interpolates between; pass 2
(`key_counts` on the written shards) counts the keys inside those bins, which pins each rank to its value. The
driver holds at most 65,536 counts per bin and score kind, whatever the number of queries or blocks. The
per-dataset positive-score caps (`positive_score_caps`) are found the same way, from block tasks' histograms.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .calibrate import summary_lines
from .executor import map_blocks
from .filters import REASONS, count_drops

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HIST_EDGES = np.round(np.linspace(-1.0, 1.0, 41), 3)
KINDS = ("pos", "neg", "margin")
SCORE_COLUMNS = ["pos_score", "neg_scores", "num_negatives"]
SIGN = np.uint32(1 << 31)
LOW_BITS = 16
SUM_SCALE = 172     # every float32 is an integer times 2**-172 (a 24-bit mantissa, exponent >= -148)
SUM_CHUNK = 1 << 28  # float64 sums of 24-bit mantissas stay exact integers below 2**53


def score_arrays(train: pa.Table) -> dict[str, np.ndarray]:
    """The float32 positive, negative and margin (positive minus negative) scores of written train rows."""
    counts = train.column("num_negatives").to_numpy()
    pos = train.column("pos_score").to_numpy()
    neg = train.column("neg_scores").combine_chunks().flatten().to_numpy()
    return {"pos": pos, "neg": neg, "margin": np.repeat(pos, counts) - neg}


def _keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys ordered as the float32 values are: positives get the sign bit set, negatives all bits flipped."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    return np.where(bits & SIGN, ~bits, bits | SIGN)


def _value(key: int) -> float:
    key = np.uint32(key)
    return float((key & ~SIGN if key & SIGN else ~key).view(np.float32))


def _exact_sum(values: np.ndarray) -> int:
    """The sum of finite float32 values times 2**SUM_SCALE, exactly: an integer, so blocks add up to the same total
    in any grouping and order."""
    total = 0
    for start in range(0, len(values), SUM_CHUNK):
        m, e = np.frexp(values[start:start + SUM_CHUNK].astype(np.float64))
        per_exponent = np.bincount(e + SUM_SCALE - 24, weights=m * 2.0 ** 24)
        total += sum(int(s) << int(i) for i, s in enumerate(per_exponent) if s)
    return total


def _add_counts(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sum two sparse histograms (sorted keys, counts)."""
    keys, at = np.unique(np.concatenate([a[0], b[0]]), return_inverse=True)
    counts = np.zeros(len(keys), np.int64)
    np.add.at(counts, at, np.concatenate([a[1], b[1]]))
    return keys, counts


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.uint32), np.zeros(0, np.int64)


def _lerp(a: float, b: float, t: float) -> float:
    """np.quantile's interpolation, operation for operation (numpy's `_lerp`), so results match it bit for bit."""
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


class ScoreStats:
    """One score kind's count, exact sum, fixed-edge histogram and order-key histograms, mergeable in any grouping;
    np.quantile's values at `quantiles`, exactly."""

    def __init__(self, quantiles: tuple = QUANTILES):
        self.quantiles = quantiles
        self.count = self.nan = self.total = 0
        self.special = 0.0                          # sum of the infinite and NaN values (np.mean's result if any)
        self.hist = np.zeros(len(HIST_EDGES) - 1, np.int64)
        self.top = _empty()                         # (top 16 bits of the keys, counts), NaN left out
        self.found = _empty()                       # pass 2: (keys inside the wanted bins, counts)

    def add(self, values: np.ndarray) -> None:
        finite = np.isfinite(values)
        nan = np.isnan(values)
        self.count += len(values)
        self.nan += int(nan.sum())
        if not finite.all():
            self.special += float(values[~finite].astype(np.float64).sum())
        self.total += _exact_sum(values[finite])
        self.hist += np.histogram(np.clip(values.astype(np.float64), -1, 1), bins=HIST_EDGES)[0]
        counts = np.bincount(_keys(values[~nan]) >> LOW_BITS, minlength=1 << (32 - LOW_BITS))
        bins = np.flatnonzero(counts)
        self.top = _add_counts(self.top, (bins.astype(np.uint32), counts[bins]))

    def merge(self, other: "ScoreStats") -> None:
        self.count += other.count
        self.nan += other.nan
        self.total += other.total
        self.special += other.special
        self.hist += other.hist
        self.top = _add_counts(self.top, other.top)

    def _positions(self) -> list[tuple[int, int, float]]:
        """(lower rank, upper rank, weight) per quantile, as np.quantile's "linear" method places them."""
        n, out = self.count, []
        for q in self.quantiles:
            virtual = (n - 1) * q
            if virtual >= n - 1:  # numpy takes the last value twice, weighted virtual - (-1)
                out.append((n - 1, n - 1, virtual + 1))
            else:
                lower = int(np.floor(virtual))
                out.append((lower, lower + 1, virtual - lower))
        return out

    def wanted(self) -> np.ndarray:
        """The top-16-bit bins that hold the ranks the quantiles need (none when there are none to compute)."""
        if not self.count or self.nan:
            return np.zeros(0, np.uint32)
        ranks = [r for lo, hi, _ in self._positions() for r in (lo, hi)]
        cum = np.cumsum(self.top[1])
        return np.unique(self.top[0][np.searchsorted(cum, ranks, side="right")]).astype(np.uint32)

    def add_found(self, found: tuple[np.ndarray, np.ndarray]) -> None:
        self.found = _add_counts(self.found, found)

    def _ranked(self, rank: int) -> float:
        tops, counts = self.top
        cum = np.cumsum(counts)
        i = int(np.searchsorted(cum, rank, side="right"))
        keys, kcounts = self.found
        inside = (keys >> LOW_BITS) == tops[i]
        j = int(np.searchsorted(np.cumsum(kcounts[inside]), rank - (cum[i] - counts[i]), side="right"))
        return _value(keys[inside][j])

    def values(self) -> list[float]:
        """np.quantile's value at each of `quantiles` (NaN when a value is NaN); needs pass 2's counts."""
        return [float("nan") if self.nan else _lerp(self._ranked(lower), self._ranked(upper), weight)
                for lower, upper, weight in self._positions()]

    def describe(self) -> dict:
        """Count, mean, quantiles (np.quantile's, exactly) and the fixed-edge histogram (epochs compare bin for bin)."""
        if not self.count:
            return {"count": 0}
        mean = self.special if self.special != 0 else self.total / (self.count << SUM_SCALE)
        quantiles = {f"p{int(q * 100)}": round(v, 5) for q, v in zip(self.quantiles, self.values())}
        return {"count": self.count, "mean": round(mean, 5), "quantiles": quantiles,
                "histogram": {"edges": HIST_EDGES.tolist(), "counts": self.hist.tolist()}}


def key_counts(train: pa.Table, wanted: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pass 2 of one shard: per score kind, the order keys that fall in the wanted bins, with their counts."""
    return {kind: found_keys(values, wanted[kind]) for kind, values in score_arrays(train).items()
            if len(wanted[kind])}


def found_keys(values: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2 of one array: its order keys that fall in the `wanted` bins, with their counts."""
    keys = _keys(values[~np.isnan(values)])
    return np.unique(keys[np.isin(keys >> LOW_BITS, wanted)], return_counts=True)


def positive_score_caps(specs: list, scores, quantiles, use_ray: bool, again=None) -> dict[str, dict]:
    """{dataset: {quantile: score cap}} of the positive scores that `scores(spec)` gives per block ({dataset: float32
    scores}): the floats `calibrate.score_cap` gives on all of them at once, without the driver holding a score (it
    holds per dataset the blocks' merged order-key histograms). Pass 2 reads the scores again by `again(spec)`
    (default `scores`: a block task that computes them may keep them for it)."""
    quantiles = tuple(sorted(set(quantiles)))
    if not quantiles:
        return {}
    merged: dict[str, ScoreStats] = {}
    for part in map_blocks(_caps_pass, [(scores, spec, quantiles, None) for spec in specs], use_ray):
        for ds, part_stats in part.items():
            merged.setdefault(ds, ScoreStats(quantiles)).merge(part_stats)
    wanted = {ds: s.wanted() for ds, s in merged.items()}
    if any(len(w) for w in wanted.values()):
        for part in map_blocks(_caps_pass, [(again or scores, spec, quantiles, wanted) for spec in specs], use_ray):
            for ds, found in part.items():
                merged[ds].add_found(found)
    return {ds: dict(zip(quantiles, [float(np.float32(v)) for v in s.values()] if s.count else [None] * len(quantiles)))
            for ds, s in merged.items()}


def _caps_pass(task) -> dict:
    """One block of `positive_score_caps`: per dataset, pass 1's ScoreStats or pass 2's keys in the wanted bins, of
    its finite scores (`score_cap` leaves out the others)."""
    scores, spec, quantiles, wanted = task
    out = {}
    for ds, values in scores(spec).items():
        finite = values[np.isfinite(values)]
        if wanted is None:
            out[ds] = ScoreStats(quantiles)
            out[ds].add(finite)
        elif len(wanted.get(ds, ())):
            out[ds] = found_keys(finite, wanted[ds])
    return out


class EpochStats:
    def __init__(self, n_negatives: int, rows_in: int):
        self.n_negatives = n_negatives
        self.rows_in = rows_in
        self.drops = dict.fromkeys(REASONS, 0)
        self.per_dataset: dict[str, dict] = {}
        self.neg_counts = np.zeros(n_negatives + 1, np.int64)
        self.scores = {kind: ScoreStats() for kind in KINDS}

    def _dataset(self, ds: str) -> dict:
        return self.per_dataset.setdefault(ds, {"queries": 0, "written": 0, "negatives": 0, "shortfall_queries": 0,
                                                "drops": dict.fromkeys(REASONS, 0)})

    def add(self, train: pa.Table, verdict: np.ndarray, keep: np.ndarray, datasets: np.ndarray) -> None:
        for reason, n in count_drops(verdict).items():
            self.drops[reason] += n
        for ds in np.unique(datasets):
            rows = datasets == ds
            entry = self._dataset(str(ds))
            entry["queries"] += int(rows.sum())
            for reason, n in count_drops(verdict[rows]).items():
                entry["drops"][reason] += n
        if not train.num_rows:
            return
        counts = train.column("num_negatives").to_numpy()
        self.neg_counts += np.bincount(counts, minlength=self.n_negatives + 1)
        for kind, values in score_arrays(train).items():
            self.scores[kind].add(values)
        written_ds = train.column("dataset").to_numpy(zero_copy_only=False)
        for ds in np.unique(written_ds):
            rows = written_ds == ds
            entry = self.per_dataset[str(ds)]
            entry["written"] += int(rows.sum())
            entry["negatives"] += int(counts[rows].sum())
            entry["shortfall_queries"] += int((counts[rows] < self.n_negatives).sum())

    def merge(self, other: "EpochStats") -> None:
        """Add another block's statistics (blocks are merged in block order, so the epoch's are the same)."""
        for reason, n in other.drops.items():
            self.drops[reason] += n
        for ds, part in other.per_dataset.items():
            entry = self._dataset(ds)
            for key in ("queries", "written", "negatives", "shortfall_queries"):
                entry[key] += part[key]
            for reason, n in part["drops"].items():
                entry["drops"][reason] += n
        self.neg_counts += other.neg_counts
        for kind, part in other.scores.items():
            self.scores[kind].merge(part)

    def wanted(self) -> dict[str, np.ndarray] | None:
        """Per score kind, the bins pass 2 must count keys in (`key_counts`); None when no quantile needs any."""
        wanted = {kind: s.wanted() for kind, s in self.scores.items()}
        return wanted if any(len(w) for w in wanted.values()) else None

    def add_found(self, found: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Add one shard's pass-2 key counts."""
        for kind, part in found.items():
            self.scores[kind].add_found(part)

    def finish(self, rejects: list[dict]) -> dict:
        written = int(self.neg_counts.sum())
        query_rejects = [r for r in rejects if r["kind"] == "query"]
        reasons: dict[str, int] = {}
        for r in query_rejects:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        total = self.scores["neg"].count
        return {
            "queries_in": self.rows_in, "queries_written": written, "queries_rejected": len(query_rejects),
            "rejects_by_reason": dict(sorted(reasons.items())),
            "negatives": {"requested_per_query": self.n_negatives, "total": total,
                          "mean_per_query": round(float(total / written), 4) if written else 0.0,
                          "per_query_histogram": {str(i): int(n) for i, n in enumerate(self.neg_counts)}},
            "shortfall_queries": int(self.neg_counts[:self.n_negatives].sum()),
            "drops": self.drops,
            "scores": {kind: s.describe() for kind, s in self.scores.items()},
            "per_dataset": self.per_dataset,
        }

    @staticmethod
    def summary_text(stats: dict) -> str:
        lines = [f"queries: {stats['queries_in']} in, {stats['queries_written']} written, "
                 f"{stats['queries_rejected']} rejected {stats['rejects_by_reason'] or ''}".rstrip(),
                 f"negatives per query: {stats['negatives']['mean_per_query']} of "
                 f"{stats['negatives']['requested_per_query']} asked "
                 f"({stats['shortfall_queries']} queries short)"]
        drops = {k: v for k, v in stats["drops"].items() if v}
        lines.append("dropped candidates: " + (", ".join(f"{k} {v}" for k, v in drops.items()) or "none"))
        for name in ("pos", "neg", "margin"):
            d = stats["scores"][name]
            if d.get("count"):
                qs = d["quantiles"]
                lines.append(f"{name:>6} score: p5 {qs['p5']:+.3f}  p50 {qs['p50']:+.3f}  p95 {qs['p95']:+.3f}  "
                             f"(n={d['count']})")
        for ds, entry in sorted(stats["per_dataset"].items()):
            lines.append(f"  {ds}: {entry['written']}/{entry['queries']} queries, "
                         f"{entry['negatives'] / max(entry['written'], 1):.2f} negatives each")
        if stats.get("deepened_queries"):
            lines.append(f"retrieved deeper: {stats['deepened_queries']} queries left short by the filters")
        fn = stats.get("false_negatives")
        if fn:
            lines.append(f"false negatives (target {100 * fn['target_fn_rate']:.1f}%, calibrate {fn['calibrate']}):")
            lines += summary_lines(fn["per_dataset"])
        return "\n".join(lines)
