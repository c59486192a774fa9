"""A small run folder in exactly the layout of docs/output-schema.md, for the inspector's tests.

Real clip-art images and captions from shared/data/clipart; one caption carries `<script>alert(1)</script>` and
markup so that escaping is tested on every page it reaches. Two datasets (text->image and image->text), two shards
per epoch with small row groups (so paging crosses files and row groups), several epochs, shortfalls, every filter
verdict, and a rejects file.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pipeline import write

CLIPART = Path(__file__).resolve().parents[2] / "shared" / "data" / "clipart"
if not CLIPART.is_dir():  # CI clones main into another folder with shared/ beside it; the work tree has /work/shared
    CLIPART = Path("/work/shared/data/clipart")
EVIL = "strawberry <script>alert(1)</script> & <b>bold</b>"
N_ITEMS = 16
NEGATIVES = 3
TOP_K = 8
DROP_REASONS = ["same_group", "rank_window", "margin_rel", "near_duplicate"]

TRAIN_SCHEMA, CAND_SCHEMA = write.TRAIN_SCHEMA, write.CANDIDATE_SCHEMA


def item_id(text: str, image: bytes = b"") -> str:
    return hashlib.sha256(text.strip().lower().encode() + b"\0" + image).hexdigest()[:32]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_run(base: Path, epochs: int = 2, image_root_relative: bool = False) -> Path:
    """Write `base/images/` and the run `base/run/`; returns the run folder."""
    src = pq.read_table(CLIPART / "items.parquet").slice(0, N_ITEMS).to_pylist()
    images = base / "images"
    images.mkdir(parents=True, exist_ok=True)
    items, corpus = [], []  # corpus: per source row, its text item and image item
    for k, r in enumerate(src):
        rel = Path(r["image_path"]).name
        shutil.copy(CLIPART / r["image_path"], images / rel)
        caption = EVIL if k == 3 else r["caption"]
        text_item = {"item_id": item_id(caption), "text": caption, "image_path": "", "modality": "text"}
        img_item = {"item_id": item_id("", (images / rel).read_bytes()), "text": "", "image_path": rel,
                    "modality": "image"}
        items += [text_item, img_item]
        corpus.append((text_item, img_item, r["category"]))
    out = base / "run"
    (out / "_run").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(items), out / "_run" / "items.parquet")
    (out / "_run" / "run.json").write_text(json.dumps({"top_k": TOP_K, "teacher": {"model": "fixture"}}))
    root = "images" if image_root_relative else str(images)
    for epoch in range(epochs):
        _write_epoch(out, epoch, corpus, root)
    return out


def _write_epoch(out: Path, epoch: int, corpus: list, image_root: str) -> None:
    rng = np.random.default_rng(1000 + epoch)
    rows, cands = [], []
    drops: dict[str, int] = {}
    for dataset in ("clip_i2t", "clip_t2i"):
        for i, (text_item, img_item, category) in enumerate(corpus):
            t2i = dataset == "clip_t2i"
            query, pos = (text_item, img_item) if t2i else (img_item, text_item)
            pool = [c[0 if not t2i else 1] for j, c in enumerate(corpus) if j != i]
            pick = rng.choice(len(pool), TOP_K - 1, replace=False)
            pos_score = float(np.float32(rng.uniform(0.55, 0.8)))
            others = rng.uniform(0.2, pos_score + 0.05, TOP_K - 1).astype(np.float32)
            ranked = sorted([(pos, pos_score)] + [(pool[p], float(s)) for p, s in zip(pick, others)],
                            key=lambda c: -c[1])
            verdicts, negs = [], []
            want = 0 if i == 5 else (1 if i == 6 else NEGATIVES)  # rows 5 and 6 fall short
            for rank, (it, s) in enumerate(ranked):
                if it is pos:
                    v = "same_as_positive"
                elif s > 0.95 * pos_score:
                    v = "margin_rel"
                elif rank >= 6:
                    v = "rank_window"
                elif len(negs) < want:
                    v = "negative"
                    negs.append((it, s, rank))
                else:
                    v = "unsampled" if rank % 2 else DROP_REASONS[(i + rank) % len(DROP_REASONS)]
                verdicts.append(v)
                if v not in ("negative", "unsampled"):
                    drops[v] = drops.get(v, 0) + 1
            qid = f"{dataset}:{i:04d}"
            rows.append({
                "query_id": qid, "dataset": dataset,
                "qry": query["text"] if t2i else "<|image_1|> Find a caption for this picture",
                "qry_image_path": "" if t2i else query["image_path"],
                "pos_text": pos["text"], "pos_image_path": pos["image_path"], "group": category,
                "qry_item_id": query["item_id"], "pos_item_id": pos["item_id"], "pos_score": pos_score,
                "neg_text": [n[0]["text"] for n in negs], "neg_image_path": [n[0]["image_path"] for n in negs],
                "neg_item_ids": [n[0]["item_id"] for n in negs], "neg_scores": [n[1] for n in negs],
                "neg_ranks": [n[2] for n in negs], "neg_rel_scores": [n[1] / pos_score for n in negs],
                "num_negatives": len(negs), "shortfall": NEGATIVES - len(negs),
            })
            cands.append({"query_id": qid, "cand_item_ids": [c["item_id"] for c, _ in ranked],
                          "cand_scores": [s for _, s in ranked], "cand_ranks": list(range(TOP_K)),
                          "cand_verdicts": verdicts})
    tmp = out / f".epoch={epoch:04d}.tmp"
    (tmp / "_candidates").mkdir(parents=True, exist_ok=True)
    split = 14
    files = []
    for part, (lo, hi) in enumerate(((0, split), (split, len(rows)))):
        name = f"part-{part:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[lo:hi], TRAIN_SCHEMA), tmp / name, row_group_size=5)
        pq.write_table(pa.Table.from_pylist(cands[lo:hi], CAND_SCHEMA), tmp / "_candidates" / name,
                       row_group_size=5)
        files.append({"path": name, "rows": hi - lo, "sha256": _sha256(tmp / name)})
    (tmp / "_rejects.jsonl").write_text(
        json.dumps({"source": "in.parquet", "row": 99, "query_id": "x", "field": "qry_image_path",
                    "reason": "missing_image", "detail": "no such file"}) + "\n"
        + json.dumps({"source": "in.parquet", "row": 100, "query_id": "y", "field": "qry",
                      "reason": "empty_text", "detail": ""}) + "\n")
    counts = {"queries_in": len(rows) + 2, "queries_written": len(rows), "queries_rejected": 2}
    (tmp / "_manifest.json").write_text(json.dumps({
        "config": {"input": {"image_root": image_root}, "mining": {"num_negatives": NEGATIVES, "top_k": TOP_K}},
        "epoch": epoch, "files": files, "counts": counts}, indent=1))
    (tmp / "_stats.json").write_text(json.dumps({
        **counts, "drops": drops,
        "negatives": {"mean": float(np.mean([r["num_negatives"] for r in rows]))},
        "scores": {"pos_mean": float(np.mean([r["pos_score"] for r in rows]))},
        "per_dataset": {d: {"queries": sum(r["dataset"] == d for r in rows)} for d in ("clip_i2t", "clip_t2i")},
    }, indent=1))
    tmp.rename(out / f"epoch={epoch:04d}")
