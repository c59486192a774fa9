"""False negatives end to end on real mining runs: multi-positive rows, deepening, calibration and its report."""
import json

import numpy as np
import pandas as pd

from corpus import base_config, text_pairs, write_jsonl
from pipeline.config import config_from_dict
from pipeline.mine import mine


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
