"""benchmarks/recall_ties.py: the tolerant recall it compares with exact recall, on a small clustered pool."""
import numpy as np

from benchmarks.recall_ties import growth, sweep, tolerant_recall


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_tolerant_recall_counts_near_ties_of_the_kth_score():
    scores = np.array([[0.9, 0.80, 0.695], [0.5, 0.4, 0.3]], np.float32)
    kth = np.array([0.7, 0.3], np.float32)
    assert tolerant_recall(scores, kth, 0.0) == 5 / 6  # 0.695 is below the k-th score
    assert tolerant_recall(scores, kth, 0.01) == 1.0  # ... but within 0.01 of it


def test_sweep_meets_each_floor_no_later_than_exact_recall():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    pool = _unit(centres[rng.integers(0, 20, 4000)] + 0.6 * rng.normal(size=(4000, 32)))
    queries = _unit(centres[rng.integers(0, 20, 100)] + 0.6 * rng.normal(size=(100, 32)))
    r = sweep(pool, queries, k=10, floor=0.9)
    for t in r["trials"]:
        assert t["exact"] <= t["tol 0.002"] <= t["tol 0.005"] <= t["tol 0.01"] + 1e-9
    assert [t["nprobe"] for t in r["trials"]] == sorted(t["nprobe"] for t in r["trials"])
    exact = r["at_floor"]["exact"]["nprobe"]
    assert all(v["nprobe"] <= exact for v in r["at_floor"].values())
    g = growth({"4000": r, "8000": r})
    assert g["exact"] == {"4000": 1.0, "8000": 1.0}
