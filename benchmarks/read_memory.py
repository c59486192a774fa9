"""Peak memory and time of the read stage alone (`pipeline.read.load_corpus`) as the input grows.

Per size, in a child process of its own: random-word (query, positive) pairs in one Parquet file (made once,
outside the measurement; a fast variant of `benchmarks.driver_memory.random_word_pairs`: 4-10 words a query, a
positive repeating half of them among 8-20 others, ids and a dataset column), then `load_corpus` once. Measured:
the child's peak RSS (`ru_maxrss`) before and after, the growth per pair, the wall time, and the sizes of the
corpus tables it returns (Arrow bytes). A job without Ray reads in the driver, so this peak is the driver's at read.

The same input read as block tasks (pipeline/read_blocks.py, a job on Ray), side by side: in one child process
all the block tasks of `--block-rows` rows one after another (a Ray worker runs one at a time), in another the task
that assembles them into the state dir's files; each child's peak RSS (`blocks`). The one-task read (`load_corpus`
and `write_corpus`) is the peak these replace on Ray. The assembling task's working set, which must not grow with
the corpus (issue 15: a bounded working set per worker), is measured twice more: its peak anonymous + shmem memory
(RssAnon + RssShmem, sampled every 5 ms: what `driver_memory.py` counts per process; RSS also counts the pages of
the blocks' memory-mapped files), and, in a child of its own, its peak of Python/numpy allocations (tracemalloc) and
of Arrow buffers (a proxy of the memory pool), as `block_memory.py` measures a block task; and their growth per
pair from the smallest size to each larger one (`assemble_growth`).

    python benchmarks/read_memory.py --sizes 100000 400000 1600000   # -> benchmarks/results/read_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def write_word_pairs(n: int, path: Path, seed: int = 0, vocab: int = 30_000) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    syll = np.array([c + v for c in "bdfgklmnprstvz" for v in "aeiou"])
    words = ["".join(rng.choice(syll, size=int(m))) for m in rng.integers(2, 5, size=vocab)]
    p = 1.0 / (np.arange(vocab) + 10.0)
    qlen, plen = rng.integers(4, 11, size=n).tolist(), rng.integers(8, 21, size=n).tolist()
    draws = rng.choice(vocab, size=(n, 30), p=p / p.sum()).tolist()
    qry, pos = [], []
    for i in range(n):
        d, q = draws[i], qlen[i]
        qry.append(f"{i} " + " ".join(words[j] for j in d[:q]))
        pos.append(" ".join(words[j] for j in d[:(q + 1) // 2] + d[10:10 + plen[i]]))
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "dataset": ["words"] * n, "qry": qry,
                             "pos_text": pos}), path)
    return path


def child(pairs: str) -> dict:
    from pipeline.config import InputConfig
    from pipeline.read import load_corpus

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    corpus = load_corpus(InputConfig(pairs=[pairs]), False)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_rss": peak, "rss_before": before, "wall_s": round(wall, 2),
            "queries": corpus.queries.num_rows, "items": corpus.items.num_rows,
            "tables_bytes": corpus.queries.nbytes + corpus.items.nbytes}


def anon_shmem() -> int:
    """This process's RssAnon + RssShmem, bytes."""
    with open("/proc/self/status") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("RssAnon:", "RssShmem:")))


class AnonPeak:
    """The largest `anon_shmem` sampled every 5 ms by a thread while the block runs."""

    def __enter__(self):
        import threading

        self.start = self.peak = anon_shmem()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, anon_shmem())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, anon_shmem())
        return False


