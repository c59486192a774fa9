"""Tevatron training data in its JSON-lines layout with inline passages: `query_id`, `query`, `positive_passages`,
`negative_passages`, each passage `{docid, title, text, score}` (docid: hardneg's item id; title: ''; score: the
teacher's). Tevatron's loader joins `title + ' ' + text`. Queries without text or without a negative are counted
and left out (its sampler draws from a non-empty negative list).
"""
from __future__ import annotations

from .common import ExportError, JsonlWriter


def write(source, folder, lineage, options) -> dict:
    counts = {"queries": 0, "rows": 0, "queries_without_text": 0, "queries_without_negatives": 0,
              "negatives_without_text": 0}
    writer = JsonlWriter(folder, prefix="train")
    for batch in source.batches(["query_id", "qry", "pos_text", "pos_item_id", "pos_score", "neg_text",
                                 "neg_item_ids", "neg_scores"]):
        for r in batch.to_pylist():
            counts["queries"] += 1
            if not r["qry"].strip() or not r["pos_text"].strip():
                counts["queries_without_text"] += 1
                continue
            negs = [{"docid": i, "title": "", "text": t, "score": s}
                    for t, i, s in zip(r["neg_text"], r["neg_item_ids"], r["neg_scores"]) if t.strip()]
            counts["negatives_without_text"] += len(r["neg_text"]) - len(negs)
            if not negs:
                counts["queries_without_negatives"] += 1
                continue
            writer.write([{"query_id": r["query_id"], "query": r["qry"],
                           "positive_passages": [{"docid": r["pos_item_id"], "title": "", "text": r["pos_text"],
                                                  "score": r["pos_score"]}],
                           "negative_passages": negs}])
            counts["rows"] += 1
    writer.close()
    if not counts["rows"]:
        raise ExportError(f"no row of epoch {source.epoch} has a text query, positive and negative ({counts})")
    return counts
