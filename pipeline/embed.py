"""Embed items with the teacher: cache look-up on the driver, a Ray Data pool of model actors for the misses.

Batches are planned on the driver (items sorted by text length, in the model's tokens where its fast tokenizer is at
hand, else in characters, then by id, and cut into `batch_size`), and each planned batch travels as one row, so a
vector never depends on how many actors or blocks ran: the same config gives the same bytes. The actors write the
vectors to the cache themselves (a local path or an fsspec URI every node reaches) as each block finishes, so an
interrupted run keeps what it embedded and no vector passes through the driver on its way to the cache.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import time
import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import Config
from .progress import Progress
from .ray_session import cuda_devices, ray_active, ray_is_up
from .teachers import teacher_fingerprint
from .teachers.base import decode_bounds, resolve_model_path
from .write import write_new_part

CACHE_PART_ROWS = 65_536
CACHE_FLUSH_S = 30.0  # vectors wait at most this long in an actor before they are written to the cache
EMBED_COLUMNS = ("item_id", "embed_text", "image_path")  # what embedding reads of an item
PLAN_CHUNK = 10_000  # rows per step of the driver's per-row Python work (keys, token counts): its memory is bounded


def input_keys(items: pa.Table) -> pa.Array:
    """Each item's cache key within a teacher fingerprint: a hash of exactly what the teacher is given, the item's
    content id (its normalised text and image bytes) and the text it embeds (`embed_text`: with
    `teacher.image_mode: caption` the image's caption, which the content id does not cover)."""
    keys = [pa.array([], pa.string())]
    for start in range(0, items.num_rows, PLAN_CHUNK):  # Python strings for a chunk of rows at a time
        part = items.slice(start, PLAN_CHUNK)
        keys.append(pa.array([hashlib.blake2b(f"{i}\0{t or ''}".encode(), digest_size=16).hexdigest()
                              for i, t in zip(part.column("item_id").to_pylist(),
                                              part.column("embed_text").to_pylist())], pa.string()))
    return pa.concat_arrays(keys)


class EmbeddingCache:
    """Parquet parts of (key, vector) under `root/<teacher fingerprint>/`, `key` from `input_keys`; written
    atomically, read with a filter. `root` is a local path or an fsspec URI (`s3://`, `gs://`, ...) that every node
    reads and writes: the embedding actors append parts, the driver looks keys up."""

    def __init__(self, root: str, fingerprint: str, storage_options: dict | None = None):
        root = str(root)
        if "://" in root:  # an fsspec URI (file:// too)
            from fsspec.core import url_to_fs
            from fsspec.implementations.local import LocalFileSystem

            self.fs, base = url_to_fs(root, **(storage_options or {}))
            self.local = isinstance(self.fs, LocalFileSystem)
        else:  # a local path (a shared mount too): plain files, no fsspec import (70 ms of a warm run)
            self.fs, base, self.local = None, os.path.abspath(os.path.expanduser(root)), True
        self.dir = f"{base.rstrip('/')}/{fingerprint}"
        self.fingerprint = fingerprint

    def parts(self) -> list[str]:
        if self.fs is None:
            return sorted(glob.glob(f"{glob.escape(self.dir)}/part-*.parquet"))
        self.fs.invalidate_cache(self.dir)  # other processes (the actors) add parts: never trust a cached listing
        return sorted(self.fs.glob(f"{self.dir}/part-*.parquet"))

    def _read(self, columns: list[str], ids: pa.Array) -> pa.Table | None:
        parts = self.parts()
        if not parts or not len(ids):  # no keys: pyarrow cannot type the filter of an empty ChunkedArray
            return None
        filesystem = None
        if not self.local:
            from pyarrow.fs import FSSpecHandler, PyFileSystem

            filesystem = PyFileSystem(FSSpecHandler(self.fs))
        return pq.read_table(parts, columns=columns, filters=pc.field("key").isin(ids), filesystem=filesystem)

    def contains(self, ids: pa.Array) -> np.ndarray:
        """Which of `ids` (the items' `input_keys`) have a vector; reads the keys only."""
        table = self._read(["key"], ids)
        if table is None or table.num_rows == 0:
            return np.zeros(len(ids), dtype=bool)
        return pc.is_in(ids, value_set=table.column("key")).to_numpy(zero_copy_only=False)

    def lookup(self, ids: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
        """(found mask, vectors of the found keys in the order of `ids`, the items' `input_keys`)."""
        found = np.zeros(len(ids), dtype=bool)
        table = self._read(["key", "vector"], ids)
        if table is None or table.num_rows == 0:
            return found, None
        pos = pc.index_in(ids, value_set=table.column("key"))
        found = pos.is_valid().to_numpy(zero_copy_only=False)
        return found, _to_numpy(table.column("vector"))[pos.drop_null().to_numpy()]

    def write(self, table: pa.Table) -> str:
        """Add one uniquely named part. Local (a shared mount too): a temporary file renamed into place. An object
        store: one PUT of the final name, atomic per object, so a listing never shows a partial part."""
        table = table.rename_columns(["key", "vector"])
        if self.local:
            return str(write_new_part(Path(self.dir), table))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path = f"{self.dir}/part-{uuid.uuid4().hex}.parquet"
        self.fs.pipe_file(path, sink.getvalue().to_pybytes())
        return path


def _to_numpy(column) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = column.type.list_size
    return column.flatten().to_numpy().reshape(-1, dim)


def plan_batches(items: pa.Table, batch_size: int, lengths: np.ndarray | None = None,
                 batch_tokens: int | None = None, max_tokens: int | None = None) -> pa.Table:
    """One row per model batch: lists of ids, texts and image paths, similar lengths together to save padding.

    `lengths` (one per item) orders the items, e.g. token counts from `token_lengths`; default: characters. With
    `batch_tokens` a batch also stops before its padded size (items x its longest item, clipped at `max_tokens`)
    passes that many tokens: long texts run faster in smaller batches on CPU (cache-sized activations)."""
    order = _length_order(items, lengths)
    n = len(order)
    if batch_tokens and lengths is not None and n:
        sizes = np.asarray(lengths)[order] + 2  # the special tokens a text model adds
        starts = _budget_starts(np.minimum(sizes, max_tokens) if max_tokens else sizes, batch_size, batch_tokens)
    else:
        starts = np.arange(0, n, batch_size)
    offsets = pa.array(np.append(starts, n).astype(np.int32))
    order = pa.array(order, pa.int64())
    return pa.table({name: pa.ListArray.from_arrays(offsets, items.column(col).take(order).combine_chunks())
                     for name, col in (("item_ids", "item_id"), ("texts", "embed_text"),
                                       ("image_paths", "image_path"))})


def _budget_starts(sizes: np.ndarray, batch_size: int, budget: int) -> np.ndarray:
    """Batch starts over ascending sizes: a batch ends at `batch_size` items or before items x size > budget."""
    starts, start = [0], 0
    for lo in range(0, len(sizes), PLAN_CHUNK):  # Python ints for a chunk of items at a time
        for i, size in enumerate(sizes[lo:lo + PLAN_CHUNK].tolist(), lo):
            if i > start and (i - start >= batch_size or (i - start + 1) * size > budget):
                starts.append(i)
                start = i
    return np.asarray(starts)


def _length_order(items: pa.Table, lengths: np.ndarray | None = None) -> np.ndarray:
    if lengths is None:
        lengths = pc.utf8_length(items.column("embed_text")).to_numpy(zero_copy_only=False)
    return np.lexsort((np.arange(items.num_rows), lengths))  # items are sorted by id already


@lru_cache(maxsize=8)
def _fast_tokenizer(path: str):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def token_lengths(texts: pa.Array | pa.ChunkedArray, model: str) -> np.ndarray | None:
    """Token counts (int32) of `texts` from the model's own fast tokenizer (`tokenizer.json` in its folder), or None
    when there is none (a hub id, a custom teacher). Batches cut from texts sorted by tokens carry far less padding
    than batches sorted by characters (about 30% fewer padded tokens on docstrings: benchmarks/overhead.py).
    Encoded `PLAN_CHUNK` texts at a time: the tokenizer's objects for every text at once held kilobytes a text in
    the driver, and the allocator kept them after they were freed (docs/scale.md)."""
    try:
        path = Path(resolve_model_path(model)) / "tokenizer.json"
        if not path.is_file():
            return None
        tokenizer = _fast_tokenizer(str(path))
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no character offsets
        lengths = np.zeros(len(texts), np.int32)
        for start in range(0, len(texts), PLAN_CHUNK):
            chunk = [t or "" for t in texts.slice(start, PLAN_CHUNK).to_pylist()]
            lengths[start:start + len(chunk)] = [len(e) for e in encode(chunk, add_special_tokens=False)]
    except Exception:  # no tokenizers package, an unreadable file: characters will do
        return None
    return lengths


def model_token_limit(model: str) -> int | None:
    """The most tokens the model reads (`max_seq_length` of a sentence-transformers folder, else the tokenizer's
    `model_max_length`), or None when its folder does not say."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        try:
            value = json.loads((Path(resolve_model_path(model)) / name).read_text()).get(key)
        except Exception:  # a hub id, no such file, an unreadable one: ask the next file
            continue
        if isinstance(value, int) and 0 < value < 1_000_000:
            return value
    return None


IMAGES_TYPE = pa.list_(pa.struct([("width", pa.int32()), ("height", pa.int32()), ("data", pa.large_binary())]))
DECODE_CPUS = 0.5


def decode_images(batch: pa.Table, columns: dict, image_root: str, max_image_pixels: int,
                  max_bytes: int | None = None, allowed_schemes: tuple = (), min_pixels: int | None = None,
                  max_pixels: int | None = None) -> pa.Table:
    """The CPU stage before the model actors: each `path column -> image column` of planned batches becomes
    decoded RGB pixels (width, height, bytes), resized into [min_pixels, max_pixels], so the actors only run the
    model. A plain function over one Arrow table (Ray Data runs it as a task stage)."""
    from .read import open_image
    from .teachers.base import bound_pixels

    for source, target in columns.items():
        decoded = []
        for paths in batch.column(source).to_pylist():
            images = []
            for path in paths:
                if not path:
                    images.append(None)
                    continue
                im = open_image(image_root, path, max_image_pixels, max_bytes, allowed_schemes)
                im = bound_pixels(im.convert("RGB"), min_pixels, max_pixels)
                images.append({"width": im.width, "height": im.height, "data": im.tobytes()})
            decoded.append(images)
        batch = batch.append_column(target, pa.array(decoded, IMAGES_TYPE))
    return batch


def to_pil(images: list) -> list:
    """PIL images from `decode_images` output (None stays None)."""
    from PIL import Image

    return [Image.frombytes("RGB", (im["width"], im["height"]), im["data"]) if im else None for im in images]


def decode_stage(ds, cfg: Config, columns: dict, min_pixels=None, max_pixels=None):
    return ds.map_batches(decode_images, batch_size=1, batch_format="pyarrow", num_cpus=DECODE_CPUS,
                          fn_kwargs=dict(columns=columns, image_root=cfg.input.image_root,
                                         max_image_pixels=cfg.input.max_image_pixels,
                                         max_bytes=cfg.input.max_image_bytes,
                                         allowed_schemes=tuple(cfg.input.allowed_schemes),
                                         min_pixels=min_pixels, max_pixels=max_pixels))


PARTS_SCHEMA = pa.schema([("fingerprint", pa.string()), ("part", pa.string()), ("rows", pa.int64())])


class EmbedActor:
    """Holds one teacher; called with one block of planned batches (each batch's role, dataset and fingerprint
    travel with it). Writes the block's vectors to the cache itself, a part per fingerprint when `part_rows` are
    buffered, when `flush_s` have passed since its last part, and at the block's end, and returns only what it wrote
    (`PARTS_SCHEMA`: fingerprint, part, rows): no vector travels back to the driver. A block's rows are in the cache
    before Ray Data sees the block done, so a restarted actor only re-embeds blocks whose output never came back."""

    def __init__(self, teacher_cfg, role: str | None = None, image_root: str = ".", max_pixels: int = 64_000_000,
                 native_images: bool = True, threads: int = 0, max_bytes: int | None = None,
                 allowed_schemes: tuple = (), cache_dir: str = "", storage_options: dict | None = None,
                 part_rows: int = CACHE_PART_ROWS, flush_s: float = CACHE_FLUSH_S):
        import sys

        from .teachers import load_teacher

        self.teacher = load_teacher(teacher_cfg)
        if threads and "torch" in sys.modules:  # a teacher without torch (a custom one) does not pay its import
            sys.modules["torch"].set_num_threads(threads)
        self.role = role
        self.image_root = image_root
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.allowed_schemes = allowed_schemes
        self.native_images = native_images
        self.cache_dir, self.storage_options = cache_dir, storage_options
        self.part_rows, self.flush_s = part_rows, flush_s
        self.caches: dict[str, EmbeddingCache] = {}

    def _images(self, row: dict) -> list:
        if not self.native_images:
            return [None] * len(row["image_paths"])
        if row.get("images") is not None:  # decoded by the CPU stage
            return to_pil(row["images"])
        from .read import open_image

        return [open_image(self.image_root, p, self.max_pixels, self.max_bytes, self.allowed_schemes) if p else None
                for p in row["image_paths"]]

    def _flush(self, fp: str, pending: list, written: list) -> None:
        ids = [i for part_ids, _ in pending for i in part_ids]
        matrix = np.concatenate([m for _, m in pending]).astype(np.float32)
        flat = pa.array(matrix.reshape(-1), pa.float32())
        if fp not in self.caches:
            self.caches[fp] = EmbeddingCache(self.cache_dir, fp, self.storage_options)
        path = self.caches[fp].write(pa.table({"key": pa.array(ids, pa.string()),
                                               "vector": pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])}))
        written.append({"fingerprint": fp, "part": path, "rows": len(ids)})
        pending.clear()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .teachers.base import call_embed

        pending: dict[str, list] = {}
        written: list[dict] = []
        last = time.monotonic()
        for row in batch.to_pylist():
            role = row.get("role") or self.role
            vectors = call_embed(self.teacher, row["texts"], self._images(row), role, row.get("dataset"))
            fp = row.get("fingerprint") or ""
            pending.setdefault(fp, []).append((row["item_ids"], vectors))
            if sum(len(ids) for ids, _ in pending[fp]) >= self.part_rows:
                self._flush(fp, pending[fp], written)
            if time.monotonic() - last > self.flush_s:  # an interrupted run loses little more than in flight
                for key, rows in pending.items():
                    if rows:
                        self._flush(key, rows, written)
                last = time.monotonic()
        for key, rows in pending.items():
            if rows:
                self._flush(key, rows, written)
        return pa.Table.from_pylist(written, schema=PARTS_SCHEMA)


def pool_shape(cfg: Config, on_ray: bool | None = None) -> dict:
    """Actors, CPUs and GPUs per actor from what Ray sees; the pool never takes every CPU (Ray Data deadlocks).
    Not `on_ray` (default: whether a Ray session is up): one model in this process (`local`), with this machine's
    CPUs as its threads, or one GPU; Ray is not asked."""
    if not (ray_is_up() if on_ray is None else on_ray):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        gpus = 1.0 if cuda_devices(cfg.teacher.device) else 0.0
        threads = cfg.embed.threads_per_actor or (2 if gpus else cpus)
        return {"actors": 1, "num_cpus": float(cpus), "num_gpus": gpus, "threads": threads, "local": True}
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
    # torch's CPU kernels give slightly different bits at different thread counts: the default follows each
    # actor's own CPUs, never the number of actors, so 1 or 8 actors write the same vectors.
    threads = cfg.embed.threads_per_actor or max(1, int(per_actor))
    return {"actors": actors, "num_cpus": per_actor, "num_gpus": 0.0, "threads": threads}


def _device_memory() -> int:
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


def resolve_batch_size(teacher_cfg, shape: dict) -> int:
    """`teacher.batch_size`, or for `auto` the teacher class's choice for the memory an actor has: a GPU's total
    memory (asked of one GPU worker), else the cluster's Ray memory divided among the actors; in this process
    (no Ray) its own GPU, else 70% of the available memory (what Ray would count)."""
    if teacher_cfg.batch_size != "auto":
        return int(teacher_cfg.batch_size)
    from .teachers.base import teacher_class

    on_gpu = shape["num_gpus"] > 0
    if shape.get("local"):  # in this process: its own device, or the memory Ray would count
        import psutil

        memory = _device_memory() if on_gpu else psutil.virtual_memory().available * 0.7
        return teacher_class(teacher_cfg).auto_batch_size(teacher_cfg, memory, on_gpu)
    import ray

    if on_gpu:
        try:
            memory = ray.get(ray.remote(num_gpus=1, num_cpus=0)(_device_memory).remote(), timeout=300)
        except Exception:  # no GPU worker answered: assume a 16 GB card
            memory = 16 * 2**30
    else:
        memory = ray.cluster_resources().get("memory", 8 * 2**30) / max(shape["actors"], 1)
    return teacher_class(teacher_cfg).auto_batch_size(teacher_cfg, memory, on_gpu)


def _codes(values) -> tuple[np.ndarray, list]:
    """(a code per row, the names they index) of per-row names (a sequence, or an Arrow dictionary array of unique
    names as `embed_roles` builds): a mining run's million rows as int32 codes, not a Python string per row."""
    if not isinstance(values, pa.DictionaryArray):
        values = pa.array([str(v) for v in values], pa.string()).dictionary_encode()
    return values.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False), values.dictionary.to_pylist()


def _first_seen(codes: np.ndarray) -> np.ndarray:
    """The distinct codes in the order of their first row."""
    distinct, first = np.unique(codes, return_index=True)
    return distinct[np.argsort(first)]


def _groups(role: str, cfg: Config, n: int, datasets=None, roles=None) -> tuple[dict, dict]:
    """(fingerprint -> (dataset whose instruction it is, rows, role), dataset -> fingerprint): rows of datasets
    (and roles) with equal prompts share one fingerprint, so one vector per item. `datasets` and `roles` are
    `_codes` of one name per row, or None; `roles` overrides `role`; rows of one role come in the order of their
    first row."""
    if datasets is None and roles is None:
        return {teacher_fingerprint(cfg.teacher, role): (None, np.arange(n), role)}, {}
    per_role = roles is not None
    role_codes, role_names = roles if per_role else (np.zeros(n, np.int32), [role])
    groups: dict[str, tuple] = {}
    by_dataset: dict = {}  # dataset -> fingerprint; with `roles`: role -> {dataset -> fingerprint}
    for code in _first_seen(role_codes):
        r, of_role = role_names[code], role_codes == code
        if datasets is None:
            names, where = [None], [np.flatnonzero(of_role)]
        else:
            ds_codes, ds_names = datasets
            present = sorted((ds_names[c], c) for c in np.unique(ds_codes[of_role]).tolist())
            names, where = [ds for ds, _ in present], [np.flatnonzero(of_role & (ds_codes == c)) for _, c in present]
        for ds, rows in zip(names, where):
            fp = teacher_fingerprint(cfg.teacher, r, ds)
            (by_dataset.setdefault(r, {}) if per_role else by_dataset)[ds] = fp
            rep, have, rep_role = groups.get(fp, (ds, np.zeros(0, np.int64), r))
            groups[fp] = (rep, np.concatenate([have, rows]), rep_role)
    return groups, by_dataset


def embed_items(items: pa.Table, role: str, cfg: Config, label: str,
                allow_failed: bool = False, datasets=None, roles=None,
                gather: bool = True) -> tuple[np.ndarray | None, dict]:
    """Vectors for `items` (rows aligned) as `role`; returns (vectors, stats). Without `gather` the vectors stay
    in the cache and None is returned in their place (a run reads them per block: pipeline/vectors.py).

    `roles` (one role per row, or None) embeds several roles in the same pass (one actor pool, one model load);
    rows of roles whose prompts are equal share one vector per item, and `stats["by_role"]` counts each role as if
    the roles had been embedded one after the other, in the order they first appear. Both `roles` and `datasets`
    take a sequence or an Arrow dictionary array of unique names (`embed_roles`: no Python object per row).

    `datasets` (one name per row, or None) picks each row's instruction (`teacher.instructions`): a row is then an
    (item, dataset) pair, rows may repeat an item, and datasets whose prompts are equal share one vector per item
    (the cache is keyed by the fingerprint of the prompt). All of them go through one Ray Data pass: a CPU stage
    decodes images, the actor pool runs the model.

    Fault tolerance is Ray Data's: its actor pool runs with max_restarts=-1 and max_task_retries=-1 (checked by
    tests/test_faults.py), so an actor whose process or node dies is restarted, on another node if need be, and
    only its in-flight blocks run again; a block's vectors are in the cache before it is returned. A block whose
    model code raises fails the run unless `run.max_errored_blocks` allows it; with `allow_failed` the items of such
    blocks get zero vectors and their ids are listed in `stats["failed_item_ids"]`.

    Without Ray (`run.executor`, pipeline/ray_session.py) the same blocks of the same planned batches go through one
    `EmbedActor` in this process (`embed_local`): the same vectors, byte for byte, and the same cache parts.
    """
    items = items.select(list(EMBED_COLUMNS))
    item_ids = items.column("item_id")
    items = items.set_column(0, "item_id", input_keys(items))  # cache keys
    datasets = _codes(datasets) if datasets is not None else None
    roles = _codes(roles) if roles is not None else None
    groups, by_dataset = _groups(role, cfg, items.num_rows, datasets, roles)
    caches = {fp: EmbeddingCache(cfg.embed.cache_dir, fp, cfg.embed.storage_options) for fp in groups}
    on_ray = ray_active(cfg)
    stats = {"items": items.num_rows, "cached": 0, "embedded": 0, "fingerprint": next(iter(groups)),
             "executor": "ray" if on_ray else "local"}
    if len(groups) > 1 and roles is None:
        stats["fingerprints"] = by_dataset  # every dataset's; datasets with equal prompts share one
    missing_parts, counted = [], {"embedded": [], "found": [], "cross": []}
    for fp, (rep, rows, rep_role) in groups.items():
        keys = items.column("item_id").take(pa.array(rows, pa.int64()))
        found = caches[fp].contains(keys)
        stats["cached"] += int(found.sum())
        kept = np.flatnonzero(~found)
        if len(kept) and (datasets is not None or roles is not None):  # an item under two names of one prompt: once
            # codes numbered in order of first appearance: an item's first row is where its code first appears
            inverse = keys.take(pa.array(kept)).combine_chunks().dictionary_encode().indices.to_numpy()
            first = np.unique(inverse, return_index=True)[1]
            if roles is not None:  # rows whose item an earlier role embeds: cached, had the roles run in turn
                own = roles[0][rows[kept]]
                counted["cross"].append(rows[kept][own[first][inverse] != own])
            kept = kept[first]
        del keys
        counted["found"].append(rows[found])
        counted["embedded"].append(rows[kept])
        stats["embedded"] += len(kept)
        if roles is None:
            missing_parts += [(fp, rep, rows[kept], rep_role)] if len(kept) else []
            continue
        row_roles = roles[0][rows[kept]]
        for code in _first_seen(row_roles):  # one part per role, in order: a role's batches run together
            missing_parts.append((fp, rep, rows[kept[row_roles == code]], roles[1][code]))
    if missing_parts:
        shape = pool_shape(cfg, on_ray)
        batch_size = resolve_batch_size(cfg.teacher, shape)
        max_tokens = cfg.teacher.batch_tokens and (cfg.teacher.max_length or model_token_limit(cfg.teacher.model))
        plans = []
        for fp, rep, part_rows, rep_role in missing_parts:  # each part's items only while it is planned
            missing = items.take(pa.array(part_rows, pa.int64()))
            plan = plan_batches(missing, batch_size, token_lengths(missing.column("embed_text"), cfg.teacher.model),
                                cfg.teacher.batch_tokens, max_tokens)
            plan = plan.append_column("role", pa.array([rep_role] * plan.num_rows, pa.string()))
            plan = plan.append_column("dataset", pa.array([rep] * plan.num_rows, pa.string()))
            plans.append(plan.append_column("fingerprint", pa.array([fp] * plan.num_rows, pa.string())))
        del missing, plan
        n_batches = sum(part.num_rows for part in plans)
        actors = min(shape["actors"], n_batches)
        blocks = cfg.embed.num_blocks or min(n_batches, max(8, 4 * actors))
        step = -(-n_batches // blocks)
        images = cfg.teacher.image_mode == "native" and any(_has_paths(part.column("image_paths")) for part in plans)
        # A block holds the batches of one part (one role) only.
        slices = [part.slice(i, step) for part in plans for i in range(0, part.num_rows, step)]
        del plans
        if on_ray:
            import ray

            ds = ray.data.from_arrow(slices)
            del slices  # in the object store now: the driver keeps no copy of the plan while the pool runs
            done = embed_stage(ds, cfg, role, shape, actors, images).iter_batches(batch_size=None,
                                                                                  batch_format="pyarrow")
        else:
            done = embed_local(slices, cfg, role, shape, images)
        total = sum(len(part_rows) for _, _, part_rows, _ in missing_parts)
        with Progress(f"embed {label}", total=total, unit="items", enabled=cfg.run.progress) as bar:
            for out in done:  # what the actors wrote, no vectors
                bar.update(int(pc.sum(out.column("rows")).as_py() or 0))
        stats.update(actors=actors, cpus_per_actor=shape["num_cpus"], gpus_per_actor=shape["num_gpus"],
                     blocks=blocks, batch_size=batch_size, batch_tokens=cfg.teacher.batch_tokens, batches=n_batches)
    if roles is not None:
        stats["by_role"] = _role_stats(groups, by_dataset, roles, counted, stats)
    if gather:
        vectors, found_all = gather_vectors(caches, groups, items.column("item_id"))
    elif missing_parts:
        vectors, found_all = None, _found(caches, groups, items.column("item_id"))
    else:  # every key was in the cache already: a warm run reads the keys once
        vectors, found_all = None, np.ones(items.num_rows, bool)
    if not found_all.all():
        if not allow_failed:
            raise RuntimeError(f"embedding cache {cfg.embed.cache_dir} is missing {int((~found_all).sum())} vectors "
                               "after embedding (blocks that failed within run.max_errored_blocks?)")
        stats["failed_item_ids"] = sorted(set(item_ids.filter(pa.array(~found_all)).to_pylist()))
    return vectors, stats


def embed_stage(ds, cfg: Config, role: str, shape: dict, actors: int, images: bool = False):
    """The embedding stage over a dataset of planned batches: the image decoding tasks (with `images`), then the
    actor pool, which writes the vectors to the cache; its output is `PARTS_SCHEMA`, no vectors."""
    import ray

    if images:
        ds = decode_stage(ds, cfg, {"image_paths": "images"}, *decode_bounds(cfg.teacher))
    ds = ds.map_batches(
        EmbedActor, batch_size=None, batch_format="pyarrow",  # a whole block per call: parts of up to a block
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=shape["num_cpus"], num_gpus=shape["num_gpus"],
        # Ray sets OMP_NUM_THREADS to an actor's whole CPUs (1 for fractions): torch's kernels then run ~20%
        # slower than with the threads the actor was given (benchmarks/overhead.py)
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(shape["threads"])}},
        fn_constructor_kwargs=actor_kwargs(cfg, role, shape))
    ds.context.max_errored_blocks = cfg.run.max_errored_blocks
    return ds


