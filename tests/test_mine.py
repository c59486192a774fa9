"""End to end on real embeddings: the offline all-MiniLM-L6-v2 teacher on real captions, Ray Data, FAISS."""
import json

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

from corpus import base_config, text_pairs, write_jsonl
from pipeline.cli import main as cli_main
from pipeline.config import config_from_dict
from pipeline.mine import RunMismatch, mine


def planted_corpus(tmp_path, n=120):
    """Real pairs plus, for query q0, an exact copy of its positive and a same-group near paraphrase."""
    pairs = text_pairs(n)
    q0 = pairs[0]
    pos = q0["pos_text"]
    candidates = [
        {"id": "copy", "text": "  " + pos.replace(" ", "  ") + " ", "dataset": "t2t", "group": "unrelated"},
        {"id": "same-group", "text": pos + " drawing", "dataset": "t2t", "group": q0["group"]},
    ]
    return (write_jsonl(tmp_path / "pairs.jsonl", pairs), write_jsonl(tmp_path / "cands.jsonl", candidates), pairs)


@pytest.fixture(scope="module")
def mined(ray_session, shared_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mined")
    pairs_path, cands_path, pairs = planted_corpus(tmp)
    raw = base_config(pairs_path, shared_cache, input={"candidates": str(cands_path)},
                      filters={"margin_rel": 0.05, "near_duplicate": 0.99, "min_rank": 0, "max_rank": 15})
    result = mine(config_from_dict(raw), tmp / "out")
    return result, pairs, raw, tmp


def test_planted_copy_and_same_group_item_never_come_back(mined):
    result, pairs, _, _ = mined
    shards = pd.read_parquet(result.epoch_dir)
    cands = pd.read_parquet(result.epoch_dir / "_candidates")
    q0 = shards.set_index("query_id").loc["q0"]
    # the copy differs only in whitespace: it is the positive itself (one item), so never its own negative
    from pipeline.read import item_id

    copy = "  " + q0.pos_text.replace(" ", "  ") + " "
    assert item_id(copy, "") == q0.pos_item_id
    norm = lambda t: " ".join(t.split())  # noqa: E731
    assert all(norm(t) != norm(row.pos_text) for _, row in shards.iterrows() for t in row.neg_text)
    assert not any("drawing" in t for t in q0.neg_text)
    c0 = cands.set_index("query_id").loc["q0"]
    verdicts = dict(zip(c0.cand_item_ids, c0.cand_verdicts))
    assert verdicts[q0.pos_item_id] == "same_as_positive"
    assert "same_group" in verdicts.values()  # the paraphrase was retrieved near the top, and dropped
    for _, row in shards.iterrows():
        assert row.pos_item_id not in set(row.neg_item_ids)
        assert row.qry_item_id not in set(row.neg_item_ids)


def test_negatives_respect_window_margin_and_groups(mined):
    result, pairs, _, _ = mined
    shards = pd.read_parquet(result.epoch_dir)
    groups = {p["id"]: p["group"] for p in pairs}
    pos_group = {}
    for p in pairs:
        pos_group.setdefault(p["pos_text"], set()).add(p["group"])
    assert (shards.num_negatives > 0).mean() > 0.9
    for _, row in shards.iterrows():
        assert all(0 <= r < 15 for r in row.neg_ranks)
        assert all(s <= 0.95 * row.pos_score + 1e-6 for s in row.neg_scores)
        assert list(row.neg_ranks) == sorted(row.neg_ranks)  # hardest first
        assert np.allclose(row.neg_rel_scores, np.array(row.neg_scores) / row.pos_score, atol=1e-5)
        for text in row.neg_text:
            assert groups[row.query_id] not in pos_group.get(text, set())
        assert row.shortfall == 4 - row.num_negatives


def test_every_query_is_accounted_for_and_stats_match_the_verdicts(mined):
    result, pairs, _, _ = mined
    stats = json.loads((result.epoch_dir / "_stats.json").read_text())
    shards = pd.read_parquet(result.epoch_dir)
    rejects = [json.loads(x) for x in (result.epoch_dir / "_rejects.jsonl").read_text().splitlines()]
    assert stats["queries_in"] == len(pairs) == stats["queries_written"] + stats["queries_rejected"]
    assert set(shards.query_id) | {r["query_id"] for r in rejects if r["kind"] == "query"} == {p["id"] for p in pairs}
    cands = pd.read_parquet(result.epoch_dir / "_candidates")
    counted = pd.Series(np.concatenate(cands.cand_verdicts.to_numpy())).value_counts().to_dict()
    for reason, n in stats["drops"].items():
        assert counted.get(reason, 0) == n
    assert counted["negative"] == shards.num_negatives.sum() == stats["negatives"]["total"]
    manifest = json.loads((result.epoch_dir / "_manifest.json").read_text())
    assert sum(f["rows"] for f in manifest["files"]) == len(shards)
    assert manifest["config"]["filters"]["max_rank"] == 15


def test_score_statistics_are_numpys_over_the_written_scores(mined):
    """The driver keeps no scores, yet `_stats.json` has np.quantile's exact quantiles and the mean of every score."""
    from pipeline.stats import HIST_EDGES, QUANTILES

    result = mined[0]
    stats = json.loads((result.epoch_dir / "_stats.json").read_text())
    assert len(json.loads((result.epoch_dir / "_manifest.json").read_text())["files"]) > 1
    shards = pd.read_parquet(result.epoch_dir)
    pos = shards.pos_score.to_numpy(np.float32)
    neg = np.concatenate(shards.neg_scores.to_list()).astype(np.float32)
    scores = {"pos": pos, "neg": neg, "margin": np.repeat(pos, shards.num_negatives) - neg}
    for name, values in scores.items():
        values = values.astype(np.float64)
        assert stats["scores"][name] == {
            "count": len(values), "mean": round(float(values.mean()), 5),
            "quantiles": {f"p{int(q * 100)}": round(float(np.quantile(values, q)), 5) for q in QUANTILES},
            "histogram": {"edges": HIST_EDGES.tolist(),
                          "counts": np.histogram(np.clip(values, -1, 1), bins=HIST_EDGES)[0].tolist()}}, name


def test_shards_load_without_conversion(mined):
    result, _, _, _ = mined
    import datasets

    table = pads.dataset(result.epoch_dir, format="parquet").to_table()
    frame = pd.read_parquet(result.epoch_dir)
    hf = datasets.load_dataset("parquet", data_files=str(result.epoch_dir / "part-*.parquet"), split="train")
    assert table.num_rows == len(frame) == len(hf)
    assert hf[0]["neg_text"] == list(frame.iloc[0].neg_text)
    assert hf.features["neg_scores"].feature.dtype == "float32"


def test_another_epoch_resamples_from_kept_candidates_reproducibly(mined):
    result, _, raw, tmp = mined
    cfg = config_from_dict({**raw, "sample": {"n_negatives": 4, "strategy": "uniform"}})
    out = result.out
    e1 = mine(cfg, out, epoch=1)
    e2 = mine(cfg, out, epoch=2)
    assert e1.reused_retrieval and e2.reused_retrieval
    a, b = pd.read_parquet(e1.epoch_dir), pd.read_parquet(e2.epoch_dir)
    differs = (a.neg_item_ids.map(tuple) != b.neg_item_ids.map(tuple)).mean()
    assert differs > 0.3
    first = (e1.epoch_dir / "part-00000.parquet").read_bytes()
    again = mine(cfg, out, epoch=1, overwrite=True)
    assert (again.epoch_dir / "part-00000.parquet").read_bytes() == first
    assert mine(cfg, out, epoch=1).skipped
    other = config_from_dict({**raw, "sample": {"n_negatives": 2}})
    with pytest.raises(RunMismatch, match="different filter, sampling or teacher config"):
        mine(other, out, epoch=1)
    changed = config_from_dict({**raw, "teacher": {**raw["teacher"], "query_prompt": "query: "}})
    with pytest.raises(RunMismatch, match="different input, teacher or index config"):
        mine(changed, out, epoch=0)


def test_runtime_keys_never_refuse_a_rerun_and_keys_that_change_results_do(mined):
    """KEY_CLASSES decides: `free` keys (batch sizes, threads, workers, progress) neither refuse nor redo a run."""
    result, _, raw, _ = mined
    runtime = ["teacher.batch_tokens=300", "teacher.batch_size=8", "index.threads=1", "index.search_clients=2",
               "index.num_shards=2", "embed.num_actors=1", "embed.num_blocks=3", "run.progress=true",
               "input.max_reject_fraction=0.9"]
    again = mine(config_from_dict(raw, runtime), result.out, epoch=0)
    assert again.skipped and again.epoch_dir == result.epoch_dir  # the epoch written is reused as it is
    later = mine(config_from_dict(raw, runtime), result.out, epoch=7)
    assert later.reused_retrieval and not later.skipped  # a new epoch re-samples the kept retrieval, no embedding
    assert later.stats["embed"] == result.stats["embed"]
    with pytest.raises(RunMismatch, match="different input, teacher or index config"):  # `run`: retrieval results
        mine(config_from_dict(raw, ["index.nprobe=8"]), result.out, epoch=0)
    with pytest.raises(RunMismatch, match="different filter, sampling or teacher config"):  # `epoch`: its output
        mine(config_from_dict(raw, ["filters.min_rank=1"]), result.out, epoch=0)
    with pytest.raises(RunMismatch, match="different filter, sampling or teacher config"):  # `retrieval`: vectors
        mine(config_from_dict(raw, ["teacher.dtype=bfloat16"]), result.out, epoch=0)


def test_second_run_embeds_nothing(mined, tmp_path):
    _, _, raw, _ = mined
    result = mine(config_from_dict(raw), tmp_path / "again")
    embed = result.stats["embed"]
    assert embed["candidates"]["embedded"] == 0 and embed["queries"]["embedded"] == 0
    assert embed["candidates"]["cached"] > 0


def test_same_bytes_with_one_or_two_actors_and_any_block_count(ray_session, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(80))
    digests = []
    for actors, blocks in ((1, 1), (2, 7)):
        raw = base_config(pairs, str(tmp_path / f"cache{actors}"),
                          embed={"num_actors": actors, "num_blocks": blocks, "cpus_per_actor": 0.5},
                          teacher={"batch_size": 16}, run={"executor": "ray"})
        result = mine(config_from_dict(raw), tmp_path / f"out{actors}")
        assert result.stats["embed"]["candidates"]["actors"] == actors
        manifest = json.loads((result.epoch_dir / "_manifest.json").read_text())
        digests.append([f["sha256"] for f in manifest["files"]])
    assert digests[0] == digests[1]


def test_token_budget_changes_the_batches_not_the_negatives(mined, tmp_path):
    result, _, raw, _ = mined
    budget = mine(config_from_dict({**raw, "teacher": {**raw["teacher"], "batch_tokens": 300},
                                    "embed": {**raw.get("embed", {}), "cache_dir": str(tmp_path / "cache")}}),
                  tmp_path / "budget")
    stats, plain = budget.stats["embed"]["candidates"], result.stats["embed"]["candidates"]
    assert stats["embedded"] == plain["embedded"] + plain["cached"] and stats["batch_tokens"] == 300
    assert stats["batches"] > -(-stats["embedded"] // stats["batch_size"])  # long captions went in smaller batches
    a = pd.read_parquet(result.epoch_dir).set_index("query_id").sort_index()
    b = pd.read_parquet(budget.epoch_dir).set_index("query_id").sort_index()
    assert [list(x) for x in a["neg_item_ids"]] == [list(x) for x in b["neg_item_ids"]]
    np.testing.assert_allclose(np.concatenate(a["neg_scores"].to_numpy()), np.concatenate(b["neg_scores"].to_numpy()),
                               atol=1e-5)


def test_too_few_negatives_go_to_rejects_when_asked(mined, tmp_path):
    _, pairs, raw, _ = mined
    strict = {**raw, "filters": {**raw["filters"], "max_rank": 3},
              "sample": {"n_negatives": 3, "min_negatives": 3, "on_shortfall": "reject"}}
    result = mine(config_from_dict(strict), tmp_path / "strict")
    stats = result.stats
    assert stats["rejects_by_reason"].get("too_few_negatives", 0) > 0
    assert stats["queries_written"] + stats["queries_rejected"] == len(pairs)
    assert (pd.read_parquet(result.epoch_dir).num_negatives >= 3).all()


def test_cli_mines_and_reports(mined, tmp_path, capsys):
    _, _, raw, _ = mined
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["mine", "--config", str(path), "--out", str(tmp_path / "cli"), "--set", "sample.n_negatives=2"]) == 0
    out = capsys.readouterr().out
    assert "negatives per query" in out and "dropped candidates" in out and "epoch=0000/part-*.parquet" in out
    assert pd.read_parquet(tmp_path / "cli" / "epoch=0000").num_negatives.max() == 2
    assert cli_main(["mine", "--config", str(path), "--out", str(tmp_path / "cli"), "--set", "sample.strategy=best"]) == 2
    assert "sample.strategy: 'best' is not allowed" in capsys.readouterr().err
