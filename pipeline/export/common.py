"""What every export shares: the epoch it reads (streamed shard by shard), the folder it writes, and its lineage.

Reading: an epoch is only read through its `_manifest.json` file list (a committed epoch; never a guess by glob), in
record batches, so memory is bounded by the batch and one shard's candidate verdicts, never by the epoch.
Writing: the destination is claimed with a lock file, files are built in a hidden staging folder and moved into place,
and `_hardneg_export.yaml` (the lineage and the list of files written) goes in last. `--overwrite` deletes only the
files a previous export listed there; a folder holding anything else is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from ..blocks import read_items
from ..errors import UserError
from ..run import epoch_dir
from ..write import sha256_file

LINEAGE_FILE = "_hardneg_export.yaml"
LOCK_FILE = ".hardneg-export.lock"
STAGING = ".hardneg-export.partial"
BATCH_ROWS = 4096
KEPT = ("negative", "unsampled")  # candidate verdicts that passed every filter


class ExportError(UserError, ValueError):
    """The export cannot run as asked (no such epoch, a folder that is not ours to write, ...)."""


def hardneg_version() -> str:
    try:
        return metadata.version("hardneg")
    except metadata.PackageNotFoundError:
        return "unknown"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class EpochSource:
    """One committed epoch of a run, read batch by batch."""

    def __init__(self, out: str | Path, epoch: int, batch_rows: int = BATCH_ROWS):
        self.out = Path(out)
        self.epoch = epoch
        self.dir = epoch_dir(self.out, epoch)
        self.batch_rows = batch_rows
        manifest_path = self.dir / "_manifest.json"
        self.manifest = _read_json(manifest_path)
        if self.manifest is None:
            done = sorted(p.name for p in self.out.glob("epoch=*") if (p / "_manifest.json").exists())
            raise ExportError(f"{manifest_path} does not exist: epoch {epoch} of {self.out} is not mined (or not "
                              f"finished); committed epochs there: {', '.join(done) or 'none'}")
        self.stats = _read_json(self.dir / "_stats.json") or {}
        self.manifest_sha256 = sha256_file(manifest_path)
        for entry in self.manifest.get("files", []):
            if not (self.dir / entry["path"]).exists():
                raise ExportError(f"{self.dir / entry['path']} is listed in {manifest_path} but missing; the epoch "
                                  "is damaged: mine it again with --overwrite")
        self._items = None
        self.progress = None  # a Progress bar the batches advance (queries read)

    @property
    def files(self) -> list[dict]:
        return self.manifest.get("files", [])

    @property
    def rows(self) -> int:
        return sum(int(f["rows"]) for f in self.files)

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def image_root(self) -> str:
        return self.manifest.get("image_root") or self.config.get("input", {}).get("image_root") or ""

    def lineage(self) -> dict:
        """How this epoch was made: enough to tell two exports apart and to find the run again."""
        teacher = self.manifest.get("teacher", {})
        canonical = json.dumps(self.config, sort_keys=True, separators=(",", ":"), default=str)
        return {
            "hardneg_version": hardneg_version(),
            "run": str(self.out.resolve()),
            "epoch": self.epoch,
            "config_hash": hashlib.sha256(canonical.encode()).hexdigest(),
            "teacher_model": self.manifest.get("teacher_model") or self.config.get("teacher", {}).get("model"),
            "teacher_fingerprint": {role: (teacher.get(key) or {}).get("fingerprint")
                                    for role, key in (("query", "queries"), ("candidate", "candidates"))},
            "retrieval_id": self.manifest.get("retrieval_id"),
            "manifest_sha256": self.manifest_sha256,
            "counts": self.manifest.get("counts", {}),
        }

    def schema(self) -> pa.Schema:
        """The training shards' schema (as written, so columns added by a newer miner travel too)."""
        if not self.files:
            from ..write import TRAIN_SCHEMA
            return TRAIN_SCHEMA
        return pq.read_schema(self.dir / self.files[0]["path"]).remove_metadata()

    def batches(self, columns: Optional[list[str]] = None) -> Iterator[pa.RecordBatch]:
        """The training rows in manifest order, `batch_rows` at a time."""
        for entry in self.files:
            for batch in pq.ParquetFile(self.dir / entry["path"]).iter_batches(self.batch_rows, columns=columns):
                yield batch
                self._advance(batch.num_rows)

    def _advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.update(n)

    def batches_with_candidates(self, columns: Optional[list[str]] = None
                                ) -> Iterator[tuple[pa.RecordBatch, pa.Table]]:
        """Training batches, each with its queries' candidate-verdict rows aligned row for row. One shard's
        verdicts are held at a time (the candidate part with the training part's name)."""
        columns = None if columns is None else list(dict.fromkeys(["query_id", *columns]))
        for entry in self.files:
            cands = pq.read_table(self.dir / "_candidates" / entry["path"])
            for batch in pq.ParquetFile(self.dir / entry["path"]).iter_batches(self.batch_rows, columns=columns):
                pos = pc.index_in(batch.column("query_id"), value_set=cands.column("query_id"))
                if pos.null_count:
                    raise ExportError(f"{self.dir / '_candidates' / entry['path']} lacks candidate rows of some "
                                      "queries of its training shard; the epoch is damaged: mine it again")
                yield batch, cands.take(pos)
                self._advance(batch.num_rows)

    def items(self) -> "ItemLookup":
        """The run's items (item_id, text, image_path) of this epoch's retrieval, for candidates the shards do not
        carry. This is the corpus, not the epoch: the miner holds it too."""
        if self._items is None:
            path = self.out / "_run" / str(self.manifest.get("retrieval_id"))
            try:
                self._items = ItemLookup(read_items(path, ["item_id", "text", "image_path"]))
            except FileNotFoundError:
                raise ExportError(f"{path / 'items.arrow'} does not exist: the run's retrieval state is gone, so the "
                                  "candidates of this epoch cannot be named; mine the epoch again") from None
        return self._items


