"""The read stage as block tasks, so that no one process holds the corpus's texts (the job on Ray).

1. Block tasks over row ranges of each input file (`read.plan_spans`: Parquet row ranges, JSONL line ranges) check
   their rows and images and hash the content (`read.check_pairs`, `read.check_candidates`), as the one-task read
   does, and write what they found as Arrow files: a pairs block its valid rows and their items, a candidates block
   its items, pool members and group pairs. A block does not know the rows of other blocks, so it accepts nothing:
   duplicates are told later. It returns its rejects and counts.
2. One task (`assemble`) runs the dedup over the blocks in input order (`read.Dedup`: hashes of the accepted pairs,
   in files merged a chunk at a time, confirmed in the blocks' files), merges the rejects in input order, and writes
   the state dir's files (`search.write_corpus`'s) a block, an id range or a batch at a time: the items one id range
   at a time (their sorted 16-byte ids to a file it maps), the queries dataset by dataset and block by block (each
   block's accepted rows sorted by dataset: the order, without a sort of all queries), and the codes of positives,
   pools and groups through files by id range (`_Buckets`), each range made unique alone. It copies each batch of
   `items.arrow` and `QUERIES_IN` from the blocks' memory-mapped files and holds no array of the whole corpus: its
   working set does not grow with it (benchmarks/read_memory.py).

The files are byte for byte those of `write_corpus(load_corpus(...))` (tested with several block sizes).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import extra_positives, input_negatives
from .blocks import PARTS, _mmap, exact_batch, open_ipc, take_rows
from .config import InputConfig
from .executor import map_blocks, run_task
from .read import (ID_TYPE, MODALITIES, QUERY_COLUMNS, READ_BLOCK_ROWS, Dedup, InputError, ReadContext,
                   check_candidates, check_columns, check_pairs, check_reject_rate, dataset_of, exact_array, hex_ids,
                   id_view, iter_numbered, jsonl_verdict, pair_items, plan_spans, query_values, row_has_negatives,
                   synthetic_id, without_cyclic_gc)
from .search import CORPUS, QUERIES_IN, CorpusMeta

STAGING = "read"  # the blocks' files, under the state dir, until the read ends
MAX_PARTS = 256
"""At most this many item-id ranges: each block writes a file per range, and the assembling task holds one range's
texts at a time."""
ROW_COLUMNS = {**QUERY_COLUMNS, "_i": pa.int64(), "_has_id": pa.bool_(), "_has_neg": pa.bool_()}
ITEM_COLUMNS = {"item_id": ID_TYPE, "text": pa.string(), "image_path": pa.string(), "embed_text": pa.string()}


@dataclass
class BlockSpec:
    cfg: InputConfig
    caption_mode: bool
    k: int                # the file's index in cfg.pairs; -1: the candidates file
    span: tuple
    out: str              # the block's files: OUT.rows.arrow, OUT.items-PPPP.arrow, OUT.members.arrow ...
    file_dataset: str = ""
    shared: bool = False
    parts: int = 1        # item-id ranges the block's items are written in (`_part`)


@dataclass
class BlockResult:
    error: Optional[InputError] = None
    read_rejects: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # (row i, reject, dataset if it has no id) of failed rows
    post: list = field(default_factory=list)      # (valid row j, reject): its negatives' and extras', if accepted
    rejects: list = field(default_factory=list)   # a candidates block's
    n_rows: int = 0
    n_bad: int = 0
    keysets: list = field(default_factory=list)   # (row i, its keys) of the first 1,000 rows, where they change
    info: dict = field(default_factory=dict)      # a JSONL block's first line (read.jsonl_verdict)


def read_block(spec: BlockSpec) -> BlockResult:
    """One block of one file read, checked and written (see the module docstring); an InputError is returned."""
    result = BlockResult()
    try:
        with without_cyclic_gc():
            if spec.k < 0:
                _candidates_block(spec, result)
            else:
                _pairs_block(spec, result)
    except InputError as exc:
        return BlockResult(error=exc)
    return result


def _pairs_block(spec: BlockSpec, result: BlockResult) -> None:
    ctx = ReadContext.of(spec.cfg, spec.caption_mode)
    path = spec.cfg.pairs[spec.k]
    j = 0
    with _Sinks(spec, {"rows": ROW_COLUMNS}, {**ITEM_COLUMNS, "_row": pa.int32()}) as sinks:
        for rows, numbers, bad in iter_numbered(path, spec.span, result.info):
            result.read_rejects += bad
            for i, row in enumerate(rows[:max(1000 - result.n_rows, 0)]):
                keys = tuple(row)
                if not result.keysets or result.keysets[-1][1] != keys:
                    result.keysets.append((result.n_rows + i, keys))
            rows_out = {name: [] for name in ROW_COLUMNS}
            items_out = {name: [] for name in [*ITEM_COLUMNS, "_row"]}
            for c in check_pairs(ctx, path, rows, numbers, result.n_rows, spec.file_dataset, spec.shared):
                i = result.n_rows
                result.n_rows += 1
                if c.problem is not None:
                    result.problems.append((i, c.problem, None if c.has_id else f"{c.dataset}"))
                    continue
                post: list = []
                negs, extras = pair_items(ctx, c, path, post)
                result.post += [(j, r) for r in post]
                values = query_values(c, negs, extras, spec.k)
                values.update(_i=i, _has_id=c.has_id, _has_neg=row_has_negatives(c.row))
                for name, value in values.items():
                    rows_out[name].append(value)
                for iid, text, image, embed_text in c.sides + negs + extras:
                    for name, value in zip(items_out, (iid, text, image, None if embed_text == text else embed_text,
                                                       j)):
                        items_out[name].append(value)
                j += 1
            result.n_bad += len(bad)
            sinks.write("rows", rows_out)
            sinks.items(items_out)


def _candidates_block(spec: BlockSpec, result: BlockResult) -> None:
    ctx = ReadContext.of(spec.cfg, spec.caption_mode)
    with _Sinks(spec, {"members": {"item_id": ID_TYPE, "dataset": pa.string()},
                       "groups": {"item_id": ID_TYPE, "group": pa.string()}}, ITEM_COLUMNS) as sinks:
        for rows, numbers, bad in iter_numbered(spec.cfg.candidates, spec.span, result.info):
            result.read_rejects += [{**r, "kind": "candidate"} for r in bad]
            items, ids, datasets, group_pairs, rejects = check_candidates(ctx, rows, numbers)
            sinks.items({"item_id": list(items), "text": [v[0] for v in items.values()],
                         "image_path": [v[1] for v in items.values()],
                         "embed_text": [None if v[2] == v[0] else v[2] for v in items.values()]})
            sinks.write("members", {"item_id": ids, "dataset": datasets})
            sinks.write("groups", {"item_id": [iid for iid, _ in group_pairs], "group": [g for _, g in group_pairs]})
            result.rejects += rejects
            result.n_rows, result.n_bad = result.n_rows + len(rows), result.n_bad + len(bad)


def _part(ids: np.ndarray, parts: int) -> np.ndarray:
    """The id range (of `parts` equal ranges of the ids' first two bytes) each 16-byte id is in: in id order, so
    the ranges' sorted items, one after another, are `items.arrow`'s rows."""
    first = np.frombuffer(np.ascontiguousarray(ids).tobytes(), np.uint8).reshape(-1, 16)[:, :2].astype(np.int64)
    return (first[:, 0] * 256 + first[:, 1]) * parts >> 16


class _Sinks:
    """A block's files, written a batch of rows at a time (so the block holds one batch as Python objects): named
    tables (OUT.NAME.arrow) and its items, one file per id range (OUT.items-PPPP.arrow), each in the block's order."""

    def __init__(self, spec: BlockSpec, tables: dict, items: dict):
        self.spec = spec
        self.schemas = {f"{spec.out}.{name}.arrow": pa.schema(kinds) for name, kinds in tables.items()}
        self.item_schema = pa.schema(items)
        self.schemas.update({self._item_path(p): self.item_schema for p in range(spec.parts)})
        self.writers: dict = {}

    def _item_path(self, p: int) -> str:
        return f"{self.spec.out}.items-{p:04d}.arrow"

    def _put(self, path: str, table: pa.Table) -> None:
        if path not in self.writers:
            sink = pa.OSFile(path, "wb")
            self.writers[path] = (sink, pa.ipc.new_file(sink, self.schemas[path]))
        self.writers[path][1].write_table(table)

    def write(self, name: str, columns: dict) -> None:
        path = f"{self.spec.out}.{name}.arrow"
        self._put(path, pa.table({n: exact_array(columns[n], f.type) for n, f in zip(self.schemas[path].names,
                                                                                self.schemas[path])}))

    def items(self, columns: dict) -> None:
        table = pa.table({f.name: exact_array(columns[f.name], f.type) for f in self.item_schema})
        part = _part(id_view(table.column("item_id").combine_chunks()), self.spec.parts)
        for p in np.unique(part):
            self._put(self._item_path(int(p)), table.take(np.flatnonzero(part == p)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for path, schema in self.schemas.items():  # every file there, if empty
            if path not in self.writers:
                self._put(path, schema.empty_table())
        for sink, writer in self.writers.values():
            writer.close()
            sink.close()
        return False


def _write(path: str, columns: dict) -> None:
    table = pa.table(columns)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def plan(cfg: InputConfig, caption_mode: bool, staging: Path, block_rows: int = READ_BLOCK_ROWS):
    """The block specs of every input file in input order (the candidates file last), and per pairs file the
    InputError that planning it met (None: none), to be raised where the one-task read would."""
    file_dataset = {path: dataset_of(cfg.dataset, path) for path in cfg.pairs}
    shared = {ds for ds in file_dataset.values() if list(file_dataset.values()).count(ds) > 1}
    specs, errors = [], []
    for k, path in enumerate([*cfg.pairs, *([cfg.candidates] if cfg.candidates else [])]):
        try:
            spans = plan_spans(path, block_rows)
        except InputError as exc:
            errors.append(exc)
            continue
        errors.append(None)
        k = k if k < len(cfg.pairs) else -1
        specs += [BlockSpec(cfg, caption_mode, k, span, str(staging / f"{len(specs) + b:06d}"),
                            file_dataset.get(path, ""), file_dataset.get(path) in shared)
                  for b, span in enumerate(spans)]
    parts = min(sum(2 if spec.k >= 0 else 1 for spec in specs), MAX_PARTS)  # ~ a block's rows of items each
    for spec in specs:
        spec.parts = max(parts, 1)
    return specs, errors


def file_errors(cfg: InputConfig, specs: list[BlockSpec], results: list[BlockResult],
                errors: list) -> Optional[InputError]:
    """The first error the one-task read would raise, in input order, before the reject rate's."""
    for k, path in enumerate([*cfg.pairs, *([cfg.candidates] if cfg.candidates else [])]):
        if errors[k] is not None:
            return errors[k]
        kk = k if k < len(cfg.pairs) else -1
        mine = [r for s, r in zip(specs, results) if s.k == kk]
        verdict = jsonl_verdict(path, [r.info for r in mine]) if any(r.info for r in mine) else None
        if verdict is not None and any(r.info.get("document") for r in mine):
            return verdict
        checked = kk < 0
        for b, r in enumerate(mine):
            if r.error is not None:
                return r.error
            if not checked and r.n_rows:
                checked = True
                seen, rows = 0, []
                for later in mine[b:]:  # the first 1,000 rows' keys
                    rows += [dict.fromkeys(keys) for i, keys in later.keysets if seen + i < 1000]
                    seen += later.n_rows
                try:
                    check_columns(path, rows, cfg)
                except InputError as exc:
                    return exc
        if verdict is not None:
            return verdict
        if kk >= 0 and not sum(r.n_rows + r.n_bad for r in mine):
            return InputError(f"{path} holds no rows; give a file of (query, positive) pairs")
    return None


def read_blocks(cfg, state_dir: Path, use_ray: bool, block_rows: int = READ_BLOCK_ROWS) -> CorpusMeta | InputError:
    """The read stage as block tasks and one assembling task (`assemble`); an InputError is returned."""
    state_dir = Path(state_dir)
    staging = state_dir / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    caption_mode = cfg.teacher.image_mode == "caption"
    try:
        specs, errors = plan(cfg.input, caption_mode, staging, block_rows)
    except InputError as exc:
        return exc
    results = ([run_task(read_block, specs[0], use_ray)] if len(specs) == 1  # a task, not the driver, on Ray
               else list(map_blocks(read_block, specs, use_ray)))
    error = file_errors(cfg.input, specs, results, errors)
    if error is not None:
        return error
    meta = run_task(assemble, (cfg.input, str(state_dir), specs, results, cfg.retrieve.block_rows), use_ray)
    if not isinstance(meta, InputError):
        shutil.rmtree(staging)
    return meta


def _tables(spec: BlockSpec, name: str) -> pa.Table:
    return open_ipc(f"{spec.out}.{name}.arrow")  # a str: pathlib interns every name, blocks x id ranges of them


def assemble(task) -> CorpusMeta | InputError:
    """The blocks' files as `search.write_corpus` writes a corpus (see the module docstring)."""
    cfg, state_dir, specs, results, block_rows = task
    state_dir = Path(state_dir)
    staging = state_dir / STAGING
    pairs = [(s, r) for s, r in zip(specs, results) if s.k >= 0]
    cands = [(s, r) for s, r in zip(specs, results) if s.k < 0]
    dedup = Dedup(cfg.pairs, str(staging))  # its hashes in files
    rejects, pools = [], {}
    has_negatives = has_extras = False
    base = {}
    for spec, result in pairs:
        first = base.get(spec.k, 0)
        base[spec.k] = first + result.n_rows
        rows = _tables(spec, "rows")
        qids = rows.column("query_id").to_pylist()
        has_id = rows.column("_has_id").to_pylist()
        local = rows.column("_i").to_pylist()
        dataset = rows.column("dataset").to_pylist()
        path = cfg.pairs[spec.k]
        if first and not all(has_id):  # ids of rows without one count the rows of the file's earlier blocks
            qids = [q if h else synthetic_id(d, path, first + i, spec.shared)
                    for q, h, d, i in zip(qids, has_id, dataset, local)]
            rows = rows.set_column(0, "query_id", pa.array(qids, pa.string()))
            _write(f"{spec.out}.tmp.arrow", {name: rows.column(name).combine_chunks() for name in rows.column_names})
            Path(f"{spec.out}.tmp.arrow").replace(f"{spec.out}.rows.arrow")  # a new file: the old one is mapped
            rows = _tables(spec, "rows")
        qry, pos, num = (rows.column(name).to_pylist() for name in ("qry_item_id", "pos_item_id", "_n"))
        duplicates = dedup.run([(q, h, (d, a, b), path, n) for q, h, d, a, b, n in
                                zip(qids, has_id, dataset, qry, pos, num)])
        ok = np.array([j for j in range(len(qids)) if j not in duplicates], np.int64)
        np.save(f"{spec.out}.ok.npy", ok)
        dedup.commit(lambda spec=spec: _tables(spec, "rows"), _accepted(spec))
        rename = lambda r, ds, i: r if not first or ds is None else {  # noqa: E731
            **r, "query_id": synthetic_id(ds, path, first + i, spec.shared)}
        events = [(i, 0, 0, rename(r, ds, i)) for i, r, ds in result.problems]
        events += [(local[j], 0, 0, r) for j, r in duplicates.items()]
        ok_set = set(ok.tolist())
        events += [(local[j], 1, n, rename(r, None if has_id[j] else dataset[j], local[j]))
                   for n, (j, r) in enumerate(result.post) if j in ok_set]
        rejects += [e[3] for e in sorted(events, key=lambda e: e[:3])]
        for j in ok.tolist():
            pools.setdefault(dataset[j], len(pools))
        if len(ok):
            has_negatives |= bool(np.any(rows.column("_has_neg").to_numpy(zero_copy_only=False)[ok]))
            has_extras |= bool(pc.max(pc.list_value_length(take_rows(rows.column("pos_extra_ids"), ok))).as_py()
                               or 0)
        del qids, has_id, local, dataset, qry, pos, num, ok, ok_set
    del dedup
    rows_in = sum(r.n_rows + r.n_bad for _, r in pairs)
    rejects = ([x for _, r in pairs for x in r.read_rejects] + rejects
               + [x for _, r in cands for x in r.read_rejects] + [x for _, r in cands for x in r.rejects])
    candidate_rejects = sum(len(r.read_rejects) + len(r.rejects) for _, r in cands)
    try:
        check_reject_rate(rows_in, [r for r in rejects if r["kind"] == "query"], cfg)
    except InputError as exc:
        return exc

    # the items: every accepted pair's and candidate's, the first occurrence of each id kept, one id range at a time;
    # their ids (sorted, 16 bytes each) go to a file, memory-mapped where the queries look their rows up
    all_specs = [s for s, _ in pairs] + [s for s, _ in cands]
    (state_dir / PARTS).mkdir(parents=True, exist_ok=True)
    starts = [0]  # each id range's first item row
    schema = pa.schema([("item_id", pa.string()), ("text", pa.string()), ("image_path", pa.string()),
                        ("modality", pa.string()), ("embed_text", pa.string())])
    with _Writer(state_dir / "items.arrow", schema, block_rows) as writer, \
            open(staging / "ids.bin", "wb") as id_file, open(staging / "modality.bin", "wb") as modality_file:
        for p in range(all_specs[0].parts if all_specs else 0):
            tables = [_tables(spec, f"items-{p:04d}") for spec in all_specs]
            keys, where = [], []
            for b, table in enumerate(tables):
                at = (np.flatnonzero(np.isin(table.column("_row").to_numpy(), _accepted(all_specs[b])))
                      if b < len(pairs) else np.arange(table.num_rows))
                keys.append(id_view(table.column("item_id").combine_chunks())[at])
                where.append(np.stack([np.full(len(at), b), at]))
            part_ids, first = np.unique(np.concatenate(keys), return_index=True)
            where = np.concatenate(where, axis=1)[:, first]
            del keys, first
            for lo in range(0, len(part_ids), block_rows):
                hi = min(lo + block_rows, len(part_ids))
                got = _gather(tables.__getitem__, where[0, lo:hi], where[1, lo:hi], list(ITEM_COLUMNS)[1:])
                text, image, embed = (got.column(name).combine_chunks() for name in ("text", "image_path",
                                                                                   "embed_text"))
                codes = np.zeros(len(text), np.int8)
                with_image = np.flatnonzero(pc.not_equal(image, "").to_numpy(zero_copy_only=False))
                if len(with_image):
                    codes[with_image] = [2 if t.strip() else 1 for t in text.take(with_image).to_pylist()]
                modality_file.write(codes.tobytes())
                embed = text if embed.null_count == len(embed) else pc.coalesce(embed, text)
                writer.write(pa.table([hex_ids(part_ids[lo:hi]), text, image,
                                       pa.array(MODALITIES, pa.string()).take(codes), embed], schema=schema))
            id_file.write(part_ids.tobytes())
            starts.append(starts[-1] + len(part_ids))
            del tables, where, part_ids
    n_items = starts[-1]
    ids = np.memmap(staging / "ids.bin", "S16", "r", shape=(n_items,)) if n_items else np.zeros(0, "S16")
    _npy(state_dir / "modality.npy", np.int8, n_items, _raw_chunks(staging / "modality.bin", np.int8))
    starts = np.array(starts, np.int64)

    # the queries: by dataset, file path, place in the file. A block's accepted rows by dataset (a file each), then
    # the datasets one at a time, each the blocks' rows of it by file path and block: that order, without a sort of
    # all the queries. Each batch of queries adds its codes of positives, pools and groups to files by id range
    # (`_Buckets`), made unique one range at a time at the end.
    names = sorted(pools)
    value_set = pa.array(names, pa.string())
    groups = set()
    for spec, _ in cands:
        groups.update(pc.unique(_tables(spec, "groups").column("group")).to_pylist())
    counts = np.zeros((len(pairs), len(names)), np.int64)
    for b, (spec, _) in enumerate(pairs):
        rows, ok = _tables(spec, "rows"), _accepted(spec)
        groups.update(g for g in pc.unique(take_rows(rows.column("group"), ok)).to_pylist() if g is not None)
        codes = pc.index_in(take_rows(rows.column("dataset"), ok), value_set=value_set).to_numpy().astype(np.int64)
        np.save(f"{spec.out}.order.npy", ok[np.argsort(codes, kind="stable")])
        counts[b] = np.bincount(codes, minlength=len(names))
    groups = pa.array(sorted(groups), pa.string())
    n_groups = max(len(groups), 1)
    rank = {path: r for r, path in enumerate(sorted(set(cfg.pairs)))}
    by_file = sorted(range(len(pairs)), key=lambda b: (rank[cfg.pairs[pairs[b][0].k]], pairs[b][0].k))
    offsets = np.concatenate([np.zeros((len(pairs), 1), np.int64), np.cumsum(counts, axis=1)], axis=1)
    segments = ((c, b, offsets[b, c], offsets[b, c + 1]) for c in range(len(names)) for b in by_file
                if counts[b, c])
    pool_number = np.array([pools[name] for name in names] or [0], np.int64)
    totals = counts.sum(axis=0)
    nq = int(totals.sum())
    positives, members, negatives, memberships = (_Buckets(staging / name, starts) for name in (
        "positives", "members", "negatives", "groups"))
    list_columns = [(name, column) for flag, name, column in
                    ((has_extras, extra_positives.COLUMN, "pos_extra_ids"),
                     (has_negatives, input_negatives.COLUMN, "input_neg_ids")) if flag]
    qschema = pa.schema([(name, kind if kind != ID_TYPE else pa.string()) for name, kind in
                         list(QUERY_COLUMNS.items())[:9]]
                        + [("qry_idx", pa.int32()), ("pos_idx", pa.int32()), ("group_code", pa.int32())]
                        + [(name, pa.list_(pa.int32())) for name, _ in list_columns])
    tmp = state_dir / f"{QUERIES_IN}.tmp"
    width = 0
    with _Writer(tmp, qschema, block_rows) as writer, open(staging / "qry_idx.bin", "wb") as qry_file:
        for batch in _batches(segments, block_rows):
            src_b = np.concatenate([np.full(hi - lo, b) for _, b, lo, hi in batch])
            src_j = np.concatenate([_mmap(f"{pairs[b][0].out}.order.npy")[lo:hi] for _, b, lo, hi in batch])
            pool_of = np.concatenate([np.full(hi - lo, pool_number[c]) for c, _, lo, hi in batch])
            part = _gather(lambda b: _tables(pairs[b][0], "rows"), src_b, src_j,
                           list(QUERY_COLUMNS)[:9] + ["pos_extra_ids", "input_neg_ids"])
            qry_idx, pos_idx = (np.searchsorted(ids, id_view(part.column(f"{name}_item_id").combine_chunks()))
                                .astype(np.int64) for name in ("qry", "pos"))
            group_code = pc.fill_null(pc.index_in(part.column("group"), value_set=groups), -1).to_numpy()
            lists = {}
            for column in ("pos_extra_ids", "input_neg_ids"):
                values = part.column(column).combine_chunks()
                lists[column] = (pc.list_value_length(values).to_numpy(zero_copy_only=False).astype(np.int64),
                                 np.searchsorted(ids, id_view(values.flatten())).astype(np.int64))
            columns = [part.column(name).combine_chunks() if QUERY_COLUMNS[name] != ID_TYPE
                       else hex_ids(id_view(part.column(name).combine_chunks())) for name in list(QUERY_COLUMNS)[:9]]
            columns += [pa.array(a.astype(np.int32)) for a in (qry_idx, pos_idx, group_code)]
            for _, column in list_columns:
                lengths, values = lists[column]
                columns.append(pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)])
                                                                 .astype(np.int32)), pa.array(values.astype(np.int32))))
            writer.write(pa.table(columns, schema=qschema))
            qry_file.write(qry_idx.tobytes())

            lengths, extra = lists["pos_extra_ids"]
            parent = np.repeat(np.arange(len(qry_idx)), lengths)
            positives.add(qry_idx * n_items + pos_idx, qry_idx)
            if has_extras:
                positives.add(qry_idx[parent] * n_items + extra, qry_idx[parent])
            members.add(pool_of * n_items + pos_idx, pos_idx)
            members.add(pool_of[parent] * n_items + extra, extra)
            grouped = group_code >= 0
            memberships.add(pos_idx[grouped] * n_groups + group_code[grouped], pos_idx[grouped])
            memberships.add(extra[grouped[parent]] * n_groups + group_code[parent[grouped[parent]]],
                            extra[grouped[parent]])
            if has_negatives:
                lengths, neg = lists["input_neg_ids"]
                negatives.add(np.repeat(pool_of, lengths) * n_items + neg, neg)
                width = max(width, int(lengths.max(initial=0)))

    # the candidates' pool members (a member without a dataset is in every pool so far) and group memberships
    for spec, _ in cands:
        table = _tables(spec, "members")
        rows = np.searchsorted(ids, id_view(table.column("item_id").combine_chunks())).astype(np.int64)
        datasets = table.column("dataset").to_pylist()
        numbers = np.array([pools.setdefault(ds, len(pools)) if ds is not None else -1 - len(pools)
                            for ds in datasets], np.int64)
        named = numbers >= 0
        members.add(numbers[named] * n_items + rows[named], rows[named])
        upto = -1 - numbers[~named]
        everywhere = np.repeat(rows[~named], upto)
        members.add((np.arange(upto.sum()) - np.repeat(np.cumsum(upto) - upto, upto)) * n_items + everywhere,
                    everywhere)
        g = _tables(spec, "groups")
        if g.num_rows:
            rows = np.searchsorted(ids, id_view(g.column("item_id").combine_chunks())).astype(np.int64)
            memberships.add(rows * n_groups + pc.index_in(g.column("group"), value_set=groups).to_numpy(), rows)
    del ids

    _npy(state_dir / "item_groups.npy", np.int64, memberships.finish(), memberships.chunks())
    _npy(state_dir / "positives.npy", np.int64, positives.finish(), positives.chunks())
    tmp.replace(state_dir / QUERIES_IN)
    d = state_dir / CORPUS
    d.mkdir(parents=True, exist_ok=True)
    members.finish()
    embedded = members
    if has_negatives:
        negatives.finish(members)
        embedded = negatives
    sizes = {}
    for ds, j in pools.items():  # the pools in the order they were numbered
        sizes[ds] = _npy(d / f"pool-{j:05d}.npy", np.int64, *members.pool(j, n_items))
        _npy(d / f"embed-{j:05d}.npy", np.int64, *embedded.pool(j, n_items))
    _npy(d / "qry_idx.npy", np.int64, nq, _raw_chunks(staging / "qry_idx.bin", np.int64))
    starts = np.concatenate([[0], np.cumsum(totals)])
    ranges = {ds: [int(starts[c]), int(starts[c + 1])] for c, ds in enumerate(names) if starts[c + 1] > starts[c]}
    return CorpusMeta(nq, n_items, n_groups, rows_in, candidate_rejects, rejects, ranges, list(pools), sizes,
                      width)


