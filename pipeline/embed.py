"""Embed items with the teacher: cache look-up and batch planning in block tasks, a Ray Data pool of model actors for
the misses.

Batches are planned per fixed range of `PLAN_ROWS` item rows (its misses sorted by text length, in the model's
tokens where its fast tokenizer is at hand, else in characters, then by row, and cut into `batch_size`), written to
plan files, and each planned batch travels as one row, so a vector never depends on how many tasks, actors or blocks
ran: the same config gives the same bytes. The driver holds the plan files' names and counts, never an item's text:
the actors read each batch's texts from `items.arrow` and write the vectors to the cache themselves (a local path or
an fsspec URI every node reaches) as each block finishes, so an interrupted run keeps what it embedded and no vector
passes through the driver on its way to the cache.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .blocks import _write_ipc, open_ipc, take_rows
from .config import Config
from .executor import map_blocks
from .progress import Progress
from .ray_session import cuda_devices, ray_active, ray_is_up
from .teachers import teacher_fingerprint
from .teachers.base import decode_bounds, resolve_model_path
from .write import write_new_part

CACHE_PART_ROWS = 65_536
CACHE_FLUSH_S = 30.0  # vectors wait at most this long in an actor before they are written to the cache
EMBED_COLUMNS = ("item_id", "embed_text", "image_path")  # what embedding reads of an item
PLAN_CHUNK = 10_000  # rows per step of a planning task's per-row Python work (keys, token counts): bounded memory
PLAN_ROWS = 65_536  # item rows a planning task keys, looks up and plans: a constant, so the batches stay the same


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
        """(found mask, vectors of the found keys in the order of `ids`, the items' `input_keys`). Each part's keys
        are read first; a part that holds wanted keys has its vectors decoded and copied once, straight into place
        (a filtered scan, then concatenating and reordering, copied every vector four times). A key in several
        parts is taken from the first, in part order."""
        found = np.zeros(len(ids), dtype=bool)
        vectors = None
        for path in self.parts() if len(ids) else ():
            with (open(path, "rb") if self.local else self.fs.open(path, "rb")) as f:
                part = pq.ParquetFile(f)
                pos = pc.index_in(ids, value_set=part.read(columns=["key"]).column("key"))
                new = pos.is_valid().to_numpy(zero_copy_only=False) & ~found
                if not new.any():
                    continue
                stored = _to_numpy(part.read(columns=["vector"]).column("vector"))
            if vectors is None:
                vectors = np.empty((len(ids), stored.shape[1]), stored.dtype)
            vectors[new] = stored[pos.to_numpy(zero_copy_only=False)[new].astype(np.int64)]
            found |= new
        if vectors is None:
            return found, None
        return found, vectors if found.all() else vectors[found]

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
    """One row per model batch: a list of each of `items`' columns, similar lengths together to save padding.

    `lengths` (one per item) orders the items, e.g. token counts from `token_lengths`; default: characters of
    `embed_text`. With `batch_tokens` a batch also stops before its padded size (items x its longest item, clipped
    at `max_tokens`) passes that many tokens: long texts run faster in smaller batches on CPU (cache-sized
    activations)."""
    order = _length_order(items, lengths)
    n = len(order)
    if batch_tokens and lengths is not None and n:
        sizes = np.asarray(lengths)[order] + 2  # the special tokens a text model adds
        starts = _budget_starts(np.minimum(sizes, max_tokens) if max_tokens else sizes, batch_size, batch_tokens)
    else:
        starts = np.arange(0, n, batch_size)
    offsets = pa.array(np.append(starts, n).astype(np.int32))
    order = pa.array(order, pa.int64())
    return pa.table({name: pa.ListArray.from_arrays(offsets, items.column(name).take(order).combine_chunks())
                     for name in items.column_names})


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
    return np.lexsort((np.arange(items.num_rows), lengths))  # then by position: item rows ascend


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
    the planning process, and the allocator kept them after they were freed (docs/scale.md)."""
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

        if "plan" in batch.column_names:  # plan specs: read the batches (a decode stage reads them when images)
            batch = read_batches(batch)
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


def _first_seen(codes: np.ndarray) -> np.ndarray:
    """The distinct codes in the order of their first row."""
    distinct, first = np.unique(codes, return_index=True)
    return distinct[np.argsort(first)]


def _batch_size(cfg: Config, on_ray: bool) -> int:
    """`teacher.batch_size`; only `auto` asks for the pool's shape (a GPU probe on Ray, torch on a CUDA host)."""
    if cfg.teacher.batch_size != "auto":
        return int(cfg.teacher.batch_size)
    return resolve_batch_size(cfg.teacher, pool_shape(cfg, on_ray))


@dataclass(frozen=True)
class PlanSpec:
    """One planning task: item rows [lo, lo + PLAN_ROWS) of `items` (an `items.arrow`) for every group that holds
    some of them. `members` are (group, role code, slices (file, start, stop) of `sort_rows` files that hold the
    range's rows), in each group's order: roles in the order of the requests, then datasets by name."""

    items: str
    out: str
    members: tuple
    groups: tuple          # (fingerprint, dataset whose instruction it is, role) per group
    roles: tuple           # role names, by code
    cache_dir: str
    storage_options: dict | None
    model: str
    batch_size: int
    batch_tokens: int | None
    max_tokens: int | None


def plan_range(spec: PlanSpec) -> dict:
    """Look one range's rows up in the cache and plan batches of its misses, written to `spec.out` (Arrow IPC, one
    row per batch: cache keys, item rows, role, dataset, fingerprint). Returns counts only: per role (items, cached,
    embedded), the misses' sections of the file ((group, role code) -> first batch, batches) and whether any miss
    has an image path. An item under two roles or datasets of one prompt (one fingerprint) is planned once, under
    the first; a row whose item an earlier role embeds counts as cached, as if the roles had run in turn."""
    items = open_ipc(Path(spec.items)).select(list(EMBED_COLUMNS))
    n_roles = len(spec.roles)
    counts = np.zeros((n_roles, 3), np.int64)  # items, cached, embedded per role code
    embedded = batches = 0
    plans, sections, images = [], [], False
    for g, (fp, rep, _) in enumerate(spec.groups):
        mine = [(code, _range_rows(slices)) for group, code, slices in spec.members if group == g]
        if not mine:
            continue
        rows = np.concatenate([r for _, r in mine])
        own = np.repeat(np.array([c for c, _ in mine], np.int64), [len(r) for _, r in mine])
        keys = input_keys(take_rows(items, rows))  # not Arrow's take: it copies whole chunked columns
        found = EmbeddingCache(spec.cache_dir, fp, spec.storage_options).contains(keys)
        counts[:, 0] += np.bincount(own, minlength=n_roles)
        counts[:, 1] += np.bincount(own[found], minlength=n_roles)
        kept = np.flatnonzero(~found)
        # codes numbered in order of first appearance: an item's first row is where its code first appears
        inverse = keys.take(pa.array(kept, pa.int64())).dictionary_encode().indices.to_numpy()
        first = np.unique(inverse, return_index=True)[1]
        counts[:, 1] += np.bincount(own[kept][own[kept][first][inverse] != own[kept]], minlength=n_roles)
        kept = kept[first]
        counts[:, 2] += np.bincount(own[kept], minlength=n_roles)
        embedded += len(kept)
        for code in _first_seen(own[kept]):  # a role's batches together
            part = kept[own[kept] == code]
            part_rows = pa.array(rows[part], pa.int64())
            texts = take_rows(items.column("embed_text"), rows[part])
            plan = plan_batches(pa.table({"item_ids": keys.take(pa.array(part, pa.int64())), "rows": part_rows,
                                          "embed_text": texts}),
                                spec.batch_size, token_lengths(texts, spec.model), spec.batch_tokens,
                                spec.max_tokens).select(["item_ids", "rows"])
            n = plan.num_rows
            for name, value in (("role", spec.roles[code]), ("dataset", rep), ("fingerprint", fp)):
                plan = plan.append_column(name, pa.array([value] * n, pa.string()))
            images = images or _has_paths(take_rows(items.column("image_path"), rows[part]))
            sections.append(((g, int(code)), batches, n))
            plans.append(plan)
            batches += n
    if plans:
        _write_ipc(pa.concat_tables(plans), Path(spec.out), max(batches, 1))
    return {"counts": counts, "embedded": embedded, "sections": sections, "images": images,
            "plan": spec.out if plans else None}


def _range_rows(slices: tuple) -> np.ndarray:
    """The sorted unique item rows of one range of one member: its slices of `sort_rows` files (one a dataset)."""
    parts = [np.array(np.load(path, mmap_mode="r")[start:stop]) for path, start, stop in slices]
    return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))


