"""Retrieval, the Ray edge: build the index over a candidate pool, search the queries, measure recall.

``retrieve(pool, queries, k, cfg)`` -> ``(scores, ids, info)``:

* plan the index (``pipeline.index.choose_index``);
* small pools / query sets (or no running Ray session): build and search in-process;
* otherwise: train the index once on a sample (in a Ray task that reads the pool files itself; in the driver for an
  in-memory array), start ``num_shards`` shard actors (fractional CPUs,
  spread over the nodes), each adding its contiguous row range of the pool batch by batch (reading ``.npy`` shards or
  a memmap itself, or receiving batches from the driver for an in-memory array), and search the queries as a Ray Data
  stage over query blocks: stage actors fan each block out to every shard and merge the shards' top-k exactly;
* measure recall@k against exact (streaming brute-force, in the shard actors over their own rows when the pool is on
  disk) search on ``recall_sample`` queries before the full search (a Flat index is exact search: recall 1.0,
  reported as ``recall_exact`` without a sample); while the sample's recall, less ``recall_z`` standard errors,
  is below ``recall_floor`` raise nprobe / efSearch (doubling, then bisecting back to the smallest measured
  setting that meets it), or raise ``RecallFloorError``.

Ray is never started or stopped here: the caller's session (``ray.is_initialized()``) is used.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import faiss

from pipeline.ray_session import ray_is_up
from pipeline.index import (
    IndexConfig, VectorSource, _cfg, _f32, add_source, as_source, build_index, canonical_topk, check_config,
    choose_index, exact_search, gpu_plan, index_bytes, make_index, merge_topk, recall_hits, refine, retune,
    search, set_search_params, source_from_spec, tame_malloc, to_gpu, train_index,
)

MAX_EF_SEARCH = 4096


class RecallFloorError(RuntimeError):
    """The index's measured recall@k stayed below ``index.recall_floor``."""

    def __init__(self, recall: float, floor: float, k: int, info: dict, why: str, at_max: bool = False,
                 lower: Optional[float] = None):
        self.recall, self.floor, self.k, self.info, self.lower = recall, floor, k, info, lower
        params = info.get("params", {})
        fixes = []
        if "nprobe" in params and not at_max:
            fixes.append(f"raise index.nprobe (now {params.get('nprobe')} of nlist={params.get('nlist')})")
        if "ef_search" in params and not at_max:
            fixes.append(f"raise index.ef_search (now {params.get('ef_search')})")
        if not at_max and "index.auto_tune is off" in why:
            fixes.append("set index.auto_tune: true")
        if info.get("lossy"):
            fixes.append(f"raise index.refine_factor (now {params.get('refine_factor')}) or index.pq_m / "
                         "index.memory_budget_gb for a finer code")
        fixes.append("choose a more exact index.kind (flat, ivf_flat)")
        fixes.append("or lower index.recall_floor (null: measure and report only)")
        margin = "" if lower is None or lower == recall else (
            f", {lower:.4f} less index.recall_z={info.get('recall_z')} standard errors")
        super().__init__(
            f"recall@{k} of the {info.get('factory')} index is {recall:.4f} on {info.get('recall_sample')} sampled "
            f"queries{margin}, below index.recall_floor={floor} ({why}). To fix: " + "; ".join(fixes) + ".")


def _use_ray(cfg, n: int, nq: int) -> bool:
    mode = str(_cfg(cfg, "distributed", "auto")).lower()
    if mode in ("never", "false", "off"):
        return False
    if not ray_is_up():  # asked without importing Ray: a run without it never pays its import
        if mode in ("always", "true", "on"):
            raise RuntimeError("index.distributed=always but Ray is not initialised (call ray.init() first)")
        return False
    if mode in ("always", "true", "on"):
        return True
    thr = int(_cfg(cfg, "ray_above", 100_000))
    return n >= thr or nq >= thr


# --------------------------------------------------------------------------------------------------------------
# In-process searcher
# --------------------------------------------------------------------------------------------------------------

