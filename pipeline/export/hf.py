"""A Hugging Face dataset folder: `data/train-*.parquet` (the training rows as mined, every column) and a
`README.md` dataset card whose front matter names the data files and whose body says how the set was mined
(lineage, config, statistics, and the false-negative estimate when `_stats.json` has one). Ready for
`datasets.load_dataset(DIR)` and for `huggingface-cli upload` / `push_to_hub`.
"""
from __future__ import annotations

import json

import yaml

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


def false_negative_estimate(stats: dict):
    """The run's false-negative estimate, whatever the miner names it (a top-level `_stats.json` entry)."""
    for key in sorted(stats):
        if "false_neg" in key or key.startswith("fn_"):
            return key, stats[key]
    return None


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
    estimate = false_negative_estimate(stats)
    if estimate is None:
        lines.append("Not estimated for this run (no evidence of true matches was configured).")
    else:
        lines += [f"`{estimate[0]}`:", "```json", json.dumps(estimate[1], indent=2, sort_keys=True), "```"]
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
