"""FAISS index choice, build and search: plain functions, no Ray (the Ray edge is pipeline/retrieve.py).

Vectors are float32, L2-normalised, compared by inner product; ids are row numbers in the pool.

* ``choose_index(n, dim, cfg)`` -> the plan (factory string + derived parameters + estimated bytes), from the
  pool size, the dimension and ``cfg.memory_budget_gb``: ``Flat`` below ``exact_below``, ``HNSW`` up to
  ``hnsw_below`` (CPU only; off by default), then ``IVF-Flat`` if the raw vectors fit the budget, ``IVF-SQ8`` if
  a byte per dimension fits, else ``(OPQ) IVF-PQ`` with the largest code that fits; or the named kind or FAISS
  factory string in ``cfg.kind`` (``ivf_fs``: 4-bit fast-scan codes, the top 8k rescored exactly, CPU only).
* ``build_index(vectors, cfg)`` trains on a sample and adds in batches from an array, a memmap or a list of ``.npy``
  shards (``VectorSource``): peak memory is the index plus one batch.
* ``search(built, queries, k)`` -> (scores desc float32, ids int64), ``-1`` / ``-inf`` where fewer than k exist;
  ties are ordered by id so the result does not depend on how the pool was sharded.
* ``exact_search`` (streaming brute force), ``merge_topk`` (exact merge of per-shard top-k), ``recall_at_k``,
  ``refine`` / ``rescore_exact`` (exact scores for lossy codes) and ``gpu_plan`` (when GPU FAISS is used) support
  retrieve.py.
See docs/scale.md for the figures behind the defaults.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import faiss

GPU_MAX_K = 2048        # GPU FAISS: k and nprobe are limited to 2048 (k-selection in shared memory)
GPU_MAX_NPROBE = 2048
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)  # code sizes GPU IVF-PQ supports
PQ_M_CHOICES = (96, 64, 48, 32, 24, 16, 8, 4)  # bytes per vector tried, largest first (8-bit codes)
FS_REFINE = 8  # ivf_fs: candidates per result rescored exactly (4-bit codes of one dimension each rank well enough)

from pipeline.config import IndexConfig, check_section  # noqa: F401  (the `index` section of the run config)


def check_config(cfg) -> None:
    """Raise ConfigError (a ValueError) naming the ``index.*`` key whose value is not allowed: the checks of
    pipeline/config.py, for an IndexConfig built in code."""
    check_section(cfg, "index")


def _cfg(cfg, name, default=None):
    return getattr(cfg, name, default) if cfg is not None else default


# --------------------------------------------------------------------------------------------------------------
# Vector sources: arrays, memmaps and .npy shards, read in row batches
# --------------------------------------------------------------------------------------------------------------

class VectorSource:
    """Rows [0, n) of float32 vectors of width ``dim``, readable in batches without loading them all."""
    n: int
    dim: int

    def batches(self, batch_rows: int, lo: int = 0, hi: Optional[int] = None) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError

    def take(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sample(self, m: int, seed: int = 0) -> np.ndarray:
        m = min(int(m), self.n)
        rows = np.sort(np.random.default_rng(seed).choice(self.n, size=m, replace=False))
        return self.take(rows)

    def spec(self):
        """A picklable description from which a Ray worker can re-open the source itself (None: in-memory)."""
        return None


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _drop_pages(arr) -> None:
    """Release the resident pages of a memmap view, so a scan does not leave the file in the process RSS."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


class ArraySource(VectorSource):
    def __init__(self, arr: np.ndarray):
        if arr.ndim != 2:
            raise ValueError(f"vectors must be 2-D (n, dim), got shape {arr.shape}")
        self.arr = arr
        self.n, self.dim = int(arr.shape[0]), int(arr.shape[1])

    def batches(self, batch_rows, lo=0, hi=None):
        hi = self.n if hi is None else hi
        for s in range(lo, hi, batch_rows):
            e = min(hi, s + batch_rows)
            yield s, _f32(self.arr[s:e])
            _drop_pages(self.arr)

    def take(self, rows):
        return _f32(self.arr[np.asarray(rows, dtype=np.int64)])

    def spec(self):
        fn = getattr(self.arr, "filename", None)
        # only a memmap as opened (its base is the mmap itself): a view's .offset would not describe its rows
        if isinstance(self.arr, np.memmap) and fn and isinstance(self.arr.base, mmap.mmap) \
                and self.arr.flags.c_contiguous:
            return ("memmap", str(fn), int(self.arr.offset), tuple(self.arr.shape), str(self.arr.dtype))
        return None


