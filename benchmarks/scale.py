"""Scale benchmark of retrieval (issue 4): index choice, build time, search throughput, recall@k vs exact, peak RSS.

    python benchmarks/scale.py --n 100000 1000000 5000000 --dim 128 --k 50 --queries 20000 --truth 1000

Data: a clustered synthetic corpus, not isotropic noise -- a Gaussian mixture on the unit sphere with ``--centres``
centres grouped under 64 "topics", Zipf-like cluster sizes, and within-cluster spread along a low-rank (32-d) subspace
plus a little isotropic noise (real embeddings have a low intrinsic dimension). Mean cosine to the nearest pool vector
is ~0.78 and to the 50th ~0.62, about what a sentence-embedding model gives on a text corpus. Pool vectors are
written to disk as ``.npy`` shards first (not timed) and read back shard by shard, as a real pool on disk would be.
Queries are fresh draws from the same mixture.

For each N, in a fresh Python process (so peak RSS is per size): Ray is started (2 CPUs, 2 GiB object store), then
``pipeline.retrieve.retrieve`` runs at the default ``IndexConfig`` (its own recall check: ``recall_sample`` queries)
and a separate exact ground truth (streaming brute force over the shards) for ``--truth`` of the queries gives the
recall@k of the returned neighbours. A thread samples the RSS of the whole process tree (the driver, raylet, GCS and
every Ray worker) every 0.2 s; the peak is reported next to the index's own size.

Results: benchmarks/results/scale.json (+ scale.md table). Timings on a shared 2-core machine are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------

class Mixture:
    """Clustered unit vectors: topics -> centres -> points spread along a per-cluster low-rank subspace."""

    def __init__(self, dim: int, centres: int = 4096, topics: int = 64, rank: int = 32, n_bases: int = 64,
                 iso: float = 0.02, seed: int = 1234):
        rng = np.random.default_rng(seed)
        self.dim, self.rank = dim, rank
        T = _unit(rng.standard_normal((topics, dim)))
        C = T[rng.integers(0, topics, centres)] + 0.6 * rng.standard_normal((centres, dim)) / np.sqrt(dim)
        self.C = _unit(C).astype(np.float32)
        w = 1.0 / (np.arange(centres) + 20.0) ** 0.7
        self.w = (w / w.sum())[rng.permutation(centres)]
        self.sigma = rng.uniform(0.5, 0.9, centres).astype(np.float32)  # within-cluster spread (norm)
        self.B = np.stack([np.linalg.qr(rng.standard_normal((dim, rank)))[0] for _ in range(n_bases)]).astype(
            np.float32)  # (n_bases, dim, rank) orthonormal bases
        self.iso = iso

    def draw(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        z = rng.choice(len(self.C), size=n, p=self.w)
        g = rng.standard_normal((n, self.rank)).astype(np.float32) / np.sqrt(self.rank)
        x = self.C[z].copy()
        b = z % len(self.B)
        for j in np.unique(b):
            sel = np.nonzero(b == j)[0]
            x[sel] += (g[sel] @ self.B[j].T) * self.sigma[z[sel], None]
        x += self.iso * rng.standard_normal(x.shape).astype(np.float32)
        return _unit(x).astype(np.float32)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_pool(mix: Mixture, n: int, folder: Path, shard_rows: int = 250_000) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(range(0, n, shard_rows)):
        p = folder / f"pool-{i:05d}.npy"
        if not p.exists():
            x = mix.draw(min(shard_rows, n - s), seed=10_000 + i)
            np.save(p.with_suffix(".tmp.npy"), x)
            os.replace(p.with_suffix(".tmp.npy"), p)
        paths.append(str(p))
    return paths


# ------------------------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------------------------

class PeakRSS(threading.Thread):
    """Peak of the summed RSS of this process and all its descendants (Ray's raylet, GCS, workers), sampled every
    0.2 s; and, every 1 s, the peak of the summed PSS (proportional set size: pages shared between processes, such
    as shared libraries and the object store, divided among them instead of counted once per process)."""

    def __init__(self, interval: float = 0.2, pss_every: int = 5):
        super().__init__(daemon=True)
        import psutil
        self.psutil, self.interval, self.pss_every = psutil, interval, pss_every
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = {}
        self._n = 0
        self._halt = threading.Event()

    def sample(self):
        ps = self.psutil
        me = ps.Process()
        procs = [me] + me.children(recursive=True)
        rss = pss = 0
        per = {}
        do_pss = self._n % self.pss_every == 0
        self._n += 1
        for p in procs:
            try:
                r = p.memory_info().rss
                rss += r
                per[f"{p.pid}:{p.name()[:40]}"] = r
                if do_pss:
                    pss += p.memory_full_info().pss
            except (ps.NoSuchProcess, ps.AccessDenied, AttributeError):
                pass
        if rss > self.peak_rss:
            self.peak_rss, self.peak_procs = rss, per
        if do_pss:
            self.peak_pss = max(self.peak_pss, pss)
        return rss

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()
        self.sample()


# ------------------------------------------------------------------------------------------------------------------
# one size, in its own process
# ------------------------------------------------------------------------------------------------------------------

def run_one(args) -> dict:
    import ray
    from pipeline.config import IndexConfig
    from pipeline.index import NpyShards, exact_search, recall_at_k
    from pipeline.retrieve import retrieve

    args.n = args.n[0] if isinstance(args.n, list) else args.n
    mix = Mixture(args.dim, centres=args.centres)
    data = Path(args.data) / f"n{args.n}_d{args.dim}"
    t = time.perf_counter()
    paths = write_pool(mix, args.n, data)
    gen_s = time.perf_counter() - t
    queries = mix.draw(args.queries, seed=7)
    mon = PeakRSS()
    mon.start()
    base_rss = mon.sample()
    ray.init(address="local", num_cpus=args.cpus, object_store_memory=int(args.object_store_gb * 2 ** 30),
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    time.sleep(2.0)
    ray_idle_rss = mon.sample()
    cfg = IndexConfig(**json.loads(args.cfg or "{}"))
    src = NpyShards(paths)
    t0 = time.perf_counter()
    D, I, info = retrieve(src, queries, args.k, cfg)
    wall = time.perf_counter() - t0
    peak_during, peak_pss = mon.peak_rss, mon.peak_pss
    procs = dict(mon.peak_procs)
    ray.shutdown()
    # separate exact ground truth for a sample of the queries (after Ray is gone: not part of the peak)
    rows = np.random.default_rng(99).choice(args.queries, size=min(args.truth, args.queries), replace=False)
    t1 = time.perf_counter()
    _, E = exact_search(src, queries[rows], args.k)
    truth_s = time.perf_counter() - t1
    mon.stop()
    rec = recall_at_k(I[rows], E, args.k)
    idx_bytes = int(info["bytes"])
    return {
        "n": args.n, "dim": args.dim, "k": args.k, "queries": args.queries, "truth_queries": len(rows),
        "factory": info["factory"], "kind": info["kind"], "params": info["params"], "mode": info["mode"],
        "num_shards": info["num_shards"], "index_bytes": idx_bytes, "index_gb": round(idx_bytes / 2 ** 30, 3),
        "train_s": info.get("train_s"), "add_s": info.get("add_s"), "build_s": info["build_s"],
        "recall_check_s": info["recall_s"], "search_s": info["search_s"], "qps": info["qps"],
        "retrieve_s": round(wall, 2),
        "recall_at_k": round(rec, 4), "recall_at_k_info": info["recall_at_k"], "recall_trials": info["recall_trials"],
        "exact_truth_s": round(truth_s, 2), "exact_qps": round(len(rows) / truth_s, 1),
        "peak_rss_gb": round(peak_during / 2 ** 30, 3), "rss_before_ray_gb": round(base_rss / 2 ** 30, 3),
        "ray_idle_rss_gb": round(ray_idle_rss / 2 ** 30, 3),
        "peak_rss_over_index": round(peak_during / max(idx_bytes, 1), 2),
        "peak_pss_gb": round(peak_pss / 2 ** 30, 3), "peak_pss_over_index": round(peak_pss / max(idx_bytes, 1), 2),
        "peak_top_processes": sorted(((v, k) for k, v in procs.items()), reverse=True)[:8],
        "data_gen_s": round(gen_s, 1), "cpus": args.cpus, "cfg": json.loads(args.cfg or "{}"),
    }


def run_sweep(args) -> dict:
    """Recall@k and throughput against nprobe for one N, in-process (no Ray): the headroom behind the default."""
    import faiss
    from pipeline.config import IndexConfig
    from pipeline.index import NpyShards, build_index, exact_search, recall_at_k, retune, search

    args.n = args.n[0] if isinstance(args.n, list) else args.n
    mix = Mixture(args.dim, centres=args.centres)
    src = NpyShards(write_pool(mix, args.n, Path(args.data) / f"n{args.n}_d{args.dim}"))
    q = mix.draw(args.truth, seed=7)
    faiss.omp_set_num_threads(args.cpus)
    built = build_index(src, IndexConfig(**json.loads(args.cfg or "{}")), k_hint=args.k)
    ED, EI = exact_search(src, q, args.k)
    rows = []
    nlist = built.info["params"].get("nlist", 1)
    default = built.info["params"].get("nprobe")
    for npb in [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist]:
        retune(built, nprobe=npb)
        t = time.perf_counter()
        D, I = search(built, q, args.k)
        dt = time.perf_counter() - t
        rows.append({"nprobe": npb, "recall": round(recall_at_k(I, EI, args.k, D, ED), 4),
                     "qps": round(len(q) / dt, 1), "default": npb == default})
    return {"n": args.n, "dim": args.dim, "k": args.k, "factory": built.info["factory"], "nlist": nlist,
            "default_nprobe": default, "build_s": built.info.get("add_s", 0) + built.info.get("train_s", 0),
            "queries": len(q), "sweep": rows}


def table(rows: list[dict]) -> str:
    head = ("| N | index (factory) | params | shards | build s | search q/s | recall@k vs exact | index GiB | "
            "peak RSS GiB (tree) | peak/index |\n|---|---|---|---|---|---|---|---|---|---|\n")
    out = []
    for r in rows:
        p = r["params"]
        ps = ", ".join(f"{a}={p[a]}" for a in ("nlist", "nprobe", "ef_search", "hnsw_m", "pq_m") if a in p)
        out.append(f"| {r['n']:,} | `{r['factory']}` | {ps} | {r['num_shards']} | {r['build_s']:.1f} | "
                   f"{r['qps']:,.0f} | {r['recall_at_k']:.4f} (@{r['k']}, {r['truth_queries']} q) | "
                   f"{r['index_gb']:.3f} | {r['peak_rss_gb']:.2f} | {r['peak_rss_over_index']:.2f} |")
    return head + "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--queries", type=int, default=20_000, help="queries searched (throughput)")
    ap.add_argument("--truth", type=int, default=1000, help="queries with exact ground truth (recall)")
    ap.add_argument("--centres", type=int, default=4096)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--object-store-gb", type=float, default=2.0)
    ap.add_argument("--cfg", default="", help="IndexConfig overrides as JSON, e.g. '{\"nprobe\": 64}'")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "hardneg-scale"),
                    help="where the .npy pool shards are written (kept for reruns)")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    ap.add_argument("--sweep", action="store_true",
                    help="in-process recall@k and q/s against nprobe for each N (--truth queries)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    if args.sweep:
        out = Path(args.out).with_name("scale_sweep.json")
        prev = json.loads(out.read_text()) if out.exists() else {}
        for n in args.n:
            args_n = argparse.Namespace(**{**vars(args), "n": n})
            r = run_sweep(args_n)
            print(json.dumps(r), flush=True)
            prev[f"n{n}_d{args.dim}_k{args.k}"] = r
            out.write_text(json.dumps(prev, indent=1))
        return 0
    rows = []
    for n in args.n:
        cmd = [sys.executable, __file__, "--one", "--n", str(n), "--dim", str(args.dim), "--k", str(args.k),
               "--queries", str(args.queries), "--truth", str(args.truth), "--centres", str(args.centres),
               "--cpus", str(args.cpus), "--object-store-gb", str(args.object_store_gb), "--data", args.data,
               "--cfg", args.cfg]
        print(f"== N={n:,}", flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(p.stdout[-3000:], p.stderr[-6000:], file=sys.stderr)
            return 1
        r = json.loads(line[-1][7:])
        print(json.dumps(r, indent=1), flush=True)
        rows.append(r)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        prev = json.loads(out.read_text()) if out.exists() else {}
        prev.setdefault("runs", {})[f"n{n}_d{args.dim}_k{args.k}" + (f"_{args.cfg}" if args.cfg else "")] = r
        prev["machine"] = "shared 2-core VM (other engineers' tests running), 24 GiB RAM; timings are noisy"
        out.write_text(json.dumps(prev, indent=1))
    print(table(rows))
    Path(args.out).with_suffix(".md").write_text(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
