"""pipeline/retrieve.py: recall measurement and floor, Ray shard actors + Ray Data search stage vs exact search."""
import numpy as np
import pytest

from pipeline import index as ix
from pipeline.config import IndexConfig
from pipeline.retrieve import RecallFloorError, recall_lower_bound, retrieve

from test_index import brute, clustered, one_faiss_thread  # noqa: F401 (an autouse fixture: one FAISS thread)


def test_in_process_flat_is_exact_and_reports_recall():
    x = clustered(2000, 16, seed=1)
    q = clustered(300, 16, seed=2)
    s, i, info = retrieve(x, q, 25, IndexConfig(distributed="never"))
    es, ei = brute(x, q, 25)
    assert np.array_equal(i, ei) and np.allclose(s, es, atol=1e-5)
    # exact search: recall 1.0 by construction, reported without searching a sample
    assert (info["kind"], info["mode"], info["recall_at_k"], info["recall_exact"]) == ("flat", "in_process", 1.0, True)
    assert info["recall_sample"] == 0 and info["recall_trials"] == []
    assert info["ntotal"] == 2000 and info["k"] == 25 and not info["tuned"]
    import json
    json.dumps(info)  # goes into _stats.json / _manifest.json as is


def test_pool_smaller_than_k_pads_with_minus_one():
    x = clustered(5, 8, seed=3)
    s, i, info = retrieve(x, x[:2], 8, IndexConfig(distributed="never"))
    assert (i[:, 5:] == -1).all() and np.isneginf(s[:, 5:]).all() and sorted(i[0, :5]) == [0, 1, 2, 3, 4]
    assert info["recall_at_k"] == 1.0


