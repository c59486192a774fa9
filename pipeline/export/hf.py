"""A Hugging Face dataset folder: `data/train-*.parquet` (the training rows as mined, every column) and a
`README.md` dataset card whose front matter names the data files and whose body says how the set was mined
(lineage, config, statistics, and the false-negative estimate when `_stats.json` has one). Ready for
`datasets.load_dataset(DIR)` and for `huggingface-cli upload` / `push_to_hub`.
"""
from __future__ import annotations

import json

import yaml

from ..calibrate import EVIDENCE_KINDS
from ..stats import EpochStats
from .common import ParquetPartWriter, card_front_matter


def write(source, folder, lineage, options) -> dict:
    writer = ParquetPartWriter(folder, source.schema(), lineage)
    for batch in source.batches():
        writer.write(batch)
    writer.close()
    counts = {"queries": writer.rows, "rows": writer.rows}
    folder.stage("README.md").write_text(card(source, lineage, counts))
    return counts


def estimate_rows(stats: dict) -> list[str]:
    """The card's false-negative table, one row per dataset, from the miner's `_stats.json` `false_negatives`."""
    per_dataset = (stats.get("false_negatives") or {}).get("per_dataset") or {}
    rows = ["| dataset | estimated FN rate (95% interval) | pairs | evidence | thresholds |", "|---|---|---|---|---|"]
    for ds, r in sorted(per_dataset.items()):
        est = r.get("estimate") or {}
        if r.get("evidence") is None or est.get("fn_rate") is None:
            rows.append(f"| {ds} | not estimated: no evidence of true matches | | | |")
            continue
        kinds = ", ".join(f"{k} {v}" for k, v in r["evidence"].items() if k in EVIDENCE_KINDS) or "none found"
        chosen = ", ".join(f"{k}={v}" for k, v in (r.get("thresholds") or {}).items() if v not in (None, 0))
        rows.append(f"| {ds} | {100 * est['fn_rate']:.2f}% ({100 * est['low']:.2f}-{100 * est['high']:.2f}%) | "
                    f"{est['pairs']} | {kinds} | {chosen or 'as configured'} |")
    return rows if per_dataset else []


def card(source, lineage: dict, counts: dict) -> str:
    stats = source.stats
    tags = {"tags": ["hardneg", "hard-negatives", "embedding-training"],
            "task_categories": ["feature-extraction", "sentence-similarity"]}
    lines = [card_front_matter({"default": {"train": "data/train-*.parquet"}}, tags),
             f"\n# Hard negatives mined by hardneg (epoch {source.epoch})\n",
             f"{counts['rows']} training rows, one per query: query, positive and mined negatives with the teacher's "
             "scores and ranks (columns: docs/output-schema.md of hardneg).\n",
             "## Lineage\n", "| | |", "|---|---|"]
    fp = lineage["teacher_fingerprint"]
    for label, value in (("hardneg version", lineage["hardneg_version"]), ("epoch", lineage["epoch"]),
                         ("config hash (sha256)", lineage["config_hash"]),
                         ("teacher model", lineage["teacher_model"]),
                         ("teacher fingerprint (query)", fp.get("query")),
                         ("teacher fingerprint (candidate)", fp.get("candidate")),
                         ("retrieval id", lineage["retrieval_id"]), ("manifest sha256", lineage["manifest_sha256"])):
        lines.append(f"| {label} | `{value}` |")
    lines += ["", "## False-negative estimate\n"]
    lines += estimate_rows(stats) or ["Not estimated for this run (mined before hardneg estimated it)."]
    lines += ["", "## Statistics\n", "```", _summary(stats), "```",
              "", "## Mining config\n", "```yaml", yaml.safe_dump(source.config, sort_keys=True).rstrip(), "```", ""]
    return "\n".join(lines)


def _summary(stats: dict) -> str:
    """The miner's own summary of `_stats.json`; its JSON when the summary does not know a newer layout."""
    try:
        return EpochStats.summary_text(stats)
    except (KeyError, TypeError):
        return json.dumps({k: v for k, v in stats.items() if k not in ("embed", "retrieval")}, indent=1,
                          sort_keys=True, default=str)