class NpyShards(VectorSource):
    """Pool stored as ``.npy`` files (each (rows, dim)), concatenated in the given order; files are memory-mapped
    one at a time and released after each batch."""

    def __init__(self, paths: Sequence[Union[str, os.PathLike]]):
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise ValueError("NpyShards needs at least one .npy file")
        rows, dims = [], set()
        for p in self.paths:
            a = np.load(p, mmap_mode="r")
            if a.ndim != 2:
                raise ValueError(f"{p}: expected a 2-D array, got shape {a.shape}")
            rows.append(int(a.shape[0]))
            dims.add(int(a.shape[1]))
            del a
        if len(dims) != 1:
            raise ValueError(f"shards have different widths: {sorted(dims)}")
        self.dim = dims.pop()
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.n = int(self.offsets[-1])

    @classmethod
    def from_dir(cls, path) -> "NpyShards":
        files = sorted(f for f in os.listdir(path) if f.endswith(".npy"))
        return cls([os.path.join(path, f) for f in files])

    def batches(self, batch_rows, lo=0, hi=None):
        hi = self.n if hi is None else hi
        for f, p in enumerate(self.paths):
            a0, a1 = int(self.offsets[f]), int(self.offsets[f + 1])
            s0, s1 = max(lo, a0), min(hi, a1)
            if s0 >= s1:
                continue
            a = np.load(p, mmap_mode="r")
            for s in range(s0, s1, batch_rows):
                e = min(s1, s + batch_rows)
                yield s, _f32(a[s - a0:e - a0])
                _drop_pages(a)
            del a

    def take(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        f_of = np.searchsorted(self.offsets, rows, side="right") - 1
        files = np.unique(f_of)
        if len(files) == 1:  # every row in one file (a small store's only shard): one gather, no scatter (4x faster)
            a = np.load(self.paths[files[0]], mmap_mode="r")
            out = np.asarray(a[rows - self.offsets[files[0]]], dtype=np.float32)
            _drop_pages(a)
            return out
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for f in files:
            sel = np.nonzero(f_of == f)[0]
            a = np.load(self.paths[f], mmap_mode="r")
            out[sel] = a[rows[sel] - self.offsets[f]]
            _drop_pages(a)
            del a
        return out

    def spec(self):
        return ("npy_shards", list(self.paths))


def as_source(x) -> VectorSource:
    """ndarray / np.memmap / VectorSource / list of .npy paths / a directory of .npy files -> VectorSource."""
    if isinstance(x, VectorSource):
        return x
    if isinstance(x, np.ndarray):
        return ArraySource(x)
    if isinstance(x, (str, os.PathLike)):
        return NpyShards.from_dir(x) if os.path.isdir(x) else NpyShards([x])
    if isinstance(x, (list, tuple)) and x and all(isinstance(p, (str, os.PathLike)) for p in x):
        return NpyShards(x)
    if isinstance(x, tuple) and len(x) and x[0] in ("memmap", "npy_shards"):
        return source_from_spec(x)
    raise TypeError(f"cannot read vectors from {type(x).__name__}")


def source_from_spec(spec) -> VectorSource:
    if spec[0] == "npy_shards":
        return NpyShards(spec[1])
    if spec[0] == "memmap":
        _, fn, off, shape, dtype = spec
        return ArraySource(np.memmap(fn, dtype=dtype, mode="r", offset=off, shape=tuple(shape)))
    raise ValueError(f"unknown source spec {spec[0]!r}")


# --------------------------------------------------------------------------------------------------------------
# Index choice
# --------------------------------------------------------------------------------------------------------------

def _pow2_near(x: float) -> int:
    return int(2 ** round(math.log2(max(1.0, x))))


LIST_SIZE = 256          # vectors per IVF list past ~260k: nlist grows with the pool so a probe scans a fixed amount
MAX_SIZED_NLIST = 32_768  # up to here; k-means (40 x nlist points x nlist) grows as nlist^2 and runs in one process
SIZED_TRAIN_BYTES = 1 << 30  # and only while its sample (40 x nlist vectors of d floats) stays this small
HNSW_QUANTIZER_FROM = 8192  # lists from which the coarse quantizer is an HNSW graph (cost ~log nlist, not nlist)


def derive_nlist(n: int, d: int = 0) -> int:
    """Power of two near max(2*sqrt(n), min(n/LIST_SIZE, MAX_SIZED_NLIST)), with at least ~39 training points per
    list, in [16, 262144]. Lists of a bounded size keep the vectors scanned per query (nprobe x list size) flat as the
    pool grows from ~260k to ~8M, where 2*sqrt(n) lists scan a growing share (docs/scale.md, "Search cost as the
    pool grows"); past that the k-means training would cost more than the search saves. For `d`-dimensional vectors
    the sized lists stop where their training sample passes SIZED_TRAIN_BYTES (a 3584-d teacher: 2*sqrt(n) lists),
    so the process that trains (a Ray task, or the driver for an in-memory pool) never holds a sample that grows
    with the pool."""
    sized = min(n / LIST_SIZE, MAX_SIZED_NLIST, SIZED_TRAIN_BYTES / (40 * 4 * d) if d else math.inf)
    nl = _pow2_near(max(2.0 * math.sqrt(max(n, 1)), sized))
    while nl > 16 and nl * 39 > n:
        nl //= 2
    return int(min(max(nl, 16), 262_144))


def derive_nprobe(nlist: int) -> int:
    """16 lists (all of them below 16). With lists of a bounded size (derive_nlist) the neighbours of a query sit in
    about as many lists at 100k as at 100M, so the start does not grow with the pool; the recall check raises it
    (auto_tune) wherever the data needs more."""
    return int(min(nlist, 16))


def derive_ef_search(k: int) -> int:
    return int(max(128, 2 * k))


def _hnsw_bytes(n, d, m):
    # level 0 keeps 2*M int32 links, upper levels ~M/ln(M)... links; + the float32 vectors and level bookkeeping
    return int(n * (4 * d + 4 * 2 * m * 1.07 + 12))


def _ivf_overhead(n, d, nlist):
    return int(nlist * d * 4 + n * 8 + nlist * 64)  # centroids + ids + list headers


def estimate_bytes(kind: str, n: int, d: int, params: dict) -> int:
    """Estimated resident size of the index (all shards together), excluding Python/Ray overhead."""
    nlist = params.get("nlist", 0) or 0
    if kind == "flat":
        return int(n * d * 4)
    if kind == "hnsw":
        return _hnsw_bytes(n, d, params.get("hnsw_m", 32))
    if kind == "ivf_flat":
        return int(n * d * 4) + _ivf_overhead(n, d, nlist)
    if kind == "ivf_sq8":
        return int(n * d) + _ivf_overhead(n, d, nlist) + 8 * d
    if kind == "ivf_fs":  # 4-bit codes, packed in blocks of 32 vectors per list; 16 centroids per dimension
        code = (d + 1) // 2
        return int(n * code) + nlist * 32 * code + _ivf_overhead(n, d, nlist) + 16 * d * 4
    if kind == "ivf_pq":
        m = params["pq_m"]
        opq = d * d * 4 if params.get("opq") else 0
        return int(n * m) + _ivf_overhead(n, d, nlist) + 256 * d * 4 + opq
    return int(n * d * 4)  # user factory string: unknown, assume raw size


def _budget_bytes(cfg) -> float:
    gb = _cfg(cfg, "memory_budget_gb", 8.0)
    return float("inf") if gb is None else float(gb) * 2 ** 30


def _quantizer(nlist: int) -> str:
    # from HNSW_QUANTIZER_FROM lists a flat coarse quantizer (nlist distances per query and per added vector, in
    # every shard) outgrows the scan of the probed lists: use an HNSW one
    return f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_FROM else f"IVF{nlist}"


def _plan_for(kind: str, n: int, d: int, cfg, gpu_ok: bool, pq_m: Optional[int] = None) -> dict:
    p: dict = {}
    if kind == "flat":
        factory = "Flat"
    elif kind == "hnsw":
        p["hnsw_m"] = int(_cfg(cfg, "hnsw_m", 32))
        p["ef_construction"] = int(_cfg(cfg, "ef_construction", 64))
        p["ef_search"] = _cfg(cfg, "ef_search")  # None -> derived from k at search time
        factory = f"HNSW{p['hnsw_m']}"
    else:
        nlist = int(_cfg(cfg, "nlist") or derive_nlist(n, d))
        p["nlist"] = nlist
        p["nprobe"] = int(_cfg(cfg, "nprobe") or derive_nprobe(nlist))
        q = _quantizer(nlist)
        if kind == "ivf_flat":
            factory = f"{q},Flat"
        elif kind == "ivf_sq8":
            factory = f"{q},SQ8"
            p["refine_factor"] = int(_cfg(cfg, "refine_factor") or 2)
        elif kind == "ivf_fs":
            factory = f"{q},PQ{d}x4fs"
            p["refine_factor"] = int(_cfg(cfg, "refine_factor") or FS_REFINE)
        elif kind == "ivf_pq":
            m = p["pq_m"] = int(pq_m or _cfg(cfg, "pq_m") or 0)
            if d % m:
                raise ValueError(f"index.pq_m={m} must divide the dimension {d}")
            opq = _cfg(cfg, "opq")
            p["opq"] = bool(d // m >= 4) if opq is None else bool(opq)
            factory = (f"OPQ{m},{q},PQ{m}" if p["opq"] else f"{q},PQ{m}")
            p["refine_factor"] = int(_cfg(cfg, "refine_factor") or 4)
        else:
            raise ValueError(kind)
        p["train_size"] = int(min(n, _cfg(cfg, "train_size") or max(40 * nlist, 65_536)))
    return {"kind": kind, "factory": factory, "params": p, "n": int(n), "dim": int(d),
            "est_bytes": estimate_bytes(kind, n, d, p), "lossy": kind in ("ivf_sq8", "ivf_pq", "ivf_fs")}


def choose_index(n: int, dim: int, cfg, gpu_available: Optional[bool] = None) -> dict:
    """The plan for a pool of ``n`` vectors of width ``dim``: kind, factory string, derived params, estimated bytes
    and the reason. ``gpu_available`` (default: GPU FAISS sees a GPU and cfg.gpu allows it) skips HNSW, which GPU
    FAISS cannot run."""
    n, dim = int(n), int(dim)
    kind = str(_cfg(cfg, "kind", "auto") or "auto")
    budget = _budget_bytes(cfg)
    if gpu_available is None:
        gpu_available = gpu_plan(cfg, k=1, kind="ivf_flat")["use_gpu"]
    named = ("flat", "hnsw", "ivf_flat", "ivf_fs", "ivf_sq8", "ivf_pq")
    low = kind.lower()
    if low in named:
        if low == "ivf_pq" and not _cfg(cfg, "pq_m"):
            plan = _plan_pq(n, dim, cfg, budget, gpu_available, force=True)
        else:
            plan = _plan_for(low, n, dim, cfg, gpu_available)
        plan["reason"] = f"index.kind={low}"
        return plan
    if low != "auto":  # a FAISS factory string, used as given
        plan = {"kind": "factory", "factory": kind, "params": {}, "n": n, "dim": dim,
                "est_bytes": estimate_bytes("factory", n, dim, {}), "lossy": False,
                "reason": "index.kind is a FAISS factory string"}
        if "IVF" in kind or "IMI" in kind:
            if _cfg(cfg, "nprobe"):
                plan["params"]["nprobe"] = int(_cfg(cfg, "nprobe"))
            plan["params"]["train_size"] = int(min(n, _cfg(cfg, "train_size") or max(65_536, 50 * _nlist_in(kind))))
        if "HNSW" in kind and _cfg(cfg, "ef_search"):
            plan["params"]["ef_search"] = int(_cfg(cfg, "ef_search"))
        if any(t in kind for t in ("PQ", "SQ", "LSH")) and "Flat" not in kind.split(",")[-1]:
            plan["lossy"] = True
            plan["params"]["refine_factor"] = int(_cfg(cfg, "refine_factor") or 4)
        return plan

    exact_below = int(_cfg(cfg, "exact_below", 50_000))
    flat = _plan_for("flat", n, dim, cfg, gpu_available)
    if n < exact_below and flat["est_bytes"] <= budget:
        flat["reason"] = f"n={n} < index.exact_below={exact_below}"
        return flat
    hnsw_below = int(_cfg(cfg, "hnsw_below", 0) or 0)
    if n < hnsw_below and not gpu_available:
        plan = _plan_for("hnsw", n, dim, cfg, gpu_available)
        if plan["est_bytes"] <= budget:
            plan["reason"] = f"index.exact_below <= n={n} < index.hnsw_below={hnsw_below}, fits the budget"
            return plan
    for k in ("ivf_flat", "ivf_sq8"):
        plan = _plan_for(k, n, dim, cfg, gpu_available)
        if plan["est_bytes"] <= budget:
            plan["reason"] = (f"{_gb(plan['est_bytes'])} GB fits index.memory_budget_gb={_cfg(cfg, 'memory_budget_gb')}"
                              + ("" if k == "ivf_flat" else " (raw float32 vectors do not)"))
            return plan
    return _plan_pq(n, dim, cfg, budget, gpu_available)


def _nlist_in(factory: str) -> int:
    import re
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else 1024


def _gb(b) -> str:
    return f"{b / 2 ** 30:.2f}"


class MemoryBudgetError(ValueError):
    pass


def _plan_pq(n, dim, cfg, budget, gpu_available, force=False) -> dict:
    if _cfg(cfg, "pq_m"):
        plan = _plan_for("ivf_pq", n, dim, cfg, gpu_available)
        plan["reason"] = "index.pq_m given"
        return plan
    cands = [m for m in PQ_M_CHOICES if m <= dim // 4 and dim % m == 0 and (not gpu_available or m in GPU_PQ_M)]
    if not cands:
        cands = [m for m in range(min(dim, 64), 0, -1) if dim % m == 0][:1]
    last = None
    for m in cands:
        plan = _plan_for("ivf_pq", n, dim, cfg, gpu_available, pq_m=m)
        last = plan
        if plan["est_bytes"] <= budget:
            plan["reason"] = (f"IVF-PQ{m}: largest code that fits index.memory_budget_gb="
                              f"{_cfg(cfg, 'memory_budget_gb')} ({_gb(plan['est_bytes'])} GB)")
            return plan
    if force:
        last["reason"] = "index.kind=ivf_pq (smallest code; over budget)"
        return last
    raise MemoryBudgetError(
        f"no index for n={n}, dim={dim} fits index.memory_budget_gb={_cfg(cfg, 'memory_budget_gb')}: the smallest, "
        f"{last['factory']}, needs {_gb(last['est_bytes'])} GB. Raise index.memory_budget_gb or shard the pool.")


# --------------------------------------------------------------------------------------------------------------
# GPU decision
# --------------------------------------------------------------------------------------------------------------

def num_gpus() -> int:
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # pragma: no cover
        return 0


def gpu_plan(cfg, k: int, kind: str, ngpu: Optional[int] = None, nprobe: Optional[int] = None) -> dict:
    """Whether to put the index on GPU(s) and whether a search of ``k`` can run there.

    Returns ``{"use_gpu", "search_on_gpu", "ngpu", "reason"}``. GPU FAISS is used when ``cfg.gpu`` is "auto"/"true"
    and FAISS sees a GPU; HNSW stays on CPU (no GPU HNSW in FAISS). k > 2048 (or nprobe > 2048) cannot be searched
    on GPU: the search falls back to the CPU copy of the index (``search_on_gpu`` False), which gives the same
    neighbours. ``cfg.gpu == "true"`` without a GPU raises."""
    want = str(_cfg(cfg, "gpu", "auto")).lower()
    if want in ("false", "0", "no", "off", "none"):
        return {"use_gpu": False, "search_on_gpu": False, "ngpu": 0, "reason": "index.gpu=false"}
    if want not in ("auto", "true", "1", "yes", "on"):
        raise ValueError(f"index.gpu must be auto|true|false, got {want!r}")
    ngpu = num_gpus() if ngpu is None else int(ngpu)
    has_gpu_faiss = ngpu > 0 and hasattr(faiss, "index_cpu_to_gpu")
    if ngpu <= 0:
        if want != "auto":
            raise RuntimeError("index.gpu=true but FAISS sees no GPU (is faiss-gpu installed and CUDA visible?); "
                               "set index.gpu=auto or false")
        return {"use_gpu": False, "search_on_gpu": False, "ngpu": 0, "reason": "no GPU visible to FAISS"}
    if kind == "hnsw":
        return {"use_gpu": False, "search_on_gpu": False, "ngpu": ngpu, "reason": "HNSW has no GPU FAISS version"}
    if kind == "ivf_fs":
        return {"use_gpu": False, "search_on_gpu": False, "ngpu": ngpu, "reason": "fast-scan has no GPU FAISS version"}
    if not has_gpu_faiss and want == "auto":
        return {"use_gpu": False, "search_on_gpu": False, "ngpu": ngpu, "reason": "FAISS build has no GPU support"}
    if k > GPU_MAX_K:
        return {"use_gpu": True, "search_on_gpu": False, "ngpu": ngpu,
                "reason": f"k={k} > {GPU_MAX_K} (GPU FAISS limit): search on the CPU copy"}
    if nprobe is not None and nprobe > GPU_MAX_NPROBE:
        return {"use_gpu": True, "search_on_gpu": False, "ngpu": ngpu,
                "reason": f"nprobe={nprobe} > {GPU_MAX_NPROBE} (GPU FAISS limit): search on the CPU copy"}
    return {"use_gpu": True, "search_on_gpu": True, "ngpu": ngpu, "reason": f"{ngpu} GPU(s)"}


def to_gpu(index, ngpu: int, plan: dict):
    """Copy a CPU index to the GPU(s) (sharded over several)."""
    co = faiss.GpuMultipleClonerOptions() if ngpu > 1 else faiss.GpuClonerOptions()
    if plan.get("kind") == "ivf_pq" or "PQ" in plan.get("factory", ""):
        co.useFloat16 = True  # lookup tables in fp16: needed for large PQ codes on GPU
    if ngpu > 1:
        co.shard = True
        return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=ngpu)
    res = faiss.StandardGpuResources()
    g = faiss.index_cpu_to_gpu(res, 0, index, co)
    g._hardneg_res = res  # keep the resources alive with the index
    return g


# --------------------------------------------------------------------------------------------------------------
# Build, search
# --------------------------------------------------------------------------------------------------------------

@dataclass
class BuiltIndex:
    index: "faiss.Index"
    info: dict = field(default_factory=dict)
    cpu_index: Optional["faiss.Index"] = None   # CPU copy when ``index`` is on GPU (k > 2048 fallback)
    source: Optional[VectorSource] = None       # the whole pool (global ids), for exact rescoring of lossy codes
    id_offset: int = 0                          # added to the ids a shard returns
    plan: dict = field(default_factory=dict)    # choose_index()'s plan (params updated by retune)


def make_index(plan: dict) -> "faiss.Index":
    idx = faiss.index_factory(plan["dim"], plan["factory"], faiss.METRIC_INNER_PRODUCT)
    p = plan["params"]
    if plan["kind"] == "hnsw":
        idx.hnsw.efConstruction = int(p.get("ef_construction", 64))
    if isinstance(idx, faiss.IndexPreTransform):
        for j in range(idx.chain.size()):
            vt = faiss.downcast_VectorTransform(idx.chain.at(j))
            if isinstance(vt, faiss.OPQMatrix):
                vt.niter = 20  # default 50: most of the gain comes early, and OPQ training is the slowest step
    try:
        ivf = faiss.extract_index_ivf(idx)
        ivf.cp.niter = 10            # k-means iterations; 10 is enough for coarse lists
        ivf.cp.max_points_per_centroid = 256
    except RuntimeError:
        pass
    return idx


def train_index(idx, source: VectorSource, plan: dict, seed: int = 0) -> float:
    """Train on a random sample of the pool; returns seconds."""
    if idx.is_trained:
        return 0.0
    t = time.perf_counter()
    m = int(plan["params"].get("train_size") or min(source.n, 65_536))
    x = source.sample(m, seed)
    try:
        ivf = faiss.extract_index_ivf(idx)
    except RuntimeError:
        ivf = None
    if ivf is not None and _find_hnsw(faiss.downcast_index(ivf.quantizer)) is not None:
        train_coarse(idx, ivf, x)
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan) \
            and not isinstance(idx, faiss.IndexPreTransform):
        # the lists on every thread, then the 4-bit codes on one: their d small k-means (16 centroids, 4,096
        # points each) spent 33 s of wall on 2 threads of a loaded machine where one thread takes 0.5 s (OpenMP
        # waits at every step), and give the same codes
        ivf.train_q1(len(x), faiss.swig_ptr(x), False, ivf.metric_type)
        with one_thread():
            idx.train(x)
    else:
        idx.train(x)  # what comes after the lists (codes); a filled quantizer is not trained again
    return time.perf_counter() - t


@contextlib.contextmanager
def one_thread():
    """Run FAISS on one OpenMP thread inside the block (the thread count is restored after it)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def train_coarse(idx, ivf, x: np.ndarray) -> None:
    """Fill the HNSW coarse quantizer of ``ivf`` (inside ``idx``) with k-means centroids of ``x``: k-means assigns
    with a flat index (FAISS would assign with the graph, rebuilt every iteration), and the graph is built once, on
    one thread: a multi-threaded build can link it in another order each time (timing, thread count), and with it
    change the lists a query probes."""
    if isinstance(idx, faiss.IndexPreTransform):  # OPQ: the lists hold rotated vectors
        for j in range(idx.chain.size()):
            vt = idx.chain.at(j)
            if not vt.is_trained:
                vt.train(x)
            x = vt.apply(x)
    cp = ivf.cp
    km = faiss.Kmeans(x.shape[1], int(ivf.nlist), niter=cp.niter, seed=cp.seed, spherical=cp.spherical,
                      max_points_per_centroid=cp.max_points_per_centroid)
    km.train(x)
    q = faiss.downcast_index(ivf.quantizer)
    q.reset()
    q.hnsw.efSearch = 64  # the beam that assigns added vectors to lists (search sets its own)
    with one_thread():
        q.add(km.centroids)


def set_search_params(index, plan: dict, k: int) -> dict:
    """Apply nprobe / efSearch (derived where None) and return the values used."""
    p = plan["params"]
    used = {}
    target = index
    if plan["kind"] == "hnsw" or "HNSW" in plan["factory"] and "IVF" not in plan["factory"]:
        ef = int(p.get("ef_search") or derive_ef_search(k))
        hn = _find_hnsw(target)
        if hn is not None:
            hn.hnsw.efSearch = ef
            used["ef_search"] = ef
    try:
        ivf = faiss.extract_index_ivf(target)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        npb = int(p.get("nprobe") or derive_nprobe(ivf.nlist))
        npb = min(npb, ivf.nlist)
        ivf.nprobe = npb
        hq = faiss.downcast_index(ivf.quantizer)
        if hasattr(hq, "hnsw"):
            hq.hnsw.efSearch = max(64, 2 * npb)
        used["nprobe"] = npb
        used["nlist"] = int(ivf.nlist)
    return used


def _find_hnsw(index):
    if hasattr(index, "hnsw"):
        return index
    try:
        inner = faiss.downcast_index(index.index) if hasattr(index, "index") else None
    except Exception:
        inner = None
    return inner if inner is not None and hasattr(inner, "hnsw") else None


def tame_malloc(threshold: int = 65_536) -> bool:
    """glibc: serve every allocation >= ``threshold`` bytes with its own mmap, returned to the OS when freed.

    IVF inverted lists grow by doubling as vectors are added; with glibc's default (a threshold that rises as large
    blocks are freed, up to 32 MiB) the outgrown list buffers stay in the heap as resident holes and a shard ends up
    ~1.4x its payload. A fixed threshold keeps resident memory at the payload. Called in the shard actors (processes
    of their own), not in the caller's process. Returns False where it does not apply (not glibc)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # pragma: no cover - non-glibc
        return False