def actor_kwargs(cfg: Config, role: str, shape: dict) -> dict:
    """What an `EmbedActor` is built with, on Ray or in this process."""
    return dict(teacher_cfg=cfg.teacher, role=role, image_root=cfg.input.image_root,
                max_pixels=cfg.input.max_image_pixels, native_images=cfg.teacher.image_mode == "native",
                threads=shape["threads"], max_bytes=cfg.input.max_image_bytes,
                allowed_schemes=tuple(cfg.input.allowed_schemes), cache_dir=cfg.embed.cache_dir,
                storage_options=cfg.embed.storage_options, part_rows=CACHE_PART_ROWS, flush_s=CACHE_FLUSH_S)


@contextmanager
def _quiet_model_load(hf: bool):
    """transformers draws a "Loading weights" bar; in a Ray actor it goes to the worker's log, here it would reach
    the terminal beside hardneg's own bars: off while the model loads."""
    if not hf:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def embed_local(blocks: list, cfg: Config, role: str, shape: dict, images: bool = False):
    """`embed_stage` without Ray: the same blocks through one `EmbedActor` in this process, last block and batch
    first, yielding what each block wrote (`PARTS_SCHEMA`). Up to `run.max_errored_blocks` blocks whose model code
    raises are skipped, as Ray Data does; one more re-raises the error."""
    with _quiet_model_load(cfg.teacher.kind != "custom"):
        actor = EmbedActor(**actor_kwargs(cfg, role, shape))
    bounds = decode_bounds(cfg.teacher) if images else None
    errored = 0
    # Longest batches first (the plan ascends): the allocator keeps the largest activation buffers from the first
    # batch instead of faulting in a larger one at every step (system CPU 4.3 -> 1.7 s on 3,320 short texts).
    for block in reversed(blocks):
        block = block.take(pa.array(np.arange(block.num_rows - 1, -1, -1)))
        try:
            if images:
                block = decode_images(block, {"image_paths": "images"}, cfg.input.image_root,
                                      cfg.input.max_image_pixels, cfg.input.max_image_bytes,
                                      tuple(cfg.input.allowed_schemes), *bounds)
            out = actor(block)
        except Exception:
            errored += 1
            if errored > cfg.run.max_errored_blocks:
                raise
            continue
        yield out


