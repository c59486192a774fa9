"""Write one epoch as block tasks: filter, sample and write each shard where its block is read, merge in the driver.

Pass 1 (`block_evidence`) returns per block only what calibration needs: the rows that carry evidence of false
negatives (group, multi-positive, blocklist), cut to a fixed, key-ordered subset per dataset and strength level,
so it does not grow with the corpus, and the exact evidence counts. The driver calibrates on that compact block.
Pass 2 (`write_block`) filters with the chosen per-dataset configs, samples and writes one train shard and its
`_candidates` shard, and returns the shard's statistics and rejects; the driver merges them in block order. A block
reads its candidates, queries and items from `OUT/_run/<retrieval id>/` (pipeline/blocks.py), so the driver holds
metadata only, and the bytes written do not depend on how many blocks or workers there are.
With a judge, three passes come first (`judge_epoch`): each block writes the pair codes it needs judged, range tasks
over query items merge them (a repeated query counts once) and plan the pairs the run's judge cache lacks, a Ray Data
stage scores those into the cache; then both passes above look their candidates' judge scores up in a sorted index
of the cache (memory-mapped), so the judge's drops and evidence are computed per block too.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import blocklist, extra_positives, input_negatives, judge
from .blocks import RunStore, take_rows
from .calibrate import EVIDENCE_KINDS, MAX_QUERIES, calibrate, cap_quantiles, evidence_labels, filter_by_dataset, \
    resolve, with_extra_positives
from .config import Config, FilterConfig, SampleConfig
from .executor import map_blocks, run_task
from .filters import KEPT, REASONS, CandidateBlock, FilterContext, _isin_sorted
from .index import _drop_pages
from .progress import Progress
from .run import EpochFolder
from .sample import query_keys, sample_negatives
from .stats import SCORE_COLUMNS, EpochStats, key_counts, positive_score_caps
from .write import CANDIDATE_SCHEMA, TRAIN_SCHEMA, write_json, write_jsonl, write_table

LEVELS = (1, 2, 3)  # evidence strengths calibrate.py chooses among
CODE_CHUNK = 1 << 16
SOURCES = pa.array(["retrieved", "input"])  # cand_sources: from_input False / True


@dataclass
class BlockSpec:
    """One block task: query rows [start, end) of a retrieval, written as shard `shard` of the epoch."""

    run_dir: str
    start: int
    end: int
    shard: int
    epoch: int
    blocked: np.ndarray                       # sorted blocklist codes query_row * n_items + item_row (small)
    filters: FilterConfig | dict = None       # pass 1: the configured filters; pass 2: {dataset: FilterConfig}
    sample: SampleConfig | None = None
    folder: str = ""                          # the epoch's partial folder
    compression: str = "zstd"
    relabel: bool = False
    on_shortfall: str = "keep"
    judge: judge.JudgePlan | None = None      # only with a judge
    blocklist_ids: tuple = ()                 # (query_ids, item rows) of the blocklist entries, reviewed ids


@dataclass
class Evidence:
    """Pass 1 of one block: the calibration rows it keeps, and counts over all of its rows."""

    rows: np.ndarray                          # global query rows, ascending
    keys: np.ndarray
    datasets: np.ndarray
    strength: np.ndarray
    block: CandidateBlock
    found: dict = field(default_factory=dict)  # {dataset: {kind: true-match pairs}}
    blocked: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    reviewed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seen: np.ndarray | None = None             # (rows, k) bool: what the judge saw (with a judge)
    judged: dict = field(default_factory=dict)  # the judge's counts over all of the block's rows


@dataclass
class BlockResult:
    shard: int
    file: dict
    cand_file: dict
    stats: EpochStats
    rejects: list
    input_counts: dict
    rows: int


def _read_block(store: RunStore, spec: BlockSpec) -> tuple[pa.Table, CandidateBlock, np.ndarray | None]:
    q = store.queries().slice(spec.start, spec.end - spec.start)
    cand, scores, pos_sims, from_input = store.candidates(spec.start, spec.end)
    col = lambda name: q.column(name).to_numpy()  # noqa: E731
    block = CandidateBlock(cand, scores, pos_sims, col("pos_score"), col("qry_idx"), col("pos_idx"),
                           col("group_code"), np.arange(spec.start, spec.end))
    return q, block, from_input


def _blocked(spec: BlockSpec, store: RunStore, query_ids: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """This block's blocklist codes (query_row * n_items + item_row) and the rows a person reviewed."""
    blocked, reviewed = np.zeros(0, np.int64), np.zeros(0, np.int64)
    if spec.blocklist_ids:
        entry_queries, entry_items, reviewed_ids = spec.blocklist_ids
        at = pc.index_in(pa.array(entry_queries, pa.string()), value_set=query_ids).to_numpy(zero_copy_only=False)
        ok = ~np.isnan(at.astype(float)) & (np.asarray(entry_items) >= 0)
        blocked = np.unique((at[ok].astype(np.int64) + spec.start) * store.n_items
                            + np.asarray(entry_items, np.int64)[ok])
        reviewed = np.flatnonzero(pc.is_in(query_ids, value_set=pa.array(list(reviewed_ids), pa.string()))
                                  .to_numpy(zero_copy_only=False)) + spec.start
    return blocked, reviewed


