"""Per-query search cost of the automatic IVF index as the pool grows (issue 15: "wall time per pair does not rise").

    python benchmarks/index_growth.py --sizes 100000 400000 --also 'IVF{nlist}_HNSW32,Flat'
    python benchmarks/index_growth.py --sizes 1600000 --out benchmarks/results/index_growth-1.6m.json
    python benchmarks/index_growth.py --data clustered --sizes 100000 400000 --also hnsw ivf_sq8
    python benchmarks/index_growth.py --also ivf_flat ivf_fs --only ivf_flat ivf_fs --threads 1

Data: `benchmarks.driver_memory.topic_pairs(n)` (n / 500 topics, the data the driver-memory benchmark mines) embedded
by the package's `HashingTeacher` (96-d): the pool is the n positives, the queries the first `--queries` pairs'
queries. That is the data on which the index + search stage went from 134 to 414 us a pair between 100k and 400k.
The vectors are computed here in numpy (`hashing_vectors`, equal to the teacher's own: tests/test_benchmarks_index_
growth.py; the teacher hashes trigram by trigram in Python, ~0.4 ms a text) and kept under `--work` for the next run.

For each size, each rule builds its index in this process (`index.distributed: never`) through
`pipeline.retrieve.open_index`, which tunes nprobe (efSearch) against `index.recall_floor` (0.95) on 500 of the
queries as a run does; then all the queries are searched once (timed) and compared with exact search:

* `today`: the rule before issue 15 -- nlist a power of two near 2 sqrt(n), a flat coarse quantizer, nprobe
  from nlist / 64 (at least 16), training on 40 x nlist points (at least 65,536), nprobe doubled until the
  sample's recall meets the floor;
* `before`: `choose_index` at the default `IndexConfig`, nprobe doubled until the sample's recall meets the floor
  (the tuning before the bisection: `pipeline.retrieve._narrow` is switched off for this rule; and before the
  margin for sampling error: recall_z 0);
* `auto`: `choose_index` at the default `IndexConfig`, tuned as a run tunes now;
* `--also`: factory templates at auto's lists, `ivf_flat` / `ivf_fs` / `ivf_sq8` (named kinds), `hnsw` / `hnsw:M`
  (a graph over the pool); `RULE@z=Z` is RULE tuned with `index.recall_z` Z (e.g. `auto@z=0`: the floor on the
  sample's recall alone, no margin for sampling error).

`--data clustered` swaps the topic pairs for `benchmarks/scale.py`'s clustered mixture (96-d; queries are fresh
draws). Reported per size and rule: factory, nlist, tuned nprobe / efSearch, bytes and build time per vector, build +
search time per pair (build + tune + n queries at the measured rate, over n), train / add seconds, build + tune and
search time (wall and this process's CPU time, which a loaded machine inflates far less), recall@k of all the
queries against exact search, vectors scanned per query (FAISS's `indexIVF_stats.ndis`; `hnsw_stats.ndis` for a
graph over the pool) and coarse-quantizer distances per query (nlist for a flat quantizer, `hnsw_stats.ndis` for an
HNSW one). Timings on a shared 2-core machine are noisy: compare the rules within a size (they run back to back),
and the scanned counts, which are exact.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
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
TEXT_DIM = 48  # HashingTeacher.TEXT_DIM; its other 48 (image) dimensions are zero for text


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------

def hashing_vectors(texts: list[str], chunk: int = 100_000) -> np.ndarray:
    """`HashingTeacher`'s vectors of ASCII texts (no prompt), computed a chunk at a time in numpy: every distinct
    character trigram is hashed once instead of once per occurrence."""
    from pipeline.teachers.base import normalise
    from pipeline.teachers.examples import HashingTeacher

    assert HashingTeacher.TEXT_DIM == TEXT_DIM
    out = np.zeros((len(texts), 2 * TEXT_DIM), np.float32)
    slot: dict[int, tuple[int, float]] = {}
    for s in range(0, len(texts), chunk):
        padded = [f"  {t.casefold()}  " for t in texts[s:s + chunk]]
        lens = np.fromiter((len(p) for p in padded), np.int64, len(padded))
        b = np.frombuffer("".join(padded).encode("ascii"), np.uint8).astype(np.int64)
        code = b[:-2] << 16 | b[1:-1] << 8 | b[2:]
        row = np.repeat(np.arange(len(padded)), lens)[:-2]
        local = np.arange(len(code)) - np.repeat(np.cumsum(lens) - lens, lens)[:-2]
        keep = local <= lens[row] - 3  # trigrams that start and end inside one padded text
        uniq, inv = np.unique(code[keep], return_inverse=True)
        for c in uniq.tolist():
            if c not in slot:
                h = int.from_bytes(hashlib.blake2b(bytes((c >> 16, (c >> 8) & 255, c & 255)), digest_size=4).digest(),
                                   "little")
                slot[c] = (h % TEXT_DIM, 1.0 if h & (1 << 31) else -1.0)
        col = np.array([slot[c][0] for c in uniq.tolist()], np.int64)[inv]
        sign = np.array([slot[c][1] for c in uniq.tolist()])[inv]
        v = np.bincount(row[keep] * TEXT_DIM + col, weights=sign, minlength=len(padded) * TEXT_DIM)
        out[s:s + len(padded), :TEXT_DIM] = normalise(v.reshape(len(padded), TEXT_DIM).astype(np.float32))
    return normalise(out)


def clustered_vectors(n: int, nq: int, work: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pool (n, 96), queries (nq, 96)) drawn from `benchmarks/scale.py`'s clustered mixture (queries are fresh
    draws); cached under `work`."""
    path = Path(work) / f"clustered-{n}-{nq}-{seed}.npz"
    if path.exists():
        z = np.load(path)
        return z["pool"], z["queries"]
    from benchmarks.scale import Mixture

    mix = Mixture(2 * TEXT_DIM)
    pool, queries = mix.draw(n, seed), mix.draw(nq, seed + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, pool=pool, queries=queries)
    os.replace(tmp, path)
    return pool, queries


