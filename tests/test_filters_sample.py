"""Filters and sampling as plain functions over numpy arrays."""
import numpy as np

from pipeline.config import FilterConfig, SampleConfig
from pipeline.filters import KEPT, PAD, REASONS, CandidateBlock, FilterContext, count_drops, filter_candidates
from pipeline.sample import query_keys, sample_negatives


def reason(name):
    return REASONS.index(name) + 1


def block(cand, scores, pos_sims=None, pos_score=0.8, qry=100, pos=101, group=-1):
    cand = np.array([cand])
    scores = np.array([scores], np.float32)
    sims = np.zeros_like(scores) if pos_sims is None else np.array([pos_sims], np.float32)
    return CandidateBlock(cand, scores, sims, np.array([pos_score], np.float32), np.array([qry]), np.array([pos]),
                          np.array([group]), np.array([0]))


def ctx(k=6, groups=(), n_groups=1, modality=None, blocked=()):
    mod = np.zeros(200, np.int8) if modality is None else modality
    return FilterContext(np.array(sorted(groups), np.int64), n_groups, mod, np.array(sorted(blocked), np.int64),
                         200, k)


def test_each_filter_drops_what_it_names():
    b = block([101, 100, 7, 8, 9, -1], [0.9, 0.85, 0.5, 0.3, 0.79, -np.inf], pos_sims=[1, 0, 0.99, 0, 0, 0])
    v = filter_candidates(b, FilterConfig(near_duplicate=0.98, margin_rel=0.05), ctx())
    assert v[0].tolist() == [reason("same_as_positive"), reason("same_as_query"), reason("near_duplicate"), KEPT,
                             reason("margin_rel"), PAD]
    assert count_drops(v) == {**dict.fromkeys(REASONS, 0), "same_as_positive": 1, "same_as_query": 1,
                              "near_duplicate": 1, "margin_rel": 1}


def test_margins_windows_bounds_groups_modality_blocklist():
    scores = [0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    cand = [10, 11, 12, 13, 14, 15]
    f = FilterConfig(margin_rel=None, near_duplicate=None, margin_abs=0.15)
    assert filter_candidates(block(cand, scores), f, ctx())[0].tolist()[:2] == [reason("margin_abs"), KEPT]
    f = FilterConfig(margin_rel=None, near_duplicate=None, min_rank=1, max_rank=4)
    assert filter_candidates(block(cand, scores), f, ctx())[0].tolist() == [reason("rank_window"), 0, 0, 0,
                                                                           reason("rank_window"), reason("rank_window")]
    f = FilterConfig(margin_rel=None, near_duplicate=None, min_score=0.35, max_score=0.65)
    assert filter_candidates(block(cand, scores), f, ctx())[0].tolist() == [reason("score_bounds"), 0, 0, 0,
                                                                           reason("score_bounds"), reason("score_bounds")]
    # candidate 12 shares group 3 with the query (codes are item * n_groups + group)
    f = FilterConfig(margin_rel=None, near_duplicate=None)
    v = filter_candidates(block(cand, scores, group=3), f, ctx(groups=[12 * 5 + 3, 13 * 5 + 1], n_groups=5))
    assert v[0].tolist() == [0, 0, reason("same_group"), 0, 0, 0]
    modality = np.zeros(200, np.int8)
    modality[[11, 101]] = 1
    v = filter_candidates(block(cand, scores), FilterConfig(margin_rel=None, near_duplicate=None, modality=True),
                          ctx(modality=modality))
    assert v[0].tolist() == [reason("modality"), 0] + [reason("modality")] * 4
    v = filter_candidates(block(cand, scores), f, ctx(blocked=[0 * 200 + 14]))
    assert v[0].tolist() == [0, 0, 0, 0, reason("blocklist"), 0]


def test_first_reason_wins():
    b = block([101, 5], [0.95, 0.1], pos_sims=[1.0, 0])
    v = filter_candidates(b, FilterConfig(near_duplicate=0.5, margin_rel=0.05), ctx(k=2))
    assert v[0].tolist() == [reason("same_as_positive"), KEPT]


def test_top_takes_the_hardest_survivors_in_rank_order():
    verdict = np.array([[1, 0, 0, 4, 0, 0]], np.int8)
    chosen = sample_negatives(verdict, np.zeros((1, 6)), query_keys(["q"]), SampleConfig(n_negatives=3, strategy="top"), 0)
    assert chosen.tolist() == [[1, 2, 4]]
    chosen = sample_negatives(verdict, np.zeros((1, 6)), query_keys(["q"]), SampleConfig(n_negatives=5, strategy="top"), 0)
    assert chosen.tolist() == [[1, 2, 4, 5, -1]]


def test_random_sampling_depends_on_seed_epoch_and_query_only():
    rng = np.random.default_rng(0)
    verdict = np.zeros((50, 30), np.int8)
    scores = np.sort(rng.random((50, 30)))[:, ::-1]
    ids = [f"q{i}" for i in range(50)]
    cfg = SampleConfig(n_negatives=4, strategy="uniform", seed=7)
    a = sample_negatives(verdict, scores, query_keys(ids), cfg, epoch=1)
    # the same queries in another order and split into other blocks give the same rows
    perm = rng.permutation(50)
    parts = [sample_negatives(verdict[perm[i:i + 7]], scores[perm[i:i + 7]], query_keys([ids[j] for j in perm[i:i + 7]]),
                              cfg, epoch=1) for i in range(0, 50, 7)]
    b = np.empty_like(a)
    b[perm] = np.concatenate(parts)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sample_negatives(verdict, scores, query_keys(ids), cfg, epoch=2))
    assert not np.array_equal(a, sample_negatives(verdict, scores, query_keys(ids), SampleConfig(
        n_negatives=4, strategy="uniform", seed=8), epoch=1))
    assert all(len(set(row)) == 4 for row in a.tolist())  # without replacement


