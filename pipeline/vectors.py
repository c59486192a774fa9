"""One role's vectors of a retrieval, per dataset, as float32 `.npy` shards on disk: what search block tasks read.

After the embedding pass, block tasks look the vectors of each (role, dataset) up in the cache parts and write them
in row order (a dataset's pool first, so the pool is a prefix that `NpyShards` indexes, then its other rows) under
the run's state dir. `VectorStore` is paths and a few numbers: it pickles to a few KB, travels to any worker, and
`get(dataset, rows)` memory-maps the shards. No process holds the n x d array, but for a job that runs in this
process and whose vectors one task gathers anyway (at most SHARD_ROWS rows): it keeps them in memory (`held`)
instead of writing shards and mapping them back, which is most of a small warm run's vector time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from .blocks import open_ipc, take_rows
from .embed import EmbeddingCache, input_keys
from .executor import map_blocks
from .index import ArraySource, NpyShards

SHARD_ROWS = 65_536


@dataclass
class VectorStore:
    """Vectors of item rows as one role, per dataset: `get(dataset, rows)`, memory-mapped from `root`."""

    root: str
    datasets: dict = field(default_factory=dict)  # dataset -> {"dir", "n", "pool", "shards": [[lo, hi], ...]}
    dim: int = 0
    held: dict = field(default_factory=dict, repr=False, compare=False)  # dataset -> vectors in store order, in memory
    _open: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # dataset -> its mapped files

    def __getstate__(self) -> dict:
        if self.held:
            raise TypeError("a VectorStore that holds its vectors in memory stays in the process that gathered them")
        return {**self.__dict__, "_open": {}}  # maps stay in the process that opened them

    def _opened(self, dataset) -> tuple:
        """(order, sorted rows, shards) of a dataset, memory-mapped once per process: a search task calls `get`
        per chunk of queries (opening them per call cost ~0.5 ms)."""
        ds = str(dataset)
        if ds not in self._open:
            d = self._dir(ds)
            self._open[ds] = (np.load(d / "order.npy", mmap_mode="r"), np.load(d / "sorted.npy", mmap_mode="r"),
                              ArraySource(self.held[ds]) if ds in self.held else NpyShards(self.shard_paths(ds)))
        return self._open[ds]

    def _dir(self, dataset) -> Path:
        return Path(self.root) / self.datasets[str(dataset)]["dir"]

    def shard_paths(self, dataset, pool_only: bool = False) -> list[str]:
        meta = self.datasets[str(dataset)]
        return [str(self._dir(dataset) / f"part-{i:05d}.npy") for i, (lo, _) in enumerate(meta["shards"])
                if not pool_only or lo < meta["pool"]]

    def pool(self, dataset) -> ArraySource | NpyShards:
        """The dataset's pool rows (the first `pool` rows, whole shards), as an index reads them."""
        if str(dataset) in self.held:
            return ArraySource(self.held[str(dataset)][:self.datasets[str(dataset)]["pool"]])
        return NpyShards(self.shard_paths(dataset, pool_only=True))

    def positions(self, dataset, rows) -> np.ndarray:
        order, ordered, _ = self._opened(dataset)
        rows = np.asarray(rows, np.int64)
        at = np.minimum(np.searchsorted(ordered, rows), max(len(ordered) - 1, 0))
        if len(rows) and (not len(ordered) or (ordered[at] != rows).any()):
            missing = rows[(ordered[at] != rows) if len(ordered) else slice(None)]
            raise KeyError(f"item rows {missing[:5].tolist()} have no vector in {self._dir(dataset)} "
                           f"(dataset {dataset!r})")
        return np.asarray(order[at], np.int64) if len(rows) else np.zeros(0, np.int64)

    def get(self, dataset, rows) -> np.ndarray:
        return self.at(dataset, self.positions(dataset, rows))

    def at(self, dataset, positions) -> np.ndarray:
        """The vectors at places in the store order (a pool row's place is its id in the dataset's index)."""
        if not len(positions):
            return np.zeros((0, self.dim), np.float32)
        return self._opened(dataset)[2].take(np.asarray(positions, np.int64))


def layout(rows_by_dataset: dict, pools: dict | None = None) -> dict:
    """{dataset: item rows in store order}: a dataset's pool first (in pool order), then its other rows, sorted."""
    out = {}
    for ds, rows in rows_by_dataset.items():
        rows = np.unique(np.asarray(rows, np.int64))
        pool = np.asarray(pools[ds], np.int64) if pools is not None and ds in pools else np.zeros(0, np.int64)
        out[str(ds)] = np.concatenate([pool, np.setdiff1d(rows, pool)])
    return out


