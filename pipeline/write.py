"""Write Parquet shards and JSON files; the epoch folder they go into, and its atomic swap, are pipeline/run.py's.

Files carry no timestamps and rows are written in a fixed order, so the same config and seed give the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TRAIN_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("dataset", pa.string()), ("qry", pa.string()), ("qry_image_path", pa.string()),
    ("pos_text", pa.string()), ("pos_image_path", pa.string()), ("group", pa.string()),
    ("qry_item_id", pa.string()), ("pos_item_id", pa.string()), ("pos_score", pa.float32()),
    ("neg_text", pa.list_(pa.string())), ("neg_image_path", pa.list_(pa.string())),
    ("neg_item_ids", pa.list_(pa.string())), ("neg_scores", pa.list_(pa.float32())),
    ("neg_ranks", pa.list_(pa.int32())), ("neg_rel_scores", pa.list_(pa.float32())),
    ("num_negatives", pa.int32()), ("shortfall", pa.int32()),
])
CANDIDATE_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("cand_item_ids", pa.list_(pa.string())), ("cand_scores", pa.list_(pa.float32())),
    ("cand_ranks", pa.list_(pa.int32())), ("cand_verdicts", pa.list_(pa.string())),
    ("cand_sources", pa.list_(pa.string())),
])


def write_table(table: pa.Table, path: Path, compression: str) -> dict:
    """Write one Parquet file; returns its manifest entry (path relative to its folder, rows, sha256)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression=None if compression == "none" else compression,
                   row_group_size=8192, write_statistics=True)
    return {"path": path.name, "rows": table.num_rows, "sha256": sha256_file(path)}


def write_new_part(folder: Path, table: pa.Table) -> Path:
    """Add a uniquely named Parquet part to a folder that several runs may append to (caches), atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"part-{uuid.uuid4().hex}.parquet"
    tmp = final.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data) -> None:
    """Write JSON through a temporary file and a rename, so a reader sees the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
