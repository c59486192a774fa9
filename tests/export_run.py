"""One real mined run shared by the export tests: `hardneg mine` with the offline MiniLM teacher (caption mode) on
the bundled demo data, two datasets (text -> text, and text -> text + image), several shards."""
from __future__ import annotations

from pathlib import Path

from corpus import DEMO, base_config, demo_items, text_pairs, write_jsonl

_RUNS: dict = {}


def export_pairs(n: int = 60) -> list[dict]:
    rows = text_pairs(n)
    for i, it in enumerate(demo_items(2 * n)[n:]):
        rows.append({"id": f"m{i}", "dataset": "t2it", "qry": it["caption"],
                     "pos_text": f"a picture of {it['category'].split('/')[-1]}", "pos_image_path": it["image_path"],
                     "group": it["category"].split("/")[0]})
    return rows


def mined_run(tmp_path_factory, cache: str) -> Path:
    """OUT of a mined run (epoch 0), mined once per test session."""
    if "out" not in _RUNS:
        from pipeline.config import config_from_dict
        from pipeline.mine import mine

        tmp = tmp_path_factory.mktemp("export-run")
        pairs = write_jsonl(tmp / "pairs.jsonl", export_pairs())
        raw = base_config(pairs, cache, input={"image_root": str(DEMO), "captions": str(DEMO / "captions.parquet")},
                          teacher={"image_mode": "caption"}, output={"rows_per_shard": 32})
        mine(config_from_dict(raw), tmp / "out")
        _RUNS["out"] = tmp / "out"
    return _RUNS["out"]