def sort_rows(spec: tuple) -> dict:
    """One request's item rows ((file, dtype, byte offset, count), memory-mapped) sorted and unique into the `.npy`
    file `out`; returns where each `PLAN_ROWS` range's rows lie in it ({range: (start, stop)}): planning tasks
    slice their range from the file, so the driver holds bounds, not rows."""
    (path, dtype, offset, count), out = spec
    rows = np.unique(np.memmap(path, np.dtype(dtype), "r", offset, (count,)).astype(np.int64))
    np.save(out, rows)
    ranges, starts = np.unique(rows // PLAN_ROWS, return_index=True)
    return {int(r): (int(a), int(b)) for r, a, b in zip(ranges, starts, np.append(starts[1:], len(rows)))}


def _row_source(rows, path: Path) -> tuple:
    """(file, dtype, byte offset, count) of a request's item rows for `sort_rows`: where they lie in their `.npy`
    file when they are a slice of one memory-mapped (`np.load(mmap_mode="r")`: the read stage's files), so no task
    copies them; other arrays (small, the caller's) are written to `path`."""
    if isinstance(rows, np.memmap) and rows.ndim == 1 and rows.flags.c_contiguous and rows.dtype.kind in "iu":
        whole = rows
        while isinstance(whole.base, np.memmap):  # a slice's base is the array it was cut from
            whole = whole.base
        data = _npy_data_offset(whole.filename)
        if data is not None and whole.offset == data:  # the file's array, mapped from its header's end
            return str(whole.filename), rows.dtype.str, data + rows.ctypes.data - whole.ctypes.data, len(rows)
    rows = np.asarray(rows, np.int64)
    rows.tofile(path)
    return str(path), rows.dtype.str, 0, len(rows)


def _npy_data_offset(path) -> int | None:
    """Where a `.npy` file's array starts: after its header, read as `np.load` reads it; None if no `.npy` file."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return None
            read_header(f)
            return f.tell()
    except (OSError, ValueError):
        return None


def read_batches(specs: pa.Table) -> pa.Table:
    """The planned batches that `specs` name (rows of items, plan, start, end: batches [start, end) of a
    `plan_range` file) with their texts and image paths read by item row from `items.arrow`, memory-mapped: the
    model's input never passes through the driver."""
    out = []
    for spec in specs.to_pylist():
        plan = open_ipc(Path(spec["plan"])).slice(spec["start"], spec["end"] - spec["start"])
        items = open_ipc(Path(spec["items"]))
        lists = plan.column("rows").combine_chunks()
        rows = pc.list_flatten(lists)
        offsets = pa.array(np.append(0, np.cumsum(pc.list_value_length(lists).to_numpy())).astype(np.int32))
        for name, col in (("texts", "embed_text"), ("image_paths", "image_path")):
            plan = plan.append_column(name, pa.ListArray.from_arrays(
                offsets, take_rows(items.column(col), rows.to_numpy())))
        out.append(plan.drop_columns(["rows"]))
    return pa.concat_tables(out)


def _check_part(spec: tuple) -> tuple[int, list]:
    """(misses, item rows) of one plan file's keys that the cache still lacks after embedding: the items of
    blocks that failed within `run.max_errored_blocks`."""
    path, cache_dir, storage_options = spec
    plan = open_ipc(Path(path))
    failed = []
    fps = plan.column("fingerprint")
    for fp in pc.unique(fps).to_pylist():
        part = plan.filter(pc.equal(fps, fp))
        keys = pc.list_flatten(part.column("item_ids"))
        found = EmbeddingCache(cache_dir, fp, storage_options).contains(keys)
        failed.append(pc.list_flatten(part.column("rows")).to_numpy()[~found])
    failed = np.concatenate([np.zeros(0, np.int64), *failed])
    return len(failed), failed.tolist()


def embed_stage(ds, cfg: Config, role: str, shape: dict, actors: int, images: bool = False):
    """The embedding stage over a dataset of plan specs (`read_batches`): with `images` the tasks that read the
    batches and decode their images, then the actor pool (which reads its own batches otherwise) and writes the
    vectors to the cache; its output is `PARTS_SCHEMA`, no vectors."""
    import ray

    if images:
        ds = ds.map_batches(read_batches, batch_size=None, batch_format="pyarrow", num_cpus=DECODE_CPUS)
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


def embed_local(specs: list[dict], cfg: Config, role: str, shape: dict, images: bool = False):
    """`embed_stage` without Ray: the same blocks (plan specs, `read_batches`) through one `EmbedActor` in this
    process, last block and batch first, yielding what each block wrote (`PARTS_SCHEMA`). Up to
    `run.max_errored_blocks` blocks whose model code raises are skipped, as Ray Data does; one more re-raises."""
    with _quiet_model_load(cfg.teacher.kind != "custom"):
        actor = EmbedActor(**actor_kwargs(cfg, role, shape))
    bounds = decode_bounds(cfg.teacher) if images else None
    errored = 0
    # Longest batches first (the plan ascends): the allocator keeps the largest activation buffers from the first
    # batch instead of faulting in a larger one at every step (system CPU 4.3 -> 1.7 s on 3,320 short texts).
    for spec in reversed(specs):
        try:
            block = read_batches(pa.Table.from_pylist([spec]))
            block = block.take(pa.array(np.arange(block.num_rows - 1, -1, -1)))
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


def _has_paths(image_paths) -> bool:
    """Whether any of `image_paths` is one."""
    return bool(pc.any(pc.greater(pc.utf8_length(image_paths.cast(pa.string())), 0)).as_py())


def gather_vectors(caches: dict, groups: dict, keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(n x d vectors of the items with cache keys `keys`, found mask) read back from the cache into one array
    (`groups`: fingerprint -> rows); rows not found are zeros. Only for callers that want a small set in memory
    (`embed_items`, e.g. the reference trainer's held-out queries); a mining run reads its vectors per block
    (pipeline/vectors.py)."""
    vectors, found_all = None, np.zeros(len(keys), bool)
    for fp, rows in groups.items():
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


def _dataset_rows(sources: dict, cfg: Config) -> tuple[list, list[tuple]]:
    """(dataset order, the `sort_rows` sources of each group's rows); without `teacher.instructions` one group
    (None) of all datasets: each item is embedded once whatever its datasets (today's cache key)."""
    if not cfg.teacher.instructions:
        return [None], [tuple(sources.values())]
    order = sorted(sources, key=str)
    return order, [(sources[ds],) for ds in order]


def role_fingerprint(cfg: Config, role: str, dataset) -> str:
    """The cache fingerprint of `role`'s vectors for `dataset`'s rows (its instruction with `teacher.instructions`)."""
    return teacher_fingerprint(cfg.teacher, role,
                               str(dataset) if cfg.teacher.instructions and dataset is not None else None)


def _plan_groups(parts: list, roles: list[str], cfg: Config) -> tuple[list, list, dict]:
    """(groups, members, by role) of the requests' (role, (dataset order, non-empty sources)): one group per
    fingerprint, so datasets and roles of equal prompts share one vector per item. `groups`: (fingerprint, its
    first dataset, its first role); `members`: (group, role code, sources) in each group's order (roles in the
    order of the requests, then datasets by name); `by_role`: role -> {dataset -> fingerprint}."""
    index, groups, members, by_role = {}, [], [], {}
    for code, r in enumerate(roles):
        entries = sorted(((str(ds), ds, rows) for role, (order, all_rows) in parts if role == r
                          for ds, rows in zip(order, all_rows) if rows), key=lambda e: e[0])
        for _, ds, rows in entries:
            fp = role_fingerprint(cfg, r, ds)
            by_role.setdefault(r, {})[ds] = fp
            if fp not in index:
                index[fp] = len(groups)
                groups.append((fp, ds, r))
            members.append((index[fp], code, rows))
    members.sort(key=lambda m: m[0])  # stable: a group's rows in role, then dataset order
    return groups, members, by_role


POOL_STATS = ("actors", "cpus_per_actor", "gpus_per_actor", "blocks", "batch_size", "batch_tokens", "batches")


def embed_roles(items_path: str | Path, requests: list[tuple[str, dict, str]], cfg: Config,
                allow_failed: bool = False) -> list[dict]:
    """Embed rows of the item table at `items_path` (an `items.arrow`, read memory-mapped) for several
    `(role, {dataset: item rows}, label)` requests in one embedding pass into the cache: one actor pool and one
    model load for all of them (queries and candidates of a run), and an item that two roles with equal prompts
    need is embedded once. With `teacher.instructions` a row is embedded with its dataset's prompt. Returns one
    stats dict per request, counted as if the requests ran in order; no vectors (they stay in the cache:
    `role_fingerprint` names where).

    The driver holds no per-item data of its own: a task per (request, dataset) (`sort_rows`, Ray tasks or a loop
    in this process) sorts its item rows into a file, read memory-mapped where the caller's rows are (the read
    stage's files); block tasks (`plan_range`) each read, key, look up and plan `PLAN_ROWS` item rows from those
    files and write their batches to a plan file beside `items_path`; the driver keeps file names, range bounds
    and counts. Ranges are fixed, so a batch (and its vectors) never depends on how many tasks, blocks or actors
    run. The actors (or `embed_local`) read each batch's texts and image paths from `items.arrow` themselves.

    Fault tolerance is Ray Data's: its actor pool runs with max_restarts=-1 and max_task_retries=-1 (checked by
    tests/test_faults.py), so an actor whose process or node dies is restarted, on another node if need be, and
    only its in-flight blocks run again; a block's vectors are in the cache before it is returned. A block whose
    model code raises fails the run unless `run.max_errored_blocks` allows it; with `allow_failed` the ids of such
    blocks' items are listed in each request's `failed_item_ids`.
    """
    items_path = Path(items_path)
    on_ray = ray_active(cfg)
    executor = "ray" if on_ray else "local"
    plan_dir = items_path.parent / f"embed-plan-{uuid.uuid4().hex[:8]}"
    plan_dir.mkdir(parents=True)
    try:
        sources, ids = [], []  # (source, its sorted file) per non-empty (request, dataset); their ids per request
        for _, rows_by_dataset, _ in requests:
            ids.append({})
            for ds, rows in rows_by_dataset.items():
                if len(rows):
                    ids[-1][ds] = i = len(sources)
                    sources.append((_row_source(rows, plan_dir / f"request-{i:05d}.bin"),
                                    str(plan_dir / f"rows-{i:05d}.npy")))
        bounds = list(map_blocks(sort_rows, sources, on_ray))
        parts = [(role, _dataset_rows(mine, cfg)) for (role, _, _), mine in zip(requests, ids)]
        roles = list(dict.fromkeys(role for role, (_, all_rows) in parts if any(all_rows)))
        groups, members, by_role = _plan_groups(parts, roles, cfg)
        if not members:  # nothing to embed: each request's empty stats
            return [{"items": 0, "cached": 0, "embedded": 0, "fingerprint": teacher_fingerprint(cfg.teacher, role),
                     "executor": executor} for role, _, _ in requests]
        batch_tokens = cfg.teacher.batch_tokens
        max_tokens = batch_tokens and (cfg.teacher.max_length or model_token_limit(cfg.teacher.model))
        batch_size = _batch_size(cfg, on_ray)
        specs = []
        for r in sorted(set().union(*bounds)):
            cut = [(g, code, tuple((sources[i][1], *bounds[i][r]) for i in mine if r in bounds[i]))
                   for g, code, mine in members]
            specs.append(PlanSpec(str(items_path), str(plan_dir / f"plan-{r:05d}.arrow"),
                                  tuple(c for c in cut if c[2]), tuple(groups), tuple(roles),
                                  cfg.embed.cache_dir, cfg.embed.storage_options, cfg.teacher.model,
                                  batch_size, batch_tokens, max_tokens))
        planned = list(map_blocks(plan_range, specs, on_ray))
        counts = sum(p["counts"] for p in planned)
        stats, failed_rows = {"executor": executor}, np.zeros(0, np.int64)
        if any(p["embedded"] for p in planned):
            label = " + ".join(lbl for _, _, lbl in requests)
            stats.update(_embed_planned(planned, items_path, cfg, roles[0], label, on_ray, batch_size))
            checked = list(map_blocks(_check_part, [(p["plan"], cfg.embed.cache_dir, cfg.embed.storage_options)
                                                    for p in planned if p["plan"]], on_ray))
            missing = sum(n for n, _ in checked)
            if missing and not allow_failed:
                raise RuntimeError(f"embedding cache {cfg.embed.cache_dir} is missing {missing} vectors after "
                                   "embedding (blocks that failed within run.max_errored_blocks?)")
            failed_rows = np.unique(np.array([r for _, rows in checked for r in rows], np.int64))
    finally:
        shutil.rmtree(plan_dir, ignore_errors=True)
    by_name = {}
    for code, r in enumerate(roles):
        n_items, n_cached, n_embedded = (int(x) for x in counts[code])
        fps = by_role[r]
        by_name[r] = {"items": n_items, "cached": n_cached, "embedded": n_embedded,
                      "fingerprint": next(iter(fps.values())), "executor": executor}
        if len(set(fps.values())) > 1:
            by_name[r]["fingerprints"] = fps  # every dataset's; datasets with equal prompts share one
        if n_embedded:
            by_name[r].update({k: stats[k] for k in POOL_STATS})
    failed_ids = None
    if len(failed_rows):  # only with `allow_failed`
        failed_ids = open_ipc(items_path).column("item_id").take(pa.array(failed_rows, pa.int64())).combine_chunks()
    out = []
    for role, rows_by_dataset, _ in requests:
        role_stats = dict(by_name.get(role, {"items": 0, "cached": 0, "embedded": 0,
                                             "fingerprint": teacher_fingerprint(cfg.teacher, role)}))
        if failed_ids is not None:
            mine = np.isin(failed_rows, np.concatenate([np.zeros(0, np.int64),
                                                        *[np.asarray(r, np.int64) for r in rows_by_dataset.values()]]))
            role_stats["failed_item_ids"] = sorted(set(failed_ids.filter(pa.array(mine)).to_pylist()))
        out.append(role_stats)
    return out


def _embed_planned(planned: list[dict], items_path: Path, cfg: Config, role: str, label: str, on_ray: bool,
                   batch_size: int) -> dict:
    """Run the planned batches (`plan_range`'s files) through the actor pool, or `embed_local` without Ray: blocks
    of at most `step` batches of one (group, role) section of one file, a section's blocks together. Returns the
    pool's stats."""
    shape = pool_shape(cfg, on_ray)
    n_batches = sum(n for p in planned for _, _, n in p["sections"])
    actors = min(shape["actors"], n_batches)
    blocks = cfg.embed.num_blocks or min(n_batches, max(8, 4 * actors))
    step = -(-n_batches // blocks)
    sections = sorted((key, i, first, n) for i, p in enumerate(planned) for key, first, n in p["sections"])
    specs = [{"items": str(items_path), "plan": planned[i]["plan"], "start": s, "end": min(s + step, first + n)}
             for _, i, first, n in sections for s in range(first, first + n, step)]
    images = cfg.teacher.image_mode == "native" and any(p["images"] for p in planned)
    if on_ray:
        import ray

        ds = ray.data.from_items(specs, override_num_blocks=len(specs))
        done = embed_stage(ds, cfg, role, shape, actors, images).iter_batches(batch_size=None,
                                                                              batch_format="pyarrow")
    else:
        done = embed_local(specs, cfg, role, shape, images)
    total = sum(p["embedded"] for p in planned)
    with Progress(f"embed {label}", total=total, unit="items", enabled=cfg.run.progress) as bar:
        for out in done:  # what the actors wrote, no vectors
            bar.update(int(pc.sum(out.column("rows")).as_py() or 0))
    return dict(actors=actors, cpus_per_actor=shape["num_cpus"], gpus_per_actor=shape["num_gpus"], blocks=blocks,
                batch_size=batch_size, batch_tokens=cfg.teacher.batch_tokens, batches=n_batches)


def embed_items(items: pa.Table, role: str, cfg: Config, label: str, allow_failed: bool = False,
                datasets=None) -> tuple[np.ndarray, dict]:
    """Vectors of a small in-memory item table as `role` (rows aligned; `datasets`: one name per row, or None, for
    `teacher.instructions`), and the stats: embedded by `embed_roles` from a temporary `items.arrow`, read back from
    the cache. For callers that want a small set in memory (the reference trainer's held-out texts); a mining run
    reads its vectors per block (pipeline/vectors.py). With `allow_failed` rows that failed are zeros."""
    rows_by_dataset: dict = {}
    for i, ds in enumerate([None] * items.num_rows if datasets is None else [str(d) for d in datasets]):
        rows_by_dataset.setdefault(ds, []).append(i)
    with tempfile.TemporaryDirectory(prefix="hardneg-embed-") as tmp:
        path = Path(tmp) / "items.arrow"
        _write_ipc(items.select(list(EMBED_COLUMNS)), path, max(items.num_rows, 1))
        [stats] = embed_roles(path, [(role, rows_by_dataset, label)], cfg, allow_failed)
    groups: dict = {}
    for ds, rows in rows_by_dataset.items():
        fp = role_fingerprint(cfg, role, ds)
        groups[fp] = np.concatenate([groups.get(fp, np.zeros(0, np.int64)), np.asarray(rows, np.int64)])
    caches = {fp: EmbeddingCache(cfg.embed.cache_dir, fp, cfg.embed.storage_options) for fp in groups}
    vectors, _ = gather_vectors(caches, groups, input_keys(items))
    return vectors, stats


def embed_or_reject(state_dir, meta, cfg: Config):
    """Embed every item once with `run.max_errored_blocks` in force and reject what could not be embedded.

    Used when the user allows errored blocks: queries whose query or positive item failed become rejects with
    reason `embed_failed`, failed candidates leave the pools. Later look-ups of the survivors hit the cache. Works on
    the read stage's files in `state_dir` (pipeline/search.py `write_corpus`); returns their new `meta`.
    """
    from .search import corpus_rows, drop_failed

    failed: set[str] = set()
    _, cand_rows, qry_rows = corpus_rows(state_dir, meta)
    for rows, role, label in ((cand_rows, "candidate", "candidates"), (qry_rows, "query", "queries")):
        [stats] = embed_roles(Path(state_dir) / "items.arrow", [(role, rows, label)], cfg, allow_failed=True)
        failed.update(stats.get("failed_item_ids", []))
    del cand_rows, qry_rows
    return drop_failed(state_dir, meta, failed, "embed_failed",
                       "the embedding block holding this item failed (within run.max_errored_blocks); see the "
                       "Ray logs for the model error", cfg.retrieve.block_rows, ray_active(cfg))
