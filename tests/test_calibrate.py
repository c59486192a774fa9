"""Calibration on synthetic scores with planted false negatives: thresholds recovered, intervals that cover."""
import numpy as np

from pipeline.calibrate import calibrate, estimate, filter_by_dataset
from pipeline.config import FilterConfig, SampleConfig
from pipeline.filters import KEPT, CandidateBlock, FilterContext
from pipeline.sample import query_keys

N_ITEMS = 100_000


def synthetic(nq, k, rng, planted, reviewed_share=1.0):
    """Queries over random candidate scores; `planted(scores, pos_score, pos_sims)` says which are true matches.
    A reviewed share of the queries has all its true matches in the blocklist (and a line saying it was reviewed)."""
    pos_score = rng.uniform(0.5, 0.9, nq).astype(np.float32)
    scores = -np.sort(-rng.uniform(0, 1, (nq, k)) * (pos_score[:, None] + 0.1), axis=1).astype(np.float32)
    pos_sims = rng.uniform(0.3, 1.0, (nq, k)).astype(np.float32)
    cand = rng.permutation(N_ITEMS - 10)[:nq * k].reshape(nq, k).astype(np.int64)
    block = CandidateBlock(cand, scores, pos_sims, pos_score, np.full(nq, N_ITEMS - 1), np.full(nq, N_ITEMS - 2),
                           np.full(nq, -1), np.arange(nq))
    truth = planted(scores, pos_score[:, None], pos_sims)
    reviewed = np.flatnonzero(rng.random(nq) < reviewed_share)
    r, c = np.nonzero(truth[reviewed])
    blocked = np.sort(reviewed[r] * N_ITEMS + cand[reviewed][r, c])
    ctx = FilterContext(np.zeros(0, np.int64), 1, np.zeros(N_ITEMS, np.int8), blocked, N_ITEMS, k)
    return block, ctx, truth, reviewed


def test_calibration_recovers_planted_thresholds():
    rng = np.random.default_rng(0)
    keys = query_keys([f"q{i}" for i in range(800)])
    sample = SampleConfig(n_negatives=4, strategy="top")
    # true matches are the near copies of the positive: cosine to it above 0.9
    block, ctx, truth, reviewed = synthetic(800, 30, rng, lambda s, p, ps: ps > 0.9)
    configs, report = calibrate(block, np.array(["a"] * 800), keys, ctx, FilterConfig(), sample, 0,
                                reviewed=reviewed)
    assert report["a"]["thresholds"] == {"min_rank": 0, "margin_rel": None, "margin_abs": None, "near_duplicate": 0.9}
    assert report["a"]["estimate"]["fn_rate"] == 0.0 and report["a"]["queries_full"] == 1.0
    assert report["a"]["evidence"]["blocklist"] == int(truth.sum())
    # true matches are those scored within 0.05 of the positive
    block, ctx, truth, reviewed = synthetic(800, 30, rng, lambda s, p, ps: s > p - 0.05)
    configs, report = calibrate(block, np.array(["a"] * 800), keys, ctx, FilterConfig(), sample, 0,
                                reviewed=reviewed)
    assert report["a"]["thresholds"] == {"min_rank": 0, "margin_rel": None, "margin_abs": 0.05, "near_duplicate": None}
    # the calibrated config, applied to every query, keeps no true match
    kept = filter_by_dataset(block, np.array(["a"] * 800), configs, ctx) == KEPT
    assert not (kept & truth).any()
    # the defaults (relative margin 0.05) leave true matches in: the estimate says so
    off = calibrate(block, np.array(["a"] * 800), keys, ctx, FilterConfig(calibrate="off"), sample, 0,
                    reviewed=reviewed)[1]["a"]
    assert off["thresholds"]["margin_rel"] == 0.05 and off["estimate"]["fn_rate"] > 0.05


def test_interval_covers_the_true_rate_in_repeated_draws():
    """95% intervals from 150 reviewed queries, clustered false negatives (each query its own FN probability)."""
    rng = np.random.default_rng(1)
    true_rate, covered = 0.04, 0
    for _ in range(200):
        p = rng.beta(0.5, 12.0, 150)  # mean 0.5 / 12.5 = 0.04
        fn = rng.binomial(4, p).astype(float)
        est = estimate(fn, np.full(150, 4.0))
        covered += est["low"] <= true_rate <= est["high"]
    assert covered >= 0.9 * 200


def test_interval_covers_the_truth_through_the_filters():
    """The same through calibrate(): the filters' survivors, the sample weights and the per-query evidence."""
    rng = np.random.default_rng(2)
    sample = SampleConfig(n_negatives=4, strategy="hardest")
    keys = query_keys([f"q{i}" for i in range(300)])
    hardness = lambda s, p, ps: rng.random(s.shape) < np.clip(3 * (s - p + 0.2), 0, 0.5)  # noqa: E731
    covered, truths = 0, []
    for draw in range(200):
        block, ctx, truth, reviewed = synthetic(300, 20, rng, hardness, reviewed_share=0.3)
        _, report = calibrate(block, np.array(["a"] * 300), keys, ctx, FilterConfig(calibrate="off"), sample,
                              draw, reviewed=reviewed)
        # the truth: the FN rate of the configured filters over all queries, reviewed or not
        cfg = FilterConfig()
        kept = filter_by_dataset(block, np.array(["a"] * 300), {"a": cfg}, ctx.__class__(
            ctx.item_groups, 1, ctx.item_modality, np.zeros(0, np.int64), N_ITEMS, 20)) == KEPT
        from pipeline.calibrate import selection_weights
        w = selection_weights(kept, block.scores, keys, sample, draw)
        truths.append((w * truth).sum() / w.sum())
        est = report["a"]["estimate"]
        covered += est["low"] <= truths[-1] <= est["high"]
    assert 0.02 < np.mean(truths) < 0.2
    assert covered >= 0.9 * 200


def test_settings_that_sample_nothing_are_never_chosen():
    """A rank window that leaves no candidate (min_rank past max_rank) has no estimate; calibration skips it."""
    rng = np.random.default_rng(4)
    block, ctx, truth, reviewed = synthetic(200, 6, rng, lambda s, p, ps: s > p - 0.05)
    keys = query_keys([f"q{i}" for i in range(200)])
    _, report = calibrate(block, np.array(["a"] * 200), keys, ctx, FilterConfig(max_rank=3), SampleConfig(), 0,
                          reviewed=reviewed)
    assert report["a"]["estimate"]["fn_rate"] is not None and report["a"]["thresholds"]["min_rank"] < 3
