"""pipeline/index.py: index choice, build/search, exact merge of shards, streaming sources, GPU decisions (no Ray)."""
import numpy as np
import pytest

import faiss
from pipeline import index as ix
from pipeline.config import IndexConfig

GB = 2 ** 30


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Small problems on a shared 2-core machine: OpenMP spinning costs more than it gains."""
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(old)


def clustered(n, d=32, centres=64, seed=0, spread=0.35):
    """Unit vectors around `centres` centres with low-rank spread (what embeddings look like, not isotropic noise)."""
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((centres, d))
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    B = np.linalg.qr(rng.standard_normal((d, 8)))[0]
    x = C[rng.integers(0, centres, n)] + spread * (rng.standard_normal((n, 8)) / np.sqrt(8)) @ B.T
    x += 0.01 * rng.standard_normal(x.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(x, q, k):
    s = q @ x.T
    o = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, o, 1), o


# ---------------------------------------------------------------------------------------------------------- choice

@pytest.mark.parametrize("n,dim,budget,kind,factory", [
    (1_000, 128, 8, "flat", "Flat"),
    (49_999, 768, 8, "flat", "Flat"),
    (50_000, 128, 8, "ivf_flat", "IVF512,Flat"),
    (1_000_000, 128, 8, "ivf_flat", "IVF4096,Flat"),
    (5_000_000, 128, 8, "ivf_flat", "IVF16384_HNSW32,Flat"),
    (5_000_000, 128, 1, "ivf_sq8", "IVF16384_HNSW32,SQ8"),
    (5_000_000, 128, 0.25, "ivf_pq", "OPQ32,IVF16384_HNSW32,PQ32"),   # 5M * (32 + 8) B = 0.19 GB; 48 B codes do not fit
    (5_000_000, 768, 0.4, "ivf_pq", "OPQ64,IVF8192_HNSW32,PQ64"),  # 40 x 8192 x 768-d: a 1 GB sample
    (100_000_000, 128, 8, "ivf_pq", "OPQ32,IVF32768_HNSW32,PQ32"),
    (1_000_000_000, 128, 64, "ivf_pq", "OPQ32,IVF65536_HNSW32,PQ32"),
])
def test_choice_by_size_dimension_and_budget(n, dim, budget, kind, factory):
    plan = ix.choose_index(n, dim, IndexConfig(memory_budget_gb=budget), gpu_available=False)
    assert (plan["kind"], plan["factory"]) == (kind, factory), plan
    assert plan["est_bytes"] <= budget * GB
    assert plan["reason"]
    if kind.startswith("ivf"):
        p = plan["params"]
        assert p["nlist"] & (p["nlist"] - 1) == 0 and 39 * p["nlist"] <= n  # power of two, trainable
        assert p["nprobe"] == 16
        assert 39 * p["nlist"] <= p["train_size"] <= n
    if kind == "ivf_pq":
        assert plan["lossy"] and plan["params"]["refine_factor"] == 4


def test_fast_scan_kind_is_sized_and_stays_on_cpu():
    plan = ix.choose_index(5_000_000, 128, IndexConfig(kind="ivf_fs"), gpu_available=False)
    assert (plan["factory"], plan["lossy"], plan["params"]["refine_factor"]) == ("IVF16384_HNSW32,PQ128x4fs", True, 8)
    assert plan["est_bytes"] < 5_000_000 * (64 + 8) * 1.15  # half a byte per dimension + ids + lists' padding
    assert not ix.gpu_plan(IndexConfig(gpu="auto"), k=10, kind="ivf_fs", ngpu=1)["use_gpu"]  # no GPU fast-scan


def test_lists_keep_a_bounded_size_as_the_pool_grows():
    """Below ~260k the lists stay as before (2 sqrt(n)); above, nlist grows with n so the vectors a probe scans do
    not, up to MAX_SIZED_NLIST lists, then 2 sqrt(n) again; nprobe starts at 16 whatever the size (the recall check
    raises it)."""
    assert [ix.derive_nlist(n) for n in (50_000, 100_000, 250_000)] == [512, 512, 1024]
    for n in (400_000, 1_600_000, 3_000_000, 10_000_000):
        assert ix.LIST_SIZE / 2 ** 0.5 <= n / ix.derive_nlist(n) <= ix.LIST_SIZE * 2 ** 0.5
    assert ix.derive_nlist(10 ** 8) == ix.MAX_SIZED_NLIST and ix.derive_nlist(10 ** 9) == 65_536  # 2 sqrt(n)
    # a wide teacher's training sample stays bounded: 3584-d vectors keep 2 sqrt(n) lists
    assert ix.derive_nlist(1_600_000, 96) == 8192 and ix.derive_nlist(1_600_000, 3584) == 2048
    for n, d in ((1_600_000, 96), (10 ** 8, 768), (10 ** 8, 3584)):
        nl = ix.derive_nlist(n, d)
        assert nl == ix._pow2_near(2 * n ** 0.5) or 40 * nl * d * 4 <= ix.SIZED_TRAIN_BYTES * 2 ** 0.5
    assert [ix.derive_nprobe(nl) for nl in (8, 512, 8192, 65_536)] == [8, 16, 16, 16]


def test_a_larger_budget_never_picks_a_smaller_index():
    sizes = [ix.choose_index(5_000_000, 128, IndexConfig(memory_budget_gb=b), gpu_available=False)["est_bytes"]
             for b in (0.1, 0.25, 0.5, 1, 2, 4, 8)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_budget_too_small_names_the_key():
    with pytest.raises(ix.MemoryBudgetError, match="index.memory_budget_gb"):
        ix.choose_index(100_000_000, 128, IndexConfig(memory_budget_gb=0.5), gpu_available=False)


def test_exact_below_budget_and_explicit_kinds():
    # under exact_below but the raw vectors do not fit: not Flat
    assert ix.choose_index(40_000, 4096, IndexConfig(memory_budget_gb=0.1), gpu_available=False)["kind"] != "flat"
    cfg = IndexConfig(kind="auto", exact_below=10, hnsw_below=100_000)
    assert ix.choose_index(50_000, 64, cfg, gpu_available=False)["factory"] == "HNSW32"
    assert ix.choose_index(50_000, 64, cfg, gpu_available=True)["kind"] == "ivf_flat"  # no HNSW on GPU FAISS
    assert ix.choose_index(500_000, 64, cfg, gpu_available=False)["kind"] == "ivf_flat"
    assert ix.choose_index(10, 64, IndexConfig(kind="flat"))["factory"] == "Flat"
    p = ix.choose_index(100_000, 64, IndexConfig(kind="ivf_flat", nlist=300, nprobe=7), gpu_available=False)
    assert (p["factory"], p["params"]["nprobe"]) == ("IVF300,Flat", 7)
    user = ix.choose_index(100_000, 64, IndexConfig(kind="IVF256,PQ16x4fs", nprobe=9))
    assert (user["kind"], user["factory"], user["params"]["nprobe"], user["lossy"]) == (
        "factory", "IVF256,PQ16x4fs", 9, True)
    opq = ix.choose_index(1_000_000, 64, IndexConfig(kind="ivf_pq", pq_m=32), gpu_available=False)
    assert opq["factory"] == "IVF4096,PQ32" and not opq["params"]["opq"]  # 2 dims per sub-vector: no OPQ
    assert ix.choose_index(1_000_000, 64, IndexConfig(kind="ivf_pq", pq_m=8), gpu_available=False)["params"]["opq"]


def test_check_config_names_the_bad_key():
    with pytest.raises(ValueError, match="index.recall_floor"):
        ix.check_config(IndexConfig(recall_floor=1.5))
    with pytest.raises(ValueError, match="index.nprobe"):
        ix.check_config(IndexConfig(nprobe=0))


# ---------------------------------------------------------------------------------------------------------- GPU

def test_gpu_decisions_without_a_gpu():
    assert not ix.gpu_plan(IndexConfig(gpu="auto"), k=50, kind="ivf_flat", ngpu=0)["use_gpu"]
    with pytest.raises(RuntimeError, match="index.gpu=true"):
        ix.gpu_plan(IndexConfig(gpu="true"), k=50, kind="ivf_flat", ngpu=0)
    assert not ix.gpu_plan(IndexConfig(gpu=False), k=50, kind="ivf_flat", ngpu=4)["use_gpu"]


def test_gpu_decisions_with_gpus(monkeypatch):
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda *a: None, raising=False)
    g = ix.gpu_plan(IndexConfig(), k=50, kind="ivf_flat", ngpu=2)
    assert g["use_gpu"] and g["search_on_gpu"] and g["ngpu"] == 2
    big = ix.gpu_plan(IndexConfig(), k=4096, kind="flat", ngpu=1)
    assert big["use_gpu"] and not big["search_on_gpu"] and "2048" in big["reason"]
    assert not ix.gpu_plan(IndexConfig(), k=50, kind="ivf_flat", ngpu=1, nprobe=4096)["search_on_gpu"]
    assert not ix.gpu_plan(IndexConfig(), k=50, kind="hnsw", ngpu=1)["use_gpu"]
    assert ix.gpu_plan(IndexConfig(), k=2048, kind="flat", ngpu=1)["search_on_gpu"]


def test_gpu_index_is_used_for_small_k_and_cpu_copy_above_2048(monkeypatch):
    """A stand-in 'GPU index' that refuses k > 2048 as GPU FAISS does: k=4000 must go to the CPU copy."""
    calls = []

    class FakeGpuIndex:
        def __init__(self, cpu):
            self.cpu, self.ntotal = cpu, cpu.ntotal

        def search(self, q, k):
            calls.append(k)
            if k > ix.GPU_MAX_K:
                raise RuntimeError("GPU k-selection limited to 2048")
            return self.cpu.search(q, k)

    monkeypatch.setattr(ix, "num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda *a: None, raising=False)
    monkeypatch.setattr(ix, "to_gpu", lambda index, ngpu, plan: FakeGpuIndex(index))
    x = clustered(5000, 16)
    built = ix.build_index(x, IndexConfig(kind="flat"))
    assert built.info["gpu"] and built.cpu_index is not None
    s, i = ix.search(built, x[:5], 10)
    assert calls == [10]
    s2, i2 = ix.search(built, x[:5], 4000)
    assert calls == [10]  # not sent to the 'GPU'
    es, ei = brute(x, x[:5], 4000)
    assert np.array_equal(i2[:, :10], ei[:, :10]) and np.allclose(s2, es, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- search

def test_flat_search_is_exact_sorted_and_padded():
    x = clustered(300, 16, seed=1)
    q = clustered(7, 16, seed=2)
    built = ix.build_index(x, IndexConfig(kind="flat"))
    s, i = ix.search(built, q, 10)
    es, ei = brute(x, q, 10)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == (7, 10)
    assert np.array_equal(i, ei) and np.allclose(s, es, atol=1e-5)
    assert (np.diff(s, axis=1) <= 0).all()
    s, i = ix.search(built, q, 310)  # the pool has 300
    assert (i[:, 300:] == -1).all() and np.isneginf(s[:, 300:]).all()
    assert sorted(i[0, :300]) == list(range(300))
    info = built.info
    assert (info["kind"], info["factory"], info["ntotal"], info["dim"], info["gpu"]) == ("flat", "Flat", 300, 16, False)
    assert info["bytes"] >= 300 * 16 * 4


def test_ivf_build_reports_params_and_reaches_recall():
    x = clustered(20_000, 32, seed=3)
    q = clustered(200, 32, seed=4)
    built = ix.build_index(x, IndexConfig(kind="ivf_flat"))
    p = built.info["params"]
    assert p["nlist"] == 256 and p["nprobe"] == 16 and built.info["ntotal"] == 20_000
    _, i = ix.search(built, q, 20)
    _, ei = ix.exact_search(x, q, 20)
    assert ix.recall_at_k(i, ei) >= 0.95
    assert ix.retune(built, nprobe=256)["nprobe"] == 256  # nprobe = nlist: IVF-Flat becomes exact
    s, i = ix.search(built, q, 20)
    es, ei = brute(x, q, 20)
    assert np.array_equal(i, ei) and np.allclose(s, es, atol=1e-5)


def test_lossy_codes_return_exact_scores():
    x = clustered(8000, 32, seed=5)
    q = clustered(50, 32, seed=6)
    built = ix.build_index(x, IndexConfig(kind="IVF64,PQ16x4", nprobe=64, refine_factor=8))  # 4-bit: quick to train
    assert built.info["lossy"] and built.info["params"]["refine_factor"] == 8
    s, i = ix.search(built, q, 10)
    assert np.allclose(s, np.einsum("qd,qkd->qk", q, x[i]), atol=1e-5)  # rescored from the vectors
    _, ei = ix.exact_search(x, q, 10)
    assert ix.recall_at_k(i, ei) > 0.9  # refine_factor=4 recovers most of what PQ loses


def test_exact_merge_of_shards_equals_one_exact_index():
    x = clustered(5000, 24, seed=7)
    q = clustered(40, 24, seed=8)
    bounds = [0, 1234, 2900, 5000]
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        b = ix.build_index(x[lo:hi], IndexConfig(kind="flat"))
        b.id_offset = lo
        parts.append(ix.search(b, q, 30))
    s, i = ix.merge_topk(parts, 30)
    es, ei = ix.search(ix.build_index(x, IndexConfig(kind="flat")), q, 30)
    assert np.array_equal(i, ei) and np.allclose(s, es, atol=1e-6)
    # streaming brute force over batches merges the same way
    s2, i2 = ix.exact_search(x, q, 30, batch_rows=777)
    assert np.array_equal(i2, ei)


def test_sharded_ivf_with_one_trained_quantizer_equals_the_single_ivf_index():
    x = clustered(12_000, 32, seed=9)
    q = clustered(100, 32, seed=10)
    cfg = IndexConfig(kind="ivf_flat", nprobe=8)
    single = ix.build_index(x, cfg)
    plan = single.plan
    tmpl = ix.make_index(plan)
    ix.train_index(tmpl, ix.as_source(x), plan, seed=0)
    blob = faiss.serialize_index(tmpl)
    parts = []
    for lo, hi in [(0, 5000), (5000, 5001), (5001, 12_000)]:
        shard = faiss.deserialize_index(blob)
        ix.add_source(shard, ix.as_source(x), lo, hi, 1000)
        ix.set_search_params(shard, plan, 20)
        parts.append(ix.search(ix.BuiltIndex(shard, dict(single.info), id_offset=lo), q, 20))
    s, i = ix.merge_topk(parts, 20)
    es, ei = ix.search(single, q, 20)
    assert np.array_equal(i, ei) and np.array_equal(s, es)


def test_fast_scan_codes_shard_and_thread_invariantly_with_exact_scores():
    """ivf_fs: 4-bit codes tie often at the kk-th approximate score, and FAISS keeps an arbitrary part of a tie; the
    candidates tied there are dropped (`refine`), so any split of the pool over shards, and any thread count, gives
    the same ids, with exact scores, at the recall of IVF-Flat at the same nprobe."""
    x = clustered(12_000, 32, seed=9)
    q = clustered(300, 32, seed=10)
    cfg = IndexConfig(kind="ivf_fs", nprobe=8)
    single = ix.build_index(x, cfg)
    plan = single.plan
    assert (plan["factory"], plan["lossy"], plan["params"]["refine_factor"]) == ("IVF256,PQ32x4fs", True, 8)
    assert single.info["bytes"] <= plan["est_bytes"] < 12_000 * 32 * 4 / 2  # codes of d / 2 bytes, not 4 d
    es, ei = ix.search(single, q, 20)
    assert np.allclose(es, np.einsum("qd,qkd->qk", q, x[ei]), atol=1e-5)
    flat = ix.search(ix.build_index(x, IndexConfig(kind="ivf_flat", nprobe=8)), q, 20)
    _, exact = ix.exact_search(x, q, 20)
    assert ix.recall_at_k(ei, exact) >= ix.recall_at_k(flat[1], exact) - 0.01
    tmpl = ix.make_index(plan)
    ix.train_index(tmpl, ix.as_source(x), plan, seed=0)
    blob = faiss.serialize_index(tmpl)
    kk = 20 * plan["params"]["refine_factor"]
    for bounds, threads in [([0, 5000, 5001, 12_000], 1), ([0, 3000, 6000, 9000, 12_000], 2)]:
        faiss.omp_set_num_threads(threads)
        parts = []
        for lo, hi in zip(bounds, bounds[1:]):
            shard = faiss.deserialize_index(blob)
            ix.add_source(shard, ix.as_source(x), lo, hi, 1000)
            ix.set_search_params(shard, plan, 20)
            D, I = shard.search(q, kk)
            parts.append((D, np.where(I >= 0, I + lo, -1)))
        D, I = ix.merge_topk(parts, kk)
        s, i = ix.refine(ix.as_source(x), q, D, I, 20)
        assert np.array_equal(i, ei) and np.array_equal(s, es)
    faiss.omp_set_num_threads(1)


def test_fast_scan_codes_train_on_one_thread_to_the_same_index():
    """The lists are trained on every thread, the 4-bit codes on one (OpenMP stalls on their small k-means on a
    loaded machine): the trained index is the one FAISS trains on one thread, and the thread count is restored."""
    x = clustered(8000, 16, seed=15)
    plan = ix.choose_index(len(x), 16, IndexConfig(kind="ivf_fs", nlist=64), gpu_available=False)
    faiss.omp_set_num_threads(2)
    try:
        idx = ix.make_index(plan)
        ix.train_index(idx, ix.as_source(x), plan, seed=3)
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(1)
    ref = ix.make_index(plan)
    ref.train(ix.as_source(x).sample(plan["params"]["train_size"], 3))
    assert np.array_equal(faiss.serialize_index(idx), faiss.serialize_index(ref))


def test_hnsw_quantizer_is_built_the_same_every_time_and_shards_exactly():
    """An HNSW coarse quantizer (auto, from HNSW_QUANTIZER_FROM lists) is trained on a flat k-means and linked on
    one thread: builds on 2 threads and on 1 give the same graph (a multi-threaded build can link it in another
    order each time), and sharded search equals the single index, as for a flat one."""
    x = clustered(12_000, 32, seed=13)
    q = clustered(100, 32, seed=14)
    cfg = IndexConfig(kind="IVF256_HNSW32,Flat", nprobe=8)
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(2)
        a = ix.build_index(x, cfg)
        faiss.omp_set_num_threads(1)
        b = ix.build_index(x, cfg)
    finally:
        faiss.omp_set_num_threads(threads)
    qa = faiss.extract_index_ivf(a.index).quantizer
    assert faiss.downcast_index(qa).hnsw.efSearch >= 64  # set_search_params: max(64, 2 * nprobe)
    assert np.array_equal(faiss.serialize_index(qa), faiss.serialize_index(faiss.extract_index_ivf(b.index).quantizer))
    s, i = ix.search(a, q, 20)
    s2, i2 = ix.search(b, q, 20)
    assert np.array_equal(i, i2) and np.array_equal(s, s2)
    tmpl = ix.make_index(a.plan)
    ix.train_index(tmpl, ix.as_source(x), a.plan, seed=0)
    blob = faiss.serialize_index(tmpl)
    parts = []
    for lo, hi in [(0, 7000), (7000, 12_000)]:
        shard = faiss.deserialize_index(blob)
        ix.add_source(shard, ix.as_source(x), lo, hi, 1000)
        ix.set_search_params(shard, a.plan, 20)
        parts.append(ix.search(ix.BuiltIndex(shard, dict(a.info), id_offset=lo), q, 20))
    s3, i3 = ix.merge_topk(parts, 20)
    assert np.array_equal(i3, i) and np.array_equal(s3, s)
    _, ei = ix.exact_search(x, q, 20)
    assert ix.recall_at_k(i, ei) >= 0.9


def test_merge_breaks_ties_by_id_and_pads():
    D1, I1 = np.array([[0.9, 0.5]], np.float32), np.array([[7, 3]])
    D2, I2 = np.array([[0.5, -np.inf]], np.float32), np.array([[1, -1]])
    s, i = ix.merge_topk([(D1, I1), (D2, I2)], 5)
    assert i.tolist() == [[7, 1, 3, -1, -1]] and s[0, :3].tolist() == [np.float32(0.9), 0.5, 0.5]


# ---------------------------------------------------------------------------------------------------------- sources

def test_npy_shards_stream_and_build_the_same_index(tmp_path):
    x = clustered(3000, 16, seed=11)
    paths = []
    for j, (lo, hi) in enumerate([(0, 1000), (1000, 1001), (1001, 3000)]):
        paths.append(tmp_path / f"p{j}.npy")
        np.save(paths[-1], x[lo:hi])
    src = ix.as_source([str(p) for p in paths])
    assert (src.n, src.dim) == (3000, 16)
    assert np.array_equal(np.concatenate([b for _, b in src.batches(128)]), x)
    assert np.array_equal(np.concatenate([b for _, b in src.batches(100, 900, 1100)]), x[900:1100])
    rows = np.array([2999, 0, 1000, 1500])
    assert np.array_equal(src.take(rows), x[rows])
    assert ix.as_source(str(tmp_path)).n == 3000
    q = x[:20]
    s1, i1 = ix.search(ix.build_index(src, IndexConfig(kind="flat")), q, 15)
    s2, i2 = ix.search(ix.build_index(x, IndexConfig(kind="flat")), q, 15)
    assert np.array_equal(i1, i2) and np.array_equal(s1, s2)
    mm = np.load(paths[2], mmap_mode="r")
    spec = ix.as_source(mm).spec()
    assert spec[0] == "memmap" and np.array_equal(ix.source_from_spec(spec).take([5]), x[1006:1007])
    assert ix.as_source(mm[10:]).spec() is None  # a view: its rows are not described by the file offset


def test_recall_at_k():
    e = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    a = np.array([[1, 2, 9, 8], [6, 5, -1, -1]])
    assert ix.recall_at_k(a, e) == pytest.approx((2 + 2) / 6)
    # ties: id 9 has the same score as the exact list's last entry (a duplicate vector): it counts as a hit
    es = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    assert ix.recall_at_k(np.array([[1, 2, 3, 9]]), e[:1], ann_scores=es, exact_scores=es) == 1.0
    assert ix.recall_at_k(np.array([[1, 2, 3, 9]]), e[:1], ann_scores=es - [[0, 0, 0, 0.1]], exact_scores=es) == 0.75
    hits, tot = ix.recall_hits(a, e)
    assert hits.sum() / tot.sum() == ix.recall_at_k(a, e) and len(hits) == len(e)
