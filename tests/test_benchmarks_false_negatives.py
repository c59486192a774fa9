"""The bounds benchmarks/false_negatives.py prints beside the tools: the label oracle and the pair-graph closure."""
import numpy as np
import pandas as pd

from benchmarks.false_negatives import N_NEG, key, oracle, pair_closure


def world(nq=20):
    """nq queries, each with 3 true matches scored 0.9 / 0.8 / 0.7 above 10 true negatives scored 0.6 ... 0.15."""
    rows, items, ids, scores = [], {}, [], []
    labels = {}
    for q in range(nq):
        rows.append({"id": f"q{q}", "qry": f"query {q}", "pos_text": f"match {q} 0", "truth": f"t{q}"})
        cand, sc = [], []
        for j, s in enumerate((0.9, 0.8, 0.7)):
            items[f"m{q}-{j}"] = f"match {q} {j}"
            labels[key(f"match {q} {j}")] = {f"t{q}"}
            cand.append(f"m{q}-{j}"), sc.append(s)
        for j in range(10):
            items[f"n{q}-{j}"] = f"other {q} {j}"
            cand.append(f"n{q}-{j}"), sc.append(0.6 - 0.05 * j)
        ids.append(cand), scores.append(sc)
    return rows, pd.DataFrame({"query_id": [r["id"] for r in rows], "cand_item_ids": ids, "cand_scores": scores}), \
        items, labels


def test_oracle_drops_exactly_the_true_matches_and_spends_its_budget_where_it_gains_most():
    rows, cand, items, labels = world()
    exact = oracle(rows, cand, items, labels)
    assert exact["measured_fn_rate"] == 0 and exact["queries_full"] == 20
    assert np.isclose(exact["mean_neg_score"], np.mean([0.6, 0.55, 0.5, 0.45, 0.4]))
    # 1% of 100 negatives: one true match (0.9) takes the place of the lowest kept negative (0.4)
    one = oracle(rows, cand, items, labels, fn_budget=0.01)
    assert one["measured_fn_rate"] == 0.01 and np.isclose(one["mean_neg_score"], exact["mean_neg_score"] + 0.5 / 100)
    # 10%: every gain of 0.5 (the first match of 20 queries) comes before any second match (0.8 for 0.45: 0.35)
    ten = oracle(rows, cand, items, labels, fn_budget=0.1)
    assert ten["measured_fn_rate"] == 0.1 and np.isclose(ten["mean_neg_score"], exact["mean_neg_score"] + 0.05)
    assert oracle(rows, cand, items, labels, only={"q0", "q1"})["queries"] == 2 and N_NEG == 5


def test_pair_closure_drops_what_a_chain_of_pairs_links_to_the_query():
    rows, cand, items, labels = world(3)
    # chain: query 0 -> match 0 0 (its positive); a row asking "match 0 0" with positive "match 0 1"; and one asking
    # "match 0 1" with "match 0 2": all three matches of query 0 are linked to it, none of another query's
    rows += [{"id": "x1", "qry": "match 0 0", "pos_text": "match 0 1", "truth": "t0"},
             {"id": "x2", "qry": "match 0 1", "pos_text": "match 0 2", "truth": "t0"}]
    got = pair_closure(rows, cand, items, labels, only={"q0"})
    assert got["measured_fn_rate"] == 0 and got["queries_full"] == 1
    assert np.isclose(got["mean_neg_score"], np.mean([0.6, 0.55, 0.5, 0.45, 0.4]))
    # query 1's matches 1 and 2 are linked to nothing: they stay and are sampled (2 of its 5 negatives)
    assert pair_closure(rows, cand, items, labels, only={"q1"})["measured_fn_rate"] == 0.4


def test_a_variant_sets_filters_and_dotted_keys_other_sections(tmp_path):
    from benchmarks.false_negatives import variant_config
    from pipeline.config import RetrieveConfig

    cfg, own = variant_config(tmp_path / "p.jsonl", None, tmp_path / "c", {"margin_rel": 0.05})
    assert cfg.filters.margin_rel == 0.05 and cfg.retrieve.deepen_factor == RetrieveConfig().deepen_factor and not own
    cfg, own = variant_config(tmp_path / "p.jsonl", None, tmp_path / "c",
                              {"positive_quantile": None, "retrieve.deepen_factor": 64})
    assert cfg.filters.positive_quantile is None and cfg.retrieve.deepen_factor == 64 and own