def _judged(block: CandidateBlock, datasets: np.ndarray, ctx: FilterContext, store: RunStore,
            plan: judge.JudgePlan) -> tuple[np.ndarray, dict]:
    """Set the judge's drops on `block`; what it saw (every other filter kept) and its counts."""
    verdict = filter_by_dataset(block, datasets, plan.filters, ctx)
    block.judge_drop, counts = judge.block_drops(block, verdict, store.n_items, plan)
    return verdict == KEPT, counts


def judge_wanted(spec: BlockSpec) -> int:
    """Judge pass: write the sorted pair codes this block needs judge scores for; returns how many."""
    store = RunStore(spec.run_dir)
    q, block, _ = _read_block(store, spec)
    ctx = store.context(_blocked(spec, store, q.column("query_id"))[0])
    verdict = filter_by_dataset(block, q.column("dataset").to_numpy(zero_copy_only=False), spec.judge.filters, ctx)
    codes = judge.wanted_codes(block, verdict, store.n_items, spec.judge.rule)
    np.save(Path(spec.judge.work) / f"wanted-{spec.shard:05d}.npy", codes)
    return len(codes)


def block_evidence(spec: BlockSpec) -> Evidence:
    """Pass 1: this block's blocklist codes and calibration evidence (a key-ordered subset per dataset)."""
    store = RunStore(spec.run_dir)
    q, block, _ = _read_block(store, spec)
    query_ids = q.column("query_id")
    blocked, reviewed = _blocked(spec, store, query_ids)
    ctx = store.context(blocked)
    datasets = q.column("dataset").to_numpy(zero_copy_only=False)
    seen, judged = (None, {}) if spec.judge is None else _judged(block, datasets, ctx, store, spec.judge)
    _, found, strength = evidence_labels(block, ctx, seen, reviewed)
    keys = query_keys(query_ids.to_pylist())
    counts = {}
    for ds in np.unique(datasets):
        rows = datasets == ds
        counts[str(ds)] = {kind: int(found[kind][rows].sum()) for kind in EVIDENCE_KINDS if kind in found}
    ev = Evidence(block.query_row, keys, datasets, strength, block, counts, blocked, reviewed, seen, judged)
    return _cut(ev, _selected(ev))


def _selected(ev: Evidence) -> np.ndarray:
    """Rows calibration could pick: per dataset and strength level the first MAX_QUERIES by (key, row) that reach
    the level and the first MAX_QUERIES that do not. Which rows calibrate.py uses depends only on these, so the
    union over blocks, cut again, is the same whatever the number of blocks."""
    keep = np.zeros(len(ev.rows), bool)
    for ds in np.unique(ev.datasets):
        rows = np.flatnonzero(ev.datasets == ds)
        rows = rows[np.lexsort((ev.rows[rows], ev.keys[rows]))]
        for lv in LEVELS:
            reached = ev.strength[rows] >= lv
            keep[rows[reached][:MAX_QUERIES]] = True
            keep[rows[~reached][:MAX_QUERIES]] = True
    return keep


