"""Driver memory, tree memory and wall time of `hardneg mine` as the corpus grows (issue 15's acceptance benchmark).

Per size (default 100k, 400k, 1.6M pairs), in a child process of its own, one size after the other: topic pairs
(`--data topics`, the default: each pair draws most of its words from one of a few thousand topic vocabularies, so
the hashing vectors fall into clusters as real embeddings do and an IVF index searches a few lists per query), or
the older random-word pairs (`--data words`: vectors close to uniformly random, the worst case for an IVF index: at
100k it tuned nprobe to 256 of 512 lists and search took 175 s of 255), the package's model-free `HashingTeacher`
(96-d vectors, so the pipeline is what is measured, not a model), `retrieve.top_k: 50`, `retrieve.deepen_factor: 1`
(no second retrieval for queries the filters leave short: how many are short depends on the data, and a second pass
would blur the per-stage split), an empty embedding cache, every other setting at its default. The child starts
Ray (`ensure_ray`) and runs `pipeline.mine.mine` once, as `hardneg mine` would. Measured:

* driver peak RSS: the child's own `VmHWM` (Ray's processes are not in it);
* tree peak RSS and PSS: the child and all its descendants (raylet, GCS, every worker), sampled every 0.2 s by
  `benchmarks.vs_sentence_transformers.TreeSampler`; and the tree's peak anonymous + shmem memory (summed RssAnon +
  RssShmem; with PSS's split of shared pages, summed Pss_Anon + Pss_Shmem, every 1 s), broken down by process label
  (Ray's workers by the task they run) at each peak, each label's largest single process, and the stage running at
  each (from the child's wall-clock stage ends);
* wall time per stage: Ray start and `mine` from the child's own marks; read, embed, index + search and
  filter-sample-write from the run's `_stats.json` timings (`read_s`; embed = `embed_and_retrieve_s` less the
  retrieval calls' own `total_s`; filter-sample-write = `total_s` less both);
* bytes on disk of the embedding cache and of the epoch (per item, per pair).

Acceptance (issue 15), printed as a table and stored under "checks": the driver's peak grows <= 15% from the
smallest to the largest size; the tree's anon + shmem peak less the index, per process alive at that peak, grows
<= 15% (the index plus a bounded per-worker working set); wall time per pair at the largest size is no more than
10% over the smallest's (noise on a shared machine). The tree figure is anon + shmem, not RSS: RSS also counts the
pages of memory-mapped files (the `.npy` vector stores, `items.arrow`, candidate parts) once per process that
touched them, page cache the kernel drops under pressure, not memory that must fit; the RSS figure is printed
beside it (`tree_minus_index_per_process_growth`), and the labels whose largest process grew most.

`simulate()` projects wall time and memory for P pairs on N nodes and a teacher of dimension d from the measured
per-pair stage costs (docs/scale.md, "100M pairs on N nodes"): a model, not a measurement.

    python benchmarks/driver_memory.py --sizes 100000 400000 1600000
    python benchmarks/driver_memory.py --sizes 100000 --data words   # the random-word pairs (worst case for IVF)
    python benchmarks/driver_memory.py --simulate            # from benchmarks/results/driver_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.textdata import write_pairs  # noqa: E402
from benchmarks.vs_sentence_transformers import RESULTS, machine, run_measured  # noqa: E402

# A cache row beside its d float32 values: the 32-character hex key and Parquet's offsets. (The hashing teacher's
# measured bytes per item are below d x 4: its 48 image dimensions are zero for text and compress away.)
CACHE_KEY_BYTES = 48
GOAL_DRIVER_GROWTH = 0.15
GOAL_WORKER_GROWTH = 0.15
WALL_NOISE = 0.10
TEACHER = "pipeline.teachers.examples:HashingTeacher"
INDEX_KEYS = ("factory", "params", "bytes", "num_shards", "mode", "dim", "ntotal", "nq", "k", "train_s", "add_s",
              "build_s", "recall_s", "recall_sample", "search_s", "total_s")


def random_word_pairs(n: int, seed: int = 0, vocab: int = 30_000) -> list[dict]:
    """`n` pairs of random words from a made-up vocabulary: a query of 4-10 words, a positive that repeats half of
    them among 8-20 others (so the teacher ranks it high, as a real positive). Word frequencies are Zipf-like, so
    candidates share words with many queries (hard negatives exist). Deterministic for (n, seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syll = np.array([c + v for c in "bdfgklmnprstvz" for v in "aeiou"])
    words = np.array(["".join(rng.choice(syll, size=int(m))) for m in rng.integers(2, 5, size=vocab)])
    p = 1.0 / (np.arange(vocab) + 10.0)
    p /= p.sum()
    qlen, plen = rng.integers(4, 11, size=n), rng.integers(8, 21, size=n)
    draws = rng.choice(vocab, size=(n, 30), p=p)
    rows = []
    for i in range(n):
        q = words[draws[i, :qlen[i]]]
        pos = np.concatenate([q[: (qlen[i] + 1) // 2], words[draws[i, 10:10 + plen[i]]]])
        rows.append({"id": f"r{i}", "dataset": "words", "qry": f"{i} " + " ".join(q),
                     "pos_text": " ".join(rng.permutation(pos))})
    return rows


def topic_pairs(n: int, seed: int = 0, topics: int | None = None, topic_words: int = 15,
                vocab: int = 30_000) -> list[dict]:
    """`n` pairs that cluster like real data: `topics` (default n // 500, 20 to 4,000) topics, each a vocabulary of
    `topic_words` words drawn from a made-up `vocab`; a pair picks one topic (Zipf-like topic sizes), its query
    draws 5-10 words, 80% from the topic, and its positive repeats half of them among 8-20 more words of the
    topic. Same-topic pairs share words (the hard negatives), other topics rarely. Deterministic for the args."""
    import numpy as np

    rng = np.random.default_rng(seed)
    topics = topics or int(min(4000, max(20, n // 500)))
    syll = np.array([c + v for c in "bdfgklmnprstvz" for v in "aeiou"])
    words = np.array(["".join(rng.choice(syll, size=int(m))) for m in rng.integers(2, 5, size=vocab)])
    lexicon = rng.integers(0, vocab, size=(topics, topic_words))
    p = 1.0 / (np.arange(topics) + 5.0)
    topic = rng.choice(topics, size=n, p=p / p.sum())
    qlen, plen = rng.integers(5, 11, size=n), rng.integers(8, 21, size=n)
    inner = lexicon[topic[:, None], rng.integers(0, topic_words, size=(n, 30))]
    noise = rng.integers(0, vocab, size=(n, 30))
    draws = np.where(rng.random((n, 30)) < 0.8, inner, noise)
    rows = []
    for i in range(n):
        q = words[draws[i, :qlen[i]]]
        pos = np.concatenate([q[: (qlen[i] + 1) // 2], words[lexicon[topic[i], rng.integers(0, topic_words,
                                                                                         size=plen[i])]]])
        rows.append({"id": f"r{i}", "dataset": "topics", "qry": f"{i} " + " ".join(q),
                     "pos_text": " ".join(rng.permutation(pos))})
    return rows


DATA = {"topics": topic_pairs, "words": random_word_pairs}


def mine_config(pairs: Path, cache: Path) -> dict:
    return {"input": {"pairs": [str(pairs)]},
            "teacher": {"kind": "custom", "cls": TEACHER, "batch_size": 256},
            "embed": {"cache_dir": str(cache)},
            "retrieve": {"top_k": 50, "deepen_factor": 1},
            # 20,000 rows a shard, not the default 50,000: at 50,000 x top_k 50 candidates pyarrow 26 turns the
            # shard's "retrieved" source column into a ChunkedArray and write_epoch fails (bug in pipeline/mine.py)
            "output": {"rows_per_shard": 20_000},
            "run": {"progress": False}}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which exec resets. `ru_maxrss` is not: it starts at the parent's RSS
    when the parent forked (a parent that made the pairs first would show up as the driver's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(a) -> dict:
    """One mine in this process (the driver); its own marks and the run's stage timings."""
    t0 = time.perf_counter()
    from pipeline.config import config_from_dict
    from pipeline.mine import ensure_ray, mine

    cfg = config_from_dict(mine_config(Path(a.pairs), Path(a.cache)))
    t_import = time.perf_counter()
    ensure_ray(cfg)
    t_ray = time.perf_counter()
    rss_after_ray = _peak_rss()
    mine_at = time.time()  # wall clock, as TreeSampler stamps its samples: which stage a peak fell in
    result = mine(cfg, a.out)
    t_mine = time.perf_counter()
    stats = result.stats
    tm = stats.get("timings", {})
    retrieval = stats.get("retrieval", {})
    index_s = sum(float(r.get("index", {}).get("total_s") or 0) for r in retrieval.values())
    read_s = float(tm.get("read_s") or 0)
    er = float(tm.get("embed_and_retrieve_s") or 0)
    total = float(tm.get("total_s") or (t_mine - t_ray))
    stages = {"ray_start_s": t_ray - t_import, "read_s": read_s, "embed_s": max(er - index_s, 0.0),
              "index_search_s": index_s, "filter_sample_write_s": max(total - read_s - er, 0.0),
              "mine_s": t_mine - t_ray}
    ends = {"ray start": mine_at, "read": mine_at + read_s, "embed+index+search": mine_at + read_s + er,
            "filter-sample-write": time.time()}
    return {"pairs": a.n, "driver_peak_rss": _peak_rss(), "stage_ends": {k: round(v, 2) for k, v in ends.items()},
            "driver_peak_rss_after_ray_start": rss_after_ray, "import_s": round(t_import - t0, 3),
            "stages": {k: round(v, 3) for k, v in stages.items()}, "timings": tm,
            "index": {ds: {k: r.get("index", {}).get(k) for k in INDEX_KEYS} for ds, r in retrieval.items()},
            "index_bytes": sum(int(r.get("index", {}).get("bytes") or 0) for r in retrieval.values()),
            "queries_written": stats.get("queries_written"), "deepened_queries": stats.get("deepened_queries"),
            "embed": stats.get("embed")}


def run_size(n: int, work: Path, seed: int = 0, data: str = "topics") -> dict:
    """Pairs (made once, outside the measurement), then one measured child process; cache and output are fresh."""
    pairs = work / f"pairs-{data}-{n}.parquet"
    if not pairs.exists():
        write_pairs(DATA[data](n, seed), pairs.with_suffix(".tmp.parquet")).replace(pairs)
    cache, out = work / f"cache-{n}", work / f"out-{n}"
    for d in (cache, out):
        shutil.rmtree(d, ignore_errors=True)
    argv = [sys.executable, __file__, "--child", "--n", str(n), "--pairs", str(pairs), "--cache", str(cache),
            "--out", str(out), "--result", str(work / f"result-{n}.json")]
    r = run_measured(argv, work / f"result-{n}.json", work / f"log-{n}.txt", env={"RAY_ADDRESS": ""})  # own Ray
    r["cache_bytes"], r["output_bytes"] = _du(cache), _du(out)
    items = (r.get("embed") or {}).get("candidates", {}).get("items") or 2 * n
    r["cache_bytes_per_item"] = round(r["cache_bytes"] / max(items, 1), 1)
    r["vector_dim"] = next((v.get("dim") for v in r["index"].values() if v.get("dim")), 96)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return summarise_run(r)


def summarise_run(r: dict) -> dict:
    n = r["pairs"]
    tree = r["peak_tree_rss_mb"] * 2**20
    r["driver_peak_rss_mb"] = round(r["driver_peak_rss"] / 2**20, 1)
    r["tree_minus_index_per_process_mb"] = round((tree - r["index_bytes"]) / max(r["peak_tree_procs"], 1) / 2**20, 1)
    mem = r.get("tree_memory_by_process")
    for key in ("anon_shmem", "working_set"):  # summed RssAnon + RssShmem; Pss_Anon + Pss_Shmem
        if mem and key in mem["at_peak"]:  # per process alive at that peak
            procs = sum(b["n"] for b in mem["at_peak"][key]["by_process"].values())
            r[f"tree_{key}_minus_index_per_process_mb"] = round(
                (r[f"peak_tree_{key}_mb"] - r["index_bytes"] / 2**20) / max(procs, 1), 1)
    if mem and r.get("stage_ends"):
        r["stage_at_peak"] = {k: stage_at(v["t"], r["stage_ends"]) for k, v in mem["at_peak"].items()}
        for v in mem["largest_process"].values():
            v["stage"] = stage_at(v["t"], r["stage_ends"])
    r["wall_per_pair_us"] = round(r["stages"]["mine_s"] / n * 1e6, 2)
    r["stage_us_per_pair"] = {k: round(v / n * 1e6, 2) for k, v in r["stages"].items() if k != "ray_start_s"}
    return r


def stage_at(t: float, ends: dict) -> str:
    """The stage running at wall clock `t`, from the child's stage ends (in order)."""
    return next((stage for stage, end in ends.items() if t <= end), "after")


def checks(runs: list[dict]) -> dict:
    """Issue 15's acceptance, smallest against largest size."""
    if len(runs) < 2:
        return {}
    lo, hi = min(runs, key=lambda r: r["pairs"]), max(runs, key=lambda r: r["pairs"])

    def growth(key):
        return round(hi[key] / lo[key] - 1.0, 4)

    g_driver, g_rss, g_wall = (growth("driver_peak_rss_mb"), growth("tree_minus_index_per_process_mb"),
                               growth("wall_per_pair_us"))
    ws = "tree_anon_shmem_minus_index_per_process_mb"
    g_worker = growth(ws) if ws in lo and ws in hi else g_rss  # results from before the split: RSS
    slope = (hi["driver_peak_rss"] - lo["driver_peak_rss"]) / (hi["pairs"] - lo["pairs"])
    return {"from_pairs": lo["pairs"], "to_pairs": hi["pairs"], "driver_bytes_per_pair": round(slope, 1),
            "driver_peak_growth": g_driver, "driver_ok": g_driver <= GOAL_DRIVER_GROWTH,
            "tree_minus_index_per_process_growth": g_rss,
            "tree_anon_shmem_minus_index_per_process_growth": g_worker, "tree_ok": g_worker <= GOAL_WORKER_GROWTH,
            "growing_processes": growing(lo, hi),
            "wall_per_pair_growth": g_wall, "wall_ok": g_wall <= WALL_NOISE}


def growing(lo: dict, hi: dict, top: int = 5) -> list[dict]:
    """The process labels (Ray task names) whose largest single process's anon + shmem grew most, with the stage it
    peaked in at the larger size: where the per-process working set grows with the corpus."""
    a, b = ((r.get("tree_memory_by_process") or {}).get("largest_process", {}) for r in (lo, hi))
    rows = [{"process": k, "mb": [a[k]["anon_shmem"], v["anon_shmem"]], "growth_mb": round(v["anon_shmem"]
             - a[k]["anon_shmem"], 1), "stage": v.get("stage")} for k, v in b.items() if k in a]
    return sorted(rows, key=lambda x: -x["growth_mb"])[:top]


def table(runs: list[dict], chk: dict) -> str:
    lines = ["| pairs | driver peak MB | tree peak MB (PSS) | tree anon+shm peak MB (PSS) | index MB | procs | "
             "tree-index per proc MB: anon+shm (RSS) | read s | embed s | index+search s | filter-sample-write s | "
             "mine s | us/pair | tree CPU s | process s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: r["pairs"]):
        s = r["stages"]
        lines.append(f"| {r['pairs']:,} | {r['driver_peak_rss_mb']:,.0f} | {r['peak_tree_rss_mb']:,.0f} "
                     f"({r['peak_tree_pss_mb']:,.0f}) | {r.get('peak_tree_anon_shmem_mb', 0):,.0f} "
                     f"({r.get('peak_tree_working_set_mb', 0):,.0f}) | {r['index_bytes'] / 2**20:,.0f} | "
                     f"{r['peak_tree_procs']} | {r.get('tree_anon_shmem_minus_index_per_process_mb', 0):,.0f} "
                     f"({r['tree_minus_index_per_process_mb']:,.0f}) | {s['read_s']:.1f} | {s['embed_s']:.1f} | "
                     f"{s['index_search_s']:.1f} | {s['filter_sample_write_s']:.1f} | {s['mine_s']:.1f} | "
                     f"{r['wall_per_pair_us']:.0f} | {r['tree_cpu_s']:,.0f} | {r['process_wall_s']:,.0f} |")
    if chk:
        mark = {True: "ok", False: "NOT MET"}
        lines += ["", f"{chk['from_pairs']:,} -> {chk['to_pairs']:,} pairs:",
                  f"- driver peak growth {chk['driver_peak_growth']:+.1%} (goal <= +{GOAL_DRIVER_GROWTH:.0%}): "
                  f"{mark[chk['driver_ok']]}",
                  f"- tree anon+shm peak less index, per process, growth "
                  f"{chk.get('tree_anon_shmem_minus_index_per_process_growth', 0):+.1%} (goal <= "
                  f"+{GOAL_WORKER_GROWTH:.0%}): {mark[chk['tree_ok']]} (RSS, page cache included: "
                  f"{chk['tree_minus_index_per_process_growth']:+.1%})",
                  *(f"  - {g['process']}: largest process anon+shm {g['mb'][0]:,.0f} -> {g['mb'][1]:,.0f} MB "
                    f"(in {g['stage']})" for g in chk.get("growing_processes", ())[:3]),
                  f"- wall per pair growth {chk['wall_per_pair_growth']:+.1%} (goal: not rising, <= "
                  f"+{WALL_NOISE:.0%} noise): {mark[chk['wall_ok']]}"]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(runs, key=lambda r: r["pairs"])
    x = [r["pairs"] for r in runs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(x, [r["driver_peak_rss_mb"] / 1024 for r in runs], "o-", label="driver peak RSS")
    a1.plot(x, [r["peak_tree_rss_mb"] / 1024 for r in runs], "s-", label="tree peak RSS (driver+Ray)")
    a1.plot(x, [r["index_bytes"] / 2**30 for r in runs], "^--", label="index size")
    a1.set_xscale("log")
    a1.set_xlabel("pairs")
    a1.set_ylabel("GiB")
    a1.legend(fontsize=7, loc="best")
    a1.set_title("memory", fontsize=9)
    keys = [("read_s", "read"), ("embed_s", "embed"), ("index_search_s", "index+search"),
            ("filter_sample_write_s", "filter-sample-write")]
    bottom = [0.0] * len(runs)
    for key, label in keys:
        h = [r["stage_us_per_pair"][key] for r in runs]
        a2.bar(range(len(runs)), h, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, h)]
    a2.set_xticks(range(len(runs)), [f"{n:,}" for n in x], fontsize=8)
    a2.set_ylabel("wall time per pair (us)")
    a2.set_title("wall time per pair, by stage", fontsize=9)
    a2.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------------------------
# 100M pairs on N nodes: a model fed by the measurements
# ------------------------------------------------------------------------------------------------------------------

def _scan(plan: dict, n: int, d: int) -> float:
    """Floats (or PQ code bytes) one query scans: nprobe / nlist of the pool for IVF, all of it for Flat."""
    prm = plan.get("params") or {}
    frac = prm["nprobe"] / prm["nlist"] if prm.get("nlist") and prm.get("nprobe") else 1.0
    return n * frac * (prm.get("pq_m") or d)


def costs(run: dict, driver_per_pair: float | None = None) -> dict:
    """Unit costs of one measured run, in seconds of the measured machine (all its cores): per pair for read,
    embed (per item) and filter-sample-write; per scanned float for search; per (vector x list x d) for adding to
    IVF lists; per (training point x list x d) for k-means; per (sample query x pool x d) for the recall check."""
    n, st = run["pairs"], run["stages"]
    info = next(iter(run["index"].values()))
    prm, d = info.get("params") or {}, info.get("dim") or run.get("vector_dim", 96)
    nlist = prm.get("nlist") or 1
    search_per_float = info["search_s"] / (n * _scan(info, n, d))
    return {"pairs": n, "dim": d, "cpus": run.get("machine", {}).get("cpus") or 2,
            "read_per_pair": st["read_s"] / n, "embed_per_item": st["embed_s"] / (2 * n),
            "fsw_per_pair": st["filter_sample_write_s"] / n,
            "search_per_float": search_per_float,
            "add_per_op": info["add_s"] / (n * nlist * d) if info.get("add_s") else 0.0,
            "train_per_op": (info["train_s"] / (prm.get("train_size", n) * nlist * d)) if info.get("train_s") else 0.0,
            # a Flat index reports recall without measuring it: the check is an exact search, priced as its search
            "recall_per_op": (search_per_float if info.get("recall_exact")
                              else info["recall_s"] / ((info.get("recall_sample") or 500) * n * d)),
            "cache_overhead_per_item": CACHE_KEY_BYTES,
            "process_base": run["tree_minus_index_per_process_mb"] * 2**20,
            "driver_per_pair": driver_per_pair}


def simulate(pairs: int, nodes: int, dim: int, c: dict, cores_per_node: int = 32, node_memory_gb: float = 256.0,
             embed_items_per_s_per_node: float | None = None, k: int = 50, block_rows: int = 4096) -> dict:
    """Wall time and memory of mining `pairs` (2 items each) on `nodes` nodes of `cores_per_node` cores with a
    teacher of width `dim`, from the unit costs `c` (`costs()` of a measured run). A model, not a measurement:

    * every stage but k-means runs as Ray tasks over blocks of `block_rows` queries spread over all cores, and a
      measured second of the measured machine's `c["cpus"]` cores is `c["cpus"]` core-seconds;
    * the index is what `choose_index` picks for the pool with half the cluster's memory as `memory_budget_gb`;
      search scales with the floats (code bytes) a query scans, adding with vectors x lists x d, the recall check
      with 500 queries x pool x d; k-means training runs in one process (a Ray task) on one node's cores;
    * embedding: `embed_items_per_s_per_node` (a real teacher's throughput) or the measured hashing teacher's;
    * filter-sample-write: as block stages over all cores (`fsw`), and as today, in the driver (`fsw_in_driver`);
    * memory per node: its share of the index + one process per core holding Ray/Python (measured) and two blocks
      (query vectors, candidate ids, scores and positive similarities); the cache: items x (d x 4 + key and
      Parquet offsets); the driver today: measured bytes per pair x pairs."""
    from pipeline.config import IndexConfig
    from pipeline.index import MemoryBudgetError, choose_index

    items, core_s = 2 * pairs, c["cpus"]  # measured seconds -> core-seconds
    cluster = cores_per_node * nodes
    try:
        plan = choose_index(pairs, dim, IndexConfig(memory_budget_gb=node_memory_gb * nodes / 2, gpu="false"),
                            gpu_available=False)
    except MemoryBudgetError as e:
        return {"pairs": pairs, "nodes": nodes, "dim": dim, "fits": False, "index": f"none fits: {e}"}
    prm = plan["params"]
    nlist = prm.get("nlist") or 1
    embed_rate = embed_items_per_s_per_node or cores_per_node / (c["embed_per_item"] * core_s)
    wall = {"read": pairs * c["read_per_pair"] * core_s / cluster,
            "embed": items / (embed_rate * nodes),
            "train_in_driver": prm.get("train_size", 0) * nlist * dim * c["train_per_op"] * core_s / cores_per_node,
            "add": pairs * nlist * dim * c["add_per_op"] * core_s / cluster,
            "recall_check": 500 * pairs * dim * c["recall_per_op"] * core_s / cluster,
            "search": pairs * _scan(plan, pairs, dim) * c["search_per_float"] * core_s / cluster,
            "fsw": pairs * c["fsw_per_pair"] * core_s / cluster}
    fsw_in_driver = pairs * c["fsw_per_pair"] * c["cpus"] / min(c["cpus"], cores_per_node)
    block_bytes = block_rows * (dim * 4 + k * 16)
    node_bytes = plan["est_bytes"] / nodes + cores_per_node * (c["process_base"] + 2 * block_bytes)
    hours = {key: round(v / 3600, 2) for key, v in wall.items()}
    hours["total"] = round(sum(wall.values()) / 3600, 2)
    return {"pairs": pairs, "nodes": nodes, "dim": dim, "cores_per_node": cores_per_node, "index": plan["factory"],
            "index_gb": round(plan["est_bytes"] / 2**30, 1), "blocks": -(-pairs // block_rows), "hours": hours,
            "fsw_in_driver_hours": round(fsw_in_driver / 3600, 2),
            "cache_gb": round(items * (4 * dim + c["cache_overhead_per_item"]) / 2**30, 1),
            "object_store_per_node_gb": round(cores_per_node * 2 * block_bytes / 2**30, 2),
            "memory_per_node_gb": round(node_bytes / 2**30, 1), "node_memory_gb": node_memory_gb,
            "driver_today_gb": round(pairs * c["driver_per_pair"] / 2**30, 1) if c.get("driver_per_pair") else None,
            "fits": bool(node_bytes < node_memory_gb * 2**30)}


def simulate_table(c: dict, pairs: int = 100_000_000, dims=(384, 1024, 3584), nodes=(1, 8, 64), **kw) -> list[dict]:
    return [simulate(pairs, n, d, c, **kw) for d in dims for n in nodes]


def simulation_table(rows: list[dict]) -> str:
    lines = ["| d | nodes | index (GiB) | embed h | train h (one process) | add h | recall check h | search h | "
             "filter-sample-write h (blocks / in driver) | total h | memory per node GiB | cache GiB | "
             "driver today GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "hours" not in r:
            lines.append(f"| {r['dim']} | {r['nodes']} | {r['index']} |" + " |" * 10)
            continue
        h = r["hours"]
        lines.append(f"| {r['dim']} | {r['nodes']} | `{r['index']}` ({r['index_gb']:,}) | {h['embed']:,} | "
                     f"{h['train_in_driver']:,} | {h['add']:,} | {h['recall_check']:,} | {h['search']:,} | "
                     f"{h['fsw']:,} / {r['fsw_in_driver_hours']:,} | {h['total']:,} | {r['memory_per_node_gb']:,} | "
                     f"{r['cache_gb']:,} | {r['driver_today_gb']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), f"hardneg-driver-memory-{REPO.name}"))
    p.add_argument("--out", default=str(RESULTS / "driver_memory.json"))
    p.add_argument("--plot", default=str(REPO / "docs" / "img" / "driver_memory.png"))
    p.add_argument("--simulate", action="store_true", help="print the N-node projection from --out and stop")
    p.add_argument("--data", choices=sorted(DATA), default="topics",
                   help="topics: clustered pairs (default); words: random-word pairs, the worst case for IVF")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--n", "--pairs", "--cache", "--result"):
        p.add_argument(name, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        a.n = int(a.n)
        Path(a.result).write_text(json.dumps(child(a), indent=1))
        return 0
    out = Path(a.out)
    if a.simulate:
        res = json.loads(out.read_text())
        big = max(res["runs"].values(), key=lambda r: r["pairs"])
        slope = (res.get("checks") or {}).get("driver_bytes_per_pair") or (  # one size: its growth since Ray started
            (big["driver_peak_rss"] - big["driver_peak_rss_after_ray_start"]) / big["pairs"])
        c = costs({**big, "machine": res.get("machine", {})}, slope)
        res["simulation"] = {"unit_costs": c, "rows": simulate_table(c)}
        out.write_text(json.dumps(res, indent=1))
        print(simulation_table(res["simulation"]["rows"]))
        return 0
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for n in a.sizes:
        print(f"== {n:,} pairs", flush=True)
        r = run_size(n, work, data=a.data)
        print(f"   driver peak {r['driver_peak_rss_mb']:,.0f} MB, tree peak {r['peak_tree_rss_mb']:,.0f} MB, "
              f"mine {r['stages']['mine_s']:.1f} s, process {r['process_wall_s']:.1f} s", flush=True)
        res = json.loads(out.read_text()) if out.exists() else {}  # read again: another size may have finished
        r["command"] = "python benchmarks/driver_memory.py --sizes " + " ".join(map(str, a.sizes)) + \
            ("" if a.data == "topics" else f" --data {a.data}")
        r["data"] = a.data
        r["loadavg"] = os.getloadavg()
        res.setdefault("runs", {})[str(n)] = r
        res["machine"] = machine()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    runs = list(res["runs"].values())
    res["checks"] = checks(runs)
    out.write_text(json.dumps(res, indent=1))
    print(table(runs, res["checks"]))
    if a.plot:
        print(f"-> {plot(runs, Path(a.plot))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