class _LocalSearcher:
    mode = "in_process"

    def __init__(self, src: VectorSource, plan: dict, cfg, k: int):
        t = time.perf_counter()
        self.src = src
        self.built = build_index(src, cfg, k_hint=k, plan=plan)
        self.build_s = time.perf_counter() - t
        self.num_shards = 1

    def params(self) -> dict:
        return dict(self.built.info["params"])

    def set_params(self, **kw) -> dict:
        return retune(self.built, **kw)

    def search(self, q: np.ndarray, k: int):
        return search(self.built, q, k)

    search_all = search

    def client(self) -> "_LocalSearcher":
        return self  # in this process only

    def exact(self, q: np.ndarray, k: int):
        return exact_search(self.src, q, k)

    def index_info(self) -> dict:
        return dict(self.built.info)

    def close(self):
        self.built = None


# --------------------------------------------------------------------------------------------------------------
# Ray: shard actors + Ray Data search stage
# --------------------------------------------------------------------------------------------------------------

def _shard_actor_cls():
    import ray

    @ray.remote
    class IndexShard:
        """Holds rows [lo, hi) of the pool in its own index (same trained quantizer as the other shards)."""

        def __init__(self, template: list, plan: dict, lo: int, hi: int, threads: int, gpu_cfg: str):
            tame_malloc()  # outgrown inverted-list buffers go back to the OS (see pipeline.index.tame_malloc)
            faiss.omp_set_num_threads(max(1, int(threads)))
            t = template[0]
            t = ray.get(t) if isinstance(t, ray.ObjectRef) else t
            self.index = faiss.deserialize_index(np.asarray(t)) if t is not None else make_index(plan)
            self.plan, self.lo, self.hi, self.gpu_cfg = plan, int(lo), int(hi), gpu_cfg
            self.cpu_index = None

        def add_from_spec(self, spec, batch_rows: int):
            src = source_from_spec(spec)
            secs = add_source(self.index, src, self.lo, self.hi, batch_rows)
            return int(self.index.ntotal), secs

        def add(self, x):
            self.index.add(np.ascontiguousarray(x, dtype=np.float32))
            return int(self.index.ntotal)

        def finish(self, k_hint: int):
            used = set_search_params(self.index, self.plan, k_hint)
            gp = gpu_plan(type("C", (), {"gpu": self.gpu_cfg})(), k=k_hint, kind=self.plan["kind"],
                          nprobe=used.get("nprobe"))
            nbytes = index_bytes(self.index)
            if gp["use_gpu"]:
                self.cpu_index = self.index
                self.index = to_gpu(self.index, gp["ngpu"], self.plan)
            return {"ntotal": int(self.index.ntotal), "bytes": nbytes, "params": used, "gpu": gp,
                    "node": ray.get_runtime_context().get_node_id()}

        def exact(self, spec, q, k: int, batch_rows: int):
            """Brute-force top-k of the queries over this shard's rows, read again from the pool files."""
            return exact_search(source_from_spec(spec), q, int(k), batch_rows, lo=self.lo, hi=self.hi)

        def set_params(self, params: dict, k_hint: int):
            self.plan["params"].update({a: b for a, b in params.items() if b is not None})
            used = set_search_params(self.cpu_index or self.index, self.plan, k_hint)
            if self.cpu_index is not None and "nprobe" in used:  # pragma: no cover - GPU only
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", used["nprobe"])
            return used

        def search(self, q, k: int):
            idx = self.index
            if self.cpu_index is not None:  # pragma: no cover - GPU only
                gp = gpu_plan(type("C", (), {"gpu": self.gpu_cfg})(), k=k, kind=self.plan["kind"],
                              nprobe=self.plan["params"].get("nprobe"))
                if not gp["search_on_gpu"]:
                    idx = self.cpu_index
            D, I = idx.search(np.ascontiguousarray(q, dtype=np.float32), int(k))
            I = I.astype(np.int64)
            I = np.where(I >= 0, I + self.lo, -1)
            return D.astype(np.float32), I

    return IndexShard


