"""The mining run: read -> embed -> retrieve (once per run, kept in OUT/_run) -> filter -> sample -> write (per epoch).

Retrieval results are kept, so another epoch only re-filters and re-samples: seconds, no model and no index.
A run folder belongs to one retrieval config; asking it for another config is refused unless `overwrite` is given.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import Config
from .embed import embed_items
from .filters import REASONS, CandidateBlock, FilterContext, count_drops, filter_candidates
from .progress import Progress
from .read import MODALITIES, Corpus, load_corpus
from .retrieve import retrieve
from .sample import query_keys, sample_negatives
from .stats import EpochStats
from .teachers import teacher_fingerprint
from .write import (CANDIDATE_SCHEMA, TRAIN_SCHEMA, EpochFolder, epoch_dir, write_json, write_jsonl, write_table)

RUN_VERSION = 1
SIM_CHUNK = 2048


class RunMismatch(RuntimeError):
    """OUT already holds a run of another config."""


@dataclass
class RunState:
    """What retrieval leaves behind for every epoch (also what OUT/_run holds on disk)."""

    queries: pa.Table      # accepted queries with qry_idx, pos_idx, group_code, pos_score
    items: pa.Table        # item_id, text, image_path, modality, embed_text
    cand: np.ndarray       # (nq, k) int64 item rows, -1 pad
    scores: np.ndarray     # (nq, k) float32
    pos_sims: np.ndarray   # (nq, k) float32
    item_groups: np.ndarray
    n_groups: int
    rejects: list[dict]
    info: dict = field(default_factory=dict)


@dataclass
class MineResult:
    out: Path
    epoch_dir: Path
    stats: dict
    reused_retrieval: bool
    skipped: bool = False


def ensure_ray(cfg: Config) -> None:
    """Join `run.ray_address` / RAY_ADDRESS, or start a local Ray; reuse a session that is already up."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
             ignore_reinit_error=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def retrieval_key(cfg: Config) -> dict:
    """Everything that changes retrieval results; filters and sampling are left out on purpose (epochs vary them)."""
    digests = {p: _file_digest(p) for p in [*cfg.input.pairs, cfg.input.candidates, cfg.input.captions] if p}
    return {"version": RUN_VERSION, "input": vars(cfg.input), "inputs_sha": digests,
            "teacher": {role: teacher_fingerprint(cfg.teacher, role) for role in ("query", "candidate")},
            "index": vars(cfg.index), "top_k": cfg.retrieve.top_k}


def _file_digest(path: str) -> str:
    if "://" in path:
        return "uri"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def mine(cfg: Config, out: str | Path, epoch: int = 0, overwrite: bool = False) -> MineResult:
    """Mine one epoch into OUT/epoch=NNNN, retrieving first unless OUT/_run already holds this config's retrieval."""
    out = Path(out)
    started = time.time()
    key = retrieval_key(cfg)
    run_dir = out / "_run"
    saved = _read_json(run_dir / "run.json")
    if saved is not None and saved.get("key") != _jsonable(key):
        if not overwrite:
            raise RunMismatch(f"{out} holds a run of a different input, teacher or index config; use a new output "
                              "folder or --overwrite to replace it")
        shutil.rmtree(out)
        saved = None
    final = epoch_dir(out, epoch)
    if saved is not None and final.exists() and not overwrite:
        manifest = _read_json(final / "_manifest.json") or {}
        if manifest.get("config") == _jsonable(cfg.to_dict()):
            return MineResult(out, final, _read_json(final / "_stats.json") or {}, True, skipped=True)
        raise RunMismatch(f"{final} was written with a different filter or sampling config; use --overwrite "
                          "to replace it or another --epoch")
    reused = saved is not None
    state = load_run(run_dir) if reused else build_run(cfg, run_dir, key)
    stats = write_epoch(state, cfg, out, epoch)
    stats["timings"] = {"total_s": round(time.time() - started, 3), "reused_retrieval": reused}
    write_json(final / "_stats.json", stats)
    return MineResult(out, final, stats, reused)


def build_run(cfg: Config, run_dir: Path, key: dict) -> RunState:
    ensure_ray(cfg)
    t0 = time.time()
    corpus = load_corpus(cfg.input, caption_mode=cfg.teacher.image_mode == "caption")
    t_read = time.time()
    state, info = _retrieve_all(corpus, cfg)
    info["timings"] = {"read_s": round(t_read - t0, 3), "embed_and_retrieve_s": round(time.time() - t_read, 3)}
    state.info = info
    save_run(state, run_dir, key)
    return state


