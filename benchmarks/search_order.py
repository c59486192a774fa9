"""Does the order of the queries change what the IVF search costs (issue 15: "wall time per pair does not rise")?

    python benchmarks/search_order.py --sizes 100000 400000 1600000 --out benchmarks/results/search_order.json

At 1.6M pairs the shard actors scan ~37.5k vectors a query at ~34 ns each against ~19 ns at 100k: each query streams
its ~192 lists (~14 MB) from memory. Queries that probe the same lists one after the other could find them in cache.
This measures, in one process, one index shard as a run builds it (the plan and tuned nprobe of the idle
`driver_memory` runs: `PLANS`; trained on the whole pool, holding its first half, as shard 0 of 2), searched with
`--queries` pool rows drawn at random (the mine's queries are texts like the pool's; a run searches 50,000-query
blocks, `retrieve.block_rows`, cut into `index.query_batch` batches) in these orders:

* `today` (`''`): the block's order, batch by batch (what `ShardClient.search` sends a shard);
* `batch`: each batch sorted by its queries' nearest list (an extra `quantizer.search(q, 1)`), the results put back;
* `block`: the whole block sorted so, then cut into batches;
* `pre`, `batch_pre`, `block_pre`: the same three orders with the coarse search (`quantizer.search(q, nprobe)`, which
  `index.search` does first) done once here, sorted by the first list probed, and handed to `search_preassigned`;

at `--threads` FAISS threads (1: what a shard actor gets on a 2-core machine, `index.threads` = CPUs / shards) and,
above one thread, each of `--parallel-modes` (IndexIVF.parallel_mode: 0 over queries, 1 over the lists of a query,
2 over both). Reported per order: CPU and wall microseconds a query (the sort's own coarse search included), the
ratios to `today` at one thread measured in the same run, the vectors scanned a query (exact), and whether the ids
and scores are bit for bit those of `today` (they must be: a query's results depend on its own vector only).
The orders run in `--rounds` interleaved rounds (each figure the smallest of its rounds): the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
# pool size -> tuned nprobe of the idle driver_memory runs (benchmarks/results/driver_memory_session23*.json, topics)
PLANS = {100_000: 24, 400_000: 80, 1_600_000: 192}


def build_shard(pool: np.ndarray, nprobe: int, k: int, shards: int = 2):
    """Shard 0 of `shards` as `pipeline.retrieve` builds it: the automatic plan, trained on a sample of the whole
    pool, holding the first rows; nprobe as tuned."""
    from pipeline.config import IndexConfig
    from pipeline.index import add_source, as_source, choose_index, make_index, set_search_params, train_index

    src = as_source(pool)
    plan = choose_index(src.n, src.dim, IndexConfig(), gpu_available=False)
    plan["params"]["nprobe"] = nprobe
    idx = make_index(plan)
    t = time.perf_counter()
    train_index(idx, src, plan, 0)
    add_source(idx, src, 0, src.n // shards, 65_536)
    set_search_params(idx, plan, k)
    return idx, plan, time.perf_counter() - t


def ordered_search(idx, q: np.ndarray, k: int, batch: int, sort: str):
    """(D, I, coarse CPU seconds) of `q` searched in `batch`-query batches. `sort`: '' (as given), 'batch' / 'block'
    (each batch / the whole block sorted by nearest list: an extra `quantizer.search(q, 1)`), or, with '_pre', the
    coarse search (`quantizer.search(q, nprobe)`, which `index.search` does first) done here once and its lists
    handed to `search_preassigned`: 'pre' (as given), 'batch_pre', 'block_pre' (sorted by the first list probed)."""
    import faiss

    ivf = faiss.extract_index_ivf(idx)
    pre = sort.endswith("pre")
    coarse_cpu = 0.0

    def coarse(x, m):
        nonlocal coarse_cpu
        c = time.process_time()
        Dq, Iq = ivf.quantizer.search(x, m)
        coarse_cpu += time.process_time() - c
        return Dq, Iq

    D, I = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
    Dq = Iq = None
    order = np.arange(len(q))
    if sort == "block":
        order = np.argsort(coarse(q, 1)[1].ravel(), kind="stable")
    elif sort == "block_pre":
        Dq, Iq = coarse(q, ivf.nprobe)
        order = np.argsort(Iq[:, 0], kind="stable")
    for s in range(0, len(q), batch):
        rows = order[s:s + batch]
        if sort == "batch":
            rows = rows[np.argsort(coarse(q[rows], 1)[1].ravel(), kind="stable")]
        x = np.ascontiguousarray(q[rows])
        if not pre:
            D[rows], I[rows] = idx.search(x, k)
            continue
        if sort == "block_pre":
            dq, iq = Dq[rows], Iq[rows]
        else:
            dq, iq = coarse(x, ivf.nprobe)
            if sort == "batch_pre":
                o = np.argsort(iq[:, 0], kind="stable")
                rows, x, dq, iq = rows[o], x[o], dq[o], iq[o]
        D[rows], I[rows] = ivf.search_preassigned(x, k, np.ascontiguousarray(iq), np.ascontiguousarray(dq))
    return D, I, coarse_cpu


def measure(idx, q: np.ndarray, k: int, batch: int, rounds: int, configs: list[tuple]) -> dict:
    """Each config (sort, threads, parallel_mode) searched `rounds` times, interleaved: min CPU / wall a query,
    vectors scanned a query, and whether D and I equal the first config's bit for bit."""
    import faiss

    ivf = faiss.extract_index_ivf(idx)
    out, ref = {}, None
    for _ in range(rounds):
        for sort, threads, pm in configs:
            name = f"{sort or 'today'} t{threads} pm{pm}"
            faiss.omp_set_num_threads(threads)
            ivf.parallel_mode = pm
            faiss.cvar.indexIVF_stats.reset()
            c0, t0 = time.process_time(), time.perf_counter()
            D, I, coarse_cpu = ordered_search(idx, q, k, batch, sort)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            if ref is None:
                ref = (D, I)
            same = bool(np.array_equal(I, ref[1]) and np.array_equal(D.view(np.uint32), ref[0].view(np.uint32)))
            r = out.setdefault(name, {"sort": sort or "today", "threads": threads, "parallel_mode": pm,
                                      "cpu_us": [], "wall_us": [], "identical": True})
            r["cpu_us"].append(round(cpu / len(q) * 1e6, 1))
            r["wall_us"].append(round(wall / len(q) * 1e6, 1))
            r.setdefault("coarse_cpu_us", []).append(round(coarse_cpu / len(q) * 1e6, 1))
            r["identical"] = r["identical"] and same
            r["scanned_per_query"] = round(faiss.cvar.indexIVF_stats.ndis / len(q))
            print(f"    {name:>22}: cpu {r['cpu_us'][-1]:>8} us/q wall {r['wall_us'][-1]:>8} us/q "
                  f"(coarse {r['coarse_cpu_us'][-1]}) scanned {r['scanned_per_query']} identical {same}", flush=True)
    base = out[next(iter(out))]
    for r in out.values():
        r["cpu_us_min"], r["wall_us_min"] = min(r["cpu_us"]), min(r["wall_us"])
        r["cpu_ratio_today_over_this"] = round(base["cpu_us_min"] / r["cpu_us_min"], 3)
        r["wall_ratio_today_over_this"] = round(base["wall_us_min"] / r["wall_us_min"], 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    ap.add_argument("--queries", type=int, default=50_000, help="pool rows drawn as queries (one search block)")
    ap.add_argument("--batch", type=int, default=4096, help="queries a search call (index.query_batch)")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--parallel-modes", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--orders", nargs="+", default=["", "pre", "batch_pre", "block_pre", "batch", "block"],
                    help="orders at one thread ('' = today's; see ordered_search)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "index_growth"),
                    help="the cached topic vectors of benchmarks/index_growth.py")
    ap.add_argument("--out", default=str(RESULTS / "search_order.json"))
    a = ap.parse_args(argv)
    from benchmarks.index_growth import topic_vectors
    from benchmarks.vs_sentence_transformers import machine

    configs = [(s, 1, 0) for s in a.orders]
    configs += [(s, t, pm) for t in a.threads if t > 1 for pm in a.parallel_modes for s in ("", "block_pre")]
    result = {"command": "python benchmarks/search_order.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "queries": a.queries, "batch": a.batch, "k": a.k, "runs": {}}
    for n in a.sizes:
        pool, _ = topic_vectors(n, 2000, Path(a.work))
        q = pool[np.sort(np.random.default_rng(1).choice(n, a.queries, replace=False))]
        q = q[np.random.default_rng(2).permutation(len(q))]
        idx, plan, build_s = build_shard(pool, PLANS[n], a.k)
        del pool
        print(f"n={n}: {plan['factory']} nprobe {PLANS[n]}, shard of {idx.ntotal} built in {build_s:.0f} s",
              flush=True)
        result["runs"][str(n)] = {"factory": plan["factory"], "nprobe": PLANS[n], "shard_rows": int(idx.ntotal),
                                  "orders": measure(idx, q, a.k, a.batch, a.rounds, configs)}
        del idx
        result["machine"] = machine()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    for n, r in result["runs"].items():
        print(f"n={n} {r['factory']} nprobe {r['nprobe']}: today / order (cpu, wall) = " + ", ".join(
            f"{name}: {o['cpu_ratio_today_over_this']}, {o['wall_ratio_today_over_this']}"
            f"{'' if o['identical'] else ' (NOT identical)'}" for name, o in r["orders"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