def _cut(ev: Evidence, keep: np.ndarray) -> Evidence:
    fields = (getattr(ev.block, f.name) for f in dataclasses.fields(CandidateBlock))
    return Evidence(ev.rows[keep], ev.keys[keep], ev.datasets[keep], ev.strength[keep],
                    CandidateBlock(*(None if v is None else v[keep] for v in fields)), ev.found, ev.blocked,
                    ev.reviewed, None if ev.seen is None else ev.seen[keep], ev.judged)


def _merge_evidence(a: Evidence | None, b: Evidence) -> Evidence:
    if a is None:
        return b
    fields = [f.name for f in dataclasses.fields(CandidateBlock)]
    block = CandidateBlock(*(None if getattr(a.block, f) is None else
                             np.concatenate([getattr(a.block, f), getattr(b.block, f)]) for f in fields))
    found = {ds: dict(kinds) for ds, kinds in a.found.items()}
    for ds, kinds in b.found.items():
        for kind, n in kinds.items():
            found.setdefault(ds, {})[kind] = found.get(ds, {}).get(kind, 0) + n
    merged = Evidence(np.concatenate([a.rows, b.rows]), np.concatenate([a.keys, b.keys]),
                      np.concatenate([a.datasets, b.datasets]), np.concatenate([a.strength, b.strength]), block, found,
                      np.concatenate([a.blocked, b.blocked]), np.concatenate([a.reviewed, b.reviewed]),
                      None if a.seen is None else np.concatenate([a.seen, b.seen]),
                      {k: a.judged.get(k, 0) + n for k, n in b.judged.items()})
    return _cut(merged, _selected(merged))


