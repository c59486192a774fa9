"""The mining run: read -> embed -> retrieve (once per run, kept in OUT/_run) -> filter -> sample -> write (per epoch).

Retrieval results are kept, so another epoch only re-filters and re-samples: seconds, no model and no index.
A run folder belongs to one retrieval config; asking it for another config is refused unless `overwrite` is given.
The folder itself (ownership, the writer lock, binding, atomic epochs) is pipeline/run.py's.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .blocks import RunState, RunStore, is_legacy, item_modality, save_run, upgrade
from .config import EPOCH, RETRIEVAL, RUN, Config, check_epoch, config_view
from .embed import embed_or_reject, embed_roles_by_dataset
from .epoch import write_epoch
from .filters import KEPT, CandidateBlock, FilterContext, query_positives
from .calibrate import data_filters, filter_by_dataset
from . import extra_positives, input_negatives
from .read import Corpus, load_corpus
from .retrieve import retrieve
from .teachers import teacher_fingerprint
from .run import RunFolder, RunMismatch, claim, epoch_dir, is_run_folder

RUN_VERSION = 1
BINDS_EPOCH = (RUN, RETRIEVAL, EPOCH)  # what an epoch already written must match to be reused; `free` keys need not
SIM_CHUNK = 2048


@dataclass
class MineResult:
    out: Path
    epoch_dir: Path
    stats: dict
    reused_retrieval: bool
    skipped: bool = False


def ensure_ray(cfg: Config, n_items: int | None = None) -> bool:
    """Join `run.ray_address` / RAY_ADDRESS, or start a local Ray, or reuse a session that is already up, when a
    job of `n_items` items runs on Ray (`use_ray`; always when `n_items` is None). Whether it does."""
    from .ray_session import start_ray, use_ray

    if n_items is not None and not use_ray(cfg, n_items):
        return False
    start_ray(cfg.run.ray_address)
    return True


def run_identity(cfg: Config) -> dict:
    """What a run folder is bound to: the input files' bytes and the keys classified `run` in pipeline/config.py
    (KEY_CLASSES). The teacher's weights are left out (each epoch may re-mine with a new checkpoint), and so are
    filters and sampling (each epoch may change them) and runtime settings."""
    digests = {p: _file_digest(p) for p in [*cfg.input.pairs, cfg.input.candidates, cfg.input.captions] if p}
    return _jsonable({"version": RUN_VERSION, "config": config_view(cfg.to_dict(), (RUN,)), "inputs_sha": digests})


def retrieval_id(cfg: Config, base: Config | None, mix: float) -> str:
    """Names one retrieval inside a run: the teacher's fingerprints (and the mixed-in teacher's, if any)."""
    parts = [teacher_fingerprint(cfg.teacher, role) for role in ("query", "candidate")]
    if base is not None and mix:
        parts += [teacher_fingerprint(base.teacher, role) for role in ("query", "candidate")] + [repr(mix)]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=6).hexdigest()


def _file_digest(path: str) -> str:
    if "://" in path:
        return "uri"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def with_checkpoint(cfg: Config, checkpoint: str | Path) -> Config:
    """The same config with the teacher's weights taken from `checkpoint` (a folder `from_pretrained` reads)."""
    out = copy.deepcopy(cfg)
    out.teacher.model = str(checkpoint)
    return out


def mine(cfg: Config, out: str | Path, epoch: int = 0, overwrite: bool = False, resume: bool = False,
         checkpoint: str | Path | None = None, mix_teacher: float = 0.0, wait_lock: float = 0.0) -> MineResult:
    """Mine one epoch into OUT/epoch=NNNN.

    Retrieval runs once per teacher and is kept under OUT/_run/<retrieval id>/, so another epoch with the same
    teacher only re-filters and re-samples. `checkpoint` re-embeds and re-mines with new weights (a student);
    `mix_teacher` in [0, 1] blends the configured teacher's scores into the checkpoint's. OUT is locked for the
    whole call: another writer makes it refuse at once, or wait up to `wait_lock` seconds (math.inf: no limit).
    """
    check_epoch(epoch)  # before the folder is claimed: a bad epoch creates nothing
    if resume and not is_run_folder(out):
        raise RunMismatch(f"{out} holds no run to resume; drop --resume to start one")
    with claim(out, wait_lock) as run:
        return _mine(run, cfg, epoch, overwrite, checkpoint, mix_teacher)


