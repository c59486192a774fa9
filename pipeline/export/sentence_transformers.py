"""sentence-transformers layouts (the columns its `mine_hard_negatives` writes), as a Parquet dataset folder.

- `triplet`: (anchor, positive, negative), one row per mined negative;
- `n-tuple`: (anchor, positive, negative_1 .. negative_n); queries with fewer than n negatives are left out (counted);
- `labeled-list`: (anchor, documents, labels): the positive and every candidate that passed the filters (sampled or
  not), labels 1 / 0 -- for cross-encoder listwise losses.
`scores=True` adds the teacher's scores: a `scores` list [positive, negative...] for triplet and n-tuple (what
MarginMSE-style losses read), and `scores` in place of `labels` for labeled-list.
Text models only: an item without text (an image alone) cannot be written; such queries / negatives are counted.
"""
from __future__ import annotations

import pyarrow as pa

from .common import ExportError, ParquetPartWriter, card_front_matter, kept_candidates

STYLES = ("triplet", "n-tuple", "labeled-list")


def write(source, folder, lineage, options) -> dict:
    style = options.setdefault("style", "triplet")
    if style not in STYLES:
        raise ExportError(f"unknown sentence-transformers style {style!r}; choose one of: {', '.join(STYLES)}")
    scores = bool(options.get("scores", False))
    n = int(options.get("n_negatives") or source.config.get("sample", {}).get("n_negatives") or 1)
    if style == "n-tuple":
        options["n_negatives"] = n
    schema = _schema(style, scores, n)
    writer = ParquetPartWriter(folder, schema, lineage)
    counts = {"queries": 0, "rows": 0, "queries_without_text": 0, "negatives_without_text": 0,
              "queries_short": 0, "queries_without_negatives": 0}
    if style == "labeled-list":
        items = source.items()
        stream = ((b, kept_candidates(c, items)) for b, c in source.batches_with_candidates(
            ["qry", "pos_text", "pos_score"]))
    else:
        stream = ((b, None) for b in source.batches(["qry", "pos_text", "pos_score", "neg_text", "neg_scores"]))
    for batch, kept in stream:
        rows = {name: [] for name in schema.names}
        for i, r in enumerate(batch.to_pylist()):
            counts["queries"] += 1
            if not r["qry"].strip() or not r["pos_text"].strip():
                counts["queries_without_text"] += 1
                continue
            if kept is None:
                negs = [(t, s) for t, s in zip(r["neg_text"], r["neg_scores"]) if t.strip()]
                counts["negatives_without_text"] += len(r["neg_text"]) - len(negs)
            else:
                negs = [(c["text"], c["score"]) for c in kept[i] if c["text"].strip()]
                counts["negatives_without_text"] += len(kept[i]) - len(negs)
            if not negs:
                counts["queries_without_negatives"] += 1
                continue
            _add(rows, style, scores, n, r, negs, counts)
        table = pa.table(rows, schema=schema)
        counts["rows"] += table.num_rows
        writer.write(table)
    files = writer.close()
    if not files:
        raise ExportError(f"no row of epoch {source.epoch} can be written as sentence-transformers {style} "
                          f"({counts}); is it a text dataset?")
    folder.stage("README.md").write_text(
        card_front_matter({"default": {"train": "data/train-*.parquet"}})
        + f"\n# sentence-transformers {style} export of hardneg run `{lineage['run']}` epoch {source.epoch}\n\n"
        f"Load: `datasets.load_dataset(\"{folder.path}\", split=\"train\")`. Lineage: `_hardneg_export.yaml`.\n")
    return counts


def _schema(style, scores, n) -> pa.Schema:
    if style == "triplet":
        fields = [("anchor", pa.string()), ("positive", pa.string()), ("negative", pa.string())]
    elif style == "n-tuple":
        fields = [("anchor", pa.string()), ("positive", pa.string())] + \
                 [(f"negative_{i}", pa.string()) for i in range(1, n + 1)]
    else:
        fields = [("anchor", pa.string()), ("documents", pa.list_(pa.string())),
                  ("scores" if scores else "labels", pa.list_(pa.float32() if scores else pa.int8()))]
        return pa.schema(fields)
    if scores:
        fields.append(("scores", pa.list_(pa.float32())))
    return pa.schema(fields)


def _add(rows, style, scores, n, r, negs, counts) -> None:
    if style == "triplet":
        for text, s in negs:
            rows["anchor"].append(r["qry"])
            rows["positive"].append(r["pos_text"])
            rows["negative"].append(text)
            if scores:
                rows["scores"].append([r["pos_score"], s])
    elif style == "n-tuple":
        if len(negs) < n:
            counts["queries_short"] += 1
            return
        rows["anchor"].append(r["qry"])
        rows["positive"].append(r["pos_text"])
        for i, (text, _) in enumerate(negs[:n], start=1):
            rows[f"negative_{i}"].append(text)
        if scores:
            rows["scores"].append([r["pos_score"]] + [s for _, s in negs[:n]])
    else:
        rows["anchor"].append(r["qry"])
        rows["documents"].append([r["pos_text"]] + [t for t, _ in negs])
        if scores:
            rows["scores"].append([r["pos_score"]] + [s for _, s in negs])
        else:
            rows["labels"].append([1] + [0] * len(negs))
