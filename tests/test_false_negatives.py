"""False negatives end to end on real mining runs: multi-positive rows, deepening, calibration and its report."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from corpus import base_config, text_pairs, write_jsonl
from pipeline.config import config_from_dict
from pipeline.mine import mine
from pipeline.stats import EpochStats


def test_short_queries_are_retrieved_deeper(ray_session, shared_cache, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(120))
    raw = base_config(pairs, shared_cache, retrieve={"top_k": 6}, sample={"n_negatives": 4, "strategy": "top"})
    flat = mine(config_from_dict({**raw, "retrieve": {"top_k": 6, "deepen_factor": 1}}), tmp_path / "flat")
    deep = mine(config_from_dict({**raw, "retrieve": {"top_k": 6, "deepen_factor": 4}}), tmp_path / "deep")
    assert flat.stats["shortfall_queries"] > 0 and "deepened" not in flat.stats["retrieval"]["t2t"]
    counted = deep.stats["retrieval"]["t2t"]["deepened"]
    assert counted["queries"] > 0 and set(counted["by_k"]) <= {"12", "24"}
    assert deep.stats["shortfall_queries"] < flat.stats["shortfall_queries"]
    f = pd.read_parquet(flat.epoch_dir).set_index("query_id")
    d = pd.read_parquet(deep.epoch_dir).set_index("query_id").loc[f.index]
    went_deep = d.neg_ranks.map(lambda r: len(r) > 0 and max(r) >= 6)
    assert went_deep.sum() > 0
    # only queries that were short are retrieved again; the others keep exactly their negatives
    assert (f.num_negatives[went_deep] < 4).all()
    full = f.num_negatives == 4
    assert (f.neg_item_ids[full].map(tuple) == d.neg_item_ids[full].map(tuple)).all()


def multi_positive_pairs(n):
    """text_pairs plus, for every 10th query, a second row asking the same query with another positive."""
    rows = text_pairs(n)
    extra = [{**rows[i], "id": f"{rows[i]['id']}-b", "pos_text": rows[i + 1]["pos_text"]} for i in range(0, n - 1, 10)]
    return rows + extra


@pytest.fixture(scope="module")
def calibrated(ray_session, shared_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibrated")
    pairs = write_jsonl(tmp / "pairs.jsonl", multi_positive_pairs(120))
    raw = base_config(pairs, shared_cache, sample={"n_negatives": 4})
    return raw, tmp, mine(config_from_dict(raw), tmp / "out")


def test_another_rows_positive_is_never_a_negative(calibrated):
    raw, tmp, result = calibrated
    df = pd.read_parquet(result.epoch_dir)
    positives = df.groupby("qry").pos_item_id.agg(set)
    assert (positives.map(len) > 1).sum() >= 12
    for qry, negs in zip(df.qry, df.neg_item_ids):
        assert not positives[qry] & set(negs)
    assert result.stats["drops"]["other_positive"] > 0


def test_group_evidence_calibrates_and_the_estimate_is_reported(calibrated):
    raw, tmp, result = calibrated
    stats = json.loads((result.epoch_dir / "_stats.json").read_text())
    fn = stats["false_negatives"]
    t2t = fn["per_dataset"]["t2t"]
    assert fn["calibrate"] == "auto" and fn["target_fn_rate"] == 0.01 and t2t["calibrated"]
    assert t2t["evidence"]["group"] > 0 and t2t["evidence"]["multi_positive"] > 0
    est = t2t["estimate"]
    assert est["pairs"] > 0 and est["low"] <= est["fn_rate"] <= est["high"]
    assert t2t["curve"] and all(p["fn_rate"] is not None for p in t2t["curve"])
    assert set(t2t["thresholds"]) == {"min_rank", "positive_quantile", "margin_rel", "margin_abs", "near_duplicate"}
    # the chosen thresholds are the ones the run used: its manifest keeps the configured ones, the stats the chosen
    assert "estimated FN rate" in EpochStats.summary_text(stats)
    # the inspector's statistics page and `hardneg report` draw the trade-off curve
    from pipeline.inspector import report
    html = report.build(tmp / "out")
    assert "False negatives, t2t" in html and "estimated false-negative rate (%)" in html


def test_without_evidence_the_summary_says_so_and_defaults_apply(ray_session, shared_cache, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "group"} for r in text_pairs(60)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    raw = base_config(pairs, shared_cache)
    raw["input"].pop("group_key")
    result = mine(config_from_dict(raw), tmp_path / "out")
    t2t = result.stats["false_negatives"]["per_dataset"]["t2t"]
    assert t2t["evidence"] is None and not t2t["calibrated"]
    assert t2t["thresholds"] == {"min_rank": 0, "positive_quantile": 0.5, "margin_rel": None, "margin_abs": None,
                                 "near_duplicate": 0.98}
    assert "no evidence of false negatives" in EpochStats.summary_text(result.stats)
    # the data's own evidence still applies: no negative scores above the median query-positive score
    df = pd.read_parquet(result.epoch_dir)
    cap = float(np.float32(np.median(df.pos_score.astype("float64"))))
    assert t2t["score_cap"] == pytest.approx(cap, abs=1e-6)
    assert df.neg_scores.map(lambda s: len(s) == 0 or max(s) <= cap + 1e-6).all()
    assert (df.num_negatives == 4).mean() >= 0.99
    cands = pd.read_parquet(result.epoch_dir / "_candidates")
    above = [v for sc, vs in zip(cands.cand_scores, cands.cand_verdicts) for x, v in zip(sc, vs) if x > cap + 1e-6]
    assert set(above) <= {"same_as_query", "same_as_positive", "other_positive", "score_bounds"}


def test_marks_are_evidence_and_calibration_is_deterministic(calibrated, shared_cache):
    raw, tmp, first = calibrated
    out = tmp / "marked"
    mine(config_from_dict(raw), out)
    df = pd.read_parquet(out / "epoch=0000").set_index("query_id")
    with open(out / "blocklist.jsonl", "w") as f:
        for qid in ["q3", "q7", "q11"]:
            f.write(json.dumps({"query_id": qid, "item_id": df.loc[qid].neg_item_ids[0]}) + "\n")
        f.write(json.dumps({"query_id": "q5", "item_id": None}) + "\n")  # reviewed, nothing to mark
    marked = mine(config_from_dict(raw), out, epoch=1)
    ev = marked.stats["false_negatives"]["per_dataset"]["t2t"]["evidence"]
    assert ev["blocklist"] == 3
    # the same epoch written in shards of another size (another partitioning): the same bytes of statistics
    (tmp / "again").mkdir()
    shutil.copyfile(out / "blocklist.jsonl", tmp / "again" / "blocklist.jsonl")
    again = mine(config_from_dict({**raw, "output": {"rows_per_shard": 1000}}), tmp / "again", epoch=1)
    assert again.stats["false_negatives"] == marked.stats["false_negatives"]
    a = pd.read_parquet(again.epoch_dir).set_index("query_id").sort_index()
    b = pd.read_parquet(marked.epoch_dir).set_index("query_id").sort_index()
    assert (a.neg_item_ids.map(tuple) == b.neg_item_ids.map(tuple)).all()


def test_relabel_writes_known_true_matches_as_extra_positives(calibrated):
    """filters.relabel: other rows' positives and group members become extra positives; the training dataset reads
    them (the EGA side: tests/test_train_ega.py)."""
    from pipeline.train.dataset import ShardDataset

    raw, tmp, plain = calibrated
    assert "pos_extra_text" not in pd.read_parquet(plain.epoch_dir).columns  # off by default
    result = mine(config_from_dict({**raw, "filters": {"relabel": True}}), tmp / "relabel")
    df = pd.read_parquet(result.epoch_dir)
    cands = pd.read_parquet(result.epoch_dir / "_candidates").set_index("query_id")
    for row in df.itertuples():
        c = cands.loc[row.query_id]
        known = [i for i, v in zip(c.cand_item_ids, c.cand_verdicts) if v in ("other_positive", "same_group")]
        assert list(row.pos_extra_item_ids) == known and len(row.pos_extra_text) == len(known)
    positives = df.groupby("qry").pos_item_id.agg(set)
    twice = df[df.qry.map(positives.map(len)) > 1]
    assert any(positives[r.qry] - {r.pos_item_id} <= set(r.pos_extra_item_ids) for r in twice.itertuples())
    rows = [r for r in ShardDataset(tmp / "relabel", 0, k=4)]
    assert sum(len(r["pos_extra_text"]) for r in rows) == df.pos_extra_text.map(len).sum() > 0
