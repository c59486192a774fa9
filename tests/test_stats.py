"""`_stats.json` score statistics from block histograms: np.quantile's values, whatever the blocks."""
import json

import numpy as np
import pytest

from pipeline.stats import HIST_EDGES, QUANTILES, ScoreStats, _keys


def expected(values: np.ndarray) -> dict:
    """What `_stats.json` said when the driver kept every score: numpy over all of them at once."""
    values = values.astype(np.float64)
    return {"count": len(values), "mean": round(float(values.mean()), 5),
            "quantiles": {f"p{int(q * 100)}": round(float(np.quantile(values, q)), 5) for q in QUANTILES},
            "histogram": {"edges": HIST_EDGES.tolist(),
                          "counts": np.histogram(np.clip(values, -1, 1), bins=HIST_EDGES)[0].tolist()}}


def from_blocks(blocks: list[np.ndarray]) -> dict:
    """Pass 1 per block, merged; pass 2 per block over the wanted bins, merged (as write_epoch does)."""
    total = ScoreStats()
    for block in blocks:
        part = ScoreStats()
        part.add(block)
        total.merge(part)
    wanted = total.wanted()
    for block in blocks:
        keys = _keys(block[~np.isnan(block)])
        total.add_found(np.unique(keys[np.isin(keys >> 16, wanted)], return_counts=True))
    return total.describe()


@pytest.mark.parametrize("seed", range(40))
def test_quantiles_and_mean_are_numpys_for_any_blocks(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 2, 3, 7, 100, 2000]))
    kind = seed % 4
    values = (rng.normal(0.4, 0.2, n) if kind == 0 else rng.choice([0.1, 0.5, -0.3, 0.25], n) if kind == 1
              else rng.uniform(-2, 2, n) if kind == 2 else rng.normal(0, 1e-3, n) * 10.0 ** -rng.integers(0, 30))
    values = values.astype(np.float32)
    blocks = np.split(values, np.sort(rng.integers(0, n + 1, rng.integers(0, 6))))
    assert from_blocks(blocks) == expected(values)


def test_nan_and_infinite_scores_give_numpys_answer():
    values = np.array([0.2, np.inf, -0.5, 0.1], np.float32)  # the top quantiles interpolate inf - inf: NaN
    assert json.dumps(from_blocks([values[:1], values[1:]])) == json.dumps(expected(values))
    got = from_blocks([np.array([0.2, np.nan], np.float32), np.array([0.3], np.float32)])
    assert np.isnan(got["mean"]) and all(np.isnan(v) for v in got["quantiles"].values())
    assert ScoreStats().describe() == {"count": 0}


def _by_dataset(spec):
    """A block of `positive_score_caps`: {dataset: its scores} of one (datasets, scores) pair."""
    datasets, scores = spec
    return {str(ds): scores[datasets == ds] for ds in np.unique(datasets)}


@pytest.mark.parametrize("seed", range(30))
def test_positive_score_caps_are_score_caps_floats_for_any_blocks(seed):
    """The per-dataset cap from block histograms is the float score_cap gives on every score at once (what the
    driver computed when it held them): ties, infinities and NaN (left out), one score, none finite."""
    from pipeline.calibrate import POSITIVE_QUANTILE, score_cap
    from pipeline.stats import positive_score_caps

    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 2, 5, 300, 3000]))
    values = (rng.normal(0.6, 0.1, n) if seed % 3 == 0 else rng.choice([0.5, 0.7, 0.25, np.inf, np.nan], n)
              if seed % 3 == 1 else rng.uniform(-1, 1, n)).astype(np.float32)
    datasets = rng.choice(["a", "b", "c"], n)
    if seed % 5 == 0:
        values[datasets == "c"] = np.nan
    cuts = np.sort(rng.integers(0, n + 1, rng.integers(0, 6)))
    blocks = [(d, v) for d, v in zip(np.split(datasets, cuts), np.split(values, cuts)) if len(d)]
    quantiles = [q for q in POSITIVE_QUANTILE if q is not None] + [float(rng.uniform(0.01, 0.99))]
    caps = positive_score_caps(blocks, _by_dataset, quantiles, use_ray=False)
    assert set(caps) == set(np.unique(datasets))
    for ds in caps:
        assert caps[ds] == {q: score_cap(q, values[datasets == ds]) for q in quantiles}
    assert positive_score_caps(blocks, _by_dataset, [], use_ray=False) == {}