def test_weighted_prefers_high_scores_and_uniform_does_not():
    verdict = np.zeros((4000, 10), np.int8)
    scores = np.tile(np.linspace(0.9, 0.0, 10), (4000, 1))
    keys = query_keys([str(i) for i in range(4000)])
    w = sample_negatives(verdict, scores, keys, SampleConfig(n_negatives=1, strategy="weighted", temperature=0.1), 0)
    u = sample_negatives(verdict, scores, keys, SampleConfig(n_negatives=1, strategy="uniform"), 0)
    w_hist, u_hist = np.bincount(w.ravel(), minlength=10) / 4000, np.bincount(u.ravel(), minlength=10) / 4000
    expected = np.exp(scores[0] / 0.1) / np.exp(scores[0] / 0.1).sum()
    assert np.abs(w_hist - expected).max() < 0.03
    assert np.abs(u_hist - 0.1).max() < 0.03


def test_relative_margin_is_sign_safe():
    """s_neg > s_pos - |s_pos| * m: with a negative positive score, a candidate above the positive is dropped."""
    f = FilterConfig(margin_rel=0.1, near_duplicate=None)
    v = filter_candidates(block([10, 11, 12], [-0.1, -0.2, -0.25], pos_score=-0.2), f, ctx(k=3))
    # threshold -0.2 - 0.02 = -0.22: -0.1 and -0.2 are at or above the positive, -0.25 is a fair negative
    assert v[0].tolist() == [reason("margin_rel"), reason("margin_rel"), KEPT]
    v = filter_candidates(block([10, 11, 12], [0.9, 0.75, 0.7], pos_score=0.8), f, ctx(k=3))
    assert v[0].tolist() == [reason("margin_rel"), reason("margin_rel"), KEPT]  # 0.72 threshold, as before


