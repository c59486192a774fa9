"""Embed items with the teacher: cache look-up on the driver, a Ray Data pool of model actors for the misses.

Batches are planned on the driver (items sorted by text length, then id, cut into `batch_size`), and each planned
batch travels as one row, so a vector never depends on how many actors or blocks ran: the same config gives the same
bytes. Vectors land in the cache as they stream back, so an interrupted run keeps what it embedded.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import Config
from .progress import Progress
from .teachers import teacher_fingerprint

CACHE_PART_ROWS = 65_536


class EmbeddingCache:
    """Parquet parts of (item_id, vector) under `root/<fingerprint>/`; written atomically, read with a filter."""

    def __init__(self, root: str, fingerprint: str):
        self.dir = Path(root) / fingerprint
        self.fingerprint = fingerprint

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet")) if self.dir.exists() else []

    def lookup(self, ids: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
        """(found mask, vectors of the found ids in the order of `ids`)."""
        found = np.zeros(len(ids), dtype=bool)
        parts = self.parts()
        if not parts:
            return found, None
        table = pq.read_table(parts, filters=pc.field("item_id").isin(ids))
        if table.num_rows == 0:
            return found, None
        pos = pc.index_in(ids, value_set=table.column("item_id"))
        found = pos.is_valid().to_numpy(zero_copy_only=False)
        return found, _to_numpy(table.column("vector"))[pos.drop_null().to_numpy()]

    def write(self, table: pa.Table) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"part-{uuid.uuid4().hex}.parquet"
        tmp = final.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, final)


def _to_numpy(column) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = column.type.list_size
    return column.flatten().to_numpy().reshape(-1, dim)


def plan_batches(items: pa.Table, batch_size: int) -> pa.Table:
    """One row per model batch: lists of ids, texts and image paths, similar lengths together to save padding."""
    order = _length_order(items)
    rows = {"item_ids": [], "texts": [], "image_paths": []}
    ids, texts, images = (items.column(c).to_pylist() for c in ("item_id", "embed_text", "image_path"))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows["item_ids"].append([ids[i] for i in chunk])
        rows["texts"].append([texts[i] for i in chunk])
        rows["image_paths"].append([images[i] for i in chunk])
    return pa.table(rows)


def _length_order(items: pa.Table) -> np.ndarray:
    lengths = pc.utf8_length(items.column("embed_text")).to_numpy(zero_copy_only=False)
    return np.lexsort((np.arange(items.num_rows), lengths)).tolist()  # items are sorted by id already


class EmbedActor:
    """Holds one teacher; called with one planned batch at a time."""

    def __init__(self, teacher_cfg, role: str, image_root: str, max_pixels: int, native_images: bool, threads: int):
        import torch

        from .teachers import load_teacher

        if threads:
            torch.set_num_threads(threads)
        self.teacher = load_teacher(teacher_cfg)
        self.role = role
        self.image_root = image_root
        self.max_pixels = max_pixels
        self.native_images = native_images

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .read import open_image

        ids, vectors = [], []
        for row in batch.to_pylist():
            images = [open_image(self.image_root, p, self.max_pixels) if (p and self.native_images) else None
                      for p in row["image_paths"]]
            vectors.append(self.teacher.embed(row["texts"], images, self.role))
            ids.extend(row["item_ids"])
        matrix = np.concatenate(vectors).astype(np.float32)
        flat = pa.array(matrix.reshape(-1), pa.float32())
        return pa.table({"item_id": pa.array(ids, pa.string()),
                         "vector": pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])})


def pool_shape(cfg: Config) -> dict:
    """Actors, CPUs and GPUs per actor from what Ray sees; the pool never takes every CPU (Ray Data deadlocks)."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1.0), int(resources.get("GPU", 0))
    use_gpu = gpus > 0 and (cfg.teacher.device in ("auto", "cuda") or cfg.teacher.device.startswith("cuda:"))
    if use_gpu:
        actors = cfg.embed.num_actors or gpus
        return {"actors": actors, "num_cpus": cfg.embed.cpus_per_actor or 1.0, "num_gpus": 1.0,
                "threads": cfg.embed.threads_per_actor or 2}
    actors = cfg.embed.num_actors or max(1, int(cpus) - 1)
    per_actor = cfg.embed.cpus_per_actor or max(0.25, min(1.0, (cpus - 0.5) / actors))
    threads = cfg.embed.threads_per_actor or max(1, int(cpus // actors))
    return {"actors": actors, "num_cpus": per_actor, "num_gpus": 0.0, "threads": threads}


def embed_items(items: pa.Table, role: str, cfg: Config, label: str) -> tuple[np.ndarray, dict]:
    """Vectors for `items` (rows aligned) as `role`; returns (vectors, stats)."""
    import ray

    cache = EmbeddingCache(cfg.embed.cache_dir, teacher_fingerprint(cfg.teacher, role))
    found, cached = cache.lookup(items.column("item_id"))
    missing = items.filter(pa.array(~found))
    stats = {"items": items.num_rows, "cached": int(found.sum()), "embedded": missing.num_rows,
             "fingerprint": cache.fingerprint}
    if missing.num_rows:
        plan = plan_batches(missing, cfg.teacher.batch_size)
        shape = pool_shape(cfg)
        actors = min(shape["actors"], plan.num_rows)
        blocks = cfg.embed.num_blocks or min(plan.num_rows, max(8, 4 * actors))
        step = -(-plan.num_rows // blocks)
        ds = ray.data.from_arrow([plan.slice(i, step) for i in range(0, plan.num_rows, step)])
        ds = ds.map_batches(
            EmbedActor, batch_size=1, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=shape["num_cpus"], num_gpus=shape["num_gpus"],
            fn_constructor_kwargs=dict(teacher_cfg=cfg.teacher, role=role, image_root=cfg.input.image_root,
                                       max_pixels=cfg.input.max_image_pixels,
                                       native_images=cfg.teacher.image_mode == "native", threads=shape["threads"]))
        pending, pending_rows = [], 0
        with Progress(f"embed {label}", total=missing.num_rows, unit="items", enabled=cfg.run.progress) as bar:
            for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                pending.append(out)
                pending_rows += out.num_rows
                bar.update(out.num_rows)
                if pending_rows >= CACHE_PART_ROWS:
                    cache.write(pa.concat_tables(pending))
                    pending, pending_rows = [], 0
        if pending:
            cache.write(pa.concat_tables(pending))
        stats.update(actors=actors, cpus_per_actor=shape["num_cpus"], gpus_per_actor=shape["num_gpus"],
                     blocks=blocks)
        found, cached = cache.lookup(items.column("item_id"))
        if not found.all():
            raise RuntimeError(f"embedding cache {cache.dir} is missing {int((~found).sum())} vectors after embedding")
    return cached, stats
