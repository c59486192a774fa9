"""benchmarks/driver_memory.py at a tiny size, end to end (child processes, real Ray, real mine): the result file
carries every figure the acceptance checks read, and the N-node simulation built on it behaves as its model says."""
import json

import pytest

from benchmarks.driver_memory import costs, main, random_word_pairs, simulate, table, topic_pairs

SIZES = (500, 1000)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("driver-memory")
    out, png = tmp / "driver_memory.json", tmp / "driver_memory.png"
    assert main(["--sizes", *map(str, SIZES), "--work", str(tmp / "work"), "--out", str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000
    return json.loads(out.read_text())


def test_random_word_pairs_are_deterministic_unique_and_related():
    a, b = random_word_pairs(300, seed=3), random_word_pairs(300, seed=3)
    assert a == b and a != random_word_pairs(300, seed=4)
    assert len({r["qry"] for r in a}) == 300 and len({r["id"] for r in a}) == 300
    for r in a:
        q, p = set(r["qry"].split()[1:]), set(r["pos_text"].split())
        assert 4 <= len(r["qry"].split()) - 1 <= 10 and q & p  # the positive repeats some of the query's words


def test_topic_pairs_cluster_where_random_words_do_not():
    """The default data: deterministic, unique, related pairs whose hashing vectors cluster, so an IVF index finds a
    query's exact top 10 in 2 of 64 lists far more often than on the random-word pairs (the worst case)."""
    import faiss
    import numpy as np

    from pipeline.config import TeacherConfig
    from pipeline.teachers.examples import HashingTeacher

    a = topic_pairs(4000, seed=1)
    assert a == topic_pairs(4000, seed=1) and a != topic_pairs(4000, seed=2)
    assert len({r["qry"] for r in a}) == len({r["id"] for r in a}) == 4000
    assert all(set(r["qry"].split()[1:]) & set(r["pos_text"].split()) for r in a)
    teacher = HashingTeacher(TeacherConfig(kind="custom", cls="pipeline.teachers.examples:HashingTeacher"))

    def recall(rows):
        x = teacher.embed([r["pos_text"] for r in rows], [None] * len(rows), "candidate")
        q = teacher.embed([r["qry"] for r in rows[:500]], [None] * 500, "query")
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        truth = flat.search(q, 10)[1]
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], 64, faiss.METRIC_INNER_PRODUCT)
        ivf.train(x)
        ivf.add(x)
        ivf.nprobe = 2
        got = ivf.search(q, 10)[1]
        return np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, got)])

    topics, words = recall(a), recall(random_word_pairs(4000, seed=1))
    assert topics > words + 0.25 and topics > 0.6, (topics, words)


def test_result_file_has_every_figure_per_size(result):
    assert set(result["runs"]) == {str(n) for n in SIZES} and result["machine"]["cpus"] >= 1
    for n in SIZES:
        r = result["runs"][str(n)]
        assert r["pairs"] == n and r["queries_written"] == n
        assert 50 < r["driver_peak_rss_mb"] < r["peak_tree_rss_mb"]  # the tree holds the driver and Ray's processes
        assert r["peak_tree_procs"] >= 4  # driver, raylet, GCS, at least one worker
        s = r["stages"]
        parts = s["read_s"] + s["embed_s"] + s["index_search_s"] + s["filter_sample_write_s"]
        assert 0 < parts <= s["mine_s"] * 1.01 and parts >= 0.8 * s["mine_s"]
        assert r["index_bytes"] >= n * 96 * 4  # every positive's 96-d vector is in the index
        assert r["cache_bytes_per_item"] > 48 * 4  # the actors wrote the vectors (the 48 text dims) and keys
        assert r["wall_per_pair_us"] == pytest.approx(s["mine_s"] / n * 1e6, rel=1e-3)
    c = result["checks"]
    assert (c["from_pairs"], c["to_pairs"]) == SIZES
    for key in ("driver_ok", "tree_ok", "wall_ok"):
        assert isinstance(c[key], bool)
    lo, hi = result["runs"][str(SIZES[0])], result["runs"][str(SIZES[1])]
    assert c["driver_peak_growth"] == pytest.approx(hi["driver_peak_rss_mb"] / lo["driver_peak_rss_mb"] - 1, abs=1e-3)
    text = table(list(result["runs"].values()), c)
    assert "driver peak growth" in text and f"{SIZES[1]:,}" in text


def test_simulation_spreads_work_over_nodes_but_not_training(result):
    c = costs({**result["runs"][str(SIZES[1])], "machine": result["machine"]}, 7000.0)
    one, many = simulate(100_000_000, 1, 1024, c), simulate(100_000_000, 8, 1024, c)
    for stage in ("read", "add", "recall_check", "search", "fsw", "embed"):  # cost measured as 0 stays 0
        assert many["hours"][stage] < one["hours"][stage] or one["hours"][stage] == 0
    assert many["hours"]["train_in_driver"] == pytest.approx(one["hours"]["train_in_driver"], rel=0.5)
    assert many["memory_per_node_gb"] < one["memory_per_node_gb"]
    assert one["driver_today_gb"] == pytest.approx(100_000_000 * 7000 / 2**30, rel=1e-2)
    # cache: every item's d float32 values plus the measured key/Parquet overhead
    wide = simulate(100_000_000, 8, 3584, c)
    assert wide["cache_gb"] == pytest.approx(2e8 * (4 * 3584 + c["cache_overhead_per_item"]) / 2**30, rel=1e-3)
    # 100M x 3584 float32 (1.3 TB) does not fit half of one 256 GB node: a compressed index is chosen
    assert any(t in simulate(100_000_000, 1, 3584, c)["index"] for t in ("PQ", "SQ8"))
