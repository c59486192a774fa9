"""Lazy, read-only access to one hardneg output folder (layout: docs/output-schema.md).

Why lazy: a run can hold millions of query rows and a page must come back in well under a second, so nothing here
loads a whole table. `_manifest.json` lists every shard with its row count, which numbers the rows of an epoch
globally without opening a file; a page streams only the row group that holds it, batch by batch, with only the
columns it shows. Filters first consult row-group statistics (rows are sorted by dataset, so a dataset filter skips
most of a run), then decode only the columns they test, and stop as soon as a page is full.
"""
from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import blocklist
from pipeline.blocks import read_items
from pipeline.run import epoch_dir

EPOCH_DIR = re.compile(r"^epoch=(\d+)$")
RETRIEVAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a folder name under _run/, never a path
SCAN_BATCH = 65536

# Bands over a query's hardest negative, measured relative to its positive (`neg_rel_scores` = neg / pos, the
# quantity TopK-PercPos and EGA weigh): key -> (label, lo, hi), half-open [lo, hi). "none": no negative at all.
BANDS = {
    "easy": ("easy (hardest < 0.80 × pos)", -math.inf, 0.80),
    "medium": ("medium (0.80–0.90 × pos)", 0.80, 0.90),
    "hard": ("hard (0.90–0.95 × pos)", 0.90, 0.95),
    "extreme": ("extreme (≥ 0.95 × pos)", 0.95, math.inf),
    "none": ("no negatives", None, None),
}

ITEM_COLUMNS = ["item_id", "text", "image_path", "modality"]
LIST_COLUMNS = [
    "query_id", "dataset", "qry", "qry_image_path", "pos_text", "pos_image_path", "pos_score",
    "neg_text", "neg_image_path", "neg_scores", "num_negatives", "shortfall",
]


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


def hardest(rel: pa.ListArray | pa.ChunkedArray) -> np.ndarray:
    """Largest value of each list (NaN for an empty one): the hardest negative, whatever the list order."""
    if isinstance(rel, pa.ChunkedArray):
        rel = rel.combine_chunks()
    out = np.full(len(rel), np.nan)
    values = pc.list_flatten(rel).to_numpy(zero_copy_only=False).astype(np.float64)
    if len(values):
        parents = pc.list_parent_indices(rel).to_numpy()
        np.fmax.at(out, parents, values)
    return out


def manifest_stamp(epoch_dir: Path) -> tuple[int, int]:
    """Identifies one writing of an epoch: the folder is swapped in whole, so a new manifest means new shards."""
    st = (epoch_dir / "_manifest.json").stat()
    return st.st_ino, st.st_mtime_ns


@dataclass(frozen=True)
class Filter:
    """What the list page narrows to; empty fields do not filter."""

    dataset: str = ""
    band: str = ""
    shortfall: str = ""  # "yes": shortfall > 0, "no": shortfall == 0
    search: str = ""  # case-insensitive substring of the query id, query text or positive text

    def active(self) -> bool:
        return bool(self.dataset or self.band in BANDS or self.shortfall in ("yes", "no") or self.search)

    def columns(self) -> list[str]:
        cols = []
        if self.dataset:
            cols.append("dataset")
        if self.band in BANDS:
            cols.append("neg_rel_scores")
        if self.shortfall in ("yes", "no"):
            cols.append("shortfall")
        if self.search:
            cols += ["query_id", "qry", "pos_text"]
        return cols

    def may_match(self, stats: dict[str, tuple]) -> bool:
        """False when a row group's min/max statistics rule out every row: it is then never decoded."""
        ds = stats.get("dataset")
        if self.dataset and ds and not ds[0] <= self.dataset <= ds[1]:
            return False
        sf = stats.get("shortfall")
        if sf and ((self.shortfall == "yes" and sf[1] <= 0) or (self.shortfall == "no" and sf[0] > 0)):
            return False
        rel = stats.get("neg_rel_scores.list.element")
        if rel and self.band in BANDS and BANDS[self.band][1] is not None and rel[1] < BANDS[self.band][1]:
            return False
        return True

    def mask(self, batch: pa.RecordBatch) -> np.ndarray:
        keep = np.ones(batch.num_rows, dtype=bool)
        if self.dataset:
            keep &= pc.fill_null(pc.equal(batch["dataset"], self.dataset), False).to_numpy(zero_copy_only=False)
        if self.shortfall in ("yes", "no"):
            sf = pc.fill_null(batch["shortfall"], 0).to_numpy(zero_copy_only=False)
            keep &= sf > 0 if self.shortfall == "yes" else sf == 0
        if self.band in BANDS:
            top = hardest(batch["neg_rel_scores"])
            _, lo, hi = BANDS[self.band]
            with np.errstate(invalid="ignore"):
                keep &= np.isnan(top) if lo is None else (top >= lo) & (top < hi)
        if self.search:
            hit = np.zeros(batch.num_rows, dtype=bool)
            for col in ("query_id", "qry", "pos_text"):
                m = pc.match_substring(batch[col], self.search, ignore_case=True)
                hit |= pc.fill_null(m, False).to_numpy(zero_copy_only=False)
            keep &= hit
        return keep


