"""Retrieval as block tasks: embed, write the vectors to disk, search each dataset's index per query block, and
write the candidates parts, so neither the vectors nor the (queries x k) matrices are ever whole in one process.

1. Embed queries and candidates into the cache (one pass), then write each (role, dataset)'s vectors as `.npy`
   shards under the state dir (pipeline/vectors.py); with a mixed-in teacher its vectors too.
2. With deepening on, a cheap first pass histograms each block's positive scores per dataset (one float a query,
   staged for a second pass that pins the quantile: `stats.positive_score_caps`); the driver merges them into each
   dataset's positive-score cap, the float the filters will use, holding no score.
3. Per dataset: build its index over the pool shards (in this process, or in shard actors on Ray), measure recall,
   then one task per query block searches it (`search_block`): exact scores, positive similarities and, for queries
   the filters leave short, deeper searches. Each writes its rows to a staging file.
4. Per query block (`finish_block`): the block's rows of every dataset, padded to the run's width, merged with the
   input's negatives, blended with the mixed-in teacher, the extra positives scored; written as
   `candidates/part-NNNNN.arrow` (pipeline/blocks.py) and the block's queries with their per-query columns, which
   one task joins into `queries.arrow` (`join_queries`).

Every query's result depends on its own vectors and the per-dataset thresholds only, and scores are recomputed
exactly after the index search, so the bytes do not depend on block, task or actor counts.

The read stage hands over files, not tables (`write_corpus`: the items, the queries, each dataset's pool), and the
driver keeps `CorpusMeta` and the queries' item rows (8 bytes a query); every table is read by the block tasks.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import extra_positives, input_negatives
from .blocks import _write_ipc, open_ipc, read_items, run_context, take_rows, write_items, write_part, \
    write_positives
from .calibrate import data_filters
from .config import Config
from .embed import embed_roles, role_fingerprint
from .executor import map_blocks, run_task
from .filters import KEPT, CandidateBlock, filter_candidates
from .index import canonical_order
from .ray_session import ray_active
from .retrieve import open_index
from .stats import positive_score_caps
from .vectors import VectorStore, layout, write_stores

SIM_CHUNK = 64  # queries per chunk of cosines: 64 x k x d floats (5 MB at k=51, d=384), summed while still in cache
#               (chunks of 256, 20 MB, took 1.8x the CPU time for 4,000 queries x 51 candidates x 384)
STAGING = "search"
QUERIES_IN = "queries_in.arrow"
CORPUS = "corpus"  # the read stage's pools and query item rows, until retrieval ends


@dataclass
class CorpusMeta:
    """What the read stage hands the driver: counts and names. The tables and pools are files (`write_corpus`)."""

    nq: int
    n_items: int
    n_groups: int
    rows_in: int
    candidate_rows_rejected: int
    rejects: list
    ranges: dict        # dataset -> [lo, hi): its queries' rows (the reader sorts the queries by dataset)
    pools: list         # the datasets with a pool, in the reader's order: CORPUS/pool-NNNNN.npy (and embed-NNNNN.npy)
    pool_sizes: dict
    input_width: int    # the longest list of input negatives


@dataclass
class Stores:
    """The vector stores of one retrieval: the teacher's, and the mixed-in teacher's when there is one."""

    query: VectorStore
    cand: VectorStore
    base_query: VectorStore | None = None
    base_cand: VectorStore | None = None


@dataclass
class SearchSpec:
    """One dataset's query rows of one query block (phase 3), or a whole block (phases 2 and 4)."""

    state_dir: str
    block: int
    start: int
    end: int
    stores: Stores
    dataset: str = ""
    ds_index: int = 0
    rows: np.ndarray | None = None   # global query rows of `dataset` in [start, end)
    client: object = None            # the index: an in-process searcher, or a picklable ShardClient
    top_k: int = 0
    kk: int = 0
    deepen: dict = field(default_factory=dict)  # factor, n_negatives, filters (this dataset's), n_groups, n_items
    width: int = 0                   # phase 4: the run's candidate width; input_width: the input's negatives
    input_width: int = 0
    mix: float = 0.0
    parts: tuple = ()                # phase 4: ds_index of the datasets with rows in this block


