"""Retrieval as block tasks (pipeline/search.py): the same candidates whatever the block count and executor, with
deepening and the input's own negatives in play, and no process gathering every vector."""
import pickle
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from corpus import base_config, text_pairs, write_jsonl
from pipeline import embed as embed_mod
from pipeline import search as search_mod
from pipeline import stats as stats_mod
from pipeline.blocks import PARTS, RunStore
from pipeline.config import config_from_dict
from pipeline.mine import mine


def _pairs(tmp_path):
    rows = text_pairs(120)
    for i in range(0, 120, 7):  # some queries bring negatives of their own, of different list lengths
        rows[i]["neg_text"] = [rows[(i + j) % 120]["pos_text"] for j in range(3, 3 + i % 3 + 1)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def _state(result):
    runs = [p for p in (result.out / "_run").iterdir() if (p / "state.json").exists()]
    assert len(runs) == 1
    return runs[0]


def _mine(pairs, cache, out, block_rows, executor):
    raw = base_config(pairs, cache, retrieve={"top_k": 6, "deepen_factor": 4, "block_rows": block_rows},
                      sample={"n_negatives": 4, "strategy": "top"}, run={"executor": executor},
                      index={"distributed": "always" if executor == "ray" else "never"},
                      output={"rows_per_shard": 50})
    return mine(config_from_dict(raw), out)


def test_many_blocks_on_ray_write_the_candidates_of_one_block_in_the_driver(ray_session, shared_cache, tmp_path,
                                                                            monkeypatch):
    pairs = _pairs(tmp_path)
    specs = []
    real = search_mod.map_blocks

    def spy(fn, items, use_ray, *a, **kw):
        items = list(items)
        specs.extend((fn.__name__, use_ray, s) for s in items)
        return real(fn, items, use_ray, *a, **kw)

    monkeypatch.setattr(search_mod, "map_blocks", spy)
    monkeypatch.setattr(stats_mod, "map_blocks", spy)  # the positive-score caps' two passes
    one = _mine(pairs, shared_cache, tmp_path / "one", 1000, "local")
    assert {(name, use_ray) for name, use_ray, _ in specs} == {("_caps_pass", False), ("search_block", False),
                                                               ("finish_block", False)}
    specs.clear()
    many = _mine(pairs, shared_cache, tmp_path / "many", 17, "ray")
    assert {(name, use_ray) for name, use_ray, _ in specs} == {("_caps_pass", True), ("search_block", True),
                                                               ("finish_block", True)}  # shard actors' clients
    assert sum(name == "search_block" for name, _, _ in specs) == 8  # 120 queries of one dataset in blocks of 17

    deep = one.stats["retrieval"]["t2t"]["deepened"]
    assert deep["queries"] > 0 and deep == many.stats["retrieval"]["t2t"]["deepened"]
    a, b = RunStore(_state(one)), RunStore(_state(many))
    assert len(list((a.dir / PARTS).iterdir())) == 1 and len(list((b.dir / PARTS).iterdir())) == 8
    assert a.k == b.k > 6 * 2 and a.meta["from_input"] and b.meta["from_input"]  # deepened, then input negatives
    for x, y in zip(a.candidates(0, a.nq), b.candidates(0, b.nq)):
        assert x.tobytes() == y.tobytes()
    assert a.queries().equals(b.queries())
    for rel in sorted(p.relative_to(one.epoch_dir) for p in one.epoch_dir.rglob("*.parquet")):
        assert (one.epoch_dir / rel).read_bytes() == (many.epoch_dir / rel).read_bytes(), rel
    # the staging files, the read stage's pools and the vectors are gone once the run is kept
    for name in ("vectors", search_mod.STAGING, search_mod.CORPUS, search_mod.QUERIES_IN):
        assert not (b.dir / name).exists(), name


def test_the_driver_never_gathers_vectors_and_tasks_get_paths_not_arrays(ray_session, shared_cache, tmp_path,
                                                                         monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("a mining run gathered every vector into one array")

    monkeypatch.setattr(embed_mod, "gather_vectors", refuse)
    specs = []
    real = search_mod.map_blocks
    monkeypatch.setattr(search_mod, "map_blocks", lambda fn, items, *a, **kw: real(
        fn, [specs.append(s) or s for s in items], *a, **kw))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(300))
    raw = base_config(pairs, shared_cache, retrieve={"top_k": 10, "block_rows": 100})
    result = mine(config_from_dict(raw), tmp_path / "out")
    assert result.stats["queries_written"] == 300
    assert len(specs) >= 3
    for spec in specs:
        stores = pickle.dumps(spec.stores)
        assert len(stores) < 4096  # paths and a few numbers: no vectors travel
        arrays = [v for v in vars(spec).values() if isinstance(v, np.ndarray)]
        assert all(a.size <= 100 for a in arrays)  # at most the block's own query rows
    store = specs[0].stores.cand
    assert store.dim == 384 and store.datasets["t2t"]["n"] == store.datasets["t2t"]["pool"] > 250  # content-deduplicated


def _cached_store(tmp_path, name, **kw):
    """50 items with random vectors in an embedding cache, and one store of dataset "a" (pool: the even rows below
    40) written from it by `write_stores` with `kw`; (store, vectors, pools)."""
    from pipeline.blocks import _write_ipc
    from pipeline.embed import EmbeddingCache, input_keys
    from pipeline.vectors import layout, write_stores

    n, d = 50, 8
    items = pa.table({"item_id": [f"i{i}" for i in range(n)], "embed_text": [f"text {i}" for i in range(n)]})
    _write_ipc(items, tmp_path / "items.arrow", 16)
    vectors = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    cache = EmbeddingCache(str(tmp_path / "cache"), "fp")
    if not cache.parts():
        cache.write(pa.table({"key": input_keys(items), "vector": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.ravel()), d)}))
    cfg = SimpleNamespace(embed=SimpleNamespace(cache_dir=str(tmp_path / "cache"), storage_options=None))
    pools = {"a": np.arange(0, 40, 2)}
    rows = layout({"a": np.r_[np.arange(0, 40, 2), [41, 3, 41]]}, pools)
    store, = write_stores([(tmp_path / name, rows, {"a": "fp"}, pools)], tmp_path / "items.arrow", cfg, False,
                          **kw)
    return store, vectors, pools


