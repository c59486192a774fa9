"""Epochs written as block tasks (pipeline/epoch.py): the same bytes whatever the blocks, tasks or executor; the
calibration evidence that reaches the driver is bounded and gives the whole epoch's answer; old runs still work."""
import json
import math
import shutil
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus import base_config, text_pairs, write_jsonl
from pipeline import calibrate as calibrate_mod
from pipeline import epoch as epoch_mod
from pipeline.blocks import PARTS, RunStore, load_run, save_run
from pipeline.calibrate import calibrate
from pipeline.config import config_from_dict
from pipeline.filters import CandidateBlock
from pipeline.mine import mine
from pipeline.run import claim
from pipeline.sample import query_keys


@pytest.fixture(scope="module")
def run(ray_session, shared_cache, tmp_path_factory):
    """A real run of 150 queries in shards of 40 (4 blocks), calibrated on group evidence, with a blocklist."""
    tmp = tmp_path_factory.mktemp("blocks")
    pairs = write_jsonl(tmp / "pairs.jsonl", text_pairs(150))
    raw = base_config(pairs, shared_cache, output={"rows_per_shard": 40}, retrieve={"top_k": 20, "block_rows": 1000},
                      filters={"calibrate": "auto"})
    out = tmp / "out"
    first = mine(config_from_dict(raw), out)
    df = pd.read_parquet(first.epoch_dir).set_index("query_id")
    with open(out / "blocklist.jsonl", "w") as f:
        for qid in ["q3", "q50", "q120"]:
            f.write(json.dumps({"query_id": qid, "item_id": df.loc[qid].neg_item_ids[0]}) + "\n")
        f.write(json.dumps({"query_id": "q9", "item_id": None}) + "\n")  # reviewed, nothing to mark
    result = mine(config_from_dict(raw), out, epoch=1)
    return raw, tmp, out, result


def _epoch_bytes(folder):
    """Every file of an epoch, but the run time in `_stats.json`."""
    data = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data[str(p.relative_to(folder))] = p.read_bytes()
    stats = json.loads(data.pop("_stats.json"))
    stats["timings"].pop("total_s")
    return data, stats


def _write(store_dir, raw, out, use_ray, like):
    """Epoch 1 written by the block writer from `store_dir`, with the manifest fields of the epoch `like`."""
    manifest = json.loads((like / "_manifest.json").read_text())
    extra = {k: manifest[k] for k in ("retrieval_id", "teacher_model", "mix_teacher", "reused_retrieval")}
    with claim(out):
        epoch_mod.write_epoch(RunStore(store_dir), config_from_dict(raw).for_epoch(1), out, 1, manifest["config"],
                              extra, time.time(), use_ray)
    return out / "epoch=0001"


def test_same_bytes_for_one_or_many_blocks_in_ray_or_in_the_driver(run, tmp_path):
    raw, tmp, out, result = run
    store = next((out / "_run").glob("*/state.json")).parent
    assert len(list((store / PARTS).glob("part-*.arrow"))) == 1
    state = load_run(store)
    many = tmp_path / "many"
    save_run(state, many, block_rows=7)  # 22 parts, none aligned with the shards of 40 rows
    assert len(list((many / PARTS).glob("part-*.arrow"))) == math.ceil(150 / 7)
    written = []
    for name, store_dir, use_ray in (("one-local", store, False), ("many-ray", many, True),
                                     ("many-local", many, False)):
        dest = tmp_path / name
        dest.mkdir()
        shutil.copyfile(out / "blocklist.jsonl", dest / "blocklist.jsonl")
        written.append(_write(store_dir, raw, dest, use_ray, result.epoch_dir))
    reference, stats = _epoch_bytes(result.epoch_dir)
    assert len([k for k in reference if k.startswith("part-")]) == 4
    assert result.stats["false_negatives"]["per_dataset"]["t2t"]["evidence"]["blocklist"] == 3
    for folder in written:
        got, got_stats = _epoch_bytes(folder)
        assert got.keys() == reference.keys()
        for key in reference:
            assert got[key] == reference[key], (folder.name, key)
        assert got_stats == stats