def write_corpus(corpus, state_dir: Path, block_rows: int, items: bool = True) -> CorpusMeta:
    """The read stage's `Corpus` as files in `state_dir` (the items and what the filters look up, QUERIES_IN, each
    dataset's pool and the pool it embeds, the queries' item rows); returns what the driver keeps of it. Without
    `items`, the item files are left as they are (`drop_failed` drops queries and pool members, never items)."""
    state_dir = Path(state_dir)
    q = corpus.queries
    if items:
        write_items(state_dir, q, corpus.items, corpus.item_groups, block_rows)
    else:
        write_positives(state_dir, q, corpus.items.num_rows)
    tmp = state_dir / f"{QUERIES_IN}.tmp"  # a task may have QUERIES_IN mapped (`drop_failed` rewrites it)
    _write_ipc(q, tmp, block_rows)
    tmp.replace(state_dir / QUERIES_IN)
    d = state_dir / CORPUS
    d.mkdir(parents=True, exist_ok=True)
    embedded = input_negatives.candidate_pools(corpus.pools, q)
    for j, ds in enumerate(corpus.pools):
        _save(d / f"pool-{j:05d}.npy", corpus.pools[ds])
        _save(d / f"embed-{j:05d}.npy", embedded[ds])
    _save(d / "qry_idx.npy", q.column("qry_idx").to_numpy().astype(np.int64))
    names, starts, counts = np.unique(q.column("dataset").to_numpy(zero_copy_only=False), return_index=True,
                                      return_counts=True)
    by_start = np.argsort(starts)
    if np.any(starts[by_start][1:] != (starts + counts)[by_start][:-1]):
        raise AssertionError("a bug, not bad input: the reader left queries not grouped by dataset; please report it")
    ranges = {str(ds): [int(lo), int(lo + n)] for ds, lo, n in zip(names, starts, counts)}
    return CorpusMeta(q.num_rows, corpus.items.num_rows, corpus.n_groups, corpus.rows_in,
                      corpus.candidate_rows_rejected, corpus.rejects, ranges, list(corpus.pools),
                      {ds: int(len(pool)) for ds, pool in corpus.pools.items()}, input_negatives.width(q))


def _save(path: Path, array: np.ndarray) -> None:
    """np.save by a new file: the driver may still have the old one mapped (`corpus_rows`)."""
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def read_corpus(state_dir: Path, meta: CorpusMeta):
    """The `Corpus` of `write_corpus`'s files (the queries read into memory: `drop_failed` writes them again)."""
    from .read import Corpus

    state_dir = Path(state_dir)
    with pa.OSFile(str(state_dir / QUERIES_IN)) as f:
        queries = pa.ipc.open_file(f).read_all()
    pools = {ds: np.load(state_dir / CORPUS / f"pool-{j:05d}.npy") for j, ds in enumerate(meta.pools)}
    return Corpus(queries, read_items(state_dir), pools, np.load(state_dir / "item_groups.npy"), meta.n_groups,
                  meta.rejects, meta.rows_in, meta.candidate_rows_rejected)


def corpus_rows(state_dir: Path, meta: CorpusMeta) -> tuple[dict, dict, dict]:
    """({dataset: its pool}, {dataset: the item rows it embeds as candidates}, {dataset: its queries' item rows}),
    memory-mapped from the read stage's files."""
    d = Path(state_dir) / CORPUS
    load = lambda name: np.load(d / name, mmap_mode="r")  # noqa: E731
    qry_idx = load("qry_idx.npy")
    return ({ds: load(f"pool-{j:05d}.npy") for j, ds in enumerate(meta.pools)},
            {ds: load(f"embed-{j:05d}.npy") for j, ds in enumerate(meta.pools)},
            {ds: qry_idx[lo:hi] for ds, (lo, hi) in meta.ranges.items()})


def drop_failed(state_dir: Path, meta: CorpusMeta, failed: set, reason: str, detail: str, block_rows: int,
                use_ray: bool) -> CorpusMeta:
    """The corpus files without the items in `failed` (`read.drop_items`), rewritten in a task; the new metadata."""
    if not failed:
        return meta
    return run_task(_drop_failed, (str(state_dir), meta, failed, reason, detail, block_rows), use_ray)


def _drop_failed(spec) -> CorpusMeta:
    from .read import drop_items

    state_dir, meta, failed, reason, detail, block_rows = spec
    corpus = drop_items(read_corpus(state_dir, meta), failed, reason, detail)
    return write_corpus(corpus, Path(state_dir), block_rows, items=False)