def _retrieve_all(corpus: Corpus, cfg: Config) -> tuple[RunState, dict]:
    q, items = corpus.queries, corpus.items
    nq, k = q.num_rows, cfg.retrieve.top_k
    cand_rows = np.unique(np.concatenate([*corpus.pools.values(), np.zeros(0, np.int64)]))
    qry_rows = np.unique(q.column("qry_idx").to_numpy()).astype(np.int64)
    cand_vecs, cand_stats = embed_items(items.take(cand_rows), "candidate", cfg, "candidates")
    qry_vecs, qry_stats = embed_items(items.take(qry_rows), "query", cfg, "queries")
    cand_at = np.full(items.num_rows, -1, np.int64)
    cand_at[cand_rows] = np.arange(len(cand_rows))
    qry_at = np.full(items.num_rows, -1, np.int64)
    qry_at[qry_rows] = np.arange(len(qry_rows))

    cand = np.full((nq, k), -1, np.int64)
    scores = np.full((nq, k), -np.inf, np.float32)
    datasets = q.column("dataset").to_numpy(zero_copy_only=False)
    q_vecs = qry_vecs[qry_at[q.column("qry_idx").to_numpy()]]
    pos_vecs = cand_vecs[cand_at[q.column("pos_idx").to_numpy()]]
    pos_score = np.einsum("ij,ij->i", q_vecs, pos_vecs).astype(np.float32)
    per_dataset = {}
    for ds in sorted(corpus.pools):
        rows = np.flatnonzero(datasets == ds)
        if not len(rows):
            continue
        pool = corpus.pools[ds]
        kk = min(k, len(pool))
        s, ids, index_info = retrieve(cand_vecs[cand_at[pool]], q_vecs[rows], kk, cfg.index)
        cand[rows, :kk] = np.where(ids >= 0, pool[np.maximum(ids, 0)], -1)
        scores[rows, :kk] = s
        per_dataset[ds] = {"queries": int(len(rows)), "pool": int(len(pool)), "k": kk, "index": index_info}
    pos_sims = np.full((nq, k), -np.inf, np.float32)
    for start in range(0, nq, SIM_CHUNK):
        block = cand[start:start + SIM_CHUNK]
        vecs = cand_vecs[cand_at[np.maximum(block, 0)]]
        sims = np.einsum("ikd,id->ik", vecs, pos_vecs[start:start + SIM_CHUNK])
        pos_sims[start:start + SIM_CHUNK] = np.where(block >= 0, sims, -np.inf)
    queries = q.append_column("pos_score", pa.array(pos_score, pa.float32()))
    info = {"rows_in": corpus.rows_in, "candidate_rows_rejected": corpus.candidate_rows_rejected,
            "embed": {"candidates": cand_stats, "queries": qry_stats}, "retrieval": per_dataset}
    state = RunState(queries, items, cand, scores, pos_sims, corpus.item_groups, corpus.n_groups, corpus.rejects)
    return state, info


