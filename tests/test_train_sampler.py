"""Hard-batch sampler: batches of queries with overlapping mined negatives, never with their false negatives."""
import itertools

import numpy as np

from pipeline.train.dataset import ShardDataset
from pipeline.train.sampler import HardBatchSampler
from test_train_dataset import hid, write_run


def clustered(n_clusters=12, size=8, k=3, seed=0):
    """Queries in clusters; each query's mined negatives are positives of other queries of its cluster."""
    rng = np.random.default_rng(seed)
    pos, neg = [], []
    for c in range(n_clusters):
        members = [c * size + i for i in range(size)]
        for m in members:
            pos.append(f"p{m}")
            neg.append([f"p{o}" for o in rng.choice([o for o in members if o != m], k, replace=False)])
    return pos, neg


def hard_pairs_of(batches, pos, neg):
    negs = [set(x) for x in neg]
    return sum(pos[b] in negs[a] for batch in batches for a, b in itertools.permutations(batch, 2))


def test_batches_partition_the_rows_and_gather_overlapping_queries():
    pos, neg = clustered()
    sampler = HardBatchSampler(pos, neg, batch_size=8, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(pos)))
    # random batches of 8 out of 96 rarely hold a query's mined negative's owner; these mostly do
    rng = np.random.default_rng(0)
    random_pairs = np.mean([hard_pairs_of(np.split(rng.permutation(len(pos)), 12), pos, neg) for _ in range(20)])
    assert sampler.stats.hard_pairs == hard_pairs_of(batches, pos, neg)
    assert sampler.stats.hard_pairs >= 0.8 * len(pos) * 3  # nearly every mined negative's owner is in the batch
    assert sampler.stats.hard_pairs > 5 * random_pairs


def test_no_false_negative_shares_a_batch():
    pos, neg = clustered()
    n = len(pos)
    groups = [f"g{i // 4}" if i % 2 == 0 else None for i in range(n)]  # even rows of each half-cluster share a group
    pos[5] = pos[6]                                                      # identical positive content
    qry = [f"q{i}" for i in range(n)]
    qry[9] = pos[10]                                                     # a query equal to another's positive
    suspects = [set() for _ in range(n)]
    suspects[1] = {pos[2], pos[3]}                                       # blocklisted / dropped by the miner
    sampler = HardBatchSampler(pos, neg, batch_size=8, groups=groups, qry_item_ids=qry, suspects=suspects, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(n))
    for batch in batches:
        for a, b in itertools.combinations(batch, 2):
            assert not sampler.conflicts(a, b), (a, b)
    pairs = [(0, 2), (5, 6), (9, 10), (1, 2), (1, 3)]
    assert all(sampler.conflicts(a, b) for a, b in pairs) and not sampler.conflicts(0, 1)
    assert all(not any(a in b and c in b for b in batches) for a, c in pairs)


def test_seeded_by_epoch_and_drop_last_counts():
    pos, neg = clustered(n_clusters=5, size=7)
    sampler = HardBatchSampler(pos, neg, batch_size=8, seed=1, drop_last=True)
    first = list(sampler)
    assert list(HardBatchSampler(pos, neg, batch_size=8, seed=1, drop_last=True)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert all(len(b) == 8 for b in first)
    assert sampler.stats.dropped_rows == 35 - 8 * len(first) and sampler.stats.full_batches == len(first)


def test_embeddings_group_near_queries_without_mined_overlap():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16))
    labels = np.repeat(np.arange(6), 8)
    emb = centers[labels] + 0.05 * rng.normal(size=(48, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pos = [f"p{i}" for i in range(48)]
    batches = list(HardBatchSampler(pos, [[] for _ in pos], batch_size=8, embeddings=emb, knn=7, seed=0))
    purity = np.mean([np.bincount(labels[b]).max() / len(b) for b in batches])
    assert purity > 0.9  # random batches of 8 over 6 clusters: about 0.4


def test_from_dataset_uses_mined_negatives_and_suspects(tmp_path):
    # query i's negatives are p{i+1..i+4}; q1 blocklists p2, so q1 and q2 never share a batch
    write_run(tmp_path, n=40, k=4, blocklist=[("q1", hid("p2"))])
    ds = ShardDataset(tmp_path, 0, k=4)
    sampler = HardBatchSampler.from_dataset(ds, batch_size=8, seed=0)
    qid = ds.table.column("query_id").to_pylist()
    batches = [[qid[i] for i in b] for b in sampler]
    assert sorted(q for b in batches for q in b) == sorted(qid)
    assert not any("q1" in b and "q2" in b for b in batches)
    # rows share a group five by five (g0 = q0..q4): a batch never holds two rows of one group
    groups = ds.table.column("group").to_pylist()
    assert all(len({groups[i] for i in b}) == len(b) for b in sampler)
    assert sampler.stats.hard_pairs > 0