def _stores(spec) -> tuple[VectorStore, VectorStore]:
    """The query and candidate stores of one teacher, laid out from the read stage's files in one task (the layout
    sorts every pool and query row: not in the driver), whose shards are written by block tasks."""
    root, state_dir, meta, cfg, use_ray = spec
    corpus_pools, pools, qrows = corpus_rows(state_dir, meta)
    fps = lambda role, rows: {ds: role_fingerprint(cfg, role, ds) for ds in rows}  # noqa: E731
    cand = layout(pools, corpus_pools)
    query = layout(qrows)
    return tuple(write_stores([(root / "query", query, fps("query", query), None),
                               (root / "candidate", cand, fps("candidate", cand), corpus_pools)],
                              Path(state_dir) / "items.arrow", cfg, use_ray))


def retrieve_run(meta: CorpusMeta, cfg: Config, state_dir: Path, base: Config | None = None,
                 mix: float = 0.0) -> dict:
    """Retrieve every query's candidates into `state_dir`, which holds the read stage's files (`write_corpus`): all
    of pipeline/blocks.py's files but state.json; returns the state's metadata and info for `write_state`."""
    state_dir = Path(state_dir)
    block_rows = cfg.retrieve.block_rows
    use_ray = ray_active(cfg)
    _, pools, qrows = corpus_rows(state_dir, meta)
    cand_stats, qry_stats = embed_roles(state_dir / "items.arrow", [("candidate", pools, "candidates"),
                                                                   ("query", qrows, "queries")], cfg)
    embed_stats = {"candidates": cand_stats, "queries": qry_stats}
    vec_dir = state_dir / "vectors"
    stores = Stores(*run_task(_stores, (vec_dir / "teacher", state_dir, meta, cfg, use_ray), use_ray))
    if mix:
        stats_c, stats_q = embed_roles(state_dir / "items.arrow",
                                       [("candidate", pools, "candidates (mixed-in teacher)"),
                                        ("query", qrows, "queries (mixed-in teacher)")], base)
        embed_stats["mixed_in"] = {"candidates": stats_c, "queries": stats_q}
        stores.base_query, stores.base_cand = run_task(_stores, (vec_dir / "mixed_in", state_dir, meta, base,
                                                                 ray_active(base)), use_ray)
    del pools, qrows  # unmapped: the files' pages leave the driver

    nq = meta.nq
    blocks = [(i, s, min(s + block_rows, nq)) for i, s in enumerate(range(0, nq, block_rows))]
    per_dataset, width, in_block = _search_datasets(meta, cfg, state_dir, stores, blocks, use_ray)
    m = meta.input_width
    finish = [SearchSpec(str(state_dir), i, s, e, stores, width=width, input_width=m, mix=mix,
                         parts=tuple(in_block[i])) for i, s, e in blocks]
    for _ in map_blocks(finish_block, finish, use_ray):
        pass
    run_task(join_queries, (str(state_dir), len(blocks)), use_ray)
    for name in (vec_dir, state_dir / STAGING, state_dir / CORPUS):
        shutil.rmtree(name, ignore_errors=True)
    (state_dir / QUERIES_IN).unlink()
    info = {"rows_in": meta.rows_in, "candidate_rows_rejected": meta.candidate_rows_rejected,
            "embed": embed_stats, "retrieval": per_dataset}
    return {"rejects": meta.rejects, "n_groups": meta.n_groups, "info": info, "nq": nq,
            "n_items": meta.n_items, "k": width + m, "blocks": [[s, e] for _, s, e in blocks], "from_input": m > 0}