def _mine(run: RunFolder, cfg: Config, epoch: int, overwrite: bool, checkpoint, mix_teacher: float) -> MineResult:
    out = run.out
    started = time.time()
    cfg = cfg.for_epoch(epoch)
    base = cfg
    if checkpoint is not None:
        cfg = with_checkpoint(cfg, checkpoint)
    if not 0.0 <= mix_teacher <= 1.0 or (mix_teacher and checkpoint is None):
        raise ValueError("mix_teacher must be in [0, 1] and needs a checkpoint to mix with")
    identity = run_identity(cfg)
    run_dir = out / "_run"
    saved = run.identity()
    if saved is not None and saved != identity:
        if not overwrite:
            raise RunMismatch(run.mismatch_message(saved, identity))
        run.clear(keep=[checkpoint] if checkpoint is not None else ())
        saved = None
    if saved is None:
        run.drop_unbound()
    rid = retrieval_id(cfg, base, mix_teacher)
    final = epoch_dir(out, epoch)
    config = _jsonable({**cfg.to_dict(), "mix_teacher": mix_teacher})
    if final.exists() and not overwrite:
        manifest = _read_json(final / "_manifest.json") or {}
        if config_view(manifest.get("config"), BINDS_EPOCH) == config_view(config, BINDS_EPOCH):
            return MineResult(out, final, _read_json(final / "_stats.json") or {}, True, skipped=True)
        raise RunMismatch(f"{final} was written with a different filter, sampling or teacher config; use "
                          "--overwrite to replace it or another --epoch")
    state_dir = run_dir / rid
    reused = (state_dir / "state.json").exists()
    if reused and is_legacy(state_dir):
        upgrade(state_dir, cfg.retrieve.block_rows)
    elif not reused:
        build_run(cfg, state_dir, base if mix_teacher else None, mix_teacher)
        if saved is None:  # bound only now: a run that fails before this leaves the folder free
            run.bind(identity)
    extra = {"retrieval_id": rid, "teacher_model": cfg.teacher.model, "mix_teacher": mix_teacher,
             "reused_retrieval": reused}
    store = RunStore(state_dir)
    stats = write_epoch(store, cfg, out, epoch, config, extra, started, ensure_ray(cfg, store.n_items))
    return MineResult(out, final, stats, reused)


def build_run(cfg: Config, state_dir: Path, base: Config | None = None, mix: float = 0.0) -> RunState:
    t0 = time.time()
    corpus = load_corpus(cfg.input, caption_mode=cfg.teacher.image_mode == "caption")
    if not ensure_ray(cfg, corpus.items.num_rows):  # a small job: every stage in this process
        cfg = copy.deepcopy(cfg)
        cfg.run.executor, cfg.index.distributed = "local", "never"
    if cfg.run.max_errored_blocks:  # the user allows failed embedding blocks: reject their items, go on
        corpus = embed_or_reject(corpus, cfg)
    t_read = time.time()
    state, info = _retrieve_all(corpus, cfg, base, mix)
    info["timings"] = {"read_s": round(t_read - t0, 3), "embed_and_retrieve_s": round(time.time() - t_read, 3)}
    state.info = info
    save_run(state, state_dir, cfg.retrieve.block_rows)
    return state


def _query_rows(q: pa.Table) -> dict:
    """{dataset: item rows of its queries}: a query item is embedded with its own dataset's instruction."""
    datasets = q.column("dataset").to_numpy(zero_copy_only=False)
    qry_idx = q.column("qry_idx").to_numpy().astype(np.int64)
    return {str(ds): qry_idx[datasets == ds] for ds in np.unique(datasets)}