def _train_task():
    import ray

    @ray.remote
    def train_from_spec(spec, plan: dict, seed: int, threads: int):
        """Sample the pool files and train the (empty) index in a worker: the sample (up to 40 x nlist vectors,
        ~1 GB) and the k-means never enter the driver. Returns (serialized index, seconds)."""
        faiss.omp_set_num_threads(max(1, int(threads)))
        idx = make_index(plan)
        secs = train_index(idx, source_from_spec(spec), plan, seed)
        return faiss.serialize_index(idx), secs

    return train_from_spec


class _SearchStage:
    """Ray Data stage (actor): for a block of query row numbers, search every shard and merge the top-k exactly;
    rescore lossy candidates from the pool files when the pool is on disk."""

    def __init__(self, shards, queries, k: int, kk: int, source_spec=None):
        import ray
        self.ray = ray
        self.shards = shards
        self.q = ray.get(queries[0])
        self.k, self.kk = int(k), int(kk)
        self.src = source_from_spec(source_spec) if source_spec is not None else None

    def __call__(self, batch: dict) -> dict:
        rows = np.asarray(batch["data"], dtype=np.int64).reshape(-1)
        q = np.ascontiguousarray(self.q[rows])
        qref = self.ray.put(q)
        parts = self.ray.get([s.search.remote(qref, self.kk) for s in self.shards])
        D, I = merge_topk(parts, self.kk)
        if self.src is not None:
            D, I = refine(self.src, q, D, I, self.k)
        return {"row": rows, "scores": D, "ids": I}


def _refined_k(plan: dict, k: int, n: int) -> int:
    """How many candidates to ask a lossy index for, to rescore exactly and keep k."""
    rf = int(plan["params"].get("refine_factor") or 1) if plan["lossy"] else 1
    return max(1, min(k * rf, n)) if rf > 1 else k


class ShardClient:
    """Searches the shard actors of one index from any process: their handles, the plan and a pool source that
    re-opens itself (`NpyShards`) pickle to a few KB, so a block task on any worker can hold one."""

    def __init__(self, shards: list, plan: dict, source: VectorSource, query_batch: int = 4096):
        self.shards, self.plan, self.source, self.query_batch = shards, plan, source, int(query_batch)

    def search(self, q: np.ndarray, k: int):
        import ray

        kk = _refined_k(self.plan, k, self.source.n)
        outD, outI = [np.zeros((0, kk), np.float32)], [np.zeros((0, kk), np.int64)]
        for s in range(0, len(q), self.query_batch):
            qref = ray.put(np.ascontiguousarray(q[s:s + self.query_batch], dtype=np.float32))
            D, I = merge_topk(ray.get([sh.search.remote(qref, kk) for sh in self.shards]), kk)
            outD.append(D)
            outI.append(I)
        D, I = np.concatenate(outD), np.concatenate(outI)
        if self.plan["lossy"]:
            return refine(self.source, _f32(q), D, I, k)
        return canonical_topk(D, I, k)


