"""Shard datasets: disjoint, complete splits over DDP ranks and loader workers; seeded shuffles; short rows counted."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.train.dataset import IterableShardDataset, ShardDataset, collate_rows
from pipeline.write import CANDIDATE_SCHEMA as CAND_SCHEMA
from pipeline.write import TRAIN_SCHEMA as SCHEMA

def hid(name: str) -> str:
    """A 32-hex content id for a test item."""
    import hashlib
    return hashlib.blake2b(name.encode(), digest_size=16).hexdigest()


def write_run(out, epoch=0, n=50, rows_per_shard=12, k=4, short_every=0, blocklist=(), verdicts=None):
    """An epoch folder in the documented layout: query i's positive is item p{i}, its negatives p{i+1..}."""
    folder = out / f"epoch={epoch:04d}"
    (folder / "_candidates").mkdir(parents=True)
    rows, cands = [], []
    for i in range(n):
        m = k - 1 if short_every and i % short_every == 0 else k
        negs = [f"p{(i + j) % n}" for j in range(1, m + 1)]
        scores = [0.8 - 0.05 * j for j in range(m)]
        rows.append({"query_id": f"q{i}", "dataset": "t", "qry": f"query {i}", "qry_image_path": "",
                     "pos_text": f"p{i}", "pos_image_path": "", "group": f"g{i // 5}", "qry_item_id": hid(f"q{i}"),
                     "pos_item_id": hid(f"p{i}"), "pos_score": 0.9, "neg_text": negs, "neg_image_path": [""] * m,
                     "neg_item_ids": [hid(t) for t in negs], "neg_scores": scores, "neg_ranks": list(range(m)),
                     "neg_rel_scores": [s / 0.9 for s in scores], "num_negatives": m, "shortfall": k - m})
        cand_ids = [hid(f"p{i}")] + [hid(t) for t in negs]
        verdict = (verdicts or {}).get(i, ("same_as_positive",) + ("negative",) * m)
        cands.append({"query_id": f"q{i}", "cand_item_ids": cand_ids, "cand_scores": [0.9] + scores,
                      "cand_ranks": list(range(m + 1)), "cand_verdicts": list(verdict)})
    for s, start in enumerate(range(0, n, rows_per_shard)):
        pq.write_table(pa.Table.from_pylist(rows[start:start + rows_per_shard], SCHEMA),
                       folder / f"part-{s:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(cands[start:start + rows_per_shard], CAND_SCHEMA),
                       folder / "_candidates" / f"part-{s:05d}.parquet")
    with open(out / "blocklist.jsonl", "w") as f:
        for q, item in blocklist:
            f.write(json.dumps({"query_id": q, "item_id": item, "who": "test", "when": "2025-01-01T00:00:00Z",
                                "note": ""}) + "\n")
    return out


def ids(ds):
    return [ds[i]["query_id"] for i in range(len(ds))]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_map_style_ranks_are_disjoint_equal_and_complete(tmp_path, world):
    write_run(tmp_path, n=50)
    parts = [ids(ShardDataset(tmp_path, 0, k=4, rank=r, world_size=world)) for r in range(world)]
    seen = [q for p in parts for q in p]
    assert len(seen) == len(set(seen))                       # no row twice
    assert len({len(p) for p in parts}) == 1                 # same number of steps on every rank
    assert len(seen) == 50 - 50 % world                      # the rest is counted, not lost silently
    assert ShardDataset(tmp_path, 0, k=4, rank=0, world_size=world).stats.dropped_uneven == 50 % world
    uneven = [ids(ShardDataset(tmp_path, 0, k=4, rank=r, world_size=world, even=False)) for r in range(world)]
    assert sorted(q for p in uneven for q in p) == sorted(f"q{i}" for i in range(50))