def test_rows_with_the_same_query_share_positives():
    from pipeline.filters import query_positives
    # rows 0 and 1 ask the same query (item 100) with positives 101 and 102; row 2 asks another query (item 50)
    positives = query_positives(np.array([100, 100, 50]), np.array([101, 102, 103]), 200)
    c = FilterContext(np.zeros(0, np.int64), 1, np.zeros(200, np.int8), np.zeros(0, np.int64), 200, 3, positives)
    b = CandidateBlock(np.array([[102, 103, 7], [101, 102, 7], [101, 102, 7]]), np.full((3, 3), 0.1, np.float32),
                       np.zeros((3, 3), np.float32), np.full(3, 0.8, np.float32), np.array([100, 100, 50]),
                       np.array([101, 102, 103]), np.full(3, -1), np.arange(3))
    f = FilterConfig(margin_rel=None, near_duplicate=None)
    v = filter_candidates(b, f, c)
    assert v.tolist() == [[reason("other_positive"), KEPT, KEPT],
                          [reason("other_positive"), reason("same_as_positive"), KEPT],
                          [KEPT, KEPT, KEPT]]
    f.other_positive = False
    assert filter_candidates(b, f, c)[0].tolist() == [KEPT, KEPT, KEPT]


def test_hardest_gives_each_epoch_another_sample_among_the_hardest():
    verdict = np.zeros((200, 30), np.int8)
    verdict[:, 3] = reason("margin_rel")
    scores = np.sort(np.random.default_rng(1).random((200, 30)))[:, ::-1]
    keys = query_keys([f"q{i}" for i in range(200)])
    cfg = SampleConfig(n_negatives=4, strategy="hardest", hardest_pool=2.0)
    e0, e1 = (sample_negatives(verdict, scores, keys, cfg, epoch) for epoch in (0, 1))
    # only the 8 hardest survivors (ranks 0-2 and 4-8) can be drawn, hardest first, never a dropped one
    assert set(np.unique(e0)) <= {0, 1, 2, 4, 5, 6, 7, 8} and (np.diff(e0, axis=1) > 0).all()
    assert (e0 != e1).any(axis=1).mean() > 0.9  # another sample for (nearly) every query
    assert (sample_negatives(verdict, scores, keys, cfg, 0) == e0).all()
    # a query with at most n survivors gets all of them
    few = np.full((1, 30), reason("rank_window"), np.int8)
    few[0, [2, 5, 9]] = KEPT
    assert sample_negatives(few, scores[:1], keys[:1], cfg, 3).tolist() == [[2, 5, 9, -1]]


def test_margin_cap_floor_and_fallback():
    """`floor`: drop only above both the cap and the query's own margin; `fallback`: a query the margin would empty
    is filtered as if without it (the cap still applies); `either` (default): above either."""
    scores, cand = [0.75, 0.65, 0.55, 0.45], [10, 11, 12, 13]
    cap = dict(max_score=0.6, margin_rel=0.1, near_duplicate=None)
    high, low = block(cand, scores, pos_score=0.9), block(cand, scores, pos_score=0.4)  # limits 0.81 and 0.36
    either = FilterConfig(**cap)
    assert filter_candidates(high, either, ctx(k=4))[0].tolist() == [reason("score_bounds")] * 2 + [KEPT] * 2
    assert filter_candidates(low, either, ctx(k=4))[0].tolist() == [reason("score_bounds")] * 2 + [
        reason("margin_rel")] * 2
    floor = FilterConfig(**cap, margin_cap="floor")
    assert filter_candidates(high, floor, ctx(k=4))[0].tolist() == [KEPT] * 4           # its own margin: 0.81
    assert filter_candidates(low, floor, ctx(k=4))[0].tolist() == [reason("margin_rel")] * 2 + [KEPT] * 2  # cap
    no_cap = FilterConfig(margin_rel=0.1, near_duplicate=None, margin_cap="floor")  # no cap: the margin alone
    assert filter_candidates(low, no_cap, ctx(k=4))[0].tolist() == [reason("margin_rel")] * 4
    fallback = FilterConfig(**cap, margin_cap="fallback")
    both = np.concatenate  # two queries in one block: only the emptied one falls back
    two = CandidateBlock(*(both([getattr(high, f), getattr(low, f)]) for f in
                           ("cand", "scores", "pos_sims", "pos_score", "qry_idx", "pos_idx", "group_code",
                            "query_row")))
    assert filter_candidates(two, fallback, ctx(k=4)).tolist() == [
        [reason("score_bounds")] * 2 + [KEPT] * 2, [reason("score_bounds")] * 2 + [KEPT] * 2]
    assert filter_candidates(two, either, ctx(k=4))[1].tolist() == [reason("score_bounds")] * 2 + [
        reason("margin_rel")] * 2