def test_compact_evidence_calibrates_like_the_whole_epoch(run, monkeypatch):
    """With a cap of 5 queries per dataset and level (instead of 2000), the evidence the blocks send is bounded,
    and calibration on it gives the same thresholds, estimates and evidence counts as on every query at once."""
    raw, tmp, out, _ = run
    monkeypatch.setattr(calibrate_mod, "MAX_QUERIES", 5)
    monkeypatch.setattr(epoch_mod, "MAX_QUERIES", 5)
    monkeypatch.setattr(calibrate_mod, "MIN_EVIDENCE_QUERIES", 3)
    cfg = config_from_dict({**raw, "filters": {**raw["filters"], "calibrate": "auto"}})
    store = RunStore(next((out / "_run").glob("*/state.json")).parent)
    specs = [epoch_mod.BlockSpec(run_dir=str(store.dir), start=s, end=min(s + 40, store.nq), shard=i, epoch=0,
                                 blocked=np.zeros(0, np.int64), filters=cfg.filters)
             for i, s in enumerate(range(0, store.nq, 40))]
    ev = None
    for part in epoch_mod.map_blocks(epoch_mod.block_evidence, specs, use_ray=False):
        assert len(part.rows) <= 6 * 5
        ev = epoch_mod._merge_evidence(ev, part)
    assert len(ev.rows) <= 6 * 5 < store.nq
    caps = epoch_mod.positive_caps(store, cfg.filters, [(i, s, min(s + 40, store.nq)) for i, s in
                                                       enumerate(range(0, store.nq, 40))], use_ray=False)
    configs, report = epoch_mod.calibrate_blocks(store, ev, np.zeros(0, np.int64), np.zeros(0, np.int64), cfg, 0,
                                                 caps)

    state = load_run(store.dir)
    q = state.queries
    every = CandidateBlock(state.cand, state.scores, state.pos_sims, q.column("pos_score").to_numpy(),
                           q.column("qry_idx").to_numpy(), q.column("pos_idx").to_numpy(),
                           q.column("group_code").to_numpy(), np.arange(q.num_rows))
    whole_configs, whole = calibrate(every, q.column("dataset").to_numpy(zero_copy_only=False),
                                     query_keys(q.column("query_id").to_pylist()), store.context(np.zeros(0, np.int64)),
                                     cfg.filters, cfg.sample, 0)
    assert report["t2t"]["evidence"]["group"] > 0 and report["t2t"]["evidence"]["queries"] == 5
    assert report == whole and configs == whole_configs


def test_a_run_kept_in_the_old_single_file_layout_is_upgraded_and_mines_the_same(run, tmp_path):
    raw, tmp, out, result = run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    store = next((old / "_run").glob("*/state.json")).parent
    state = load_run(store)
    k = state.cand.shape[1]
    for name in ("candidates", "queries.arrow", "items.arrow", "modality.npy", "positives.npy"):
        path = store / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    pq.write_table(state.queries, store / "queries.parquet")
    pq.write_table(state.items, store / "items.parquet")
    pq.write_table(pa.table({name: pa.FixedSizeListArray.from_arrays(pa.array(m.ravel()), k) for name, m in (
        ("cand", state.cand.astype(np.int32)), ("scores", state.scores), ("pos_sims", state.pos_sims))}),
        store / "candidates.parquet")
    meta = json.loads((store / "state.json").read_text())
    (store / "state.json").write_text(json.dumps({"n_groups": meta["n_groups"], "info": meta["info"]}))
    # readers of the run read the old item table until it is upgraded
    from pipeline.inspector.store import Run

    ep = Run(old).epoch(1)
    some = ep.candidates(0, ep.read(0, 1, ["query_id"])[0]["query_id"])["cand_item_ids"]
    assert set(ep.items(some)) == set(some)
    shutil.rmtree(old / "epoch=0001")
    again = mine(config_from_dict(raw), old, epoch=1)
    assert again.reused_retrieval and not (store / "candidates.parquet").exists()
    assert (store / "items.arrow").exists() and not (store / "items.parquet").exists()
    assert (store / PARTS / "part-00000.arrow").exists()
    assert _epoch_bytes(again.epoch_dir) == _epoch_bytes(result.epoch_dir)


def test_a_shard_of_more_than_two_million_candidates_writes():
    """A shard of 45,000 queries x 50 candidates (the default 50,000-row shards hit it from ~42k queries): numpy
    string arrays of that size became a ChunkedArray in pyarrow, which the list columns refused."""
    from pipeline.epoch import shard_tables
    from pipeline.filters import KEPT

    nq, k, n_items = 45_000, 50, 1_000
    rng = np.random.default_rng(0)
    text = pa.array([f"t{i}" for i in range(nq)])
    q = pa.table({name: text for name in ("query_id", "dataset", "qry", "qry_image_path", "pos_text",
                                          "pos_image_path", "group", "qry_item_id", "pos_item_id")})
    cand = rng.integers(0, n_items, (nq, k))
    block = CandidateBlock(cand, rng.random((nq, k), np.float32), rng.random((nq, k), np.float32),
                           np.ones(nq, np.float32), np.zeros(nq, np.int64), np.zeros(nq, np.int64),
                           np.full(nq, -1), np.arange(nq))
    verdict = np.full((nq, k), KEPT, np.int8)
    chosen = np.tile(np.arange(5), (nq, 1))
    names = pa.array([f"i{i}" for i in range(n_items)])
    for from_input in (None, np.zeros((nq, k), bool)):
        train, cands = shard_tables(q, np.arange(nq), block, verdict, chosen, np.ones(nq, bool), names, names,
                                    names, from_input)
        assert train.num_rows == nq and cands.num_rows == nq
        sources = cands.column("cand_sources").combine_chunks().flatten()
        assert len(sources) == nq * k and set(sources.unique().to_pylist()) == {"retrieved"}