def add_source(idx, source: VectorSource, lo: int, hi: int, batch_rows: int) -> float:
    t = time.perf_counter()
    for _, x in source.batches(batch_rows, lo, hi):
        idx.add(x)
        del x
    return time.perf_counter() - t


def index_bytes(index) -> int:
    """Bytes the index holds (codes, ids, quantizer, graph links), computed from its structure -- no copy is made,
    so this is cheap for a 5M-vector shard. Unknown types fall back to the serialized size."""
    idx = faiss.downcast_index(index)
    extra = 0
    if isinstance(idx, faiss.IndexPreTransform):
        for j in range(idx.chain.size()):
            vt = idx.chain.at(j)
            extra += int(vt.d_in) * int(vt.d_out) * 4
        idx = faiss.downcast_index(idx.index)
    if isinstance(idx, faiss.IndexIVF):
        nl = idx.nlist
        return extra + index_bytes(idx.quantizer) + int(idx.ntotal) * (int(idx.code_size) + 8) + nl * 32
    if isinstance(idx, faiss.IndexHNSW):
        h = idx.hnsw
        return (extra + index_bytes(idx.storage) + int(h.neighbors.size()) * 4 + int(h.levels.size()) * 4
                + int(h.offsets.size()) * 8)
    if isinstance(idx, faiss.IndexFlatCodes):
        return extra + int(idx.ntotal) * int(idx.code_size)
    try:
        return extra + int(faiss.serialize_index(index).nbytes)
    except Exception:  # pragma: no cover
        return -1