def _search_datasets(meta: CorpusMeta, cfg: Config, state_dir: Path, stores: Stores, blocks: list, use_ray: bool):
    """Phases 2 and 3: per dataset, open its index, search its queries block by block (deepening the short ones),
    close it. Returns (per-dataset info, the run's candidate width, {block: datasets with rows in it})."""
    nq, k = meta.nq, cfg.retrieve.top_k
    deepen = cfg.retrieve.deepen_factor > 1 and cfg.filters.max_rank is None and nq > 0
    thresholds = {}
    if deepen:  # each dataset's positive-score cap, from the blocks' histograms of one float a query
        quantile = cfg.filters.positive_quantile
        caps = positive_score_caps([SearchSpec(str(state_dir), i, s, e, stores) for i, s, e in blocks],
                                   positive_scores, [] if quantile is None else [quantile], use_ray,
                                   staged_positive_scores)
        thresholds = data_filters(cfg.filters, caps, meta.ranges)
    per_dataset, width, in_block = {}, k, {i: [] for i, _, _ in blocks}
    for j, ds in enumerate(sorted(meta.pools)):
        lo, hi = meta.ranges.get(ds, (0, 0))
        n_pool = meta.pool_sizes[ds]
        if hi <= lo or not n_pool:
            continue
        t0 = time.perf_counter()
        kk = min(k, n_pool)
        searcher, info = open_index(stores.cand.pool(ds), hi - lo, kk, cfg.index, lambda r: run_task(
            recall_sample, (str(state_dir), stores.query, ds, lo, r), use_ray))
        try:
            deep = {"factor": cfg.retrieve.deepen_factor, "n_negatives": cfg.sample.n_negatives,
                    "filters": thresholds.get(str(ds)), "n_groups": meta.n_groups, "n_items": meta.n_items}
            specs = []
            for i, s, e in blocks:
                mine = np.arange(max(lo, s), min(hi, e), dtype=np.int64)
                if len(mine):
                    in_block[i].append(j)
                    specs.append(SearchSpec(str(state_dir), i, s, e, stores, str(ds), j, mine, searcher.client(), k,
                                            kk, deep if deepen else {}))
            t1 = time.perf_counter()
            results = list(map_blocks(search_block, specs, use_ray and searcher.mode == "ray"))
        finally:
            searcher.close()
        search_s = time.perf_counter() - t1
        info.update({"search_s": round(search_s, 3), "qps": round((hi - lo) / search_s, 1) if search_s > 0 else None,
                     "total_s": round(time.perf_counter() - t0, 3)})
        per_dataset[ds] = {"queries": int(hi - lo), "pool": int(n_pool), "k": kk, "index": info}
        by_k = {}
        for w, counts in results:
            width = max(width, w)
            for key, n in counts.items():
                by_k[key] = by_k.get(key, 0) + n
        if by_k:
            by_k = {str(key): by_k[key] for key in sorted(by_k)}
            per_dataset[ds]["deepened"] = {"queries": max(by_k.values()), "by_k": by_k}
    return per_dataset, width, in_block


def recall_sample(spec) -> np.ndarray:
    """The vectors of some of a dataset's queries (rows `rows` from its first row `lo`: the index's recall sample),
    looked up in a task: the look-up maps the query store's files and the queries' item rows whole."""
    state_dir, store, ds, lo, rows = spec
    qry_idx = np.load(Path(state_dir) / CORPUS / "qry_idx.npy", mmap_mode="r")
    return store.get(ds, qry_idx[lo + np.asarray(rows, np.int64)])


def _block_queries(state_dir: Path, block: int) -> Path:
    return Path(state_dir) / STAGING / f"queries-{block:05d}.arrow"


