"""Ranked lists for re-ranker training and distillation: per query, the positive and every candidate that passed
the filters (sampled as a negative or not), in the teacher's rank order with its scores.

Parquet dataset folder, one row per query: `query_id`, `dataset`, `query`, `query_image_path`, `positives`
(list of {item_id, text, image_path, score, rank}; rank: the positive's place among the candidates, null when it was
not retrieved) and `candidates` (list of {item_id, text, image_path, score, rank, sampled, source}; source:
`retrieved`, or `input` for a negative the input already had). Listwise KL distillation reads the scores as the
teacher's distribution; MarginMSE reads score(pos) - score(candidate).
"""
from __future__ import annotations

import pyarrow as pa

from .common import ParquetPartWriter, card_front_matter, kept_candidates

DOC = [("item_id", pa.string()), ("text", pa.string()), ("image_path", pa.string()), ("score", pa.float32()),
       ("rank", pa.int32())]
SCHEMA = pa.schema([
    ("query_id", pa.string()), ("dataset", pa.string()), ("query", pa.string()), ("query_image_path", pa.string()),
    ("positives", pa.list_(pa.struct(DOC))),
    ("candidates", pa.list_(pa.struct(DOC + [("sampled", pa.bool_()), ("source", pa.string())]))),
])


def write(source, folder, lineage, options) -> dict:
    writer = ParquetPartWriter(folder, SCHEMA, lineage)
    items = source.items()
    counts = {"queries": 0, "candidates": 0, "candidates_sampled": 0}
    cols = ["query_id", "dataset", "qry", "qry_image_path", "pos_text", "pos_image_path", "pos_item_id", "pos_score"]
    for batch, cands in source.batches_with_candidates(cols):
        kept = kept_candidates(cands, items)
        pos_rank = [dict(zip(c["cand_item_ids"], c["cand_ranks"])) for c in cands.select(
            ["cand_item_ids", "cand_ranks"]).to_pylist()]
        rows = []
        for r, k, ranks in zip(batch.to_pylist(), kept, pos_rank):
            rows.append({"query_id": r["query_id"], "dataset": r["dataset"], "query": r["qry"],
                         "query_image_path": r["qry_image_path"],
                         "positives": [{"item_id": r["pos_item_id"], "text": r["pos_text"],
                                        "image_path": r["pos_image_path"], "score": r["pos_score"],
                                        "rank": ranks.get(r["pos_item_id"])}],
                         "candidates": [{"item_id": c["item_id"], "text": c["text"], "image_path": c["image_path"],
                                         "score": c["score"], "rank": c["rank"],
                                         "sampled": c["verdict"] == "negative", "source": c["source"]}
                                        for c in k]})
            counts["candidates"] += len(k)
            counts["candidates_sampled"] += sum(c["verdict"] == "negative" for c in k)
        counts["queries"] += len(rows)
        writer.write(pa.Table.from_pylist(rows, schema=SCHEMA))
    writer.close()
    folder.stage("README.md").write_text(
        card_front_matter({"default": {"train": "data/train-*.parquet"}})
        + f"\n# Ranked candidates of hardneg run `{lineage['run']}` epoch {source.epoch}\n\n"
        "Every candidate that passed the filters, with the teacher's scores and ranks. Lineage: "
        "`_hardneg_export.yaml`.\n")
    return counts