def blocks_child(pairs: str, phase: str, work: str, block_rows: int) -> dict:
    """One phase of the read as block tasks, in this process: "blocks" (every block task, one after another) or
    "assemble" (the one task after them, in batches of `block_rows` rows; "assemble-traced": the same, traced),
    handing over through a pickle in `work`."""
    import pickle
    import tracemalloc

    import pyarrow as pa

    from pipeline.config import InputConfig
    from pipeline.read_blocks import STAGING, assemble, plan, read_block

    cfg = InputConfig(pairs=[pairs])
    state_dir = Path(work) / "state"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if phase == "blocks":
        (state_dir / STAGING).mkdir(parents=True, exist_ok=True)
        specs, _ = plan(cfg, False, state_dir / STAGING, block_rows)
        results = [read_block(spec) for spec in specs]
        (Path(work) / "blocks.pkl").write_bytes(pickle.dumps((specs, results)))
        out = {"blocks": len(specs)}
    else:
        specs, results = pickle.loads((Path(work) / "blocks.pkl").read_bytes())
        traced = phase == "assemble-traced"
        if traced:
            import pandas  # noqa: F401  imported by Arrow's first conversion to numpy: ~25 MB once, not working set
            pool = pa.proxy_memory_pool(pa.default_memory_pool())
            pa.set_memory_pool(pool)
            tracemalloc.start()
        with AnonPeak() as anon:
            meta = assemble((cfg, str(state_dir), specs, results, block_rows))
        out = {"queries": meta.nq, "items": meta.n_items, "anon_before": anon.start, "peak_anon": anon.peak}
        if traced:
            out.update(python_mb=round(tracemalloc.get_traced_memory()[1] / 2**20, 2),
                       arrow_mb=round(pool.max_memory() / 2**20, 2))
    wall = time.perf_counter() - t0
    return {**out, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before": before,
            "wall_s": round(wall, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_600_000])
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "hardneg-read-memory"))
    p.add_argument("--out", default=str(RESULTS / "read_memory.json"))
    p.add_argument("--block-rows", type=int, default=50_000, help="rows a read block task (pipeline/read_blocks.py)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--phase", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--make", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child and a.phase:
        print(json.dumps(blocks_child(a.child, a.phase[0], a.phase[1], a.block_rows)))
        return 0
    if a.child:
        print(json.dumps(child(a.child)))
        return 0
    if a.make:
        write_word_pairs(int(a.make[0]), Path(a.make[1]))
        return 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = {}
    for n in a.sizes:
        pairs = work / f"words-{n}.parquet"
        if not pairs.exists():  # in a process of its own: a child inherits its parent's peak RSS
            subprocess.run([sys.executable, __file__, "--make", str(n), str(pairs)], check=True, env=env)
        out = subprocess.run([sys.executable, __file__, "--child", str(pairs)], capture_output=True, text=True,
                             check=True, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["pairs"] = n
        r["peak_rss_mb"] = round(r["peak_rss"] / 2**20, 1)
        r["growth_bytes_per_pair"] = round((r["peak_rss"] - r["rss_before"]) / n)
        runs[str(n)] = r
        print(f"{n:>9,} pairs: peak {r['peak_rss_mb']:,.0f} MB ({r['growth_bytes_per_pair']:,} B/pair over the "
              f"{r['rss_before'] / 2**20:,.0f} MB before), tables {r['tables_bytes'] / 2**20:,.0f} MB, "
              f"{r['wall_s']} s", flush=True)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            r["blocks"] = {}
            for phase in ("blocks", "assemble", "assemble-traced"):
                out = subprocess.run([sys.executable, __file__, "--child", str(pairs), "--phase", phase, tmp,
                                      "--block-rows", str(a.block_rows)], capture_output=True, text=True, check=True,
                                     env=env)
                b = json.loads(out.stdout.strip().splitlines()[-1])
                b["peak_rss_mb"] = round(b["peak_rss"] / 2**20, 1)
                r["blocks"][phase] = b
            print(f"{'':>9}  as blocks of {a.block_rows:,} rows: peak {r['blocks']['blocks']['peak_rss_mb']:,.0f} MB "
                  f"in the block tasks ({r['blocks']['blocks']['blocks']} blocks, {r['blocks']['blocks']['wall_s']} s),"
                  f" {r['blocks']['assemble']['peak_rss_mb']:,.0f} MB assembling "
                  f"({r['blocks']['assemble']['wall_s']} s)", flush=True)
            asm, traced = r["blocks"]["assemble"], r["blocks"]["assemble-traced"]
            print(f"{'':>9}  assembling: anon+shm peak {asm['peak_anon'] / 2**20:,.1f} MB "
                  f"({asm['anon_before'] / 2**20:,.1f} MB before), traced peak {traced['python_mb']:,.1f} MB "
                  f"Python/numpy + {traced['arrow_mb']:,.1f} MB Arrow", flush=True)
    runs_by_size = [runs[str(n)] for n in sorted(a.sizes)]
    first = runs_by_size[0]
    growth = {}
    for r in runs_by_size[1:]:  # the assembling task's working set per pair added: ~0 when it is bounded
        n = r["pairs"] - first["pairs"]
        x, y = first["blocks"], r["blocks"]
        growth[str(r["pairs"])] = {
            "anon_bytes_per_pair": round((y["assemble"]["peak_anon"] - x["assemble"]["peak_anon"]) / n, 1),
            "traced_bytes_per_pair": round(sum(y["assemble-traced"][k] - x["assemble-traced"][k]
                                               for k in ("python_mb", "arrow_mb")) * 2**20 / n, 1)}
        print(f"assembling, {first['pairs']:,} -> {r['pairs']:,} pairs: anon+shm peak "
              f"{growth[str(r['pairs'])]['anon_bytes_per_pair']:+,.1f} B/pair, traced peak "
              f"{growth[str(r['pairs'])]['traced_bytes_per_pair']:+,.1f} B/pair", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"command": "python benchmarks/read_memory.py --sizes "
                                       + " ".join(map(str, a.sizes)) + f" --block-rows {a.block_rows}",
                                       "runs": runs, "assemble_growth": growth}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