@dataclass
class Page:
    rows: list[dict]  # each row carries "_row", its global row number in the epoch
    start: int
    next_start: int | None


class Shard:
    """One Parquet file. The footer is read once and cached; every read opens its own ParquetFile from it, so
    concurrent requests never share a reader."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._meta: pq.FileMetaData | None = None
        self.starts = np.zeros(1, dtype=np.int64)
        self._col_index: dict[str, int] = {}

    @property
    def meta(self) -> pq.FileMetaData:
        with self._lock:
            if self._meta is None:
                md = pq.read_metadata(self.path)
                sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
                self.starts = np.cumsum([0] + sizes).astype(np.int64)
                if md.num_row_groups:
                    rg = md.row_group(0)
                    self._col_index = {rg.column(j).path_in_schema: j for j in range(rg.num_columns)}
                self._meta = md
            return self._meta

    def open(self) -> pq.ParquetFile:
        return pq.ParquetFile(self.path, metadata=self.meta)

    def stats(self, group: int) -> dict[str, tuple]:
        """(min, max) of each column of a row group that has statistics."""
        rg = self.meta.row_group(group)
        out = {}
        for name, j in self._col_index.items():
            st = rg.column(j).statistics
            if st is not None and st.has_min_max:
                out[name] = (st.min, st.max)
        return out

    def read(self, lo: int, hi: int, columns: list[str] | None) -> pa.Table:
        """Rows [lo, hi) of this file, decoding batch by batch only up to `hi` inside each row group."""
        pf = self.open()
        pieces = []
        for g in range(self.meta.num_row_groups):
            g0, g1 = int(self.starts[g]), int(self.starts[g + 1])
            if g1 <= lo or g0 >= hi:
                continue
            a, b = max(lo, g0) - g0, min(hi, g1) - g0
            pos = 0
            for batch in pf.iter_batches(batch_size=min(b, SCAN_BATCH), row_groups=[g], columns=columns,
                                         use_threads=False):
                n = batch.num_rows
                if pos + n > a:
                    s = max(a - pos, 0)
                    pieces.append(batch.slice(s, min(b, pos + n) - pos - s))
                pos += n
                if pos >= b:
                    break
        schema = pf.schema_arrow if columns is None else pa.schema([pf.schema_arrow.field(c) for c in columns])
        return pa.Table.from_batches(pieces, schema=schema)

    def find(self, column: str, value: str) -> int | None:
        """Local row of the first `value` in `column`, skipping row groups whose statistics exclude it."""
        pf = self.open()
        for g in range(self.meta.num_row_groups):
            st = self.stats(g).get(column)
            if st and not st[0] <= value <= st[1]:
                continue
            pos = int(self.starts[g])
            for batch in pf.iter_batches(batch_size=SCAN_BATCH, row_groups=[g], columns=[column], use_threads=False):
                i = pc.index(batch[column], value).as_py()
                if i >= 0:
                    return pos + i
                pos += batch.num_rows
        return None


class Epoch:
    """One `epoch=NNNN` folder: rows numbered 0..total-1 across its shards in manifest order."""

    def __init__(self, out: Path, number: int):
        self.number = number
        self.dir = epoch_dir(out, number)
        self.stamp = manifest_stamp(self.dir)
        self.manifest = read_json(self.dir / "_manifest.json", {})
        self.stats = read_json(self.dir / "_stats.json", {})
        files = self.manifest.get("files", [])
        self.shards = [Shard(self.dir / f["path"]) for f in files]
        self.candidate_shards = [Shard(self.dir / "_candidates" / Path(f["path"]).name) for f in files]
        self.offsets = np.cumsum([0] + [int(f["rows"]) for f in files]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self._datasets: list[str] | None = None
        rid = str(self.manifest.get("retrieval_id") or "")
        path = out / "_run" / rid
        self.items_dir = path if RETRIEVAL_ID.match(rid) and path.is_dir() else None

    def locate(self, row: int) -> tuple[int, int]:
        i = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return i, row - int(self.offsets[i])

    def read(self, start: int, count: int, columns: list[str] | None = None) -> list[dict]:
        """Global rows [start, start + count), each as a dict with its "_row"."""
        rows: list[dict] = []
        row, end = max(start, 0), min(start + count, self.total)
        while row < end:
            i, local = self.locate(row)
            n = min(end, int(self.offsets[i + 1])) - row
            for k, r in enumerate(self.shards[i].read(local, local + n, columns).to_pylist()):
                r["_row"] = row + k
                rows.append(r)
            row += n
        return rows

    def row(self, row: int) -> dict | None:
        got = self.read(row, 1)
        return got[0] if got else None

    def page(self, flt: Filter, start: int, size: int, columns: list[str] = LIST_COLUMNS) -> Page:
        start = max(0, start)
        if not flt.active():
            nxt = start + size
            return Page(self.read(start, size, columns), start, nxt if nxt < self.total else None)
        found: list[dict] = []
        for i, shard in enumerate(self.shards):
            base = int(self.offsets[i])
            if int(self.offsets[i + 1]) <= start:
                continue
            pf = shard.open()
            for g in range(shard.meta.num_row_groups):
                g0 = base + int(shard.starts[g])
                if base + int(shard.starts[g + 1]) <= start or not flt.may_match(shard.stats(g)):
                    continue
                hits, pos = [], 0
                for batch in pf.iter_batches(batch_size=SCAN_BATCH, row_groups=[g], columns=flt.columns(),
                                             use_threads=False):
                    idx = np.flatnonzero(flt.mask(batch)) + pos
                    hits.extend(int(k) for k in idx if g0 + k >= start)
                    pos += batch.num_rows
                    if len(found) + len(hits) > size:
                        break
                hits = hits[: size + 1 - len(found)]
                if hits:
                    lo = int(shard.starts[g]) + hits[0]
                    table = shard.read(lo, int(shard.starts[g]) + hits[-1] + 1, columns)
                    table = table.take(pa.array(np.array(hits) - hits[0]))
                    for k, r in zip(hits, table.to_pylist()):
                        r["_row"] = g0 + k
                        found.append(r)
                if len(found) > size:
                    return Page(found[:size], start, found[size]["_row"])
        return Page(found, start, None)

    def find(self, query_id: str) -> int | None:
        """Global row of a query id."""
        for i, shard in enumerate(self.shards):
            local = shard.find("query_id", query_id)
            if local is not None:
                return int(self.offsets[i]) + local
        return None

    def candidates(self, row: int, query_id: str) -> dict | None:
        """The `_candidates` row of a query: the same row of the same-numbered shard when they align, else looked
        up by id (a shard's candidates also list the queries that `on_shortfall: reject` left out of it)."""
        if not 0 <= row < self.total:
            return None
        i, local = self.locate(row)
        shard = self.candidate_shards[i]
        if shard.path.exists() and local < shard.meta.num_rows:
            got = shard.read(local, local + 1, None).to_pylist()
            if got and got[0]["query_id"] == query_id:
                return got[0]
        for shard in [shard] + self.candidate_shards[:i] + self.candidate_shards[i + 1:]:
            local = shard.find("query_id", query_id) if shard.path.exists() else None
            if local is not None:
                return shard.read(local, local + 1, None).to_pylist()[0]
        return None

    def items(self, ids: list[str]) -> dict[str, dict]:
        """text / image_path / modality of the given item ids from the item table of the retrieval this epoch was
        mined from (`_run/<retrieval_id>/items.arrow`, named by the manifest), memory-mapped: the scan touches the
        id column and the rows it finds, and stops once all are found."""
        if not ids or self.items_dir is None:
            return {}
        try:
            table = read_items(self.items_dir, ITEM_COLUMNS)
        except FileNotFoundError:
            return {}
        want = pa.array(sorted(set(ids)), pa.string())
        found: dict[str, dict] = {}
        for batch in table.to_batches(max_chunksize=SCAN_BATCH):
            hit = pc.is_in(batch["item_id"], value_set=want)
            found.update((r["item_id"], r) for r in batch.filter(hit).to_pylist())
            if len(found) == len(want):
                return found
        return found

    def datasets(self) -> list[str]:
        """Distinct datasets: from row-group statistics where a group holds one dataset, decoded otherwise."""
        if self._datasets is None:
            names: set[str] = set()
            for shard in self.shards:
                for g in range(shard.meta.num_row_groups):
                    st = shard.stats(g).get("dataset")
                    if st and st[0] == st[1]:
                        names.add(st[0])
                    else:
                        col = shard.open().read_row_group(g, columns=["dataset"])["dataset"]
                        names.update(v for v in pc.unique(col).to_pylist() if v is not None)
            self._datasets = sorted(names)
        return self._datasets


class Run:
    """An output folder: its complete epochs (folders renamed into place with a manifest) and its blocklist."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        if not self.out.is_dir():
            raise FileNotFoundError(f"no output folder at {self.out}")
        self._epochs: dict[int, Epoch] = {}
        self._lock = threading.Lock()

    @property
    def epochs(self) -> list[int]:
        """Rescanned on each call so that an epoch mined while the inspector runs shows up."""
        found = []
        for p in self.out.iterdir():
            m = EPOCH_DIR.match(p.name)
            if m and (p / "_manifest.json").is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def epoch(self, number: int | None = None) -> Epoch:
        numbers = self.epochs
        if not numbers:
            raise FileNotFoundError(f"no complete epoch under {self.out}")
        number = numbers[-1] if number is None else number
        if number not in numbers:
            raise KeyError(number)
        with self._lock:
            cached = self._epochs.get(number)
            if cached is None or cached.stamp != manifest_stamp(cached.dir):  # re-mined with --overwrite
                self._epochs[number] = cached = Epoch(self.out, number)
            return cached

    @property
    def blocklist_path(self) -> Path:
        return self.out / blocklist.FILENAME