def write_stores(requests: list, items_path: Path, cfg, use_ray: bool, shard_rows: int = SHARD_ROWS
                 ) -> list[VectorStore]:
    """Write one store per request `(root, rows, fingerprints, pools)` (`rows`: {dataset: item rows in store order},
    `layout`; `fingerprints`: {dataset: teacher fingerprint}; `pools` or None) from the embedding cache, as `.npy`
    shards under `root`. Shards end where the pool ends, so the pool is whole shards. One block task writes
    consecutive shards of up to `shard_rows` rows together, from one scan of the cache: a small job's query and
    candidate stores take one scan, a large store one task (and scan) per shard. Without Ray, a job of one task
    keeps the vectors it gathers in the stores (`held`) and writes no shards."""
    stores, specs, whole = [], [], []
    for root, rows, fingerprints, pools in requests:
        root = Path(root)
        store = VectorStore(str(root))
        for j, (ds, order) in enumerate(sorted(rows.items())):
            d = root / f"ds-{j:05d}"
            d.mkdir(parents=True, exist_ok=True)
            np.save(d / "rows.npy", order)
            by_row = np.argsort(order, kind="stable")
            np.save(d / "order.npy", by_row)
            np.save(d / "sorted.npy", order[by_row])
            n_pool = len(pools[ds]) if pools is not None and ds in pools else 0
            cuts = sorted({0, n_pool, len(order), *range(0, len(order), shard_rows),
                           *range(n_pool, len(order), shard_rows)})
            shards = [[lo, hi] for lo, hi in zip(cuts, cuts[1:]) if hi > lo]
            store.datasets[ds] = {"dir": d.name, "n": int(len(order)), "pool": int(n_pool), "shards": shards}
            specs += [(len(stores), str(d), i, lo, hi, fingerprints[ds]) for i, (lo, hi) in enumerate(shards)]
            if len(order):
                whole.append((store, ds, order, fingerprints[ds]))
        stores.append(store)
    tasks, rows_in_task = [], shard_rows
    for spec in specs:
        if rows_in_task + spec[4] - spec[3] > shard_rows:
            tasks.append([])
            rows_in_task = 0
        tasks[-1].append(spec)
        rows_in_task += spec[4] - spec[3]
    common = (str(items_path), cfg.embed.cache_dir, cfg.embed.storage_options)
    if not use_ray and len(tasks) == 1:  # one task would gather every vector here anyway: keep them, write none
        for (store, ds, _, _), v in zip(whole, _vectors([w[2] for w in whole], [w[3] for w in whole], *common)):
            store.held[ds], store.dim = np.asarray(v, np.float32), max(store.dim, int(v.shape[1]))
        return stores
    for task, dims in zip(tasks, map_blocks(_write_shards, [(task, *common) for task in tasks], use_ray)):
        for spec, dim in zip(task, dims):
            stores[spec[0]].dim = max(stores[spec[0]].dim, dim)
    return stores


def _vectors(rows: list[np.ndarray], fingerprints: list[str], items_path: str, cache_dir: str,
             storage_options) -> list[np.ndarray]:
    """The cached vectors of each list of item rows (under its teacher fingerprint), from one scan of the cache
    parts per fingerprint; the lists of one fingerprint are views of one array."""
    items = open_ipc(Path(items_path)).select(["item_id", "embed_text"])  # the key columns
    keys = [input_keys(take_rows(items, r)) for r in rows]
    vectors = [None] * len(rows)
    for fingerprint in dict.fromkeys(fingerprints):
        mine = [j for j, fp in enumerate(fingerprints) if fp == fingerprint]
        found, found_vectors = EmbeddingCache(cache_dir, fingerprint, storage_options).lookup(
            pa.concat_arrays([keys[j] for j in mine]))
        if not found.all():
            raise RuntimeError(f"embedding cache {cache_dir} is missing {int((~found).sum())} vectors of "
                               f"{fingerprint} after embedding: mine again to embed them")
        ends = np.cumsum([len(rows[j]) for j in mine])
        for j, part in zip(mine, np.split(found_vectors, ends[:-1])):
            vectors[j] = part
    return vectors


def _write_shards(spec) -> list[int]:
    """Shards (rows [lo, hi) of a store order each), their vectors looked up in one scan of the cache parts per
    fingerprint; returns each shard's width."""
    shards, *common = spec
    rows = [np.asarray(np.load(Path(folder) / "rows.npy", mmap_mode="r")[lo:hi], np.int64)
            for _, folder, _, lo, hi, _ in shards]
    vectors = _vectors(rows, [s[5] for s in shards], *common)
    for (_, folder, i, _, _, _), v in zip(shards, vectors):
        path = Path(folder) / f"part-{i:05d}.npy"
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, np.ascontiguousarray(v, np.float32))
        tmp.replace(path)
    return [int(v.shape[1]) for v in vectors]
