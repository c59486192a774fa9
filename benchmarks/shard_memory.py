"""What an index shard actor holds beyond its index, as the shard grows (issue 15: the tree's peak is the index plus
a bounded per-worker working set).

Per size (the pool; the shard is its first half, as the first of 2 shard actors), the index `choose_index` plans
for the pool is trained once here; then, for each way of adding, a child process of its own does what an
`IndexShard` actor (pipeline/retrieve.py) does, with its allocator settings (`tame_malloc`) and one FAISS thread:
load the trained empty index, add its rows from the pool's `.npy` file in 65,536-row batches, set nprobe, search
4,096-query batches, run the recall check's brute force (`exact_search`) over its rows, search again. RssAnon
(/proc/self/status) is read after each step; the excess is the peak less the child's RssAnon before the index was
loaded and less `index_bytes`; and the add's CPU seconds (`after` reads the rows twice). Ways: `before`, `idx.add`
batch by batch (the lists grow by doubling); `after`, `pipeline.index.add_source` (each list sized from the batches'
coarse assignments before adding).

    python benchmarks/shard_memory.py --sizes 100000 400000 --work /tmp/index_growth \\
        --out benchmarks/results/shard_memory.json

Data: `benchmarks.index_growth.topic_vectors` (the topic pairs' hashing-teacher vectors, cached under --work);
queries: 4,096 pool rows spread over the pool. nprobe: session23's tuned values where known (24 / 80 / 192 at
100k / 400k / 1.6M), else the plan's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WAYS = ("before", "after")
TUNED_NPROBE = {100_000: 24, 400_000: 80, 1_600_000: 192}  # driver_memory_session23*.json, recall floor 0.95


def rss_anon_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
    return 0.0


def shard_steps(pool_npy: str, template: str, plan: dict, lo: int, hi: int, way: str, k: int = 50,
                query_batch: int = 4096, batches: int = 2, exact_queries: int = 500,
                add_batch: int = 65_536) -> dict:
    """An IndexShard actor's steps in this process; RssAnon MB after each, the index's bytes and the excess."""
    import faiss

    from pipeline.index import NpyShards, add_source, exact_search, index_bytes, set_search_params, tame_malloc

    tame_malloc()
    faiss.omp_set_num_threads(1)
    src = NpyShards([pool_npy])
    marks = {"start": rss_anon_mb()}
    idx = faiss.read_index(template)
    marks["template"] = rss_anon_mb()
    c0 = time.process_time()
    if way == "before":
        for _, x in src.batches(add_batch, lo, hi):
            idx.add(x)
    else:
        add_source(idx, src, lo, hi, add_batch)
    add_cpu = time.process_time() - c0
    marks["add"] = rss_anon_mb()
    set_search_params(idx, plan, k)
    q = src.take(np.linspace(0, src.n - 1, query_batch).astype(np.int64))
    for b in range(batches):
        idx.search(q, k)
        marks[f"search{b}"] = rss_anon_mb()
    exact_search(src, q[:exact_queries], k, add_batch, lo=lo, hi=hi)
    marks["exact"] = rss_anon_mb()
    idx.search(q, k)
    marks["search_after_exact"] = rss_anon_mb()
    ib = index_bytes(idx) / 2**20
    return {"ntotal": int(idx.ntotal), "index_mb": round(ib, 1),
            "rss_anon_mb": {a: round(b, 1) for a, b in marks.items()},
            "excess_mb": round(max(marks.values()) - marks["start"] - ib, 1), "add_cpu_s": round(add_cpu, 2)}


def measure(pool: np.ndarray, work: Path, cfg=None, nprobe: int | None = None, ways=WAYS, **kw) -> dict:
    """Train the planned index on `pool` here, then each way's shard (rows [0, n/2)) in a child process."""
    import faiss

    from pipeline.config import IndexConfig
    from pipeline.index import as_source, choose_index, make_index, train_index

    n = len(pool)
    plan = choose_index(n, pool.shape[1], cfg or IndexConfig(), gpu_available=False)
    if nprobe:
        plan["params"]["nprobe"] = int(nprobe)
    pool_npy, template = str(work / f"pool-{n}.npy"), str(work / f"template-{n}.index")
    np.save(pool_npy, pool)
    idx = make_index(plan)
    train_index(idx, as_source(pool_npy), plan)
    faiss.write_index(idx, template)
    del idx
    out = {"n": n, "factory": plan["factory"], "nprobe": plan["params"].get("nprobe"), "shard_rows": n // 2}
    for way in ways:
        args = {"pool_npy": pool_npy, "template": template, "plan": plan, "lo": 0, "hi": n // 2, "way": way, **kw}
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        if p.returncode:
            raise RuntimeError(p.stderr[-4000:])
        out[way] = json.loads(p.stdout.strip().splitlines()[-1])
    os.unlink(pool_npy)
    os.unlink(template)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000])
    ap.add_argument("--work", default=None, help="folder for the cached topic vectors (default: a temp folder)")
    ap.add_argument("--out", default=None, help="JSON result file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(shard_steps(**json.loads(a.child))))
        return 0
    from benchmarks.index_growth import topic_vectors

    work = Path(a.work or tempfile.mkdtemp(prefix="hardneg-shard-memory-"))
    runs = {}
    for n in a.sizes:
        pool, _ = topic_vectors(n, 2000, work)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            runs[n] = measure(pool, Path(tmp), nprobe=TUNED_NPROBE.get(n))
        del pool
    print("| pool | shard rows | index | nprobe | shard's index MB | excess MB before | after |")
    print("|---|---|---|---|---|---|---|")
    for n, r in runs.items():
        print(f"| {n:,} | {r['shard_rows']:,} | {r['factory']} | {r['nprobe']} | {r['after']['index_mb']} | "
              f"{r['before']['excess_mb']} | {r['after']['excess_mb']} |")
    lo, hi = runs[min(runs)], runs[max(runs)]
    growth = {way: round(hi[way]["excess_mb"] - lo[way]["excess_mb"], 1) for way in WAYS}
    print("add CPU s before / after: " + ", ".join(f"{n:,}: {r['before']['add_cpu_s']} / {r['after']['add_cpu_s']}"
                                                   for n, r in runs.items()))
    print("excess growth MB, smallest to largest shard: " + ", ".join(f"{w} {g:+}" for w, g in growth.items()))
    result = {"runs": runs, "excess_growth_mb": growth}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