def save_run(state: RunState, run_dir: Path, key: dict) -> None:
    """Keep retrieval results for later epochs; run.json goes last, so a half-saved run is never reused."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    pq.write_table(state.queries, run_dir / "queries.parquet")
    pq.write_table(state.items, run_dir / "items.parquet")
    k = state.cand.shape[1]
    pq.write_table(pa.table({
        "cand": pa.FixedSizeListArray.from_arrays(pa.array(state.cand.ravel().astype(np.int32)), k),
        "scores": pa.FixedSizeListArray.from_arrays(pa.array(state.scores.ravel()), k),
        "pos_sims": pa.FixedSizeListArray.from_arrays(pa.array(state.pos_sims.ravel()), k),
    }), run_dir / "candidates.parquet")
    np.save(run_dir / "item_groups.npy", state.item_groups)
    write_jsonl(run_dir / "rejects.jsonl", state.rejects)
    write_json(run_dir / "run.json", {"key": _jsonable(key), "n_groups": state.n_groups, "info": state.info})


def load_run(run_dir: Path) -> RunState:
    meta = _read_json(run_dir / "run.json")
    cands = pq.read_table(run_dir / "candidates.parquet")

    def matrix(name, dtype):
        col = cands.column(name).combine_chunks()
        return col.flatten().to_numpy().astype(dtype).reshape(cands.num_rows, col.type.list_size)

    with open(run_dir / "rejects.jsonl") as f:
        rejects = [json.loads(line) for line in f if line.strip()]
    return RunState(pq.read_table(run_dir / "queries.parquet"), pq.read_table(run_dir / "items.parquet"),
                    matrix("cand", np.int64), matrix("scores", np.float32), matrix("pos_sims", np.float32),
                    np.load(run_dir / "item_groups.npy"), meta["n_groups"], rejects, meta["info"])


def load_blocklist(paths: list[Path], queries: pa.Table, items: pa.Table) -> np.ndarray:
    """Sorted codes query_row * n_items + item_row of the known false negatives in the blocklist files."""
    pairs = []
    for path in paths:
        if not path.exists():
            continue
        with open(path) as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    pairs.append((str(row["query_id"]), str(row["item_id"])))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path} line {n + 1}: a blocklist line must be a JSON object with query_id "
                                     f"and item_id ({exc})") from None
    if not pairs:
        return np.zeros(0, np.int64)
    qpos = pc.index_in(pa.array([p[0] for p in pairs]), value_set=queries.column("query_id")).to_numpy(
        zero_copy_only=False)
    ipos = pc.index_in(pa.array([p[1] for p in pairs]), value_set=items.column("item_id")).to_numpy(
        zero_copy_only=False)
    ok = ~(np.isnan(qpos.astype(float)) | np.isnan(ipos.astype(float)))
    return np.unique(qpos[ok].astype(np.int64) * items.num_rows + ipos[ok].astype(np.int64))


def write_epoch(state: RunState, cfg: Config, out: Path, epoch: int) -> dict:
    """Filter, sample and write one epoch from the kept retrieval results."""
    q, items = state.queries, state.items
    nq = q.num_rows
    modality = pc.index_in(items.column("modality"), value_set=pa.array(MODALITIES)).to_numpy().astype(np.int8)
    blocklists = [out / "blocklist.jsonl"] + ([Path(cfg.filters.blocklist)] if cfg.filters.blocklist else [])
    ctx = FilterContext(state.item_groups, state.n_groups, modality, load_blocklist(blocklists, q, items),
                        items.num_rows, cfg.retrieve.top_k)
    keys = query_keys(q.column("query_id").to_pylist())
    folder = EpochFolder(out, epoch)
    stats = EpochStats(cfg.sample.n_negatives, state.info["rows_in"])
    rejects = list(state.rejects)
    files, cand_files = [], []
    item_ids, texts, images = (items.column(c).combine_chunks() for c in ("item_id", "text", "image_path"))
    step = cfg.output.rows_per_shard
    with Progress(f"write epoch {epoch}", total=nq, unit="queries", enabled=cfg.run.progress) as bar:
        for shard, start in enumerate(range(0, nq, step)):
            rows = np.arange(start, min(start + step, nq))
            block = CandidateBlock(state.cand[rows], state.scores[rows], state.pos_sims[rows],
                                   q.column("pos_score").to_numpy()[rows], q.column("qry_idx").to_numpy()[rows],
                                   q.column("pos_idx").to_numpy()[rows], q.column("group_code").to_numpy()[rows],
                                   rows)
            verdict = filter_candidates(block, cfg.filters, ctx)
            chosen = sample_negatives(verdict, block.scores, keys[rows], cfg.sample, epoch)
            found = (chosen >= 0).sum(axis=1)
            keep = found >= cfg.sample.min_negatives
            if cfg.sample.on_shortfall == "reject":
                for r in rows[~keep]:
                    rejects.append({"kind": "query", "source": "mining", "row": None, "query_id": q.column("query_id")[r].as_py(),
                                    "field": None, "reason": "too_few_negatives",
                                    "detail": f"{found[r - start]} negatives passed the filters; "
                                              f"sample.min_negatives is {cfg.sample.min_negatives}"})
            else:
                keep[:] = True
            train, cands = _shard_tables(q, rows, block, verdict, chosen, keep, item_ids, texts, images)
            name = f"part-{shard:05d}.parquet"
            files.append(write_table(train, folder.tmp / name, cfg.output.compression))
            cand_files.append(write_table(cands, folder.tmp / "_candidates" / name, cfg.output.compression))
            stats.add(train, verdict, keep, q.column("dataset").to_numpy(zero_copy_only=False)[rows])
            bar.update(len(rows))
    write_jsonl(folder.tmp / "_rejects.jsonl", rejects)
    summary = stats.finish(rejects)
    summary["retrieval"] = state.info.get("retrieval", {})
    summary["embed"] = state.info.get("embed", {})
    write_json(folder.tmp / "_stats.json", summary)
    write_json(folder.tmp / "_manifest.json", {
        "epoch": epoch, "config": _jsonable(cfg.to_dict()), "teacher": state.info.get("embed", {}),
        "retrieval": state.info.get("retrieval", {}), "counts": {
            k: summary[k] for k in ("queries_in", "queries_written", "queries_rejected")},
        "files": files, "candidate_files": cand_files, "filters": list(REASONS)})
    folder.commit()
    return summary


def _shard_tables(q, rows, block, verdict, chosen, keep, item_ids, texts, images):
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
    }, schema=CANDIDATE_SCHEMA)
    return train, cands


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def _jsonable(data):
    return json.loads(json.dumps(data, sort_keys=True, default=str))
