"""Extra positives an input row carries (list-valued `pos_text` / `pos_image_path`: the first is the row's positive,
the rest extra; or `pos_extra_text` / `pos_extra_image_path`, the columns `filters.relabel` writes, so a mined epoch
can be read back). The read stage puts their item rows in the queries' `pos_extra_idx` column.

They are positives like the row's own: in the dataset's candidate pool, never a negative of a query with the same
content (the `other_positive` filter, through `pairs`), evidence of true matches for calibration, and written to the
shard's `pos_extra_*` columns (with the teacher's score to the query) for the training dataset and the EGA loss.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

COLUMN = "pos_extra_idx"
SCORES = "pos_extra_score"
CHUNK = 4096
OUTPUT = ("pos_extra_item_ids", "pos_extra_text", "pos_extra_image_path", "pos_extra_scores")


def _flat(queries: pa.Table, name: str = COLUMN) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row of each entry, the entries, per-row list lengths) of a list column."""
    lists = queries.column(name).combine_chunks()
    lengths = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = lists.flatten().to_numpy(zero_copy_only=False)
    return np.repeat(np.arange(len(lengths)), lengths), values, lengths


def _lists(lengths: np.ndarray, values: pa.Array) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), values)


def pairs(queries: pa.Table) -> tuple[np.ndarray, np.ndarray] | None:
    """(query item rows, extra positive item rows) for `filters.query_positives`; None when the input has none."""
    if COLUMN not in queries.column_names:
        return None
    parents, values, _ = _flat(queries)
    return queries.column("qry_idx").to_numpy()[parents].astype(np.int64), values.astype(np.int64)


def without(queries: pa.Table, bad: np.ndarray, column: str = COLUMN) -> pa.Table:
    """The queries with the items flagged in `bad` (item row -> bool) taken out of a list column of item rows (the
    extra positives, or the input negatives)."""
    if column not in queries.column_names:
        return queries
    parents, values, _ = _flat(queries, column)
    ok = ~bad[values.astype(np.int64)]
    lengths = np.bincount(parents[ok], minlength=queries.num_rows)
    field = queries.schema.field(column)
    return queries.set_column(queries.column_names.index(column), field,
                              _lists(lengths, pa.array(values[ok]).cast(field.type.value_type)))


def score(queries: pa.Table, qry_v, cand_v) -> pa.Table:
    """The queries with `pos_extra_score`: the teacher's cosine of the query and each of its extra positives."""
    if COLUMN not in queries.column_names:
        return queries
    parents, values, lengths = _flat(queries)
    rows = values.astype(np.int64)
    out = np.zeros(len(rows), np.float32)
    datasets = queries.column("dataset").to_numpy(zero_copy_only=False)[parents]
    qry_idx = queries.column("qry_idx").to_numpy()[parents]
    for ds in np.unique(datasets):
        sel = np.flatnonzero(datasets == ds)
        for start in range(0, len(sel), CHUNK):
            part = sel[start:start + CHUNK]
            out[part] = np.einsum("id,id->i", qry_v.get(ds, qry_idx[part]), cand_v.get(ds, rows[part]))
    return queries.append_column(SCORES, _lists(lengths, pa.array(out, pa.float32())))


def add_columns(train: pa.Table, queries: pa.Table, rows: np.ndarray, item_ids: pa.Array, texts: pa.Array,
                images: pa.Array) -> pa.Table:
    """The shard rows (queries `rows`, in order) with `pos_extra_*`: the input's extra positives, then the candidates
    `filters.relabel` added (when it ran) that are not among them."""
    if COLUMN not in queries.column_names:
        return train
    from .blocks import take_rows  # columns may be memory-mapped, chunked

    sub = queries.take(pa.array(np.asarray(rows, np.int64)))
    _, values, lengths = _flat(sub)
    scores = sub.column(SCORES).combine_chunks().flatten()
    taken = [take_rows(col, values) for col in (item_ids, texts, images)]
    new = dict(zip(OUTPUT, (*taken, scores.cast(pa.float32()))))
    if OUTPUT[0] not in train.column_names:
        for name in OUTPUT:
            train = train.append_column(name, _lists(lengths, new[name]))
        return train
    # relabel wrote its own lists: per row, the input's first, then relabelled items not already listed
    ours = {name: _lists(lengths, new[name]).to_pylist() for name in OUTPUT}
    theirs = {name: train.column(name).to_pylist() for name in OUTPUT}
    merged = {name: [] for name in OUTPUT}
    for r in range(train.num_rows):
        seen = set(ours[OUTPUT[0]][r])
        keep = [j for j, item in enumerate(theirs[OUTPUT[0]][r]) if item not in seen]
        for name in OUTPUT:
            merged[name].append(ours[name][r] + [theirs[name][r][j] for j in keep])
    for name in OUTPUT:
        train = train.set_column(train.column_names.index(name), name,
                                 pa.array(merged[name], train.schema.field(name).type))
    return train