DATA = {"topics": None, "clustered": clustered_vectors}  # topics: topic_vectors (defined below)


def topic_vectors(n: int, nq: int, work: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pool (n, 96), queries (nq, 96)) of `topic_pairs(n, seed)`; cached under `work`."""
    path = Path(work) / f"topics-{n}-{nq}-{seed}.npz"
    if path.exists():
        z = np.load(path)
        return z["pool"], z["queries"]
    from benchmarks.driver_memory import topic_pairs

    rows = topic_pairs(n, seed=seed)
    pool = hashing_vectors([r["pos_text"] for r in rows])
    queries = hashing_vectors([r["qry"] for r in rows[:nq]])
    del rows
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, pool=pool, queries=queries)
    os.replace(tmp, path)
    return pool, queries


# ------------------------------------------------------------------------------------------------------------------
# the rules
# ------------------------------------------------------------------------------------------------------------------

def today(n: int) -> dict:
    """`IndexConfig` overrides that rebuild the index the rule before issue 15 chose (a power of two near 2 sqrt(n)
    lists, at most n / 39; flat quantizer; nprobe from nlist / 64 in [16, 128]; 40 x nlist training points)."""
    nl = int(2 ** round(math.log2(max(1.0, 2.0 * math.sqrt(n)))))
    while nl > 16 and nl * 39 > n:
        nl //= 2
    nl = min(max(nl, 16), 262_144)
    q = f"IVF{nl}_HNSW32" if nl >= 65_536 else f"IVF{nl}"
    return {"kind": f"{q},Flat", "nprobe": min(nl, max(16, min(128, nl // 64))),
            "train_size": min(n, max(40 * nl, 65_536))}


def rules(n: int, also: list[str]) -> dict[str, dict]:
    """name -> IndexConfig overrides: `today`, `auto` (the defaults) and each `--also` factory template, whose
    `{nlist}` is the nlist `auto` picks (to compare quantizers at the same lists)."""
    from pipeline.config import IndexConfig
    from pipeline.index import choose_index

    out = {"today": {**today(n), "doubling_only": True, "recall_z": 0},
           "before": {"doubling_only": True, "recall_z": 0}, "auto": {}}
    nl = choose_index(n, 96, IndexConfig(), gpu_available=False)["params"].get("nlist", 0)
    for f in also:
        base, _, z = f.partition("@z=")  # 'RULE@z=Z': RULE tuned with index.recall_z = Z
        if z:
            out[f] = {**(out.get(base) or rules(n, [base])[base]), "recall_z": float(z)}
        elif f.startswith("hnsw"):  # 'hnsw' or 'hnsw:M': one HNSW graph over the whole pool, efSearch tuned
            out[f] = {"kind": "hnsw", "hnsw_m": int(f.partition(":")[2] or 32)}
        elif f in ("ivf_sq8", "ivf_flat", "ivf_fs"):  # a named kind at auto's lists (SQ8 / FS: exact rescoring)
            out[f] = {"kind": f}
        elif nl:
            out[f.format(nlist=nl)] = {"kind": f.format(nlist=nl), "train_size": min(n, max(40 * nl, 65_536))}
    return out


# ------------------------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------------------------

def measure(pool: np.ndarray, queries: np.ndarray, truth: tuple, k: int, overrides: dict) -> dict:
    """Build + tune (`open_index`, in this process), then search every query once: timings, recall@k against
    `truth`, and FAISS's own counts of the vectors scanned and the coarse distances computed per query."""
    import faiss

    from pipeline.config import IndexConfig
    from pipeline.index import recall_at_k
    from pipeline.retrieve import open_index

    from pipeline import retrieve

    overrides = dict(overrides)
    narrow = retrieve._narrow
    if overrides.pop("doubling_only", False):  # the tuning before the bisection: keep the first nprobe that meets it
        narrow = lambda searcher, trials, met, floor, measure: met  # noqa: E731
    cfg = IndexConfig(distributed="never", **overrides)
    c0, t0 = time.process_time(), time.perf_counter()
    saved, retrieve._narrow = retrieve._narrow, narrow
    try:
        searcher, info = open_index(pool, len(queries), k, cfg, lambda rows: queries[rows])
    finally:
        retrieve._narrow = saved
    build_cpu, build_wall = time.process_time() - c0, time.perf_counter() - t0
    try:
        faiss.cvar.indexIVF_stats.reset()
        faiss.cvar.hnsw_stats.reset()
        c0, t0 = time.process_time(), time.perf_counter()
        D, I = searcher.search(queries, k)
        search_cpu, search_wall = time.process_time() - c0, time.perf_counter() - t0
        nq = len(queries)
        graph = info["kind"] == "hnsw"  # a graph over the pool: its distances are the vectors scanned
        scanned = (faiss.cvar.hnsw_stats.ndis if graph else faiss.cvar.indexIVF_stats.ndis) / nq
        hnsw_q = "HNSW" in info["factory"].split(",")[0] and not graph
        coarse = faiss.cvar.hnsw_stats.ndis / nq if hnsw_q else info["params"].get("nlist", 0)
    finally:
        searcher.close()
    p = info["params"]
    n = len(pool)
    return {"factory": info["factory"], "nlist": p.get("nlist"), "nprobe": p.get("nprobe"),
            "ef_search": p.get("ef_search"), "bytes_per_vector": round(info["bytes"] / n, 1),
            "build_us_per_vector": round(build_wall / n * 1e6, 1),
            "wall_us_per_pair": round((build_wall + search_wall / nq * n) / n * 1e6, 1),
            "cpu_us_per_pair": round((build_cpu + search_cpu / nq * n) / n * 1e6, 1),
            "train_size": p.get("train_size"), "recall_trials": info.get("recall_trials"),
            "train_s": info.get("train_s"), "add_s": info.get("add_s"),
            "build_and_tune_wall_s": round(build_wall, 2), "build_and_tune_cpu_s": round(build_cpu, 2),
            "search_us_per_query": round(search_wall / nq * 1e6, 1),
            "search_cpu_us_per_query": round(search_cpu / nq * 1e6, 1),
            "recall_at_k": round(recall_at_k(I, truth[1], k, D, truth[0]), 4),
            "scanned_per_query": round(scanned), "coarse_distances_per_query": round(coarse),
            "list_size": round(len(pool) / p["nlist"]) if p.get("nlist") else None}


