"""How long the inspector takes to show the first page of a large run.

Writes a synthetic run of `--rows` query rows (default 1,000,000) in the documented layout into a temporary folder,
through the miner's own writer (`pipeline.write.write_table`: zstd, 8192-row row groups, 50,000-row shards, like a
default `hardneg mine`), then, in a fresh Python process, opens the run, starts the server and times the first GET of
the list page; also a filtered page, a query page and the statistics page. Prints one line per figure; the first is
the one that matters ("first page").

    .venv/bin/python benchmarks/inspector_first_page.py [--rows 1000000] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASETS = ["clipart_cls", "clipart_i2t", "clipart_t2i"]
NEGATIVES = 8
TOP_K = 30
ROWS_PER_SHARD = 50_000
RETRIEVAL_ID = "synthetic"


def _lists(counts: np.ndarray, values: pa.Array) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def write_run(out: Path, rows: int, seed: int = 0) -> None:
    """A run folder with `rows` training rows, their `_candidates`, `_run/<retrieval id>/items.arrow`, manifest
    and stats."""
    from pipeline.write import CANDIDATE_SCHEMA, TRAIN_SCHEMA, write_json, write_table

    rng = np.random.default_rng(seed)
    caps = pa.array([f"synthetic caption {i} of a clip-art picture" for i in range(5000)])
    paths = pa.array([f"images/{i % 600:04d}.png" for i in range(5000)])
    n_items = 200_000
    ids = pa.array([f"{h:032x}" for h in rng.integers(0, 2**62, n_items, dtype=np.int64)])
    run = out / "_run" / RETRIEVAL_ID
    run.mkdir(parents=True)
    items = pa.table({"item_id": ids, "text": caps.take(pa.array(np.arange(n_items) % 5000)),
                      "image_path": paths.take(pa.array(np.arange(n_items) % 5000)),
                      "modality": pa.array(["image_text"] * n_items)})
    with pa.OSFile(str(run / "items.arrow"), "wb") as sink, pa.ipc.new_file(sink, items.schema) as writer:
        writer.write_table(items, max_chunksize=65536)
    epoch = out / "epoch=0000"
    (epoch / "_candidates").mkdir(parents=True)
    files, drops = [], {}
    for shard, start in enumerate(range(0, rows, ROWS_PER_SHARD)):
        n = min(ROWS_PER_SHARD, rows - start)
        g = np.arange(start, start + n)
        ds = np.array(DATASETS)[g * len(DATASETS) // rows]
        counts = np.where(rng.random(n) < 0.05, rng.integers(0, NEGATIVES, n), NEGATIVES).astype(np.int32)
        pos = rng.uniform(0.4, 0.95, n).astype(np.float32)
        cand_scores = -np.sort(-rng.uniform(0.05, 1.0, (n, TOP_K)).astype(np.float32), axis=1)
        cand_items = rng.integers(0, n_items, (n, TOP_K))
        reasons = np.array(["negative", "unsampled", "same_as_positive", "same_group", "margin_rel", "rank_window"])
        verdicts = reasons[rng.integers(1, len(reasons), (n, TOP_K))]
        take = np.argsort(rng.random((n, TOP_K)), axis=1)[:, :NEGATIVES]
        mask = np.arange(NEGATIVES)[None, :] < counts[:, None]
        take = np.sort(take, axis=1)
        rows_idx = np.repeat(np.arange(n), NEGATIVES).reshape(n, NEGATIVES)
        verdicts[rows_idx[mask], take[mask]] = "negative"
        neg_items = cand_items[rows_idx[mask], take[mask]]
        neg_scores = cand_scores[rows_idx[mask], take[mask]]
        for r, c in zip(*np.unique(verdicts, return_counts=True)):
            if r not in ("negative", "unsampled"):
                drops[str(r)] = drops.get(str(r), 0) + int(c)
        text_idx = pa.array(g % 5000)
        qid = pc.binary_join_element_wise(pa.array(ds), pa.array([f"{i:07d}" for i in g]), ":")
        neg_text_idx = pa.array(neg_items % 5000)
        train = pa.table({
            "query_id": qid, "dataset": pa.array(ds), "qry": caps.take(text_idx), "qry_image_path": paths.take(
                text_idx), "pos_text": caps.take(pa.array((g + 1) % 5000)), "pos_image_path": paths.take(text_idx),
            "group": pa.array(ds), "qry_item_id": ids.take(pa.array(g % n_items)),
            "pos_item_id": ids.take(pa.array((g + 7) % n_items)), "pos_score": pa.array(pos),
            "neg_text": _lists(counts, caps.take(neg_text_idx)), "neg_image_path": _lists(counts, paths.take(
                neg_text_idx)), "neg_item_ids": _lists(counts, ids.take(pa.array(neg_items))),
            "neg_scores": _lists(counts, pa.array(neg_scores)),
            "neg_ranks": _lists(counts, pa.array(take[mask].astype(np.int32))),
            "neg_rel_scores": _lists(counts, pa.array((neg_scores / np.repeat(pos, counts)).astype(np.float32))),
            "num_negatives": pa.array(counts), "shortfall": pa.array((NEGATIVES - counts).astype(np.int32)),
        }, schema=TRAIN_SCHEMA)
        full = np.full(n, TOP_K, np.int32)
        cands = pa.table({
            "query_id": qid, "cand_item_ids": _lists(full, ids.take(pa.array(cand_items.ravel()))),
            "cand_scores": _lists(full, pa.array(cand_scores.ravel())),
            "cand_ranks": _lists(full, pa.array(np.tile(np.arange(TOP_K, dtype=np.int32), n))),
            "cand_verdicts": _lists(full, pa.array(verdicts.ravel())),
        }, schema=CANDIDATE_SCHEMA)
        name = f"part-{shard:05d}.parquet"
        files.append(write_table(train, epoch / name, "zstd"))
        write_table(cands, epoch / "_candidates" / name, "zstd")
    counts = {"queries_in": rows, "queries_written": rows, "queries_rejected": 0}
    write_json(epoch / "_stats.json", {**counts, "drops": drops, "negatives": {}, "scores": {}, "per_dataset": {}})
    (epoch / "_rejects.jsonl").write_text("")
    write_json(epoch / "_manifest.json", {"epoch": 0, "retrieval_id": RETRIEVAL_ID,
                                          "config": {"input": {"image_root": str(ROOT / "data/demo")}},
                                          "files": files, "counts": counts})


def measure(out: Path, rows: int) -> dict:
    """Cold figures in this (fresh) process: nothing of the run is cached in memory yet."""
    import threading
    import urllib.request

    def get(url: str) -> float:
        t = time.perf_counter()
        with urllib.request.urlopen(url) as resp:
            body = resp.read()
        assert resp.status == 200 and body, url
        return time.perf_counter() - t

    t0 = time.perf_counter()
    from pipeline.inspector.app import make_server

    srv = make_server(out, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    first = get(srv.url)
    figures = {"first page": time.perf_counter() - t0, "first page (request only)": first}
    figures["page 10,000 of the list"] = get(srv.url + f"?start={rows // 100 * 99}")
    figures["filter: last dataset"] = get(srv.url + f"?dataset={DATASETS[-1]}")
    figures["filter: shortfall"] = get(srv.url + "?shortfall=yes")
    figures["search: a query id"] = get(srv.url + f"?q={DATASETS[-1]}:{rows - 5:07d}")
    figures["query page (mid-run)"] = get(srv.url + f"query?row={rows // 2}")
    figures["statistics page (cold)"] = get(srv.url + "stats")
    figures["statistics page (cached)"] = get(srv.url + "stats")
    srv.shutdown()
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--keep", type=Path, default=None, help="write the run here and keep it (default: a temp dir)")
    ap.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # the fresh child process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.rows)))
        return 0
    tmp = None
    out = args.keep or Path(tmp := tempfile.mkdtemp(prefix="hardneg-bench-")) / "run"
    try:
        if not (out / "epoch=0000" / "_manifest.json").exists():
            t = time.perf_counter()
            write_run(out, args.rows)
            print(f"wrote {args.rows:,} query rows to {out} in {time.perf_counter() - t:.1f} s")
        child = subprocess.run([sys.executable, __file__, "--measure", str(out), "--rows", str(args.rows)],
                               check=True, capture_output=True, text=True)
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        for name, seconds in figures.items():
            print(f"{name:<28} {seconds:7.3f} s")
        ok = figures["first page"] < 2.0
        print(f"first page of {args.rows:,} rows in {figures['first page']:.3f} s: "
              f"{'under' if ok else 'OVER'} the 2 s budget")
        return 0 if ok else 1
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