def _retrieve_all(corpus: Corpus, cfg: Config, base: Config | None, mix: float) -> tuple[RunState, dict]:
    q, items = corpus.queries, corpus.items
    nq, k = q.num_rows, cfg.retrieve.top_k
    # Vectors per (role, dataset): with teacher.instructions an item's vector depends on its dataset's prompt.
    # One embedding pass (one actor pool, one model load) for candidates and queries.
    (cand_v, cand_stats), (qry_v, qry_stats) = embed_roles_by_dataset(
        items, [("candidate", input_negatives.candidate_pools(corpus.pools, q), "candidates"),
                ("query", _query_rows(q), "queries")], cfg)

    cand = np.full((nq, k), -1, np.int64)
    scores = np.full((nq, k), -np.inf, np.float32)
    pos_score = np.zeros(nq, np.float32)
    pos_sims = np.full((nq, k), -np.inf, np.float32)
    datasets = q.column("dataset").to_numpy(zero_copy_only=False)
    qry_idx, pos_idx = q.column("qry_idx").to_numpy(), q.column("pos_idx").to_numpy()
    per_dataset = {}
    for ds in sorted(corpus.pools):
        rows = np.flatnonzero(datasets == ds)
        if not len(rows):
            continue
        pool = corpus.pools[ds]
        kk = min(k, len(pool))
        q_vecs, pos_vecs = qry_v.get(ds, qry_idx[rows]), cand_v.get(ds, pos_idx[rows])
        pos_score[rows] = np.einsum("ij,ij->i", q_vecs, pos_vecs)
        s, ids, index_info = retrieve(cand_v.get(ds, pool), q_vecs, kk, cfg.index)
        cand[rows, :kk] = np.where(ids >= 0, pool[np.maximum(ids, 0)], -1)
        scores[rows, :kk] = s
        per_dataset[ds] = {"queries": int(len(rows)), "pool": int(len(pool)), "k": kk, "index": index_info}
        pos_sims[rows] = _pos_sims(cand_v, ds, cand[rows], pos_vecs)
    cand, scores, pos_sims = _deepen(cfg, corpus, pos_score, cand, scores, pos_sims, cand_v, qry_v, per_dataset)
    embed_stats = {"candidates": cand_stats, "queries": qry_stats}
    cand, scores, pos_sims = input_negatives.merge(q, cand, scores, pos_sims, qry_v, cand_v)
    if mix:
        scores, pos_score, pos_sims, cand = _mix_in(base, mix, items, q, cand, scores, pos_score, pos_sims,
                                                    input_negatives.candidate_pools(corpus.pools, q), embed_stats)
    queries = extra_positives.score(q.append_column("pos_score", pa.array(pos_score, pa.float32())), qry_v, cand_v)
    info = {"rows_in": corpus.rows_in, "candidate_rows_rejected": corpus.candidate_rows_rejected,
            "embed": embed_stats, "retrieval": per_dataset}
    state = RunState(queries, items, cand, scores, pos_sims, corpus.item_groups, corpus.n_groups, corpus.rejects,
                     from_input=input_negatives.marks(q, cand))
    return state, info


def _pos_sims(cand_v, ds: str, block: np.ndarray, pos_vecs: np.ndarray) -> np.ndarray:
    """Candidate-positive cosines of a block of retrieved candidates (-inf where none)."""
    out = np.full(block.shape, -np.inf, np.float32)
    for start in range(0, len(block), SIM_CHUNK):
        part = block[start:start + SIM_CHUNK]
        sims = np.einsum("ikd,id->ik", cand_v.get(ds, np.maximum(part, 0)), pos_vecs[start:start + SIM_CHUNK])
        out[start:start + SIM_CHUNK] = np.where(part >= 0, sims, -np.inf)
    return out