def test_a_store_reads_back_the_vectors_the_cache_holds(tmp_path):
    """`VectorStore.get` of any rows, in any order, is the cache's vector of each row's item; the pool is the
    store's prefix, whole shards, for the index; a row it does not hold is a clear error."""
    store, vectors, pools = _cached_store(tmp_path, "store", shard_rows=8)
    assert len(list((tmp_path / "store").rglob("part-*.npy"))) == 4 and not store.held
    want = np.array([41, 0, 38, 3, 4])
    assert store.get("a", want).tobytes() == vectors[want].tobytes()
    assert store.pool("a").n == 20 and store.pool("a").take(np.arange(20)).tobytes() == vectors[pools["a"]].tobytes()
    assert len(pickle.dumps(store)) < 2048
    try:
        store.get("a", [5])
    except KeyError as e:
        assert "[5]" in str(e)
    else:
        raise AssertionError("a row without a vector was read")


def test_a_job_of_one_task_without_ray_keeps_its_vectors_in_memory(tmp_path):
    """The store a one-task job gathers in this process writes no vector shards and reads the same bytes as the
    shards; it refuses to travel (a worker could not read it)."""
    sharded, vectors, _ = _cached_store(tmp_path, "sharded", shard_rows=8)
    held, _, _ = _cached_store(tmp_path, "held")
    assert held.held and not list((tmp_path / "held").rglob("part-*.npy"))
    want = np.array([41, 0, 38, 3, 4, 41])
    assert held.get("a", want).tobytes() == sharded.get("a", want).tobytes() == vectors[want].tobytes()
    pool = held.pool("a")
    assert pool.n == 20 and pool.take(np.arange(20)).tobytes() == sharded.pool("a").take(np.arange(20)).tobytes()
    scanned = lambda source: np.concatenate([b for _, b in source.batches(7)]).tobytes()  # noqa: E731
    assert scanned(pool) == scanned(sharded.pool("a"))
    with pytest.raises(TypeError, match="stays in the process"):
        pickle.dumps(held)