def _info(plan, index, used, gpu, times, nbytes) -> dict:
    params = dict(plan["params"])
    params.update(used)
    return {"kind": plan["kind"], "factory": plan["factory"], "params": params, "ntotal": int(index.ntotal),
            "dim": int(plan["dim"]), "bytes": int(nbytes), "est_bytes": int(plan["est_bytes"]),
            "gpu": bool(gpu.get("use_gpu")), "gpu_reason": gpu.get("reason"), "lossy": bool(plan["lossy"]),
            "reason": plan.get("reason", ""), **{f"{k}_s": round(v, 3) for k, v in times.items()}}


def build_index(vectors, cfg, k_hint: int = 50, plan: Optional[dict] = None) -> BuiltIndex:
    """Build the planned index over ``vectors`` (ndarray, memmap, ``VectorSource`` or ``.npy`` paths): train on a
    sample, add in ``cfg.add_batch`` batches (peak memory: the index plus one batch), move to GPU where chosen."""
    src = as_source(vectors)
    check_config(cfg)
    gpu_ok = gpu_plan(cfg, k=1, kind="ivf_flat")["use_gpu"]
    plan = plan or choose_index(src.n, src.dim, cfg, gpu_available=gpu_ok)
    idx = make_index(plan)
    seed = int(_cfg(cfg, "seed", 0) or 0)
    times = {"train": train_index(idx, src, plan, seed)}
    times["add"] = add_source(idx, src, 0, src.n, int(_cfg(cfg, "add_batch", 65_536)))
    used = set_search_params(idx, plan, k_hint)
    gp = gpu_plan(cfg, k=k_hint, kind=plan["kind"], nprobe=used.get("nprobe"))
    nbytes = index_bytes(idx)
    built = BuiltIndex(idx, _info(plan, idx, used, gp, times, nbytes), source=src if plan["lossy"] else None,
                       plan=plan)
    if gp["use_gpu"]:
        built.cpu_index = idx
        built.index = to_gpu(idx, gp["ngpu"], plan)
    return built