def _has_paths(image_paths: pa.ChunkedArray) -> bool:
    """Whether any planned batch (a list of image paths each) holds an image path."""
    lengths = pc.utf8_length(pc.list_flatten(image_paths).cast(pa.string()))
    return bool(pc.any(pc.greater(lengths, 0)).as_py())


def _found(caches: dict, groups: dict, keys: pa.Array) -> np.ndarray:
    """Which items (cache keys `keys`) the cache holds a vector of; reads the keys only."""
    found_all = np.zeros(len(keys), bool)
    for fp, (_, rows, _) in groups.items():
        found_all[rows] = caches[fp].contains(keys.take(pa.array(rows, pa.int64())))
    return found_all


def gather_vectors(caches: dict, groups: dict, keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(n x d vectors of the items with cache keys `keys`, found mask) read back from the cache into one array;
    rows not found are zeros. Only for callers that want a small set in memory (`embed_items`, e.g. the reference
    trainer's held-out queries); a mining run reads its vectors per block (pipeline/vectors.py)."""
    vectors, found_all = None, np.zeros(len(keys), bool)
    for fp, (_, rows, _) in groups.items():
        found, cached = caches[fp].lookup(keys.take(pa.array(rows, pa.int64())))
        if cached is None:
            continue
        if vectors is None:
            vectors = np.zeros((len(keys), cached.shape[1]), np.float32)
        vectors[rows[found]] = cached
        found_all[rows[found]] = True
    if vectors is None:
        vectors = np.zeros((len(keys), 1) if len(keys) else (0, 1), np.float32)
    return vectors, found_all


POOL_STATS = ("actors", "cpus_per_actor", "gpus_per_actor", "blocks", "batch_size", "batch_tokens", "batches")


def _role_stats(groups: dict, by_role: dict, roles: tuple, counted: dict, stats: dict) -> dict:
    """Per role (`roles`: `_codes` of one role per row), the stats that embedding the roles one after the other
    would have given: an item shared with an earlier role of the same prompt counts as cached for the later one."""
    codes, names = roles
    masks = {}
    for key, parts in counted.items():
        masks[key] = np.zeros(len(codes), bool)
        for rows in parts:
            masks[key][rows] = True
    out = {}
    for code in _first_seen(codes):
        r, of_role = names[code], codes == code
        fps = by_role.get(r, {})
        n_embedded = int((masks["embedded"] & of_role).sum())
        n_cached = int(((masks["found"] | masks["cross"]) & of_role).sum())
        out[r] = {"items": int(of_role.sum()), "cached": n_cached, "embedded": n_embedded,
                  "fingerprint": next(iter(fps.values()), next(iter(groups))), "executor": stats["executor"]}
        if len(set(fps.values())) > 1:
            out[r]["fingerprints"] = fps  # every dataset's; datasets with equal prompts share one
        if n_embedded:
            out[r].update({k: stats[k] for k in POOL_STATS if k in stats})
    return out


def _dataset_rows(rows_by_dataset: dict, cfg: Config) -> tuple[list, list[np.ndarray]]:
    """(dataset order, unique item rows per dataset); without `teacher.instructions` one group (None) of all rows:
    each item is embedded once whatever its datasets (today's cache key)."""
    if not cfg.teacher.instructions:
        return [None], [np.unique(np.concatenate([np.zeros(0, np.int64),
                                                  *[np.asarray(r, np.int64) for r in rows_by_dataset.values()]]))]
    order = sorted(rows_by_dataset, key=str)
    return order, [np.unique(np.asarray(rows_by_dataset[ds], np.int64)) for ds in order]


def role_fingerprint(cfg: Config, role: str, dataset) -> str:
    """The cache fingerprint of `role`'s vectors for `dataset`'s rows (its instruction with `teacher.instructions`)."""
    return teacher_fingerprint(cfg.teacher, role, str(dataset) if cfg.teacher.instructions else None)


def _repeat(names: list[str], sizes: list[int]) -> pa.DictionaryArray:
    """names[i] `sizes[i]` times, as codes into the distinct names (what `_codes` reads)."""
    distinct = list(dict.fromkeys(names))
    codes = np.repeat(np.array([distinct.index(n) for n in names], np.int32), sizes)
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(distinct, pa.string()))


def embed_roles(items: pa.Table, requests: list[tuple[str, dict, str]], cfg: Config,
                allow_failed: bool = False) -> list[dict]:
    """Embed `items` rows for several `(role, {dataset: item rows}, label)` requests in one embedding pass into the
    cache: one actor pool and one model load for all of them (queries and candidates of a run), and an item that two
    roles with equal prompts need is embedded once. With `teacher.instructions` a row is embedded with its
    dataset's prompt. Returns one stats dict per request, counted as if the requests ran in order; no vectors (they
    stay in the cache: `role_fingerprint` names where)."""
    parts = [_dataset_rows(rows_by_dataset, cfg) for _, rows_by_dataset, _ in requests]
    flat = np.concatenate([np.zeros(0, np.int64), *[r for _, all_rows in parts for r in all_rows]])
    if not len(flat):  # nothing to embed: each request on its own gives its empty stats
        return [embed_items(items.take(pa.array([], pa.int64())), role, cfg, lbl, allow_failed, gather=False)[1]
                for role, _, lbl in requests]
    sizes = [len(r) for _, all_rows in parts for r in all_rows]
    roles = _repeat([role for (role, _, _), (_, all_rows) in zip(requests, parts) for _ in all_rows], sizes)
    names = _repeat([str(ds) for order, _ in parts for ds in order], sizes) if cfg.teacher.instructions else None
    label = " + ".join(lbl for _, _, lbl in requests)
    _, stats = embed_items(items.select(list(EMBED_COLUMNS)).take(pa.array(flat, pa.int64())), requests[0][0], cfg,
                           label, allow_failed, datasets=names, roles=roles, gather=False)
    out = []
    for (role, _, _), (order, all_rows) in zip(requests, parts):
        role_stats = dict(stats["by_role"].get(role, {"items": 0, "cached": 0, "embedded": 0,
                                                      "fingerprint": teacher_fingerprint(cfg.teacher, role)}))
        if "failed_item_ids" in stats:
            mine = items.column("item_id").take(pa.array(np.concatenate([np.zeros(0, np.int64), *all_rows]),
                                                         pa.int64())).combine_chunks()
            failed = pa.array(stats["failed_item_ids"], mine.type)
            role_stats["failed_item_ids"] = failed.filter(pc.is_in(failed, value_set=mine)).to_pylist()
        out.append(role_stats)
    return out


def embed_or_reject(state_dir, meta, cfg: Config):
    """Embed every item once with `run.max_errored_blocks` in force and reject what could not be embedded.

    Used when the user allows errored blocks: queries whose query or positive item failed become rejects with
    reason `embed_failed`, failed candidates leave the pools. Later look-ups of the survivors hit the cache. Works on
    the read stage's files in `state_dir` (pipeline/search.py `write_corpus`); returns their new `meta`.
    """
    from .blocks import read_items
    from .search import corpus_rows, drop_failed

    failed: set[str] = set()
    _, cand_rows, qry_rows = corpus_rows(state_dir, meta)
    for rows, role, label in ((cand_rows, "candidate", "candidates"), (qry_rows, "query", "queries")):
        [stats] = embed_roles(read_items(state_dir), [(role, rows, label)], cfg, allow_failed=True)
        failed.update(stats.get("failed_item_ids", []))
    del cand_rows, qry_rows
    return drop_failed(state_dir, meta, failed, "embed_failed",
                       "the embedding block holding this item failed (within run.max_errored_blocks); see the "
                       "Ray logs for the model error", cfg.retrieve.block_rows, ray_active(cfg))