class ItemLookup:
    """Texts and image paths of item ids, by binary search over the run's item table (sorted by item_id when the
    reader wrote it): one index for the whole export, not a hash table per batch."""

    def __init__(self, table: pa.Table):
        self.table = table
        ids = table.column("item_id").to_numpy(zero_copy_only=False).astype("S")
        self.order = None if np.all(ids[1:] >= ids[:-1]) else np.argsort(ids, kind="stable")
        self.ids = ids if self.order is None else ids[self.order]

    def lookup(self, ids: list[str]) -> tuple[list[str], list[str]]:
        if not ids:
            return [], []
        wanted = np.array(ids, dtype="S")
        pos = np.minimum(np.searchsorted(self.ids, wanted), len(self.ids) - 1)
        if not np.array_equal(self.ids[pos], wanted):
            missing = ids[int(np.flatnonzero(self.ids[pos] != wanted)[0])]
            raise ExportError(f"candidate item {missing} is not in the run's item table; the run is damaged")
        rows = pa.array(pos if self.order is None else self.order[pos], pa.int64())
        return (self.table.column("text").take(rows).to_pylist(),
                self.table.column("image_path").take(rows).to_pylist())


def kept_candidates(cands: pa.Table, items: "ItemLookup") -> list[list[dict]]:
    """Per query: every candidate that passed every filter (sampled or not), in rank order, with text and image."""
    out = []
    for row in cands.to_pylist():
        sources = row.get("cand_sources") or ["retrieved"] * len(row["cand_item_ids"])
        kept = [(i, s, r, v, src) for i, s, r, v, src in zip(row["cand_item_ids"], row["cand_scores"],
                                                             row["cand_ranks"], row["cand_verdicts"], sources)
                if v in KEPT]
        out.append(kept)
    flat = [k[0] for q in out for k in q]
    texts, images = items.lookup(flat)
    n, result = 0, []
    for q in out:
        result.append([{"item_id": i, "text": texts[n + j] or "", "image_path": images[n + j] or "", "score": s,
                        "rank": r, "verdict": v, "source": src or "retrieved"}
                       for j, (i, s, r, v, src) in enumerate(q)])
        n += len(q)
    return result