def _deepen(cfg: Config, corpus: Corpus, pos_score, cand, scores, pos_sims, cand_v, qry_v, per_dataset):
    """Queries that the filters leave with fewer than n_negatives are retrieved again with 2x, 4x ... top_k
    candidates, up to `retrieve.deepen_factor * top_k` (only those queries); counted per dataset."""
    q = corpus.queries
    k = cand.shape[1]
    if cfg.retrieve.deepen_factor <= 1 or cfg.filters.max_rank is not None or not q.num_rows:
        return cand, scores, pos_sims
    datasets = q.column("dataset").to_numpy(zero_copy_only=False)
    qry_idx, pos_idx = q.column("qry_idx").to_numpy(), q.column("pos_idx").to_numpy()
    width = k
    while width < k * cfg.retrieve.deepen_factor:
        ctx = filter_context(corpus.items, corpus.item_groups, corpus.n_groups, q, np.zeros(0, np.int64), width)
        rows = np.arange(q.num_rows)
        block = CandidateBlock(cand, scores, pos_sims, pos_score, qry_idx, pos_idx,
                               q.column("group_code").to_numpy(), rows)
        configs = data_filters(cfg.filters, pos_score, datasets)  # with each dataset's positive-score cap
        survivors = (filter_by_dataset(block, datasets, configs, ctx) == KEPT).sum(axis=1)
        width = min(2 * width, k * cfg.retrieve.deepen_factor)
        todo = {}
        for ds in sorted(corpus.pools):
            pool = corpus.pools[ds]
            # short, and the pool holds more than was retrieved for them
            short = rows[(datasets == ds) & (survivors < cfg.sample.n_negatives) & (cand[:, -1] >= 0)]
            if len(short) and len(pool) > cand.shape[1]:
                todo[ds] = (short, pool)
        if not todo:
            break
        pad = width - cand.shape[1]
        cand = np.pad(cand, ((0, 0), (0, pad)), constant_values=-1)
        scores, pos_sims = (np.pad(m, ((0, 0), (0, pad)), constant_values=-np.inf) for m in (scores, pos_sims))
        for ds, (short, pool) in todo.items():
            kk = min(width, len(pool))
            s, ids, _ = retrieve(cand_v.get(ds, pool), qry_v.get(ds, qry_idx[short]), kk, cfg.index)
            cand[short, :kk] = np.where(ids >= 0, pool[np.maximum(ids, 0)], -1)
            scores[short, :kk] = s
            pos_sims[short, :kk] = _pos_sims(cand_v, ds, cand[short, :kk], cand_v.get(ds, pos_idx[short]))
            deep = per_dataset[ds].setdefault("deepened", {"queries": 0, "by_k": {}})
            deep["by_k"][str(kk)] = int(len(short))
            deep["queries"] = max(deep["queries"], int(len(short)))
    return cand, scores, pos_sims


def filter_context(items: pa.Table, item_groups: np.ndarray, n_groups: int, queries: pa.Table, blocked: np.ndarray,
                   width: int) -> FilterContext:
    """What the filters look up, for `width` retrieved candidates per query."""
    modality = item_modality(items)
    positives = query_positives(queries.column("qry_idx").to_numpy(), queries.column("pos_idx").to_numpy(),
                                items.num_rows, extra_positives.pairs(queries))
    return FilterContext(item_groups, n_groups, modality, blocked, items.num_rows, width, positives)


def _mix_in(base, mix, items, q, cand, scores, pos_score, pos_sims, pools, embed_stats):
    """Blend the base teacher's scores into the checkpoint's for the retrieved candidates, then re-rank."""
    (b_cand, stats_c), (b_qry, stats_q) = embed_roles_by_dataset(
        items, [("candidate", pools, "candidates (mixed-in teacher)"),
                ("query", _query_rows(q), "queries (mixed-in teacher)")], base)
    embed_stats["mixed_in"] = {"candidates": stats_c, "queries": stats_q}
    datasets = q.column("dataset").to_numpy(zero_copy_only=False)
    qry_idx, pos_idx = q.column("qry_idx").to_numpy(), q.column("pos_idx").to_numpy()
    pos_score = pos_score.astype(np.float64)
    for ds in np.unique(datasets):
        ds_rows = np.flatnonzero(datasets == ds)
        for start in range(0, len(ds_rows), SIM_CHUNK):
            rows = ds_rows[start:start + SIM_CHUNK]
            q_vecs, pos_vecs = b_qry.get(ds, qry_idx[rows]), b_cand.get(ds, pos_idx[rows])
            pos_score[rows] = (1 - mix) * pos_score[rows] + mix * np.einsum("ij,ij->i", q_vecs, pos_vecs)
            vecs = b_cand.get(ds, np.maximum(cand[rows], 0))
            valid = cand[rows] >= 0
            scores[rows] = np.where(valid, (1 - mix) * scores[rows]
                                    + mix * np.einsum("ikd,id->ik", vecs, q_vecs), -np.inf)
            pos_sims[rows] = np.where(valid, (1 - mix) * pos_sims[rows]
                                      + mix * np.einsum("ikd,id->ik", vecs, pos_vecs), -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    take = lambda m: np.take_along_axis(m, order, axis=1)  # noqa: E731
    return take(scores).astype(np.float32), pos_score.astype(np.float32), take(pos_sims).astype(np.float32), take(cand)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def _jsonable(data):
    return json.loads(json.dumps(data, sort_keys=True, default=str))
