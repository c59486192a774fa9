"""FlagEmbedding (BGE) fine-tuning data: JSON lines `query`, `pos`, `neg`, `pos_scores`, `neg_scores`, `prompt`.

One file (or more, by size) per dataset: FlagEmbedding treats each file of `--train_data DIR` as one dataset (what
`same_dataset_within_batch` groups by). The scores are the teacher's, for `--knowledge_distillation True`; `prompt`
is the query instruction the teacher used for that dataset ('' when none). Queries without text or without any
negative are left out and counted: FlagEmbedding's sampler needs at least one negative.
"""
from __future__ import annotations

from .common import ExportError, JsonlWriter, query_prompt, safe_name


def write(source, folder, lineage, options) -> dict:
    counts = {"queries": 0, "rows": 0, "queries_without_text": 0, "queries_without_negatives": 0,
              "negatives_without_text": 0, "files": {}}
    writer, current = None, None
    for batch in source.batches(["dataset", "qry", "pos_text", "pos_score", "neg_text", "neg_scores"]):
        for r in batch.to_pylist():
            counts["queries"] += 1
            if not r["qry"].strip() or not r["pos_text"].strip():
                counts["queries_without_text"] += 1
                continue
            negs = [(t, s) for t, s in zip(r["neg_text"], r["neg_scores"]) if t.strip()]
            counts["negatives_without_text"] += len(r["neg_text"]) - len(negs)
            if not negs:
                counts["queries_without_negatives"] += 1
                continue
            if r["dataset"] != current:
                if writer is not None:
                    counts["files"][current] = writer.close()
                current = r["dataset"]
                writer = JsonlWriter(folder, prefix=safe_name(current))
            writer.write([{"query": r["qry"], "pos": [r["pos_text"]], "neg": [t for t, _ in negs],
                           "pos_scores": [r["pos_score"]], "neg_scores": [s for _, s in negs],
                           "prompt": query_prompt(source.config, r["dataset"])}])
            counts["rows"] += 1
    if writer is not None:
        counts["files"][current] = writer.close()
    if not counts["rows"]:
        raise ExportError(f"no row of epoch {source.epoch} has a text query, a text positive and a text negative "
                          f"({counts}); FlagEmbedding trains text models")
    return counts