def _subset_codes(codes: np.ndarray, wanted: np.ndarray, divisor: int) -> np.ndarray:
    """The sorted codes whose `code // divisor` is in `wanted`, read chunk by chunk (codes may be memory-mapped: the
    pages read are dropped, so the file, 8 bytes a query or item, never stays in the driver); the first code is
    kept too, so a filter that checks whether any codes exist still sees some."""
    wanted = np.unique(wanted)
    parts = [np.array(codes[:1])]
    for start in range(0, len(codes) if len(wanted) else 0, CODE_CHUNK):
        chunk = np.asarray(codes[start:start + CODE_CHUNK])
        parts.append(chunk[_isin_sorted(chunk // divisor, wanted)])
        _drop_pages(codes)
    return np.unique(np.concatenate(parts)).astype(np.int64)


def block_pos_scores(spec: tuple) -> dict[str, np.ndarray]:
    """{dataset: the query-positive scores of query rows [start, end)} of a retrieval (`spec`: run dir, start,
    end), read from the memory-mapped queries without a Python object per row."""
    run_dir, start, end = spec
    q = RunStore(run_dir).queries().slice(start, end - start)
    datasets, pos_score = q.column("dataset"), q.column("pos_score")
    return {str(ds): pc.filter(pos_score, pc.equal(datasets, ds)).to_numpy()
            for ds in pc.unique(datasets).to_pylist()}


def positive_caps(store: RunStore, filters: FilterConfig, ranges: list, use_ray: bool) -> dict[str, dict]:
    """{dataset: {quantile: score cap}} at every quantile calibration may choose (`cap_quantiles`), from the blocks'
    histograms of the positive scores (`stats.positive_score_caps`): the driver holds no score."""
    specs = [(str(store.dir), start, end) for _, start, end in ranges]
    return positive_score_caps(specs, block_pos_scores, cap_quantiles(filters), use_ray)


def calibrate_blocks(store: RunStore, ev: Evidence, blocked: np.ndarray, reviewed: np.ndarray, cfg: Config,
                     epoch: int, caps: dict) -> tuple[dict, dict]:
    """calibrate() on the compact evidence block, with the filter context cut to its rows (`caps`: `positive_caps`);
    the evidence counts of the report are the exact ones over every query."""
    full = store.context(blocked)
    n_items = store.n_items
    safe = np.maximum(ev.block.cand, 0)
    ctx = FilterContext(_subset_codes(full.item_groups, np.concatenate([safe.ravel(), ev.block.pos_idx]),
                                      store.n_groups),
                        store.n_groups, full.item_modality, _subset_codes(blocked, ev.rows, n_items), n_items,
                        full.top_k, _subset_codes(full.positives, ev.block.qry_idx, n_items))
    order = np.argsort(ev.rows, kind="stable")
    ev = _cut(ev, order)
    configs, report = calibrate(ev.block, ev.datasets, ev.keys, ctx, cfg.filters, cfg.sample, epoch, ev.seen,
                                reviewed, caps)
    for ds, entry in report.items():
        if entry.get("evidence") is not None:
            exact = {k: n for k, n in ev.found.get(ds, {}).items() if n}
            entry["evidence"] = {**{k: v for k, v in entry["evidence"].items() if k not in EVIDENCE_KINDS}, **exact}
    return configs, report


def write_block(spec: BlockSpec) -> BlockResult:
    """Pass 2: filter, sample and write one shard (train rows and candidate verdicts) into the partial folder."""
    store = RunStore(spec.run_dir)
    q, block, from_input = _read_block(store, spec)
    items = store.items()
    ctx = store.context(spec.blocked)
    datasets = q.column("dataset").to_numpy(zero_copy_only=False)
    if spec.judge is not None:
        _judged(block, datasets, ctx, store, spec.judge)
    keys = query_keys(q.column("query_id").to_pylist())
    cfg = spec.sample
    verdict = filter_by_dataset(block, datasets, spec.filters, ctx)
    chosen = sample_negatives(verdict, block.scores, keys, cfg, spec.epoch)
    found = (chosen >= 0).sum(axis=1)
    keep = found >= cfg.min_negatives
    rejects = []
    if spec.on_shortfall == "reject":
        for r in np.flatnonzero(~keep):
            rejects.append({"kind": "query", "source": "mining", "row": None, "query_id": q.column("query_id")[r].as_py(),
                            "field": None, "reason": "too_few_negatives",
                            "detail": f"{found[r]} negatives passed the filters; "
                                      f"sample.min_negatives is {cfg.min_negatives}"})
    else:
        keep[:] = True
    rows = np.arange(len(block.cand))
    # the items this block names, taken from the memory-mapped table; candidates renumbered to index them
    used = np.unique(block.cand[block.cand >= 0])
    item_ids, texts, images = (take_rows(items.column(c), used) for c in ("item_id", "text", "image_path"))
    local = dataclasses.replace(block, cand=np.where(block.cand >= 0, np.searchsorted(used, block.cand), -1))
    train, cands = shard_tables(q, rows, local, verdict, chosen, keep, item_ids, texts, images, from_input)
    counts = input_negatives.new_counts()
    if from_input is not None and from_input.any():
        input_negatives.add_counts(counts, verdict, chosen, from_input, REASONS)
    if spec.relabel:
        train = with_extra_positives(train, verdict, local, keep, item_ids, texts, images)
    train = extra_positives.add_columns(train, q, rows[keep], *(items.column(c) for c in ("item_id", "text",
                                                                                           "image_path")))
    name = f"part-{spec.shard:05d}.parquet"
    folder = Path(spec.folder)
    stats = EpochStats(cfg.n_negatives, 0)
    stats.add(train, verdict, keep, datasets)
    return BlockResult(spec.shard, write_table(train, folder / name, spec.compression),
                       write_table(cands, folder / "_candidates" / name, spec.compression), stats, rejects, counts,
                       len(rows))


def shard_key_counts(spec: tuple[str, dict]) -> dict:
    """Statistics pass 2 over one written shard (path, wanted bins): the score keys the quantiles need."""
    path, wanted = spec
    return key_counts(pq.ParquetFile(path).read(columns=SCORE_COLUMNS), wanted)


def shard_tables(q, rows, block, verdict, chosen, keep, item_ids, texts, images, from_input=None):
    """The training rows and the candidate-verdict rows of one shard."""
    k = block.cand.shape[1]
    picked = np.take_along_axis(block.cand, np.maximum(chosen, 0), axis=1)
    valid = (chosen >= 0) & keep[:, None]
    counts = valid.sum(axis=1).astype(np.int32)
    flat_items = picked[valid]
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))

    def lists(values):
        return pa.ListArray.from_arrays(offsets, values)

    neg_scores = np.take_along_axis(block.scores, np.maximum(chosen, 0), axis=1)[valid]
    pos_score = block.pos_score[keep]
    rel = neg_scores / np.repeat(np.where(pos_score == 0, 1e-12, pos_score), counts[keep])
    base = q.take(pa.array(rows[keep]))
    train = pa.table({
        **{name: base.column(name) for name in ("query_id", "dataset", "qry", "qry_image_path", "pos_text",
                                                "pos_image_path", "group", "qry_item_id", "pos_item_id")},
        "pos_score": pa.array(pos_score, pa.float32()),
        "neg_text": lists(texts.take(pa.array(flat_items))),
        "neg_image_path": lists(images.take(pa.array(flat_items))),
        "neg_item_ids": lists(item_ids.take(pa.array(flat_items))),
        "neg_scores": lists(pa.array(neg_scores, pa.float32())),
        "neg_ranks": lists(pa.array(chosen[valid].astype(np.int32))),
        "neg_rel_scores": lists(pa.array(rel.astype(np.float32))),
        "num_negatives": pa.array(counts[keep]),
        "shortfall": pa.array((chosen.shape[1] - counts[keep]).astype(np.int32)),
    }, schema=TRAIN_SCHEMA) if keep.any() else TRAIN_SCHEMA.empty_table()

    labels = np.array(["negative", "unsampled", *REASONS], dtype=object)
    code = verdict.astype(np.int64) + 1  # KEPT -> 1 (unsampled), reason r -> r + 1
    sampled = np.zeros_like(verdict, dtype=bool)
    np.put_along_axis(sampled, np.maximum(chosen, 0), chosen >= 0, axis=1)
    code[sampled] = 0
    present = verdict >= 0
    per_row = present.sum(axis=1)
    coffsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32))
    ranks = np.broadcast_to(np.arange(k, dtype=np.int32), verdict.shape)
    cands = pa.table({
        "query_id": q.column("query_id").take(pa.array(rows)),
        "cand_item_ids": pa.ListArray.from_arrays(coffsets, item_ids.take(pa.array(block.cand[present]))),
        "cand_scores": pa.ListArray.from_arrays(coffsets, pa.array(block.scores[present], pa.float32())),
        "cand_ranks": pa.ListArray.from_arrays(coffsets, pa.array(ranks[present])),
        "cand_verdicts": pa.ListArray.from_arrays(coffsets, pa.array(labels[code[present]], pa.string())),
        "cand_sources": pa.ListArray.from_arrays(coffsets, SOURCES.take(pa.array(  # via take: a numpy string array
            (from_input[present] if from_input is not None else np.zeros(int(present.sum()), bool)).astype(np.int8)))),
    }, schema=CANDIDATE_SCHEMA)
    return train, cands