def test_iterable_split_over_ranks_and_workers_is_disjoint_and_complete(tmp_path):
    write_run(tmp_path, n=45, rows_per_shard=7)
    seen = []
    for rank in range(2):
        ds = IterableShardDataset(tmp_path, 0, k=4, rank=rank, world_size=2, even=False)
        got = [q for batch in DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate_rows)
               for q in batch["query_id"]]
        assert len(got) == len(ds)
        seen += got
    assert sorted(seen) == sorted(f"q{i}" for i in range(45))


def test_shuffle_is_seeded_by_epoch_and_independent_of_the_split(tmp_path):
    for epoch in (0, 1):
        write_run(tmp_path, epoch=epoch, n=40, rows_per_shard=6)
    order = ids(ShardDataset(tmp_path, 0, k=4))
    assert order == ids(ShardDataset(tmp_path, 0, k=4))                      # reproducible
    assert order != sorted(order, key=lambda q: int(q[1:]))                  # shuffled
    assert ids(ShardDataset(tmp_path, 1, k=4)) != order                      # another epoch, another order
    assert ids(ShardDataset(tmp_path, 0, k=4, seed=1)) != order              # another seed, another order
    halves = [ids(ShardDataset(tmp_path, 0, k=4, rank=r, world_size=2)) for r in range(2)]
    assert halves[0] + halves[1] == order                                    # ranks cut one global order
    streamed = [r["query_id"] for r in IterableShardDataset(tmp_path, 0, k=4)]
    assert streamed == order                                                 # map-style and iterable agree


def test_short_rows_are_padded_with_a_mask_dropped_or_refused_and_counted(tmp_path):
    write_run(tmp_path, n=20, k=4, short_every=5)  # rows 0, 5, 10, 15 have 3 negatives
    pad = ShardDataset(tmp_path, 0, k=4, on_short="pad")
    assert (pad.stats.short_rows, pad.stats.padded_rows, pad.stats.padded_negatives) == (4, 4, 4)
    row = next(pad[i] for i in range(len(pad)) if pad[i]["query_id"] == "q5")
    assert row["neg_mask"].tolist() == [True, True, True, False]
    assert row["neg_item_ids"][3] == "" and row["neg_scores"][3] == 0.0 and len(row["neg_text"]) == 4
    drop = ShardDataset(tmp_path, 0, k=4, on_short="drop")
    assert len(drop) == 16 and drop.stats.dropped_short == 4 and drop.stats.rows_used == 16
    assert {"q0", "q5", "q10", "q15"}.isdisjoint(ids(drop))
    with pytest.raises(ValueError, match="4 of 20 rows"):
        ShardDataset(tmp_path, 0, k=4, on_short="error")
    fewer = ShardDataset(tmp_path, 0, k=2)  # more negatives than asked: the k hardest (first) are kept
    assert fewer.stats.truncated_rows == 20 and fewer.stats.short_rows == 0
    assert fewer[0]["neg_scores"].tolist() == pytest.approx([0.8, 0.75])


def test_collate_and_suspects(tmp_path):
    verdicts = {3: ("same_as_positive", "margin_rel", "score_bounds", "negative", "rank_window")}
    write_run(tmp_path, n=10, k=4, blocklist=[("q1", hid("p7"))], verdicts=verdicts)
    ds = ShardDataset(tmp_path, 0, k=4)
    batch = collate_rows([ds[i] for i in range(4)])
    assert batch["neg_scores"].shape == (4, 4) and batch["neg_mask"].dtype == torch.bool
    assert batch["pos_score"].shape == (4,) and len(batch["neg_text"]) == 4 and len(batch["neg_text"][0]) == 4
    suspects = dict(zip(ids(ds), ds.suspects()))
    assert suspects["q1"] == {hid("p1"), hid("p7")}                    # its own positive + the blocklisted item
    # margin_rel and score_bounds (the positive-score cap) drops; rank_window is no suspect
    assert suspects["q3"] == {hid("p3"), hid("p4"), hid("p5")}
    assert suspects["q0"] == {hid("p0")}


def test_missing_epoch_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="epoch=0003"):
        ShardDataset(tmp_path, 3, k=4)