@dataclass
class ExportFolder:
    """The `--to` folder: claimed, staged, committed with its lineage; see the module docstring."""

    path: Path
    overwrite: bool = False
    files: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.path = Path(self.path).absolute()
        self.staging = self.path / STAGING
        self._old: list[str] = []
        self._locked = False

    def open(self, source_out: Path) -> "ExportFolder":
        run = Path(source_out).resolve()
        dest = self.path.resolve()
        if dest == run or run in dest.parents or dest in run.parents:
            raise ExportError(f"--to {self.path} overlaps the run folder {source_out}; export to a folder outside it")
        if self.path.exists() and not self.path.is_dir():
            raise ExportError(f"--to {self.path} is a file; give a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._check_contents()
            if self.staging.exists():  # left by an interrupted export into this folder
                shutil.rmtree(self.staging)
            self.staging.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self

    def _lock(self) -> None:
        lock = self.path / LOCK_FILE
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise ExportError(f"another export (pid {pid}) is writing to {self.path}; wait for it or "
                                      "choose another --to") from None
                lock.unlink(missing_ok=True)  # its writer is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._locked = True
            return
        raise ExportError(f"cannot lock {self.path}")

    def _unlock(self) -> None:
        if self._locked:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self._locked = False

    def _check_contents(self) -> None:
        present = sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*")
                         if p.is_file() and p.name != LOCK_FILE and STAGING not in p.relative_to(self.path).parts)
        if not present:
            return
        if not self.overwrite:
            raise ExportError(f"{self.path} is not empty ({len(present)} files, e.g. {present[0]}); choose an empty "
                              "folder, or --overwrite to replace a previous export there")
        lineage_path = self.path / LINEAGE_FILE
        previous = yaml.safe_load(lineage_path.read_text()) if lineage_path.exists() else None
        if not isinstance(previous, dict) or "files" not in previous:
            raise ExportError(f"{self.path} holds files that `hardneg export` did not write (no {LINEAGE_FILE}), e.g. "
                              f"{present[0]}; --overwrite replaces only a previous export: choose another folder")
        ours = {f["path"] for f in previous["files"]} | {LINEAGE_FILE}
        foreign = [p for p in present if p not in ours]
        if foreign:
            raise ExportError(f"{self.path} holds {len(foreign)} files the previous export did not write, e.g. "
                              f"{foreign[0]}; move them away or choose another folder (nothing was deleted)")
        self._old = sorted(ours)

    def stage(self, relpath: str) -> Path:
        """Where to write `relpath` now; it becomes `--to/relpath` at commit."""
        target = self.staging / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(self, lineage: dict) -> dict:
        """Replace the previous export's files with the staged ones; the lineage file goes last."""
        for rel in self._old:
            (self.path / rel).unlink(missing_ok=True)
        _prune_empty_dirs(self.path, keep=self.staging)
        staged = sorted(p for p in self.staging.rglob("*") if p.is_file())
        entries = []
        for p in staged:
            rel = str(p.relative_to(self.staging))
            entries.append({"path": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
            (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, self.path / rel)
        shutil.rmtree(self.staging)
        record = {**lineage, "files": entries}
        tmp = self.path / (LINEAGE_FILE + ".tmp")
        tmp.write_text(yaml.safe_dump(record, sort_keys=True, allow_unicode=True))
        os.replace(tmp, self.path / LINEAGE_FILE)
        self._unlock()
        return record

    def abort(self) -> None:
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self._unlock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prune_empty_dirs(root: Path, keep: Path) -> None:
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if d != keep and keep not in d.parents and not any(d.iterdir()):
            d.rmdir()


class PartWriter:
    """Rows into numbered part files (`PREFIX-00000.EXT`, ...) of at most `rows_per_file` rows, one open at a time."""

    def __init__(self, folder: ExportFolder, prefix: str, ext: str, rows_per_file: int):
        self.folder, self.prefix, self.ext, self.rows_per_file = folder, prefix, ext, rows_per_file
        self.part, self.in_part, self.rows = -1, 0, 0
        self.paths: list[str] = []
        self._handle = None

    def _roll(self):
        if self._handle is None or self.in_part >= self.rows_per_file:
            self._close_part()
            self.part += 1
            rel = f"{self.prefix}-{self.part:05d}.{self.ext}"
            self.paths.append(rel)
            self._handle = self._open(self.folder.stage(rel))
            self.in_part = 0

    def _open(self, path: Path):
        raise NotImplementedError

    def _close_part(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self) -> list[str]:
        self._close_part()
        return self.paths


class JsonlWriter(PartWriter):
    def __init__(self, folder, prefix="train", rows_per_file=100_000):
        super().__init__(folder, prefix, "jsonl", rows_per_file)

    def _open(self, path):
        return open(path, "w", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self._roll()
            self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.in_part += 1
            self.rows += 1


class ParquetPartWriter(PartWriter):
    """Parquet parts with one schema; the lineage rides in the schema metadata (key `hardneg`)."""

    def __init__(self, folder, schema: pa.Schema, lineage: dict, prefix="data/train", rows_per_file=500_000):
        super().__init__(folder, prefix, "parquet", rows_per_file)
        meta = dict(schema.metadata or {})
        meta[b"hardneg"] = json.dumps(lineage, sort_keys=True).encode()
        self.schema = schema.with_metadata(meta)

    def _open(self, path):
        return pq.ParquetWriter(path, self.schema, compression="zstd")

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        table = pa.Table.from_batches([table]) if isinstance(table, pa.RecordBatch) else table
        start = 0
        while start < table.num_rows:
            self._roll()
            take = min(self.rows_per_file - self.in_part, table.num_rows - start)
            self._handle.write_table(table.slice(start, take).cast(self.schema))
            self.in_part += take
            self.rows += take
            start += take


def query_prompt(config: dict, dataset: str) -> str:
    """The instruction the teacher put before this dataset's queries ('' when none)."""
    teacher = config.get("teacher", {})
    entries = teacher.get("instructions") or {}
    entry = entries.get(dataset) or entries.get("*") or {}
    return entry.get("query") or teacher.get("query_prompt") or ""


def card_front_matter(configs: dict[str, dict[str, str]], extra: Optional[dict] = None) -> str:
    """YAML front matter of a dataset card: `{config: {split: glob}}` so `datasets.load_dataset(DIR, config,
    split=...)` reads exactly our data files."""
    meta = dict(extra or {})
    meta["configs"] = [{"config_name": name, "data_files": [{"split": s, "path": p} for s, p in splits.items()],
                        **({"default": True} if len(configs) == 1 else {})}
                       for name, splits in configs.items()]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def safe_name(name: str) -> str:
    """A dataset name as a folder / file name (letters, digits, `-`, `_`, `.`)."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip(".")
    return out or "default"


def dataset_runs(batch: pa.RecordBatch) -> Iterator[tuple[str, pa.RecordBatch]]:
    """Consecutive rows of one dataset (shards are ordered by dataset, so a dataset's rows are contiguous)."""
    values = batch.column("dataset").to_pylist()
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            yield values[start], batch.slice(start, i - start)
            start = i


class PerDataset:
    """One writer per dataset, opened when its first row arrives; `make(dataset)` builds it."""

    def __init__(self, make):
        self.make = make
        self.writers: dict = {}

    def __getitem__(self, dataset):
        if dataset not in self.writers:
            self.writers[dataset] = self.make(dataset)
        return self.writers[dataset]

    def close(self) -> dict[str, list[str]]:
        return {ds: w.close() for ds, w in self.writers.items()}