def test_recall_floor_raises_nprobe_until_met():
    x = clustered(20_000, 32, centres=200, seed=4, spread=0.6)
    q = clustered(400, 32, centres=200, seed=5, spread=0.6)
    cfg = IndexConfig(kind="ivf_flat", nlist=256, nprobe=1, recall_floor=0.97, recall_sample=200,
                      distributed="never")
    s, i, info = retrieve(x, q, 20, cfg)
    trials = info["recall_trials"]
    assert trials[0]["nprobe"] == 1 and trials[0]["recall_lower"] < 0.97  # the setting given was not enough ...
    met = next(j for j, t in enumerate(trials) if t["recall_lower"] >= 0.97)
    assert met >= 2 and [t["nprobe"] for t in trials[:met + 1]] == [2 ** j for j in range(met + 1)]  # doubled ...
    lo, hi = trials[met - 1]["nprobe"], trials[met]["nprobe"]
    assert len(trials) > met + 1 and all(lo < t["nprobe"] < hi for t in trials[met + 1:])  # ... then bisected
    kept = min(t["nprobe"] for t in trials if t["recall_lower"] >= 0.97)  # the smallest setting measured to meet it
    assert all(t["recall_lower"] < 0.97 for t in trials if t["nprobe"] < kept) and kept - max(
        t["nprobe"] for t in trials if t["nprobe"] < kept) <= max(1, kept // 8)
    assert info["tuned"] and info["params"]["nprobe"] == kept and info["recall_lower"] >= 0.97
    assert (info["recall_at_k"], info["recall_lower"]) == [(t["recall"], t["recall_lower"]) for t in trials
                                                           if t["nprobe"] == kept][0]
    assert all(t["recall"] > t["recall_lower"] for t in trials if t["recall"] < 1)  # the margin for sampling error
    _, ei = ix.exact_search(x, q, 20)
    assert ix.recall_at_k(i, ei) >= 0.97  # the full result, all queries, meets the floor too
    # without the margin the sample's recall alone decides: never a larger nprobe
    _, _, plain = retrieve(x, q, 20, IndexConfig(**{**cfg.__dict__, "recall_z": 0}))
    assert plain["recall_lower"] == plain["recall_at_k"] >= 0.97 and plain["params"]["nprobe"] <= kept


def test_recall_lower_bound_is_a_ratio_standard_error_with_finite_population_correction():
    hits, tot = np.array([10, 9, 8, 10, 7, 10]), np.full(6, 10)
    r = hits.sum() / tot.sum()
    se = np.std(hits / 10, ddof=1) / np.sqrt(6)  # equal list lengths: the standard error of the mean
    assert recall_lower_bound(hits, tot, 10 ** 9, 1.96) == pytest.approx((r, r - 1.96 * se))
    assert recall_lower_bound(hits, tot, 24, 1.96)[1] == pytest.approx(r - 1.96 * se * np.sqrt(1 - 6 / 24))
    assert recall_lower_bound(hits, tot, 6, 1.96) == pytest.approx((r, r))  # the sample is every query
    assert recall_lower_bound(hits, tot, 10 ** 9, 0) == pytest.approx((r, r))
    assert recall_lower_bound(np.full(5, 10), np.full(5, 10), 100, 3) == (1.0, 1.0)  # no spread, no margin
    assert recall_lower_bound(np.zeros(3, int), np.zeros(3, int), 100, 2) == (1.0, 1.0)  # nothing to find


def test_recall_floor_error_names_recall_floor_and_keys():
    x = clustered(20_000, 32, centres=200, seed=4, spread=0.6)
    q = clustered(200, 32, centres=200, seed=5, spread=0.6)
    cfg = IndexConfig(kind="ivf_flat", nlist=256, nprobe=1, recall_floor=0.99, auto_tune=False, distributed="never",
                      recall_sample=100)
    with pytest.raises(RecallFloorError) as e:
        retrieve(x, q, 20, cfg)
    err = e.value
    assert err.recall < 0.99 and err.floor == 0.99
    msg = str(err)
    for part in (f"{err.recall:.4f}", f"{err.lower:.4f} less index.recall_z=1.96 standard errors",
                 "index.recall_floor=0.99", "raise index.nprobe (now 1 of nlist=256)",
                 "index.auto_tune", "index.kind"):
        assert part in msg, (part, msg)
    # no floor: the same index runs and reports its (low) recall
    _, _, info = retrieve(x, q, 20, IndexConfig(kind="ivf_flat", nlist=256, nprobe=1, recall_floor=None,
                                                 distributed="never", recall_sample=100))
    assert info["recall_at_k"] == pytest.approx(err.recall) and not info["tuned"]


def test_recall_floor_error_when_tuning_is_exhausted():
    # 4-bit PQ with a single candidate per query and no room to refine: nprobe=nlist cannot reach 0.999
    x = clustered(3000, 16, centres=30, seed=6, spread=0.8)
    cfg = IndexConfig(kind="IVF4,PQ4x4", nprobe=4, refine_factor=1, recall_floor=0.999, distributed="never")
    with pytest.raises(RecallFloorError, match="already at their maximum: nprobe=4") as e:
        retrieve(x, x[:100], 10, cfg)
    assert "index.refine_factor" in str(e.value) and "raise index.nprobe" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------- Ray

def test_ray_shards_and_data_stage_equal_exact_search(ray_session, tmp_path):
    """Pool on disk as .npy shards read by the shard actors themselves; queries through the Ray Data stage."""
    x = clustered(6000, 24, seed=7)
    q = clustered(1500, 24, seed=8)
    for j, (lo, hi) in enumerate([(0, 2500), (2500, 6000)]):
        np.save(tmp_path / f"pool-{j}.npy", x[lo:hi])
    cfg = IndexConfig(kind="flat", distributed="always", num_shards=3, query_batch=400, recall_sample=100)
    s, i, info = retrieve(str(tmp_path), q, 30, cfg)
    es, ei = brute(x, q, 30)
    assert np.array_equal(i, ei) and np.allclose(s, es, atol=1e-5)
    assert (info["mode"], info["num_shards"], info["ntotal"], info["recall_at_k"]) == ("ray", 3, 6000, 1.0)


def test_ray_sharded_ivf_equals_in_process_ivf(ray_session):
    """In-memory pool streamed to 2 shard actors; the sharded IVF (one trained quantizer) gives exactly what the
    single in-process IVF index gives, so results do not depend on the number of shards."""
    x = clustered(12_000, 32, seed=9)
    q = clustered(900, 32, seed=10)
    base = dict(kind="ivf_flat", nprobe=8, recall_sample=150, query_batch=256, add_batch=1000)
    s1, i1, f1 = retrieve(x, q, 20, IndexConfig(distributed="never", **base))
    s2, i2, f2 = retrieve(x, q, 20, IndexConfig(distributed="always", num_shards=2, **base))
    assert f1["factory"] == f2["factory"] == "IVF256,Flat" and f2["mode"] == "ray"
    assert np.array_equal(i1, i2) and np.array_equal(s1, s2)
    assert f1["recall_at_k"] == f2["recall_at_k"] >= 0.95


def test_ray_trains_a_pool_on_disk_outside_the_driver(ray_session, tmp_path):
    """A pool in .npy files is sampled and trained in a Ray task (the driver never holds the sample); the index is
    the one the driver would have trained: the same neighbours and scores as the in-process index."""
    x = clustered(12_000, 32, seed=13)
    q = clustered(700, 32, seed=14)
    for j, (lo, hi) in enumerate([(0, 5000), (5000, 12_000)]):
        np.save(tmp_path / f"pool-{j}.npy", x[lo:hi])
    base = dict(kind="IVF128_HNSW32,Flat", nprobe=8, recall_sample=150, query_batch=256, add_batch=1000)
    s1, i1, f1 = retrieve(x, q, 20, IndexConfig(distributed="never", **base))
    s2, i2, f2 = retrieve(str(tmp_path), q, 20, IndexConfig(distributed="always", num_shards=2, **base))
    assert (f2["mode"], f2["train_in"]) == ("ray", "ray_task")
    assert np.array_equal(i1, i2) and np.array_equal(s1, s2) and f1["recall_trials"] == f2["recall_trials"]


def test_ray_lossy_index_rescored_exactly(ray_session):
    x = clustered(4000, 16, seed=11)
    q = clustered(600, 16, seed=12)
    cfg = IndexConfig(kind="IVF16,PQ16x4", nprobe=16, refine_factor=4, recall_floor=0.95, distributed="always",
                      num_shards=2, query_batch=200, recall_sample=200)
    s, i, info = retrieve(x, q, 10, cfg)
    assert info["lossy"] and info["recall_at_k"] >= 0.95
    assert np.allclose(s, np.einsum("qd,qkd->qk", q, x[i]), atol=1e-5)  # exact scores of what was returned


def test_ray_sharded_fast_scan_equals_in_process_and_meets_the_floor(ray_session):
    """ivf_fs over 3 shard actors (approximate top-kk merged, then rescored exactly) gives the ids and scores of the
    in-process index, and the tuned nprobe meets the recall floor on the whole query set, not only the sample."""
    x = clustered(12_000, 32, seed=9)
    q = clustered(900, 32, seed=10)
    base = dict(kind="ivf_fs", nprobe=1, recall_sample=300, query_batch=256, add_batch=1000)
    s1, i1, f1 = retrieve(x, q, 20, IndexConfig(distributed="never", **base))
    s2, i2, f2 = retrieve(x, q, 20, IndexConfig(distributed="always", num_shards=3, **base))
    assert f1["factory"] == f2["factory"] == "IVF256,PQ32x4fs" and f2["mode"] == "ray" and f1["tuned"]
    assert np.array_equal(i1, i2) and np.array_equal(s1, s2) and f1["recall_trials"] == f2["recall_trials"]
    es, ei = brute(x, q, 20)
    assert ix.recall_at_k(i1, ei, 20, s1, es) >= 0.95