class _RaySearcher:
    mode = "ray"

    def __init__(self, src: VectorSource, plan: dict, cfg, k: int):
        import ray
        self.ray, self.cfg, self.src, self.plan, self.k = ray, cfg, src, plan, int(k)
        self.shards = []
        try:
            self._start(src, plan, cfg, k)
        except BaseException:
            self.close()
            raise

    def _start(self, src: VectorSource, plan: dict, cfg, k: int):
        ray = self.ray
        res = ray.cluster_resources()
        cpus = float(res.get("CPU", 1.0))
        nodes = [nd for nd in ray.nodes() if nd.get("Alive") and nd.get("Resources", {}).get("CPU", 0) > 0]
        S = _cfg(cfg, "num_shards")
        if not S:
            S = min(8, max(len(nodes), int(cpus)))
        S = int(max(1, min(S, src.n)))
        self.num_shards = S
        threads = int(_cfg(cfg, "threads") or max(1, int(cpus // S)))
        actor_cpus = float(_cfg(cfg, "actor_cpus", 0.5))
        t0 = time.perf_counter()
        # 1. train once on a sample; every shard gets a copy of the empty trained index. A pool on disk is sampled
        # and trained in a Ray task (the driver only passes the index's object ref on); an in-memory one here.
        seed = int(_cfg(cfg, "seed", 0) or 0)
        spec = src.spec()
        if spec is not None and plan["kind"] != "flat":
            train_threads = int(_cfg(cfg, "threads") or max([nd["Resources"]["CPU"] for nd in nodes], default=1))
            tref, secs = _train_task().options(num_cpus=actor_cpus, num_returns=2).remote(
                spec, plan, seed, train_threads)
            self.train_s, self.train_in = ray.get(secs), "ray_task"
        else:
            tmpl = make_index(plan)
            self.train_s, self.train_in = train_index(tmpl, src, plan, seed), "driver"
            tref = ray.put(faiss.serialize_index(tmpl)) if tmpl.is_trained and plan["kind"] != "flat" else None
            del tmpl
        # 2. shard actors, spread over the nodes, each adding its contiguous row range
        bounds = np.linspace(0, src.n, S + 1).astype(np.int64)
        Shard = _shard_actor_cls()
        gpu_cfg = str(_cfg(cfg, "gpu", "auto"))
        gp = gpu_plan(cfg, k=k, kind=plan["kind"])
        gpus_per = 0.0
        if gp["use_gpu"] and res.get("GPU", 0) > 0:  # pragma: no cover - GPU only
            gpus_per = min(1.0, float(res["GPU"]) / S)
        self.shards = [
            Shard.options(num_cpus=actor_cpus, num_gpus=gpus_per, scheduling_strategy="SPREAD",
                          max_concurrency=1).remote([tref], plan, int(bounds[s]), int(bounds[s + 1]), threads, gpu_cfg)
            for s in range(S)]
        del tref  # the shards hold it now
        add_batch = int(_cfg(cfg, "add_batch", 65_536))
        ta = time.perf_counter()
        if spec is not None:  # workers read the pool files themselves
            ray.get([sh.add_from_spec.remote(spec, add_batch) for sh in self.shards])
        else:  # in-memory pool: stream batches to the shards, at most two in flight per shard
            inflight: list = []
            gens = [src.batches(add_batch, int(bounds[s]), int(bounds[s + 1])) for s in range(S)]
            live = list(range(S))
            while live:
                for s in list(live):
                    try:
                        _, x = next(gens[s])
                    except StopIteration:
                        live.remove(s)
                        continue
                    inflight.append(self.shards[s].add.remote(ray.put(x)))
                    del x
                while len(inflight) > 2 * S:
                    done, inflight = ray.wait(inflight, num_returns=len(inflight) - 2 * S)
                    ray.get(done)  # surface a failed add now
            ray.get(inflight)
        self.add_s = time.perf_counter() - ta
        self.finish = ray.get([sh.finish.remote(k) for sh in self.shards])
        added = sum(f["ntotal"] for f in self.finish)
        if added != src.n:
            raise RuntimeError(f"index shards hold {added} vectors, the pool has {src.n}")
        self.build_s = time.perf_counter() - t0
        self.nodes = sorted({f["node"] for f in self.finish})
        self._params = dict(plan["params"])
        self._params.update(self.finish[0]["params"])
        self.gpu = self.finish[0]["gpu"]

    def params(self) -> dict:
        return dict(self._params)

    def set_params(self, **kw) -> dict:
        used = self.ray.get([sh.set_params.remote(kw, self.k) for sh in self.shards])[0]
        self._params.update(kw)
        self._params.update(used)
        return used

    def _kk(self, k):
        return _refined_k(self.plan, k, self.src.n)

    def exact(self, q: np.ndarray, k: int):
        """Exact top-k for the recall check: each shard actor scans its own rows of the pool files (in parallel,
        on the nodes that hold the shards); an in-memory pool is scanned in the driver."""
        spec = self.src.spec()
        if spec is None:
            return exact_search(self.src, q, k)
        qref = self.ray.put(np.ascontiguousarray(q))
        batch = int(_cfg(self.cfg, "add_batch", 65_536))
        return merge_topk(self.ray.get([sh.exact.remote(spec, qref, k, batch) for sh in self.shards]), k)

    def client(self) -> "ShardClient":
        return ShardClient(self.shards, self.plan, self.src, int(_cfg(self.cfg, "query_batch", 4096)))

    def search(self, q: np.ndarray, k: int):
        """Direct fan-out (used for the recall sample)."""
        return self.client().search(q, k)

    def search_all(self, q: np.ndarray, k: int):
        """The full query set as a Ray Data stage over query blocks (explicit block count, fractional CPUs)."""
        ray = self.ray
        import ray.data
        nq = len(q)
        qb = int(_cfg(self.cfg, "query_batch", 4096))
        if nq <= qb:
            return self.search(q, k)
        kk = self._kk(k)
        qref = ray.put(np.ascontiguousarray(q))
        import pyarrow as pa
        # one block per query batch, built in the driver: from_numpy_refs / range would start 1-CPU tasks that
        # cannot be scheduled while the shard actors hold their CPUs
        ds = ray.data.from_blocks([pa.table({"data": np.arange(s, min(nq, s + qb), dtype=np.int64)})
                                   for s in range(0, nq, qb)])
        spec = self.src.spec() if self.plan["lossy"] else None
        clients = max(1, int(_cfg(self.cfg, "search_clients", 1)))
        ds = ds.map_batches(
            _SearchStage, batch_size=None, zero_copy_batch=True,
            fn_constructor_kwargs={"shards": self.shards, "queries": [qref], "k": k, "kk": kk, "source_spec": spec},
            compute=ray.data.ActorPoolStrategy(size=clients),
            num_cpus=float(_cfg(self.cfg, "client_cpus", 0.25)))
        D = np.full((nq, kk if self.plan["lossy"] and spec is None else k), -np.inf, np.float32)
        I = np.full(D.shape, -1, np.int64)
        ctx = ray.data.DataContext.get_current()
        old = ctx.enable_progress_bars
        ctx.enable_progress_bars = False
        try:
            seen = 0
            for b in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                r = b["row"]
                D[r] = b["scores"]
                I[r] = b["ids"]
                seen += len(r)
        finally:
            ctx.enable_progress_bars = old
        if seen != nq:
            raise RuntimeError(f"search stage returned {seen} of {nq} query rows")
        del qref
        if self.plan["lossy"] and spec is None:  # in-memory pool: rescore in the driver
            D, I = refine(self.src, _f32(q), D, I, k)
        return D, I

    def index_info(self) -> dict:
        nb = [f["bytes"] for f in self.finish]
        return {"kind": self.plan["kind"], "factory": self.plan["factory"], "params": self.params(),
                "ntotal": int(sum(f["ntotal"] for f in self.finish)), "dim": self.plan["dim"],
                "bytes": int(sum(nb)) if min(nb) >= 0 else int(self.plan["est_bytes"]),
                "est_bytes": int(self.plan["est_bytes"]), "gpu": bool(self.gpu["use_gpu"]),
                "gpu_reason": self.gpu["reason"], "lossy": bool(self.plan["lossy"]),
                "reason": self.plan.get("reason", ""), "train_s": round(self.train_s, 3), "train_in": self.train_in,
                "add_s": round(self.add_s, 3), "nodes": len(self.nodes)}

    def close(self):
        for sh in getattr(self, "shards", []):
            try:
                self.ray.kill(sh)
            except Exception:
                pass
        self.shards = []


# --------------------------------------------------------------------------------------------------------------
# retrieve
# --------------------------------------------------------------------------------------------------------------

def _tune_step(params: dict, plan: dict, n: int) -> Optional[dict]:
    """The next, more exact setting, or None when there is none."""
    if "nprobe" in params and params.get("nlist"):
        cur, nlist = int(params["nprobe"]), int(params["nlist"])
        return {"nprobe": min(nlist, cur * 2)} if cur < nlist else None
    if "ef_search" in params:
        cur = int(params["ef_search"])
        cap = min(MAX_EF_SEARCH, max(n, 1))
        return {"ef_search": min(cap, cur * 2)} if cur < cap else None
    return None


def recall_lower_bound(hits: np.ndarray, tot: np.ndarray, population: int, z: float) -> tuple[float, float]:
    """(recall, its lower bound) from a sample's per-query counts (`recall_hits`): recall@k of the sample
    (sum hits / sum tot) less ``z`` standard errors of that ratio over queries, with the finite-population correction
    for a sample of ``population`` queries (a sample of every query has no sampling error)."""
    m, total = len(hits), float(tot.sum())
    if not total:
        return 1.0, 1.0
    r = float(hits.sum()) / total
    if m < 2 or not z:
        return r, r
    resid = hits - r * tot
    se = np.sqrt(float(resid @ resid) / (m - 1) / m * max(0.0, 1.0 - m / max(population, m))) / (total / m)
    return r, r - float(z) * se


def _narrow(searcher, trials: list, met: tuple, floor: float, measure) -> tuple[float, float]:
    """After doubling met the floor: bisect between the last setting that missed it and the first that met it,
    until they are within 1/8, and keep the smallest measured setting that meets it (doubling alone overshoots by
    up to 2x, and the search cost is proportional to nprobe). `met` and the result: (recall, lower bound)."""
    key = "nprobe" if "nprobe" in trials[-1] else "ef_search"
    lo, hi, kept = int(trials[-2][key]), int(trials[-1][key]), met
    while hi - lo > max(1, hi // 8):
        mid = (lo + hi) // 2
        searcher.set_params(**{key: mid})
        r = measure()
        if r[1] >= floor:
            hi, kept = mid, r
        else:
            lo = mid
    if trials[-1][key] != hi:
        searcher.set_params(**{key: hi})
    return kept


def retrieve(pool, queries: np.ndarray, k: int, cfg=None):
    """Top-k pool rows for every query by inner product.

    pool: float32 (n, d) L2-normalised ndarray / np.memmap, a list of ``.npy`` shard paths, or a ``VectorSource``.
    Returns (scores float32 (nq, k) descending, ids int64 (nq, k) row numbers, -1/-inf padding, info dict) where
    info holds the index (kind, factory, params, bytes, gpu), the measured recall and timings."""
    cfg = cfg if cfg is not None else IndexConfig()
    check_config(cfg)
    t_all = time.perf_counter()
    src = as_source(pool)
    q = _f32(queries)
    k = int(k)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if q.ndim != 2 or q.shape[1] != src.dim:
        raise ValueError(f"queries must be (nq, {src.dim}), got {q.shape}")
    nq = len(q)
    if src.n == 0 or nq == 0:
        return (np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64),
                {"kind": "empty", "ntotal": src.n, "k": k, "recall_at_k": None})
    searcher, info = open_index(src, nq, k, cfg, lambda rows: q[rows])
    try:
        t1 = time.perf_counter()
        D, I = searcher.search_all(q, k)
        search_s = time.perf_counter() - t1
        info.update({"search_s": round(search_s, 3), "qps": round(nq / search_s, 1) if search_s > 0 else None,
                     "total_s": round(time.perf_counter() - t_all, 3)})
        return D, I, info
    finally:
        searcher.close()


def open_index(pool, nq: int, k: int, cfg, sample) -> tuple:
    """Build the index over `pool` for `nq` queries (in-process, or in shard actors on Ray: `index.distributed`),
    measure recall@k on `recall_sample` of them (`sample(rows)`: the vectors of those query rows) against exact
    search and raise nprobe / efSearch until `recall_floor` is met with a margin of `recall_z` standard errors
    (`recall_lower_bound`), so that the floor holds for all `nq` queries, not only for the sample. Returns
    (searcher, info); the caller searches (`searcher.search`, or a picklable `searcher.client()` on Ray) and
    closes it."""
    cfg = cfg if cfg is not None else IndexConfig()
    check_config(cfg)
    src = as_source(pool)
    k = int(k)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    gp0 = gpu_plan(cfg, k=k, kind="ivf_flat")
    plan = choose_index(src.n, src.dim, cfg, gpu_available=gp0["use_gpu"])
    Searcher = _RaySearcher if _use_ray(cfg, src.n, nq) else _LocalSearcher
    searcher = Searcher(src, plan, cfg, k)
    try:
        # recall on a sample, against exact search; tune before the full search. A Flat index is exact search
        # (in-process, on a GPU or sharded with an exact merge): its recall is 1.0 without measuring it.
        t0 = time.perf_counter()
        exact = plan["kind"] == "flat"
        m = 0 if exact else int(min(nq, max(0, int(_cfg(cfg, "recall_sample", 500)))))
        floor = _cfg(cfg, "recall_floor")
        z = float(_cfg(cfg, "recall_z", 1.96))
        trials = []
        recall = lower = 1.0 if exact and nq else None
        if m > 0:
            rows = np.sort(np.random.default_rng(int(_cfg(cfg, "seed", 0) or 0) + 1).choice(nq, m, replace=False))
            qs = _f32(sample(rows))
            exact_D, exact_I = searcher.exact(qs, k)

            def measure() -> tuple[float, float]:
                ann_D, ann_I = searcher.search(qs, k)
                r = recall_lower_bound(*recall_hits(ann_I, exact_I, k, ann_D, exact_D), nq, z)
                now = searcher.params()
                trials.append({**{a: now[a] for a in ("nprobe", "ef_search") if a in now}, "recall": round(r[0], 5),
                               "recall_lower": round(r[1], 5)})
                return r

            while True:
                recall, lower = measure()
                p = searcher.params()
                if floor is None or lower >= float(floor):
                    if len(trials) > 1:
                        recall, lower = _narrow(searcher, trials, (recall, lower), float(floor), measure)
                    break
                step = _tune_step(p, plan, src.n) if _cfg(cfg, "auto_tune", True) else None
                if step is None:
                    info = searcher.index_info()
                    info.update(recall_sample=m, recall_trials=trials, recall_z=z)
                    tunable = "nprobe" in p or "ef_search" in p
                    if not _cfg(cfg, "auto_tune", True):
                        why, at_max = "index.auto_tune is off", False
                    elif tunable:
                        why, at_max = ("search parameters already at their maximum: "
                                       + ", ".join(f"{a}={p[a]}" for a in ("nprobe", "ef_search") if a in p)), True
                    else:
                        why, at_max = "the index has no search parameter to raise", True
                    raise RecallFloorError(recall, float(floor), k, info, why, at_max, lower)
                searcher.set_params(**step)
        recall_s = time.perf_counter() - t0
        info = searcher.index_info()
        info.update({
            "k": k, "nq": nq, "mode": searcher.mode, "num_shards": searcher.num_shards,
            "recall_at_k": None if recall is None else round(float(recall), 5), "recall_k": k,
            "recall_lower": None if lower is None else round(float(lower), 5), "recall_z": z,
            "recall_sample": m, "recall_exact": exact, "recall_floor": floor, "recall_trials": trials,
            "tuned": len(trials) > 1,
            "build_s": round(searcher.build_s, 3), "recall_s": round(recall_s, 3),
        })
        return searcher, info
    except BaseException:
        searcher.close()
        raise
