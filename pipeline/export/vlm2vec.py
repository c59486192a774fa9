"""VLM2Vec training data: a dataset folder with one config per subset (`dataset`) and split `original`, what
VLM2Vec's loaders open with `load_dataset(DIR, subset, split="original")`.

- `main` (VLM2Vec's `mmeb` loader): one negative per row, `neg_text` / `neg_image_path` scalar strings (it calls
  `neg_text.replace(...)`); a query with k negatives becomes k rows, one with none a row with empty negatives.
- `b3` (the hard-negative `mmeb_neg` loader): the training shards' rows as they are (list-valued negatives).
Image paths stay relative to the run's image root: give it to VLM2Vec as `--image_dir`.
"""
from __future__ import annotations

import pyarrow as pa

from .common import ParquetPartWriter, PerDataset, card_front_matter, dataset_runs, safe_name

SPLIT = "original"
MAIN_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("qry", pa.string()), ("qry_image_path", pa.string()), ("pos_text", pa.string()),
    ("pos_image_path", pa.string()), ("neg_text", pa.string()), ("neg_image_path", pa.string()),
    ("pos_score", pa.float32()), ("neg_score", pa.float32()), ("neg_rank", pa.int32()),
])


def write(source, folder, lineage, options) -> dict:
    layout = options.get("layout", "main")
    schema = MAIN_SCHEMA if layout == "main" else source.schema()
    writers = PerDataset(lambda ds: ParquetPartWriter(folder, schema, lineage, prefix=f"{safe_name(ds)}/{SPLIT}"))
    counts = {"queries": 0, "rows": 0, "per_dataset": {}}
    columns = None if layout == "b3" else ["dataset", *MAIN_SCHEMA.names, "neg_scores", "neg_ranks"]
    for batch in source.batches(columns):
        for ds, run in dataset_runs(batch):
            table = pa.Table.from_batches([run]) if layout == "b3" else _one_negative_per_row(run)
            writers[ds].write(table)
            counts["queries"] += run.num_rows
            counts["rows"] += table.num_rows
            counts["per_dataset"][ds] = counts["per_dataset"].get(ds, 0) + table.num_rows
    files = writers.close()
    configs = {safe_name(ds): {SPLIT: f"{safe_name(ds)}/{SPLIT}-*.parquet"} for ds in files}
    folder.stage("README.md").write_text(
        card_front_matter(configs)
        + f"\n# VLM2Vec ({layout}) export of hardneg run `{lineage['run']}` epoch {source.epoch}\n\n"
        f"Subsets: {', '.join(sorted(configs))}. Images are relative to `{source.image_root}` (`--image_dir`).\n"
        "Lineage: `_hardneg_export.yaml`.\n")
    return counts


def _one_negative_per_row(run: pa.RecordBatch) -> pa.Table:
    rows = {name: [] for name in MAIN_SCHEMA.names}
    for r in run.to_pylist():
        negs = list(zip(r["neg_text"], r["neg_image_path"], r["neg_scores"], r["neg_ranks"])) or [("", "", None, None)]
        for text, image, score, rank in negs:
            for name in ("query_id", "qry", "qry_image_path", "pos_text", "pos_image_path", "pos_score"):
                rows[name].append(r[name])
            rows["neg_text"].append(text)
            rows["neg_image_path"].append(image)
            rows["neg_score"].append(score)
            rows["neg_rank"].append(rank)
    return pa.table(rows, schema=MAIN_SCHEMA)
