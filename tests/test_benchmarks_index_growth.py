"""benchmarks/index_growth.py at a tiny size: its vectors are the hashing teacher's, the `today` rule is the one the
driver-memory runs used, and the result file carries the figures docs/scale.md quotes."""
import json

import numpy as np

from benchmarks.driver_memory import topic_pairs
from benchmarks.index_growth import hashing_vectors, main, measure, today, topic_vectors
from pipeline.index import exact_search


def test_hashing_vectors_equal_the_teachers():
    from pipeline.config import TeacherConfig
    from pipeline.teachers.examples import HashingTeacher

    rows = topic_pairs(700, seed=5)
    teacher = HashingTeacher(TeacherConfig(kind="custom", cls="pipeline.teachers.examples:HashingTeacher"))
    for key, role in (("pos_text", "candidate"), ("qry", "query")):
        texts = [r[key] for r in rows]
        assert np.array_equal(hashing_vectors(texts, chunk=256), teacher.embed(texts, [None] * len(texts), role))


def test_today_is_the_index_the_driver_memory_runs_built():
    # benchmarks/results/driver_memory_merged-400k.json: IVF512 at 100k, IVF1024 at 400k (nprobe then auto-tuned)
    assert today(100_000) == {"kind": "IVF512,Flat", "nprobe": 16, "train_size": 65_536}
    assert today(400_000)["kind"] == "IVF1024,Flat" and today(1_600_000)["kind"] == "IVF2048,Flat"


def test_measure_counts_scanned_vectors_and_coarse_distances(tmp_path):
    pool, queries = topic_vectors(4000, 100, tmp_path)
    assert (tmp_path / "topics-4000-100-0.npz").exists() and pool.shape == (4000, 96) and queries.shape == (100, 96)
    truth = exact_search(pool, queries, 10)
    flat = measure(pool, queries, truth, 10, {"kind": "IVF64,Flat", "nprobe": 64, "recall_floor": None})
    assert flat["recall_at_k"] == 1.0 and flat["scanned_per_query"] == 4000 and flat["coarse_distances_per_query"] == 64
    hnsw = measure(pool, queries, truth, 10, {"kind": "IVF64_HNSW32,Flat", "nprobe": 4, "recall_floor": None})
    assert 0 < hnsw["scanned_per_query"] < 4000 and 0 < hnsw["coarse_distances_per_query"]


def test_result_file(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--sizes", "3000", "--queries", "100", "--work", str(tmp_path), "--out", str(out),
                 "--also", "ivf_flat", "ivf_flat@z=0"]) == 0
    r = json.loads(out.read_text())
    run = r["runs"]["3000"]
    assert run["today"]["factory"] == "IVF64,Flat" and run["auto"]["factory"] == "Flat"  # below index.exact_below
    assert run["auto"]["recall_at_k"] == 1.0 and run["today"]["recall_at_k"] >= 0.95  # the recall floor
    assert set(r["ratios_auto_over_today"]["3000"]) == {"scanned", "search_us", "search_cpu_us", "wall_us_per_pair"}
    assert run["before"]["factory"] == "Flat" and "3000" in r["ratios_auto_over_before"]
    # RULE@z=Z: the same index tuned without (Z=0) the margin for sampling error
    assert run["ivf_flat"]["factory"] == run["ivf_flat@z=0"]["factory"] == "IVF64,Flat"
    plain, margin = run["ivf_flat@z=0"]["recall_trials"][0], run["ivf_flat"]["recall_trials"][0]
    assert plain["recall_lower"] == plain["recall"] and margin["recall_lower"] <= margin["recall"]
