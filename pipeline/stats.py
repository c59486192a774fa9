"""Statistics of one epoch, accumulated shard by shard: what `_stats.json` and the run summary say."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .calibrate import summary_lines
from .filters import REASONS, count_drops

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HIST_EDGES = np.round(np.linspace(-1.0, 1.0, 41), 3)


def describe(values: np.ndarray) -> dict:
    """Count, mean, quantiles and a fixed-edge histogram (so epochs and runs compare bin for bin)."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return {"count": 0}
    hist, _ = np.histogram(np.clip(values, -1, 1), bins=HIST_EDGES)
    return {"count": int(len(values)), "mean": round(float(values.mean()), 5),
            "quantiles": {f"p{int(q * 100)}": round(float(np.quantile(values, q)), 5) for q in QUANTILES},
            "histogram": {"edges": HIST_EDGES.tolist(), "counts": hist.tolist()}}


class EpochStats:
    def __init__(self, n_negatives: int, rows_in: int):
        self.n_negatives = n_negatives
        self.rows_in = rows_in
        self.drops = dict.fromkeys(REASONS, 0)
        self.per_dataset: dict[str, dict] = {}
        self.neg_counts = np.zeros(n_negatives + 1, np.int64)
        self.pos, self.neg, self.margin = [], [], []

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
        pos = train.column("pos_score").to_numpy()
        neg = train.column("neg_scores").combine_chunks().flatten().to_numpy()
        self.pos.append(pos)
        self.neg.append(neg)
        self.margin.append(np.repeat(pos, counts) - neg)
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
        self.pos += other.pos
        self.neg += other.neg
        self.margin += other.margin

    def finish(self, rejects: list[dict]) -> dict:
        written = int(self.neg_counts.sum())
        query_rejects = [r for r in rejects if r["kind"] == "query"]
        reasons: dict[str, int] = {}
        for r in query_rejects:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
        return {
            "queries_in": self.rows_in, "queries_written": written, "queries_rejected": len(query_rejects),
            "rejects_by_reason": dict(sorted(reasons.items())),
            "negatives": {"requested_per_query": self.n_negatives, "total": int(cat(self.neg).size),
                          "mean_per_query": round(float(cat(self.neg).size / written), 4) if written else 0.0,
                          "per_query_histogram": {str(i): int(n) for i, n in enumerate(self.neg_counts)}},
            "shortfall_queries": int(self.neg_counts[:self.n_negatives].sum()),
            "drops": self.drops,
            "scores": {"pos": describe(cat(self.pos)), "neg": describe(cat(self.neg)),
                       "margin": describe(cat(self.margin))},
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
