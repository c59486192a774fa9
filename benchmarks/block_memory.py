"""What one block task holds, as the corpus grows and its block stays the same size (issue 15: the tree's peak is
the index plus a bounded per-worker working set).

Per size, in a child process of its own: topic pairs (benchmarks/driver_memory.py's data, hashing teacher, top_k
50, deepen_factor 1), mined with `run.executor: local` and `retrieve.block_rows` = `output.rows_per_shard` =
`--block-rows` (default 10,000), so every size has blocks of the same rows. Each block function (search_block,
finish_block, block_evidence, write_block) runs wrapped: its peak of Python/numpy allocations (tracemalloc) and
of Arrow buffers (a fresh proxy of the memory pool per call), the larger call of each kept. Memory-mapped file
pages are in neither: the page cache, not a task's working set. A block function whose peak grows with the corpus
holds something of the whole corpus (at 1.6M pairs `driver_memory.py` saw ~545 MB a search task, ~627 MB a write
task); one that is bounded stays flat.

    python benchmarks/block_memory.py --sizes 40000 160000 --out benchmarks/results/block_memory.json
    python benchmarks/block_memory.py --take pairs-topics-1600000.parquet --block-rows 50000   # no mine: the copies
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

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.driver_memory import TEACHER, topic_pairs  # noqa: E402
from benchmarks.textdata import write_pairs  # noqa: E402

FUNCTIONS = (("pipeline.search", "search_block"), ("pipeline.search", "finish_block"),
             ("pipeline.epoch", "block_evidence"), ("pipeline.epoch", "write_block"))


def probe(fn, peaks: dict):
    """`fn` with its per-call peaks recorded in `peaks` (the largest call's, MB)."""
    import tracemalloc

    import pyarrow as pa

    def wrapped(spec):
        previous = pa.default_memory_pool()
        pool = pa.proxy_memory_pool(previous)
        pa.set_memory_pool(pool)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            return fn(spec)
        finally:
            py = tracemalloc.get_traced_memory()[1] - base
            pa.set_memory_pool(previous)
            old = peaks.setdefault(fn.__name__, {"calls": 0, "python_mb": 0.0, "arrow_mb": 0.0})
            old["calls"] += 1
            old["python_mb"] = max(old["python_mb"], round(py / 2**20, 1))
            old["arrow_mb"] = max(old["arrow_mb"], round(pool.max_memory() / 2**20, 1))
    return wrapped


def arrow_peak(fn) -> float:
    """MB Arrow allocates at most while `fn` runs (a fresh proxy of the memory pool)."""
    import pyarrow as pa

    previous = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(previous)
    pa.set_memory_pool(pool)
    try:
        fn()
    finally:
        pa.set_memory_pool(previous)
    return round(pool.max_memory() / 2**20, 1)


def take_copies(pairs: str, work: Path, block_rows: int = 50_000) -> dict:
    """Without a mine: a pairs file written as Arrow IPC in batches of `block_rows` (as `queries.arrow` is),
    memory-mapped; the Arrow memory of one block's rows taken with Arrow's `take` and with `blocks.take_rows`, and of
    the texts of 500,000 scattered rows (a write block's candidates). At 1.6M pairs: the per-task copy of the old
    code, without the 40-minute run."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.blocks import _write_ipc, open_ipc, take_rows

    path = work / "take-copies.arrow"
    _write_ipc(pq.read_table(pairs), path, block_rows)
    q = open_ipc(path)
    mid = q.num_rows // 2
    rows = np.arange(mid, min(mid + block_rows, q.num_rows))
    used = np.unique(np.random.default_rng(0).integers(0, q.num_rows, 500_000))
    text = q.column("pos_text")
    out = {"rows": q.num_rows, "chunks": q.column(0).num_chunks, "block_rows": len(rows), "scattered": len(used),
           "block_arrow_take_mb": arrow_peak(lambda: q.take(pa.array(rows))),
           "block_take_rows_mb": arrow_peak(lambda: take_rows(q, rows)),
           "scattered_texts_arrow_take_mb": arrow_peak(lambda: text.take(pa.array(used)).combine_chunks()),
           "scattered_texts_take_rows_mb": arrow_peak(lambda: take_rows(text, used))}
    path.unlink()
    return out


def child(pairs: str, out: str, block_rows: int) -> dict:
    import importlib
    import tracemalloc

    from pipeline.config import config_from_dict
    from pipeline.mine import mine

    peaks: dict = {}
    for module, name in FUNCTIONS:
        mod = importlib.import_module(module)
        setattr(mod, name, probe(getattr(mod, name), peaks))
    cfg = config_from_dict({"input": {"pairs": [pairs]}, "teacher": {"kind": "custom", "cls": TEACHER},
                            "embed": {"cache_dir": str(Path(out) / "cache")},
                            "retrieve": {"top_k": 50, "deepen_factor": 1, "block_rows": block_rows},
                            "output": {"rows_per_shard": block_rows},
                            "run": {"progress": False, "executor": "local"}})
    tracemalloc.start()
    t0 = time.perf_counter()
    mine(cfg, Path(out) / "out")
    for v in peaks.values():
        v["total_mb"] = round(v["python_mb"] + v["arrow_mb"], 1)
    return {"peaks": peaks, "mine_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[40_000, 160_000])
    ap.add_argument("--block-rows", type=int, default=10_000)
    ap.add_argument("--work", default=None, help="folder for the pairs (kept) and runs (default: a temp folder)")
    ap.add_argument("--out", default=None, help="JSON result file")
    ap.add_argument("--take", metavar="PAIRS", help="only `take_copies` of this pairs file (blocks of --block-rows)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.block_rows)))
        return 0
    work = Path(a.work or tempfile.mkdtemp(prefix="hardneg-block-memory-"))
    if a.take:
        result = take_copies(a.take, work, a.block_rows)
        print(json.dumps(result, indent=1))
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    runs = {}
    for n in a.sizes:
        pairs = work / f"pairs-topics-{n}.parquet"
        if not pairs.exists():
            write_pairs(topic_pairs(n), pairs)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            p = subprocess.run([sys.executable, __file__, "--block-rows", str(a.block_rows), "--child", str(pairs),
                                tmp], capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
        if p.returncode:
            sys.stderr.write(p.stderr[-4000:])
            return p.returncode
        runs[n] = json.loads(p.stdout.strip().splitlines()[-1])
    lo, hi = min(a.sizes), max(a.sizes)
    print(f"| block function | peak MB per call at {lo:,} pairs: python + arrow | at {hi:,} | growth |")
    print("|---|---|---|---|")
    growth = {}
    for _, name in FUNCTIONS:
        x, y = runs[lo]["peaks"].get(name), runs[hi]["peaks"].get(name)
        if x and y:
            growth[name] = round(y["total_mb"] / max(x["total_mb"], 0.1) - 1, 3)
            print(f"| {name} | {x['total_mb']} ({x['python_mb']} + {x['arrow_mb']}) | {y['total_mb']} "
                  f"({y['python_mb']} + {y['arrow_mb']}) | {growth[name]:+.0%} |")
    result = {"block_rows": a.block_rows, "runs": runs, "growth": growth}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