def join_queries(spec) -> None:
    """queries.arrow: QUERIES_IN with the per-query columns of phase 4, one record batch a block, as the whole table
    would be written in `block_rows` batches; the blocks' files (`finish_block`) are read memory-mapped, in order."""
    state_dir, n_blocks = Path(spec[0]), spec[1]
    schema = pa.ipc.open_file(pa.memory_map(str(state_dir / QUERIES_IN))).schema.append(
        pa.field("pos_score", pa.float32()))
    if extra_positives.COLUMN in schema.names:
        schema = schema.append(pa.field(extra_positives.SCORES, pa.list_(pa.float32())))
    with pa.OSFile(str(state_dir / "queries.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for i in range(n_blocks):
            writer.write_table(open_ipc(_block_queries(state_dir, i)))


def _queries(spec: SearchSpec) -> pa.Table:
    q = open_ipc(Path(spec.state_dir) / QUERIES_IN)
    return take_rows(q, spec.rows) if spec.rows is not None else q.slice(spec.start, spec.end - spec.start)


def positive_scores(spec: SearchSpec) -> dict[str, np.ndarray]:
    """Phase 2: {dataset: the query-positive cosines of the block's queries} (0 where the dataset has no pool),
    staged for the cap's second pass (`staged_positive_scores`) so it does not read the vectors again."""
    q = _queries(spec)
    out = np.zeros(q.num_rows, np.float32)
    datasets = q.column("dataset").to_numpy(zero_copy_only=False)
    qry_idx, pos_idx = q.column("qry_idx").to_numpy(), q.column("pos_idx").to_numpy()
    for ds in np.unique(datasets):
        if str(ds) in spec.stores.cand.datasets and str(ds) in spec.stores.query.datasets:
            rows = np.flatnonzero(datasets == ds)
            out[rows] = _dot(spec.stores.query.get(ds, qry_idx[rows]), spec.stores.cand.get(ds, pos_idx[rows]))
    path = _staged_scores(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, out)
    return {str(ds): out[datasets == ds] for ds in np.unique(datasets)}


def staged_positive_scores(spec: SearchSpec) -> dict[str, np.ndarray]:
    """`positive_scores` of a block, read back from its staging file."""
    datasets = _queries(spec).column("dataset").to_numpy(zero_copy_only=False)
    out = np.load(_staged_scores(spec))
    return {str(ds): out[datasets == ds] for ds in np.unique(datasets)}


def _staged_scores(spec: SearchSpec) -> Path:
    return Path(spec.state_dir) / STAGING / f"pos-{spec.block:05d}.npy"


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def _search(spec: SearchSpec, q_vecs: np.ndarray, pos_vecs: np.ndarray, kk: int):
    """(cand item rows, scores, pos_sims), each (rows, kk): the index's top-kk, scored again exactly (the index's
    own scores depend on how many queries it is given at once) and ordered by score, then item row."""
    _, ids = spec.client.search(q_vecs, kk)
    pool = np.load(Path(spec.stores.cand.root) / spec.stores.cand.datasets[spec.dataset]["dir"] / "rows.npy",
                   mmap_mode="r")
    cand = np.where(ids >= 0, np.asarray(pool[np.maximum(ids, 0).ravel()]).reshape(ids.shape), -1)
    # an index id is the candidate's place in the store: its vector is taken there, not looked up by item row
    scores, pos_sims = _sims(lambda at: spec.stores.cand.at(spec.dataset, at), ids, q_vecs, pos_vecs)
    order = canonical_order(scores, cand)
    cand, scores, pos_sims = (np.take_along_axis(a, order, 1) for a in (cand, scores, pos_sims))
    cand = np.where(np.isneginf(scores), -1, cand)
    pos_sims[cand < 0] = -np.inf
    return cand, scores, pos_sims


def _sims(take, block: np.ndarray, *vecs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Cosines of each row's candidates (-1 none; `take` gives the vectors of the others, a flat array of them)
    with that row's vector, per array of `vecs` (-inf where none). The candidates' vectors are read once for all
    of `vecs`; a cosine depends only on its two vectors, not on its place in the row, so re-ordering the
    candidates afterwards changes no value."""
    out = tuple(np.full(block.shape, -np.inf, np.float32) for _ in vecs)
    for start in range(0, len(block), SIM_CHUNK):
        part = block[start:start + SIM_CHUNK]
        valid = part >= 0
        if not valid.any():
            continue
        # one gather in place: an empty slot reads some valid row's vector, its cosine is masked below
        cands = take(np.where(valid, part, part[valid][0]).ravel()).reshape(part.shape + (-1,))
        for o, v in zip(out, vecs):
            o[start:start + SIM_CHUNK] = np.where(valid, np.einsum("ikd,id->ik", cands, v[start:start + SIM_CHUNK]),
                                                  -np.inf)
    return out


def search_block(spec: SearchSpec) -> tuple[int, dict]:
    """Phase 3: search one dataset's queries of one block, deepen those the filters leave short, stage the rows.
    Returns (the width reached, {k: queries searched at that depth} of the deeper searches)."""
    q = _queries(spec)
    ds, k = spec.dataset, spec.top_k
    qry_idx, pos_idx = q.column("qry_idx").to_numpy(), q.column("pos_idx").to_numpy()
    q_vecs, pos_vecs = spec.stores.query.get(ds, qry_idx), spec.stores.cand.get(ds, pos_idx)
    pos_score = _dot(q_vecs, pos_vecs)
    n = len(spec.rows)
    cand = np.full((n, k), -1, np.int64)
    scores, pos_sims = np.full((n, k), -np.inf, np.float32), np.full((n, k), -np.inf, np.float32)
    cand[:, :spec.kk], scores[:, :spec.kk], pos_sims[:, :spec.kk] = _search(spec, q_vecs, pos_vecs, spec.kk)
    by_k = {}
    deep = spec.deepen
    n_pool = spec.stores.cand.datasets[ds]["pool"]
    width = k
    while deep and width < k * deep["factor"]:
        ctx = run_context(Path(spec.state_dir), deep["n_groups"], deep["n_items"], np.zeros(0, np.int64), width)
        block = CandidateBlock(cand, scores, pos_sims, pos_score, qry_idx, pos_idx,
                               q.column("group_code").to_numpy(), spec.rows)
        survivors = (filter_candidates(block, deep["filters"], ctx) == KEPT).sum(axis=1)
        width = min(2 * width, k * deep["factor"])
        short = np.flatnonzero((survivors < deep["n_negatives"]) & (cand[:, -1] >= 0))
        if not len(short) or n_pool <= cand.shape[1]:
            break
        pad = width - cand.shape[1]
        cand = np.pad(cand, ((0, 0), (0, pad)), constant_values=-1)
        scores, pos_sims = (np.pad(a, ((0, 0), (0, pad)), constant_values=-np.inf) for a in (scores, pos_sims))
        kk = min(width, n_pool)
        cand[short, :kk], scores[short, :kk], pos_sims[short, :kk] = _search(spec, q_vecs[short], pos_vecs[short],
                                                                             kk)
        by_k[kk] = by_k.get(kk, 0) + int(len(short))
    path = Path(spec.state_dir) / STAGING / f"ds-{spec.ds_index:05d}" / f"part-{spec.block:05d}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, rows=spec.rows, cand=cand, scores=scores, pos_sims=pos_sims, pos_score=pos_score)
    return cand.shape[1], by_k


def finish_block(spec: SearchSpec) -> None:
    """Phase 4: one query block's candidates part (every dataset's rows at the run's width, the input's negatives
    merged, the mixed-in teacher blended in) and its queries with their per-query columns (pos_score, extra
    positives' scores), one record batch for `join_queries`."""
    q = _queries(spec)
    n, width = q.num_rows, spec.width
    cand = np.full((n, width), -1, np.int64)
    scores, pos_sims = np.full((n, width), -np.inf, np.float32), np.full((n, width), -np.inf, np.float32)
    pos_score = np.zeros(n, np.float32)
    for j in spec.parts:
        with np.load(Path(spec.state_dir) / STAGING / f"ds-{j:05d}" / f"part-{spec.block:05d}.npz") as part:
            at, w = part["rows"] - spec.start, part["cand"].shape[1]
            cand[at, :w], scores[at, :w], pos_sims[at, :w] = part["cand"], part["scores"], part["pos_sims"]
            pos_score[at] = part["pos_score"]
    stores = spec.stores
    cand, scores, pos_sims = input_negatives.merge(q, cand, scores, pos_sims, stores.query, stores.cand,
                                                   spec.input_width)
    if spec.mix:
        scores, pos_score, pos_sims, cand = mix_in(q, cand, scores, pos_score, pos_sims, stores, spec.mix)
    scored = extra_positives.score(q.append_column("pos_score", pa.array(pos_score, pa.float32())), stores.query,
                                   stores.cand)
    from_input = input_negatives.marks(q, cand) if spec.input_width else None
    if spec.input_width and from_input is None:
        from_input = np.zeros(cand.shape, bool)
    write_part(Path(spec.state_dir), spec.block, cand, scores, pos_sims, from_input)
    path = _block_queries(spec.state_dir, spec.block)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_ipc(scored.combine_chunks(), path, max(n, 1))


def mix_in(q: pa.Table, cand, scores, pos_score, pos_sims, stores: Stores, mix: float):
    """Blend the mixed-in teacher's scores into the teacher's for a block's candidates, then re-rank."""
    datasets = q.column("dataset").to_numpy(zero_copy_only=False)
    qry_idx, pos_idx = q.column("qry_idx").to_numpy(), q.column("pos_idx").to_numpy()
    pos_score = pos_score.astype(np.float64)
    for ds in np.unique(datasets):
        if str(ds) not in stores.base_cand.datasets:
            continue
        ds_rows = np.flatnonzero(datasets == ds)
        for start in range(0, len(ds_rows), SIM_CHUNK):
            rows = ds_rows[start:start + SIM_CHUNK]
            q_vecs, pos_vecs = stores.base_query.get(ds, qry_idx[rows]), stores.base_cand.get(ds, pos_idx[rows])
            pos_score[rows] = (1 - mix) * pos_score[rows] + mix * _dot(q_vecs, pos_vecs)
            valid = cand[rows] >= 0
            base_scores, base_pos_sims = _sims(lambda r: stores.base_cand.get(ds, r), cand[rows], q_vecs, pos_vecs)
            scores[rows] = np.where(valid, (1 - mix) * scores[rows] + mix * base_scores, -np.inf)
            pos_sims[rows] = np.where(valid, (1 - mix) * pos_sims[rows] + mix * base_pos_sims, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    take = lambda m: np.take_along_axis(m, order, axis=1)  # noqa: E731
    return take(scores).astype(np.float32), pos_score.astype(np.float32), take(pos_sims).astype(np.float32), take(cand)