def run(sizes: list[int], nq: int, k: int, work: Path, also: list[str], done=lambda runs: None,
        data: str = "topics", only: tuple = ()) -> dict:
    from pipeline.index import exact_search

    out = {}
    for n in sizes:
        t = time.perf_counter()
        pool, queries = (DATA[data] or topic_vectors)(n, nq, work)
        print(f"n={n}: vectors in {time.perf_counter() - t:.1f} s", flush=True)
        truth = exact_search(pool, queries, k)
        out[str(n)] = {}
        for name, ov in rules(n, also).items():
            if only and name not in only:
                continue
            r = measure(pool, queries, truth, k, ov)
            out[str(n)][name] = r
            print(f"  {name:>24}: {r['factory']:>20} nprobe {str(r['nprobe']):>4} ef {str(r['ef_search']):>4} "
                  f"recall {r['recall_at_k']:.4f} {r['bytes_per_vector']} B/vec "
                  f"build {r['build_us_per_vector']} us/vec "
                  f"wall {r['wall_us_per_pair']} us/pair (cpu {r['cpu_us_per_pair']}) "
                  f"scanned {r['scanned_per_query']:>7} coarse {r['coarse_distances_per_query']:>6} "
                  f"search {r['search_us_per_query']:>8} us/q train {r['train_s']} s add {r['add_s']} s", flush=True)
        del pool, queries
        done(out)
    return out