def _accepted(spec: BlockSpec) -> np.ndarray:
    """A pairs block's accepted rows (`assemble` keeps them on disk, a file a block)."""
    return _mmap(f"{spec.out}.ok.npy")


def _batches(segments, rows: int):
    """(dataset code, block, lo, hi) segments of queries, cut into lists of segments of `rows` rows each."""
    batch, held = [], 0
    for c, b, lo, hi in segments:
        while lo < hi:
            take = min(hi - lo, rows - held)
            batch.append((c, b, lo, lo + take))
            lo, held = lo + take, held + take
            if held == rows:
                yield batch
                batch, held = [], 0
    if batch:
        yield batch


class _Buckets:
    """int64 codes appended to files by the id range (`starts`: each range's first item row) of a row they
    carry, then sorted and made unique one range at a time: what is held is a range's codes, not the corpus's. The
    codes of a row's range come before those of the next range's rows when the row is the code's leading part
    (query x positive, item x group); a pool's (pool x row) are taken from every range (`pool`)."""

    def __init__(self, prefix: Path, starts: np.ndarray):
        self.prefix, self.starts = prefix, starts
        for r in range(len(starts) - 1):  # a task run again appends to none of its first run's codes
            if os.path.exists(self._path(r)):
                os.remove(self._path(r))

    def _path(self, r: int) -> str:
        return f"{self.prefix}-{r:04d}.bin"

    def add(self, codes: np.ndarray, rows: np.ndarray) -> None:
        if not len(codes):
            return
        ranges = np.searchsorted(self.starts, rows, "right") - 1
        order = np.argsort(ranges, kind="stable")
        ranges, codes = ranges[order], np.asarray(codes, np.int64)[order]
        cuts = [0, *(np.flatnonzero(np.diff(ranges)) + 1).tolist(), len(ranges)]
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            with open(self._path(int(ranges[lo])), "ab") as f:
                f.write(codes[lo:hi].tobytes())

    def _read(self, r: int) -> np.ndarray:
        path = self._path(r)
        return np.fromfile(path, np.int64) if os.path.exists(path) else np.zeros(0, np.int64)

    def finish(self, other: Optional["_Buckets"] = None) -> int:
        """Each range's codes (and `other`'s, finished) sorted and unique, in their files; how many in all."""
        n = 0
        for r in range(len(self.starts) - 1):
            codes = self._read(r) if other is None else np.concatenate([self._read(r), other._read(r)])
            codes = np.unique(codes)
            codes.tofile(self._path(r))
            n += len(codes)
        return n

    def chunks(self):
        return (self._read(r) for r in range(len(self.starts) - 1))

    def pool(self, j: int, n_items: int) -> tuple[int, object]:
        """Pool `j`'s rows (codes j * n_items + row): how many, and the rows range by range."""
        spans = []
        for r in range(len(self.starts) - 1):
            path = self._path(r)
            codes = (np.memmap(path, np.int64, "r") if os.path.exists(path) and os.path.getsize(path)
                     else np.zeros(0, np.int64))
            lo, hi = np.searchsorted(codes, [j * n_items, (j + 1) * n_items])
            spans.append((r, int(lo), int(hi)))
        return (sum(hi - lo for _, lo, hi in spans),
                (np.fromfile(self._path(r), np.int64, hi - lo, offset=8 * lo) - j * n_items
                 for r, lo, hi in spans if hi > lo))