def _merge_counts(total: dict, part: dict) -> None:
    for key in ("candidates", "sampled", "unsampled"):
        total[key] += part[key]
    for reason, n in part["dropped"].items():
        total["dropped"][reason] = total["dropped"].get(reason, 0) + n


def _item_rows(store: RunStore, item_ids: list[str]) -> np.ndarray:
    """Item row of each id (-1 where the run holds none), found by scanning items.arrow one batch at a time."""
    found: dict[str, int] = {}
    wanted = pa.array(sorted(set(item_ids)), pa.string())
    with pa.OSFile(str(store.dir / "items.arrow")) as f:
        reader = pa.ipc.open_file(f)
        offset = 0
        for i in range(reader.num_record_batches):
            ids = reader.get_batch(i).column("item_id")
            for at in np.flatnonzero(pc.is_in(ids, value_set=wanted).to_numpy(zero_copy_only=False)):
                found.setdefault(ids[int(at)].as_py(), offset + int(at))
            offset += len(ids)
    return np.array([found.get(i, -1) for i in item_ids], np.int64)


def judge_epoch(store: RunStore, cfg: Config, run_root: Path, work: Path, ranges: list, base: dict, ids: tuple,
                caps: dict, use_ray: bool) -> tuple[judge.JudgePlan, dict]:
    """Score the pairs this epoch's blocks need and the run's judge cache lacks; the plan the block passes judge
    with, and the judge's report (its drop counts come with the evidence pass). `caps`: `positive_caps`."""
    j = cfg.judge
    fp = judge.judge_fingerprint(j, cfg.teacher.image_placeholder)
    cache = judge.JudgeCache(run_root / "judge" / fp)
    rule = judge.resolved_rule(j)
    filters = {ds: resolve(cfg.filters, ds_caps) for ds, ds_caps in caps.items()}
    plan = judge.JudgePlan(filters, str(work), str(work / "known-0"), j, rule, judge.judge_class(j).probabilistic)
    specs = (BlockSpec(start=start, end=end, shard=shard, blocked=np.zeros(0, np.int64), blocklist_ids=ids,
                       judge=plan, **base) for shard, start, end in ranges)
    for _ in map_blocks(judge_wanted, specs, use_ray):
        pass
    items_path = str(store.dir / "items.arrow")
    run_task(judge.save_known, (str(cache.dir), items_path, plan.known), use_ray)
    step = -(-store.n_items // len(ranges))
    images = judge.takes_images(cfg)
    specs = (judge.RangeSpec(str(work), plan.known, items_path, store.n_items, lo, min(lo + step, store.n_items), i,
                             j.batch_size, images) for i, lo in enumerate(range(0, store.n_items, step)))
    planned = list(map_blocks(judge.plan_range, specs, use_ray))
    pairs, missing = sum(p["pairs"] for p in planned), sum(p["missing"] for p in planned)
    info = {"kind": j.kind, "model": j.model or j.cls, "fingerprint": fp, "rule": rule, "pairs": pairs,
            "reused": pairs - missing, "scored": missing}
    if missing:
        from .mine import ensure_ray

        ensure_ray(cfg)
        info["actors"] = judge.score_plans([(p["path"], p["rows"]) for p in planned if p["path"]],
                                           any(p["images"] for p in planned), cfg, cache)
        plan = dataclasses.replace(plan, known=str(work / "known-1"))
        run_task(judge.save_known, (str(cache.dir), items_path, plan.known), use_ray)
    return plan, info


def write_epoch(store: RunStore, cfg: Config, out: Path, epoch: int, config: dict, extra: dict, started: float,
                use_ray: bool) -> dict:
    """Filter, sample and write one epoch from the kept retrieval results, block by block; the manifest goes in
    last. The driver holds the blocks' statistics and the compact calibration evidence, not the candidates."""
    nq = store.nq
    blocklists = [out / "blocklist.jsonl"] + ([Path(cfg.filters.blocklist)] if cfg.filters.blocklist else [])
    blocked_list = blocklist.read(*blocklists)
    folder = EpochFolder(out, epoch)
    stats = EpochStats(cfg.sample.n_negatives, store.info["rows_in"])
    rejects = store.rejects()
    input_counts = input_negatives.new_counts()
    files, cand_files = [], []
    step = cfg.output.rows_per_shard
    base = dict(run_dir=str(store.dir), epoch=epoch, sample=cfg.sample, folder=str(folder.tmp),
                compression=cfg.output.compression, relabel=cfg.filters.relabel,
                on_shortfall=cfg.sample.on_shortfall)
    ranges = [(shard, start, min(start + step, nq)) for shard, start in enumerate(range(0, nq, step))]
    entries = blocked_list.entries
    ids = ((tuple(e["query_id"] for e in entries), _item_rows(store, [e["item_id"] for e in entries]),
            tuple(sorted(blocked_list.reviewed))) if entries or blocked_list.reviewed else ())
    judge_plan, judge_info, work = None, None, None
    try:
        for left in (out / "_run").glob(".judge-*"):  # a killed run's scratch; the caller holds OUT's writer lock
            shutil.rmtree(left, ignore_errors=True)
        caps = positive_caps(store, cfg.filters, ranges, use_ray)
        if cfg.judge.kind != "none" and nq:  # scored once per run (OUT/_run/judge), applied after every other filter
            work = Path(tempfile.mkdtemp(prefix=".judge-", dir=out / "_run"))
            judge_plan, judge_info = judge_epoch(store, cfg, out / "_run", work, ranges, base, ids, caps, use_ray)
        ev = None
        specs = (BlockSpec(start=start, end=end, shard=shard, blocked=np.zeros(0, np.int64), filters=cfg.filters,
                           blocklist_ids=ids, judge=judge_plan, **base) for shard, start, end in ranges)
        for part in map_blocks(block_evidence, specs, use_ray):
            ev = _merge_evidence(ev, part)
        blocked = np.unique(ev.blocked) if ev is not None else np.zeros(0, np.int64)
        reviewed = np.unique(ev.reviewed) if ev is not None else np.zeros(0, np.int64)
        filter_cfgs, fn_report = calibrate_blocks(store, ev, blocked, reviewed, cfg, epoch, caps) if ev is not None \
            else ({}, {})
        if judge_info is not None:
            judge_info.update(ev.judged)
        del ev
        specs = (BlockSpec(start=start, end=end, shard=shard, blocked=blocked, filters=filter_cfgs,
                           judge=judge_plan, **base) for shard, start, end in ranges)
        with Progress(f"write epoch {epoch}", total=nq, unit="queries", enabled=cfg.run.progress) as bar:
            for result in map_blocks(write_block, specs, use_ray):
                files.append(result.file)
                cand_files.append(result.cand_file)
                stats.merge(result.stats)
                rejects += result.rejects
                _merge_counts(input_counts, result.input_counts)
                bar.update(result.rows)
        wanted = stats.wanted()
        if wanted is not None:  # the exact quantiles: count the keys in their bins, read back from the shards
            specs = ((str(folder.tmp / f["path"]), wanted) for f in files if f["rows"])
            for found in map_blocks(shard_key_counts, specs, use_ray):
                stats.add_found(found)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    write_jsonl(folder.tmp / "_rejects.jsonl", rejects)
    summary = stats.finish(rejects)
    summary["retrieval"] = store.info.get("retrieval", {})
    summary["embed"] = store.info.get("embed", {})
    if judge_info is not None:
        summary["judge"] = judge_info
    if input_negatives.COLUMN in store.queries().column_names:
        summary["input_negatives"] = input_counts
    summary["false_negatives"] = {"calibrate": cfg.filters.calibrate, "target_fn_rate": cfg.filters.target_fn_rate,
                                  "per_dataset": fn_report}
    summary["deepened_queries"] = sum(r.get("deepened", {}).get("queries", 0) for r in summary["retrieval"].values())
    summary["timings"] = {"total_s": round(time.time() - started, 3), **store.info.get("timings", {})}
    summary["blocklist"] = blocked_list.summary()
    summary.update(extra)
    write_json(folder.tmp / "_stats.json", summary)
    write_json(folder.tmp / "_manifest.json", {
        "epoch": epoch, "config": config, "teacher": store.info.get("embed", {}), **extra,
        "image_root": cfg.input.image_root, "retrieval": store.info.get("retrieval", {}), "counts": {
            k: summary[k] for k in ("queries_in", "queries_written", "queries_rejected")},
        "files": files, "candidate_files": cand_files, "filters": list(REASONS)})
    folder.commit()
    return summary