def table(runs: dict) -> str:
    head = ("| pool | rule | index | nprobe / efSearch (tuned) | vectors / list | scanned / query "
            "| coarse distances / query | recall@50 | search us / query (wall, cpu) | train + add s (wall) "
            "| build + tune s (wall, cpu) | bytes / vector | build + search us / pair (wall, cpu) |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for n, by_rule in runs.items():
        for name, r in by_rule.items():
            rows.append(f"| {int(n):,} | {name} | `{r['factory']}` | {r['nprobe'] or r.get('ef_search')} "
                        f"| {r['list_size']} "
                        f"| {r['scanned_per_query']:,} | {r['coarse_distances_per_query']:,} | {r['recall_at_k']:.4f} "
                        f"| {r['search_us_per_query']:,.0f}, {r['search_cpu_us_per_query']:,.0f} "
                        f"| {r['train_s'] or 0:.0f} + {r['add_s'] or 0:.0f} "
                        f"| {r['build_and_tune_wall_s']:.0f}, {r['build_and_tune_cpu_s']:.0f} "
                        f"| {r.get('bytes_per_vector')} | {r.get('wall_us_per_pair')}, {r.get('cpu_us_per_pair')} |")
    return "\n".join(rows)


def ratios(runs: dict, base: str = "today") -> dict:
    """Per size, auto / `base`: vectors scanned and search time per query, build + search time per pair (same run,
    back to back)."""
    out = {}
    for n, r in runs.items():
        if base in r and "auto" in r:
            a, t = r["auto"], r[base]
            out[n] = {"scanned": round(a["scanned_per_query"] / max(t["scanned_per_query"], 1), 3),
                      "search_us": round(a["search_us_per_query"] / t["search_us_per_query"], 3),
                      "search_cpu_us": round(a["search_cpu_us_per_query"] / max(t["search_cpu_us_per_query"], 1e-9),
                                             3),
                      "wall_us_per_pair": round(a["wall_us_per_pair"] / t["wall_us_per_pair"], 3)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    ap.add_argument("--queries", type=int, default=2000, help="queries searched (the first pairs' queries)")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--also", nargs="*", default=[],
                    help="more rules: factory templates ('{nlist}' = auto's nlist, e.g. 'IVF{nlist}_HNSW32,Flat') or "
                         "'hnsw' / 'hnsw:M' (an HNSW graph over the whole pool, efSearch tuned like nprobe)")
    ap.add_argument("--data", choices=sorted(DATA), default="topics",
                    help="topics: the driver-memory benchmark's pairs; clustered: benchmarks/scale.py's mixture")
    ap.add_argument("--only", nargs="*", default=[], help="measure only these rules (names as printed)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "index_growth"),
                    help="where the vectors are cached")
    ap.add_argument("--out", default=str(RESULTS / "index_growth.json"))
    ap.add_argument("--threads", type=int, default=0,
                    help="FAISS threads (0: FAISS's default, all cores); 1 is what a shard actor gets on a 2-core "
                         "machine (index.threads: CPUs / shards), and keeps OpenMP from spinning on a loaded one")
    a = ap.parse_args(argv)
    if a.threads:
        import faiss
        faiss.omp_set_num_threads(a.threads)
    from benchmarks.vs_sentence_transformers import machine

    command = "python benchmarks/index_growth.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(runs):  # after every size, so a long run leaves what it has measured
        result = {"command": command, "data": a.data, "k": a.k, "queries": a.queries, "threads": a.threads or None,
                  "runs": runs,
                  "ratios_auto_over_today": ratios(runs), "ratios_auto_over_before": ratios(runs, "before"),
                  "machine": machine()}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        return result

    result = write(run(a.sizes, a.queries, a.k, Path(a.work), a.also, write, a.data, tuple(a.only)))
    print(table(result["runs"]))
    print("auto / today:", json.dumps(result["ratios_auto_over_today"]))
    print("auto / before:", json.dumps(result["ratios_auto_over_before"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