def _raw_chunks(path: Path, dtype, rows: int = 1 << 16):
    """A file of raw values, `rows` at a time."""
    size = np.dtype(dtype).itemsize
    for lo in range(0, path.stat().st_size // size, rows):
        yield np.fromfile(path, dtype, rows, offset=lo * size)


def _npy(path: Path, dtype, n: int, chunks) -> int:
    """An .npy file of `n` values (`chunks`: arrays, in order) written a chunk at a time, byte for byte what
    np.save writes of them joined; by a new file, as `search._save` (the driver may have the old one mapped). `n`."""
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, "w+", dtype, (n,))
    at = 0
    for chunk in chunks:
        out[at:at + len(chunk)] = chunk
        at += len(chunk)
    assert at == n, (path, at, n)
    out.flush()
    del out
    tmp.replace(path)
    return n


def _gather(table, blocks: np.ndarray, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows (`blocks[i]`, `rows[i]`) of the blocks' tables (`table(b)`), in that order: a take per block (of the
    chunks that hold its rows: `take_rows`), then one reorder."""
    parts, at = [], []
    for b in np.unique(blocks):
        sel = np.flatnonzero(blocks == b)
        parts.append(take_rows(table(int(b)).select(columns), rows[sel]))
        at.append(sel)
    table = pa.concat_tables(parts).combine_chunks()
    inverse = np.empty(len(blocks), np.int64)
    inverse[np.concatenate(at)] = np.arange(len(blocks))
    return table.take(inverse)


class _Writer:
    """An Arrow IPC file written a few rows at a time in batches of `batch_rows`, as `blocks._write_ipc` writes a
    whole table."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int):
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, schema)
        self.batch_rows, self.held, self.rows, self.empty = batch_rows, [], 0, schema.empty_table()

    def write(self, table: pa.Table) -> None:
        self.held.append(table)
        self.rows += table.num_rows
        while self.rows >= self.batch_rows:
            self._flush(self.batch_rows)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.held)
        self.writer.write_table(exact_batch(table.slice(0, n)))
        self.held, self.rows = [table.slice(n)], table.num_rows - n

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        if kind is None:
            if self.rows or not self.writer.stats.num_record_batches:
                self.held.append(self.empty)
                self._flush(self.rows)
        self.writer.close()
        self.sink.close()
        return False