def retune(built: BuiltIndex, **params) -> dict:
    """Change nprobe / ef_search on a built index (CPU and GPU copies); returns the values now in use."""
    plan = built.plan
    plan["params"].update({k: v for k, v in params.items() if v is not None})
    used = set_search_params(built.cpu_index if built.cpu_index is not None else built.index, plan, 1)
    if built.cpu_index is not None:
        try:
            faiss.GpuParameterSpace().set_index_parameter(built.index, "nprobe", used["nprobe"])
        except Exception:  # pragma: no cover - GPU only
            pass
    built.info["params"].update(used)
    return used


def canonical_topk(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by score descending, ties by id ascending, -1 ids (score -inf) last; keep k columns."""
    D = np.asarray(D, dtype=np.float32)
    I = np.asarray(I, dtype=np.int64)
    D = np.where(I < 0, -np.inf, D).astype(np.float32)
    n = D.shape[1]
    if len(D) and n > 2 * k:  # lossy candidates (k x refine_factor): sort only the columns that can make the top k
        kth = np.partition(D, n - k, axis=1)[:, n - k:n - k + 1]
        w = int((D >= kth).sum(axis=1).max())  # the k best and every tie of the k-th, in the widest row
        if w < n:
            keep = np.argpartition(D, n - w, axis=1)[:, n - w:]
            D, I = np.take_along_axis(D, keep, 1), np.take_along_axis(I, keep, 1)
    order = canonical_order(D, I)
    D2 = np.take_along_axis(D, order, 1)[:, :k]
    I2 = np.take_along_axis(I, order, 1)[:, :k]
    if D2.shape[1] < k:  # pad
        pad = k - D2.shape[1]
        D2 = np.hstack([D2, np.full((len(D2), pad), -np.inf, np.float32)])
        I2 = np.hstack([I2, np.full((len(I2), pad), -1, np.int64)])
    I2 = np.where(np.isneginf(D2), -1, I2)
    return np.ascontiguousarray(D2, dtype=np.float32), np.ascontiguousarray(I2, dtype=np.int64)


def canonical_order(D: np.ndarray, I: np.ndarray) -> np.ndarray:
    """The per-row permutation `canonical_topk` applies: score descending, ties by id ascending, -1 ids last."""
    o1 = np.argsort(np.where(I < 0, np.iinfo(np.int64).max, I), axis=1, kind="stable")
    o2 = np.argsort(-np.take_along_axis(D, o1, 1), axis=1, kind="stable")
    return np.take_along_axis(o1, o2, 1)


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact merge of per-shard top-k lists (ids already global): the top-k of the union."""
    D = np.concatenate([p[0] for p in parts], axis=1)
    I = np.concatenate([p[1] for p in parts], axis=1)
    return canonical_topk(D, I, k)


def _raw_search(index, queries, k):
    D, I = index.search(queries, k)
    return D, I


def search(built: BuiltIndex, queries: np.ndarray, k: int, batch: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: scores float32 (nq, k) descending, ids int64 (nq, k); -1 / -inf where fewer than k.
    Lossy codes (SQ/PQ) search k*refine_factor candidates and rescore them exactly from the pool vectors."""
    q = _f32(queries)
    if q.ndim != 2 or q.shape[1] != built.info["dim"]:
        raise ValueError(f"queries must be (nq, {built.info['dim']}), got {q.shape}")
    k = int(k)
    if k <= 0:
        raise ValueError("k must be positive")
    rf = int(built.info["params"].get("refine_factor") or 1) if built.info.get("lossy") else 1
    kk = min(k * rf, max(built.index.ntotal, 1)) if rf > 1 else k
    kk = max(kk, 1)
    index = built.index
    if built.cpu_index is not None:
        gp = gpu_plan(None, k=kk, kind=built.info["kind"], ngpu=max(1, num_gpus()),
                      nprobe=built.info["params"].get("nprobe"))
        if not gp["search_on_gpu"]:
            index = built.cpu_index
    outD, outI = [], []
    for s in range(0, len(q), batch):
        D, I = _raw_search(index, q[s:s + batch], kk)
        I = I.astype(np.int64)
        if built.id_offset:
            I = np.where(I >= 0, I + built.id_offset, I)
        outD.append(D)
        outI.append(I)
    D = np.concatenate(outD) if outD else np.zeros((0, kk), np.float32)
    I = np.concatenate(outI) if outI else np.zeros((0, kk), np.int64)
    if built.info.get("lossy") and built.source is not None:
        return refine(built.source, q, D, I, k)
    return canonical_topk(D, I, k)


def refine(source: VectorSource, queries: np.ndarray, D: np.ndarray, I: np.ndarray, k: int):
    """Top-k of lossy candidates (approximate scores ``D`` descending, global ids ``I``, kk columns) by exact score.
    Candidates tied with the kk-th approximate score are dropped: 4-bit codes tie often, FAISS keeps an arbitrary
    part of a tie, and which part would depend on how the pool is sharded; every candidate scored strictly above
    is in the kk best of its own shard too, so the set rescored is the same however the pool is split."""
    if I.shape[1] < source.n:
        full = I[:, -1:] >= 0
        I = np.where(full & (D <= D[:, -1:]), -1, I)
    return canonical_topk(rescore_exact(source, queries, I), I, k)


def rescore_exact(source: VectorSource, queries: np.ndarray, ids: np.ndarray, offset: int = 0,
                  chunk: int = 256) -> np.ndarray:
    """Exact inner products between each query and its candidate ids (global ids; ``offset`` = first row of
    ``source`` in global ids); -inf for -1. FAISS computes them in place (`fvec_inner_products_by_idx`): a numpy
    gather of the candidates (queries x kk x d floats) costs ~10x more at kk=400. A pool in memory is read where
    it lies; one on disk a chunk of queries' distinct rows at a time."""
    q = _f32(queries)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.full(ids.shape, -np.inf, dtype=np.float32)
    arr = getattr(source, "arr", None)
    if type(arr) is np.ndarray and arr.dtype == np.float32 and arr.flags.c_contiguous:
        _ip_by_idx(out, q, arr, np.where(ids >= 0, ids - offset, -1))
        return out
    for s in range(0, len(ids), chunk):
        I = ids[s:s + chunk]
        valid = I >= 0
        if not valid.any():
            continue
        uniq, inv = np.unique(I[valid] - offset, return_inverse=True)
        local = np.full(I.shape, -1, np.int64)
        local[valid] = inv
        _ip_by_idx(out[s:s + chunk], q[s:s + chunk], source.take(uniq), local)
    return out


def _ip_by_idx(out: np.ndarray, q: np.ndarray, x: np.ndarray, ids: np.ndarray) -> None:
    """out[i, j] = q[i] . x[ids[i, j]] (-inf where ids[i, j] < 0), all C-contiguous."""
    x = _f32(x)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(x),
                                     faiss.swig_ptr(ids), q.shape[1], len(q), ids.shape[1])


def exact_search(source, queries: np.ndarray, k: int, batch_rows: int = 262_144,
                 lo: int = 0, hi: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k over rows [lo, hi) of the source, streamed in batches (memory: one batch + nq*k)."""
    src = as_source(source)
    q = _f32(queries)
    k = int(k)
    D = np.full((len(q), k), -np.inf, np.float32)
    I = np.full((len(q), k), -1, np.int64)
    for start, x in src.batches(batch_rows, lo, hi):
        kb = min(k, len(x))
        d, i = faiss.knn(q, x, kb, metric=faiss.METRIC_INNER_PRODUCT)
        i = i.astype(np.int64) + start
        D, I = merge_topk([(D, I), (d, i)], k)
    return D, I


def recall_at_k(ann_ids: np.ndarray, exact_ids: np.ndarray, k: Optional[int] = None,
                ann_scores: Optional[np.ndarray] = None, exact_scores: Optional[np.ndarray] = None,
                tol: float = 1e-5) -> float:
    """Mean over queries of |ANN top-k ∩ exact top-k| / |exact top-k| (exact lists are shorter than k when the pool
    is smaller than k). With scores, ties count: an ANN id outside the exact list whose exact score is within
    ``tol`` of the k-th exact score is a hit too (duplicate vectors make the exact top-k ambiguous)."""
    hits, tot = recall_hits(ann_ids, exact_ids, k, ann_scores, exact_scores, tol)
    return float(hits.sum() / tot.sum()) if tot.sum() else 1.0


def recall_hits(ann_ids: np.ndarray, exact_ids: np.ndarray, k: Optional[int] = None,
                ann_scores: Optional[np.ndarray] = None, exact_scores: Optional[np.ndarray] = None,
                tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """``recall_at_k``'s counts per query, (hits, length of the exact top-k): what a sample's standard error needs."""
    k = k or exact_ids.shape[1]
    a, e = ann_ids[:, :k], exact_ids[:, :k]
    hits, tot = np.zeros(len(e), np.int64), np.zeros(len(e), np.int64)
    for r, (ra, re_) in enumerate(zip(a, e)):
        valid = re_ >= 0
        re_ = re_[valid]
        tot[r] = len(re_)
        got = ra >= 0
        inter = np.isin(ra[got], re_)
        h = int(inter.sum())
        if ann_scores is not None and exact_scores is not None and len(re_):
            kth = float(exact_scores[r, :k][valid][-1])
            h += int((ann_scores[r, :k][got][~inter] >= kth - tol).sum())
        hits[r] = min(h, len(re_))
    return hits, tot
