"""Read the corpus: pairs (and an optional candidate corpus) in, validated queries and content-addressed items out.

Every input row either becomes a query or a reject with its file, row, field and reason; nothing is dropped silently.
An item's identity is the hash of its normalised text and its image bytes, so identical content is one item and a
copy of the positive can never come back as its own negative.
"""
from __future__ import annotations

import bisect
import gc
import hashlib
import io
import json
import os
import posixpath
import stat
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import UnidentifiedImageError

from . import extra_positives, input_negatives
from .config import InputConfig

TEXT_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
MODALITIES = ("text", "image", "text+image")


class InputError(ValueError):
    """The input as a whole cannot be used (unreadable file, missing columns, mostly broken rows)."""


@dataclass
class Corpus:
    """What the reader hands to the miner. Items are sorted by item_id, so their row numbers are stable."""

    queries: pa.Table
    items: pa.Table
    pools: dict[str, np.ndarray]
    item_groups: np.ndarray
    """Sorted codes `item_row * n_groups + group_code` of (candidate, group) memberships."""
    n_groups: int
    rejects: list[dict] = field(default_factory=list)
    rows_in: int = 0
    candidate_rows_rejected: int = 0


def normalise_text(text: str) -> str:
    if text.isascii():  # NFKC leaves ASCII as it is
        return " ".join(text.split())
    return " ".join(unicodedata.normalize("NFKC", text).split())


def item_id(text: str, image_digest: str) -> str:
    return _item_key(text, image_digest).hex()


def _item_key(text: str, image_digest: str) -> bytes:
    """`item_id` as its 16 bytes: what the reader keeps per item until it writes the corpus tables."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"t:" + normalise_text(text).encode() + b"\0i:" + image_digest.encode())
    return h.digest()


READ_BLOCK_ROWS = 50_000
"""Input rows a read block (pipeline/read_blocks.py): what one task holds as Arrow, a batch of it as Python objects."""
BATCH_ROWS = 10_000
"""Rows a batch: the reader holds one batch of input rows as Python objects at a time. At least 1,000: a file's
columns are checked on its first 1,000 rows, which its first batch holds."""


def read_rows(path: str) -> tuple[list[dict], list[dict]]:
    """Rows of a Parquet or JSONL file as dicts, plus rejects for JSONL lines that are not usable JSON objects."""
    rows, _, rejects = read_numbered(path)
    return rows, rejects


def read_numbered(path: str) -> tuple[list[dict], list[int], list[dict]]:
    """(rows, their numbers, rejects). A row's number is what a person looks it up by: its line number (1-based)
    in a JSONL file, its row index (0-based) in a Parquet file."""
    rows, numbers, rejects = [], [], []
    for batch_rows, batch_numbers, batch_rejects in iter_numbered(path):
        rows += batch_rows
        numbers += batch_numbers
        rejects += batch_rejects
    return rows, numbers, rejects


def iter_numbered(path: str, span: Optional[tuple] = None,
                  info: Optional[dict] = None) -> Iterator[tuple[list[dict], list[int], list[dict]]]:
    """`read_numbered` a batch of up to BATCH_ROWS rows at a time, so that a caller holds one batch of Python rows,
    not the file's. A JSONL batch carries the rejects of its lines. `span` (from `plan_spans`) reads one block of
    the file; what is said of the file as a whole (a JSONL file that is one JSON document) then goes into `info`
    for the caller to judge over all its blocks (`jsonl_verdict`)."""
    batch_rows = BATCH_ROWS
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            yield from _parquet_batches(path, batch_rows, span)
        except (OSError, pa.ArrowInvalid) as exc:
            raise _unreadable(path, "Parquet", exc, str(exc)) from exc
        return
    if suffix in (".jsonl", ".json", ".ndjson"):
        with _jsonl_errors(path):
            yield from _jsonl_batches(path, batch_rows, span, info)
        return
    raise _unsupported(path, suffix)


def _unsupported(path: str, suffix: str) -> InputError:
    return InputError(f"{path}: unsupported file type {suffix!r}; give Parquet (.parquet) or JSON lines (.jsonl)")


class _jsonl_errors:
    """A JSONL file that cannot be opened or read, said as the reader says it."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, IsADirectoryError):
            raise InputError(f"{self.path} is a folder; give a JSONL or Parquet file") from None
        if isinstance(exc, OSError):
            raise _unreadable(self.path, "JSONL", exc, exc.strerror or str(exc)) from None
        return False


def _unreadable(path: str, kind: str, exc: Exception, detail: str) -> InputError:
    """A file that cannot be opened or read; for a URI that cannot be reached, what to check (the object, this
    node's access to it)."""
    remote = "://" in path
    if remote and isinstance(exc, FileNotFoundError):
        return InputError(f"{path} does not exist; fix the URI or upload the file")
    if remote and isinstance(exc, OSError):
        return InputError(f"{path}: cannot read {kind} file: {detail}; check the URI and this node's access to it "
                          "(credentials from AWS_* / GOOGLE_APPLICATION_CREDENTIALS env vars, its role or fsspec's "
                          "config)")
    return InputError(f"{path}: cannot read {kind} file: {detail}")


def _open_input(path: str):
    """An input file opened for binary reading: a local path, or an fsspec URI (`s3://`, `gs://`, ...) opened by its
    fsspec driver with the node's usual credentials (pyarrow opens a Parquet URI itself). A URI's file is read
    through a buffer, as `open` reads a local one: fsspec's own line iteration is far slower, and
    a read of a block's span fetches 4 MiB past its end, not the driver's default (s3fs: 50 MiB)."""
    if "://" not in path:
        return open(path, "rb")
    fs, inner = _input_fs(path)
    return io.BufferedReader(fs.open(inner, "rb", block_size=1 << 22), 1 << 20)


def _input_fs(path: str):
    """(fsspec filesystem, path in it) of a URI."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(path)
    except (ImportError, ValueError) as exc:  # no driver for the scheme (fsspec says which package to install)
        raise InputError(f"{path}: cannot open it ({exc}); install the fsspec driver for its scheme (s3fs for "
                         "s3://, gcsfs for gs://) where the read runs") from None


def _version(path: str) -> tuple:
    """What changes when a file's content does: its size and modification time (a local file), its size and ETag
    (an object: one HEAD request)."""
    if "://" not in path:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    fs, inner = _input_fs(path)
    info = fs.info(inner)
    return info.get("size"), str(info.get("ETag") or info.get("LastModified") or info.get("mtime"))


_SCANS: dict = {}
"""(path, block_rows, version) -> `_jsonl_scan` of the last few JSONL files scanned."""


def _jsonl_scan(path: str, block_rows: int) -> tuple[list[tuple], int]:
    """A JSONL file's spans of `block_rows` lines (`plan_spans`) and its line count (`input_items`), from one read of
    its bytes, kept while the file is unchanged: a job on Ray counts its input in the driver and then plans its block
    read there, and a file on an object store is downloaded once for both, not twice."""
    key = (path, block_rows, _version(path))
    if key not in _SCANS:
        ends, lines, offset, last = [], 0, 0, b"\n"  # the byte after every `block_rows`-th newline
        with _open_input(path) as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                at = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
                cut = at[(lines + np.arange(1, len(at) + 1)) % block_rows == 0]
                ends += (offset + cut + 1).tolist()
                lines, offset, last = lines + len(at), offset + len(chunk), chunk[-1:]
        if not ends or ends[-1] < offset:
            ends.append(offset)
        starts = [0] + ends[:-1]
        while len(_SCANS) >= 8:
            _SCANS.pop(next(iter(_SCANS)))
        _SCANS[key] = ([(lo, hi, 1 + i * block_rows) for i, (lo, hi) in enumerate(zip(starts, ends))],
                       lines + (last != b"\n"))
    return _SCANS[key]


def plan_spans(path: str, block_rows: int) -> list[tuple]:
    """A file cut into blocks of `block_rows` rows, for `iter_numbered(path, span)`: Parquet row ranges
    (start, end) from its metadata, JSONL line ranges as byte ranges (start, end, first line number), found by one
    scan of the file's bytes (`input_items`'s, when it scanned the file unchanged for blocks of these rows)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            n = sum(fragment.metadata.num_rows for fragment in pq.ParquetDataset(path).fragments)
        except (OSError, pa.ArrowInvalid) as exc:
            raise _unreadable(path, "Parquet", exc, str(exc)) from exc
        return [(lo, min(lo + block_rows, n)) for lo in range(0, n, block_rows)] or [(0, 0)]
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise _unsupported(path, suffix)
    with _jsonl_errors(path):
        return _jsonl_scan(path, block_rows)[0]


def _parquet_batches(path: str, batch_rows: int, span: Optional[tuple] = None):
    """What `pq.read_table(path)` reads (rows [start, end) of it with a `span`), a batch at a time. Opened as
    read_table opens it (the same errors; a file, or a folder of them with hive partitions); a file that is the whole
    table streams through ParquetFile, which holds less than a dataset scan (no read-ahead), and reads only the row
    groups the span needs."""
    lo, hi = span or (0, None)
    dataset = pq.ParquetDataset(path)
    start = 0
    for fragment in dataset.fragments:
        if hi is not None and start >= hi:
            return
        if fragment.physical_schema.equals(dataset.schema):
            file = pq.ParquetFile(fragment.path, filesystem=dataset.filesystem, buffer_size=1 << 20, pre_buffer=False)
            sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
            bounds = start + np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
            groups = [g for g in range(len(sizes)) if bounds[g + 1] > lo and (hi is None or bounds[g] < hi)]
            batches = file.iter_batches(batch_size=batch_rows, row_groups=groups) if groups else []
            at, end = (int(bounds[groups[0]]) if groups else int(bounds[-1])), int(bounds[-1])
        else:
            batches, at, end = fragment.to_batches(schema=dataset.schema, batch_size=batch_rows), start, None
        for batch in batches:
            n = len(batch)
            first, last = max(lo - at, 0), n if hi is None else min(hi - at, n)
            if last > first:
                yield batch.slice(first, last - first).to_pylist(), list(range(at + first, at + last)), []
            at += n
            if hi is not None and at >= hi:
                return
        start = at if end is None else end


def _jsonl_batches(path: str, batch_rows: int, span: Optional[tuple] = None, info: Optional[dict] = None):
    """Line by line with the json module: strings stay strings (pyarrow's reader turns "2021-05-01" into a date),
    every row keeps its line number, and a line that is not UTF-8 is rejected instead of altered. With a `span`
    (start byte, end byte, first line number), its lines only; `info` then gets the block's first non-blank line
    (`first`), whether it starts one JSON document (`document`) and whether any row was read (`rows`)."""
    lo, hi, first_n = span or (0, None, 1)
    rows, numbers, rejects = [], [], []
    first, first_line, any_rows = None, None, False
    with _open_input(path) as f:
        f.seek(lo)
        offset = lo
        for n, raw in enumerate(f, first_n):
            if hi is not None and offset >= hi:
                break
            offset += len(raw)
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            if not raw.strip():
                continue
            if first is None:
                first, first_line = raw.strip(), n
            try:
                line, bad_bytes = raw.decode("utf-8"), None
            except UnicodeDecodeError as exc:
                line, bad_bytes = raw.decode("utf-8", errors="surrogateescape"), exc
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if n == first_line and (first.startswith(b"[") or first == b"{"):
                    if info is None:
                        raise _not_json_lines(path, first) from None
                    info["document"] = True
                if bad_bytes is not None:
                    rejects.append(_bad_encoding(path, n, None, bad_bytes))
                else:
                    rejects.append(_reject(path, n, None, None, "bad_json",
                                           f"line {n} is not valid JSON ({exc.msg}); fix or remove the line"))
                continue
            if not isinstance(row, dict):
                rejects.append(_reject(path, n, None, None, "bad_json",
                                       f"line {n} is a JSON {_json_type(row)}, not an object"))
                continue
            bad_field = _field_with_bad_text(row)
            if bad_field is not None or bad_bytes is not None:
                rejects.append(_bad_encoding(path, n, row, bad_bytes, bad_field))
                continue
            rows.append(row)
            numbers.append(n)
            if len(rows) == batch_rows:
                yield rows, numbers, rejects
                rows, numbers, rejects, any_rows = [], [], [], True
    if info is not None:
        info.update(first=first, rows=any_rows or bool(rows))
    elif rejects and not rows and not any_rows:
        raise _not_json_lines(path, first)
    yield rows, numbers, rejects


def jsonl_verdict(path: str, infos: list[dict]) -> Optional[InputError]:
    """What `_jsonl_batches` says of a whole file, from its blocks' `info` in order: one JSON document, or no line
    of it a JSON object."""
    firsts = [i for i in infos if i.get("first") is not None]
    if firsts and (firsts[0].get("document") or not any(i["rows"] for i in infos)):
        return _not_json_lines(path, firsts[0]["first"])
    return None


def _not_json_lines(path: str, first: bytes) -> InputError:
    """One JSON document, not one object a line: said once, not per line."""
    hint = ("it holds a JSON array (convert it, e.g. `jq -c '.[]' FILE > FILE.jsonl`)" if first.startswith(b"[")
            else "it holds one JSON document spread over several lines" if first.startswith(b"{")
            else "no line of it is a JSON object")
    return InputError(f"{path}: expected JSON Lines (one object per line); {hint}")


def _json_type(value) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _has_bad_text(value: str) -> bool:
    """Lone surrogates: bytes that were not UTF-8 (kept by surrogateescape) or a \\ud800-style escape."""
    if value.isascii():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _field_with_bad_text(row: dict) -> Optional[str]:
    for key, value in row.items():
        if _has_bad_text(key) or (isinstance(value, str) and _has_bad_text(value)):
            return key
    return None


def _bad_encoding(path, n, row, exc: Optional[UnicodeDecodeError], field_name: Optional[str] = None) -> dict:
    qid = row.get("id") if row else None
    qid = None if qid is None or (isinstance(qid, str) and _has_bad_text(qid)) else str(qid)
    if field_name is not None and _has_bad_text(field_name):
        field_name = field_name.encode("utf-8", "backslashreplace").decode("utf-8")
    where = f"field {field_name!r}" if field_name else "the line"
    byte = f" (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})" if exc is not None else ""
    return _reject(path, n, qid, field_name, "bad_encoding",
                   f"line {n}: {where} is not valid UTF-8 text{byte}; save the file as UTF-8")


def _reject(source, row, query_id, field_name, reason, detail, kind="query") -> dict:
    return {"kind": kind, "source": str(source), "row": row, "query_id": query_id, "field": field_name,
            "reason": reason, "detail": detail}


class ImageProbe:
    """Checks every referenced image once: inside the root, readable, within the pixel bound, decodable."""

    def __init__(self, root: str, max_pixels: int, allowed_schemes: tuple[str, ...] = (),
                 max_bytes: Optional[int] = None):
        self.root = root.rstrip("/")
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.allowed_schemes = allowed_schemes
        self.results: dict[str, tuple[Optional[str], Optional[str], str]] = {}

    def url(self, rel: str) -> tuple[Optional[str], Optional[str]]:
        """The location of `rel` under the root, or (None, reason) when it is not allowed."""
        if any(ord(c) < 32 for c in rel) or ("://" in self.root and "::" in rel):
            return None, "bad_path"  # NUL / control characters; fsspec URL chaining under a URI root
        if "://" in rel:
            scheme = rel.split("://", 1)[0]
            if scheme not in self.allowed_schemes:
                return None, "bad_uri_scheme"
            return rel, None
        norm = posixpath.normpath(rel.replace("\\", "/"))
        if rel.startswith("/") or norm == ".." or norm.startswith("../"):
            return None, "path_escapes_root"
        if "://" in self.root:
            return f"{self.root}/{norm}", None
        root = Path(self.root).resolve()
        full = (root / norm).resolve()
        if full != root and root not in full.parents:  # a symlink that leads outside the root
            return None, "path_escapes_root"
        return str(full), None

    def check(self, rel: str) -> tuple[Optional[str], Optional[str], str]:
        """(digest, reject reason, detail) for one path."""
        try:
            location, reason = self.url(rel)
        except (OSError, ValueError) as exc:  # e.g. a name too long to resolve
            return None, "bad_path", f"{rel!r} is not a usable path ({exc})"
        if reason == "bad_uri_scheme":
            return None, reason, (f"{rel!r} uses a URI scheme that is not allowed (allowed: "
                                  f"{', '.join(self.allowed_schemes) or 'none'}); give a path under the image root")
        if reason == "bad_path":
            return None, reason, f"{rel!r} is not a usable path (control characters or '::'); fix the path"
        if reason:
            return None, reason, f"{rel!r} leads outside the image root {self.root}; give a path under the root"
        try:
            data = open_bytes(location, self.max_bytes)
        except FileNotFoundError:
            return None, "missing_image", f"{location} does not exist; fix the path or add the file"
        except ImageTooLarge as exc:
            return None, "image_too_large", f"{location}: {exc}"
        except (OSError, ValueError) as exc:
            return None, "missing_image", f"{location} cannot be read: {exc}"
        try:
            check_image_bytes(data, self.max_pixels)
        except ImageTooLarge as exc:
            return None, "image_too_large", f"{location}: {exc}"
        except UnidentifiedImageError:  # PIL's message names the in-memory buffer, not the file
            return None, "corrupt_image", (f"{location} is not an image in a readable format "
                                           f"({', '.join(IMAGE_FORMATS)}); replace the file or fix the path")
        except Exception as exc:  # PIL raises many types for broken files
            return None, "corrupt_image", f"{location} is not a readable image ({type(exc).__name__}: {exc})"
        return hashlib.blake2b(data, digest_size=16).hexdigest(), None, ""

    def run(self, paths: set[str], threads: int = 8) -> None:
        todo = sorted(p for p in paths if p and p not in self.results)
        with ThreadPoolExecutor(threads) as pool:
            for path, result in zip(todo, pool.map(self.check, todo)):
                self.results[path] = result


class ImageTooLarge(ValueError):
    pass


# Raster formats only: PIL's EPS reader runs Ghostscript on the file, which would execute untrusted PostScript.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "TGA", "ICO")


def open_bytes(location: str, max_bytes: Optional[int] = None) -> bytes:
    """The file's bytes; a file above `max_bytes` (or not a regular file) is refused before it is read."""
    too_big = lambda n: ImageTooLarge(f"{n} bytes is above input.max_image_bytes={max_bytes}")  # noqa: E731
    if "://" in location:
        import fsspec

        with fsspec.open(location, "rb") as f:
            data = f.read(max_bytes + 1) if max_bytes else f.read()
        if max_bytes and len(data) > max_bytes:
            raise too_big(f"more than {max_bytes}")
        return data
    st = os.stat(location)  # before open(): opening a FIFO blocks, a device never ends
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{location} is not a regular file")
    if max_bytes and st.st_size > max_bytes:
        raise too_big(st.st_size)
    with open(location, "rb") as f:
        data = f.read(max_bytes + 1) if max_bytes else f.read()
    if max_bytes and len(data) > max_bytes:  # grew since the stat
        raise too_big(f"more than {max_bytes}")
    return data


def check_image_bytes(data: bytes, max_pixels: int):
    """Decode an image after checking its header's size, so a decompression bomb is refused before it expands.

    Our bound is checked on the header, before any pixel is decoded, whatever PIL's own `MAX_IMAGE_PIXELS` is
    (many training scripts set it to None). PIL's bomb error, when it fires first (above twice its limit), is
    reported in our words: the user is told which limit refused the image and what to change."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        pil_limit = 2 * Image.MAX_IMAGE_PIXELS
        if pil_limit > max_pixels:
            raise _too_many_pixels(f"more than {pil_limit}", max_pixels) from None
        raise ImageTooLarge(f"more than {pil_limit} pixels is above Pillow's decompression-bomb limit (twice "
                            f"PIL.Image.MAX_IMAGE_PIXELS), which input.max_image_pixels={max_pixels} does not lift; "
                            "shrink the image or drop it from the input") from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise _too_many_pixels(f"{width}x{height}", max_pixels)
        im.verify()
    im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    im.load()
    return im


def _too_many_pixels(size: str, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(f"{size} pixels is above input.max_image_pixels={max_pixels}; shrink the image or drop it "
                         "from the input, or raise input.max_image_pixels if images this large are wanted")


def open_image(root: str, rel: str, max_pixels: int, max_bytes: Optional[int] = None,
               allowed_schemes: tuple[str, ...] = ()):
    """Decoded PIL image of an already probed path (used by the image decode stage and the embedding actors)."""
    location, reason = ImageProbe(root, max_pixels, tuple(allowed_schemes)).url(rel)
    if reason:
        raise ValueError(f"{rel}: {reason}")
    return check_image_bytes(open_bytes(location, max_bytes), max_pixels)


def _text_field(row: dict, name: str) -> tuple[str, Optional[str]]:
    value = row.get(name)
    if value is None:
        return "", None
    if not isinstance(value, str):
        return "", f"expected a string, got {type(value).__name__} {value!r}; convert the column to strings"
    return value, None


ID_TYPE = pa.binary(16)  # an item id while reading: its 16 bytes (hex strings only in the files written)
QUERY_COLUMNS = {"query_id": pa.string(), "dataset": pa.string(), "qry": pa.string(), "qry_image_path": pa.string(),
                 "pos_text": pa.string(), "pos_image_path": pa.string(), "group": pa.string(), "qry_item_id": ID_TYPE,
                 "pos_item_id": ID_TYPE, "input_neg_ids": pa.list_(ID_TYPE), "pos_extra_ids": pa.list_(ID_TYPE),
                 "_file": pa.int32(), "_n": pa.int64()}
"""What the reader keeps of an accepted pair, a column each (`_file`: its index in input.pairs, `_n`: its number)."""
ITEM_COLUMNS = ("item_id", "text", "image_path", "embed_text")


def input_items(cfg: InputConfig) -> int:
    """How many items a read of `cfg` finds at most, counted before reading it: two a pairs row (its query and its
    positive) and one a candidates row, from Parquet files' metadata and JSONL files' line counts. The input's own
    negatives and extra positives are not counted (that takes parsing the rows). A file that cannot be counted
    counts 0: the read says what is wrong with it."""
    return 2 * sum(_count_rows(path) for path in cfg.pairs) + (_count_rows(cfg.candidates) if cfg.candidates else 0)


def _count_rows(path: str) -> int:
    try:
        if Path(path).suffix.lower() in (".parquet", ".pq"):
            return sum(fragment.metadata.num_rows for fragment in pq.ParquetDataset(path).fragments)
        return _jsonl_scan(path, READ_BLOCK_ROWS)[1]  # the block read's planning on Ray reuses this scan
    except (OSError, ValueError, pa.ArrowException):
        return 0


@contextmanager
def without_cyclic_gc():
    """The cyclic garbage collector off while reading. A batch's Python objects (rows, checks, keys, a few per row)
    are freed by reference counting when the batch is done, but while they live their count triggers full
    collections, each a walk over every object of the process (its libraries' too): one cost 0.09 s of a warm
    5,000-pair job's ~1 s of CPU time (docs/benchmarks.md). On again afterwards, as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_corpus(cfg: InputConfig, caption_mode: bool) -> Corpus:
    """Read and validate every input file (see the module docstring), a batch of rows at a time: only the batch is
    Python objects; what is kept of it is Arrow / numpy columns, so the driver grows by bytes a pair, not objects."""
    with without_cyclic_gc():
        return _load_corpus(cfg, caption_mode)


def _load_corpus(cfg: InputConfig, caption_mode: bool) -> Corpus:
    reader = _Reader(cfg, caption_mode)
    file_dataset = {path: dataset_of(cfg.dataset, path) for path in cfg.pairs}
    shared = {ds for ds in file_dataset.values() if list(file_dataset.values()).count(ds) > 1}
    rows_in = 0
    for k, path in enumerate(cfg.pairs):
        n_rows = n_bad = 0
        for rows, numbers, bad in iter_numbered(path):
            reader.read_rejects.extend(bad)
            if rows and not n_rows:
                check_columns(path, rows, cfg)
            reader.add_pairs(k, rows, numbers, n_rows, file_dataset[path], file_dataset[path] in shared)
            n_rows, n_bad = n_rows + len(rows), n_bad + len(bad)
        if not n_rows and not n_bad:
            raise InputError(f"{path} holds no rows; give a file of (query, positive) pairs")
        rows_in += n_rows + n_bad
    candidate_rejects = reader.add_candidates() if cfg.candidates else 0
    rejects = reader.read_rejects + reader.rejects + reader.candidate_read_rejects + reader.candidate_rejects
    check_reject_rate(rows_in, [r for r in rejects if r["kind"] == "query"], cfg)
    return reader.corpus(rejects, rows_in, candidate_rejects)


class _Reader:
    """What `load_corpus` keeps between batches: accepted pairs and found items as Arrow chunks, the ids and contents
    of accepted pairs as sorted hashes (`_Seen`), pool and group memberships as arrays. Rejects stay dicts."""

    def __init__(self, cfg: InputConfig, caption_mode: bool):
        self.cfg = cfg
        self.context = ReadContext.of(cfg, caption_mode)
        self.read_rejects, self.rejects = [], []
        self.candidate_read_rejects, self.candidate_rejects = [], []
        self.queries = {name: [] for name in QUERY_COLUMNS}  # chunks, one a batch
        self.items = {name: [] for name in ITEM_COLUMNS}  # every batch's new items (an item may recur across them)
        self.dedup = Dedup(cfg.pairs)
        self.pools: dict[str, int] = {}  # dataset -> pool number, in the order the pools appear
        self.candidate_pools: dict[str, list] = {"item_id": [], "pool": []}  # pool -1 - k: the first k pools
        self.group_pairs: dict[str, list] = {"item_id": [], "group": []}
        self.has_negatives = self.has_extras = False

    def add_pairs(self, k, rows, numbers, first_n, file_dataset, shared) -> None:
        """Validate one batch of pairs rows (the `first_n`-th row of file `k` on); keep the accepted ones."""
        cfg, path = self.cfg, self.cfg.pairs[k]
        checked = check_pairs(self.context, path, rows, numbers, first_n, file_dataset, shared)
        duplicates = self.dedup.run([(c.qid, c.has_id, c.content, path, c.num) for c in checked if c.problem is None])
        columns: dict[str, list] = {name: [] for name in QUERY_COLUMNS}
        items: dict[bytes, tuple] = {}
        group_pairs: set[tuple[bytes, str]] = set()
        j = -1
        for c in checked:
            if c.problem is None:
                j += 1
                c.problem = duplicates.get(j)
            if c.problem:
                self.rejects.append(c.problem)
                continue
            negs, extras = pair_items(self.context, c, path, self.rejects)
            for iid, text, image, embed_text in c.sides + negs + extras:
                items.setdefault(iid, (text, image, embed_text))
            self.has_negatives |= row_has_negatives(c.row)
            self.has_extras |= bool(extras)
            self.pools.setdefault(str(c.dataset), len(self.pools))
            for name, value in query_values(c, negs, extras, k).items():
                columns[name].append(value)
            if c.group is not None:
                group_pairs.update((iid, c.group) for iid in [c.sides[1][0], *(e[0] for e in extras)])
        del checked
        for name, values in columns.items():
            self.queries[name].append(exact_array(values, QUERY_COLUMNS[name]))
        self.dedup.commit(pa.table({name: self.queries[name][-1] for name in Dedup.COLUMNS}))
        self._keep_items(items)
        self._keep_groups(group_pairs)

    def _keep_items(self, items: dict[bytes, tuple]) -> None:
        """A batch's items as chunks; `embed_text` is null where it is the text (no caption), shared at the end."""
        self.items["item_id"].append(exact_array(list(items), ID_TYPE))
        for at, name in enumerate(("text", "image_path")):
            self.items[name].append(exact_array([v[at] for v in items.values()], pa.string()))
        self.items["embed_text"].append(exact_array([None if v[2] == v[0] else v[2] for v in items.values()],
                                             pa.string()))

    def _keep_groups(self, group_pairs: set[tuple[bytes, str]]) -> None:
        self.group_pairs["item_id"].append(exact_array([iid for iid, _ in group_pairs], ID_TYPE))
        self.group_pairs["group"].append(exact_array([g for _, g in group_pairs], pa.string()))

    def add_candidates(self) -> int:
        """The candidate corpus (input.candidates) into the items and pools; returns how many rows it rejected."""
        count = 0
        for rows, numbers, bad in iter_numbered(self.cfg.candidates):
            self.candidate_read_rejects.extend({**r, "kind": "candidate"} for r in bad)
            items, members, datasets, group_pairs, rejects = check_candidates(self.context, rows, numbers)
            self.candidate_rejects += rejects
            count += len(bad) + len(rejects)
            pools = [self.pools.setdefault(ds, len(self.pools)) if ds is not None else -1 - len(self.pools)
                     for ds in datasets]  # into its dataset's pool, or (no dataset) into every pool there is so far
            self.candidate_pools["item_id"].append(exact_array(members, ID_TYPE))
            self.candidate_pools["pool"].append(np.array(pools, np.int64))
            self._keep_items(items)
            self._keep_groups(group_pairs)
        return count

    def corpus(self, rejects: list[dict], rows_in: int, candidate_rejects: int) -> Corpus:
        """The tables and row numbers, a column at a time (each column's chunks go as it is joined)."""
        # each id's first occurrence kept
        ids, keep = np.unique(id_view(_concat(self.items.pop("item_id"), ID_TYPE)), return_index=True)
        text, image = (_concat(self.items.pop(name), pa.string()).take(keep) for name in ("text", "image_path"))
        embed = _concat(self.items.pop("embed_text"), pa.string())
        embed = text if embed.null_count == len(embed) else pc.coalesce(embed.take(keep), text)
        del keep
        codes = np.zeros(len(text), np.int8)
        with_image = np.flatnonzero(pc.not_equal(image, "").to_numpy(zero_copy_only=False))
        if len(with_image):
            codes[with_image] = [2 if t.strip() else 1 for t in text.take(with_image).to_pylist()]
        item_table = pa.table({"item_id": hex_ids(ids), "text": text, "image_path": image,
                               "modality": pa.array(MODALITIES, pa.string()).take(codes), "embed_text": embed})
        del text, image, embed, codes

        q = {name: _concat(self.queries.pop(name), kind) for name, kind in QUERY_COLUMNS.items()}
        rank = {path: r for r, path in enumerate(sorted(set(self.cfg.pairs)))}  # sorted(): UTF-8 byte order
        ranks = np.array([rank[path] for path in self.cfg.pairs], np.int32)
        # rows by dataset, then file path, then place in the file
        keys = pa.table({"d": q["dataset"], "p": ranks[q.pop("_file").to_numpy()], "n": q.pop("_n")})
        order = pc.sort_indices(keys, sort_keys=[("d", "ascending"), ("p", "ascending"), ("n", "ascending")])
        del keys
        qry_rows, pos_rows = (np.searchsorted(ids, id_view(q[name])) for name in ("qry_item_id", "pos_item_id"))
        qtable = pa.table({name: hex_ids(id_view(q.pop(name))) if QUERY_COLUMNS[name] == ID_TYPE else q[name]
                           for name in list(QUERY_COLUMNS)[:9]})
        groups = pa.concat_arrays([_concat(self.group_pairs["group"], pa.string()), q["group"].drop_null()])
        groups = pc.unique(groups)
        groups = groups.take(pc.sort_indices(groups))
        n_groups = max(len(groups), 1)
        group_code = pc.fill_null(pc.index_in(q["group"], value_set=groups), -1).cast(pa.int32())
        qtable = qtable.append_column("qry_idx", pa.array(qry_rows.astype(np.int32)))
        qtable = qtable.append_column("pos_idx", pa.array(pos_rows.astype(np.int32)))
        qtable = qtable.append_column("group_code", group_code)
        if np.any(np.diff(order.to_numpy().astype(np.int64)) < 0):  # not in order yet: one sorted copy of the table
            qtable = qtable.take(order)
        extra_lists = q.pop("pos_extra_ids")
        for flag, name, lists in ((self.has_extras, extra_positives.COLUMN, extra_lists),
                                  (self.has_negatives, "input_neg_idx", q.pop("input_neg_ids"))):
            if flag:  # the input has extra positives / negatives: their item rows
                lists = lists.take(order)
                qtable = qtable.append_column(name, pa.ListArray.from_arrays(
                    lists.offsets, pa.array(np.searchsorted(ids, id_view(lists.flatten())).astype(np.int32))))

        # the default pool of a dataset: its pairs' positives (and extra positives); then the candidates'
        pool_of = pc.index_in(q["dataset"], value_set=pa.array(list(self.pools), pa.string())).to_numpy()
        extra_rows = np.searchsorted(ids, id_view(extra_lists.flatten()))
        member_rows = [pos_rows, extra_rows]
        member_pools = [pool_of, np.repeat(pool_of, np.diff(extra_lists.offsets.to_numpy()))]
        if self.cfg.candidates:
            rows = np.searchsorted(ids, id_view(_concat(self.candidate_pools["item_id"], ID_TYPE)))
            pools = np.concatenate(self.candidate_pools["pool"] or [np.zeros(0, np.int64)])
            named = pools >= 0
            member_rows.append(rows[named])
            member_pools.append(pools[named])
            upto = -1 - pools[~named]  # a row without a dataset: in each of the first `upto` pools
            member_rows.append(np.repeat(rows[~named], upto))
            member_pools.append(np.arange(upto.sum()) - np.repeat(np.cumsum(upto) - upto, upto))
        codes = np.unique(np.concatenate(member_pools).astype(np.int64) * len(ids)
                          + np.concatenate(member_rows).astype(np.int64))
        bounds = np.searchsorted(codes, np.arange(len(self.pools) + 1) * len(ids))
        pools = {ds: codes[bounds[p]:bounds[p + 1]] - p * len(ids) for ds, p in self.pools.items()}
        del q, member_rows, member_pools, codes

        group_items = _concat(self.group_pairs["item_id"], ID_TYPE)
        if len(group_items):
            item_rows = np.searchsorted(ids, id_view(group_items)).astype(np.int64)
            codes = pc.index_in(_concat(self.group_pairs["group"], pa.string()), value_set=groups).to_numpy()
            item_groups = np.unique(item_rows * n_groups + codes)
        else:
            item_groups = np.zeros(0, np.int64)
        return Corpus(qtable, item_table, pools, item_groups, n_groups, rejects, rows_in, candidate_rejects)


class _Seen:
    """64-bit hashes of what accepted pairs have (ids, contents) with the pair each came from: 16 bytes a pair
    instead of a dict entry, and a batch's membership test is a vectorised search. Kept as sorted runs that merge
    when one is as long as the run before it (as a binary counter): few runs to search, each hash moved log times.
    With a `prefix` the runs are files (PREFIX-N.bin, memory-mapped) merged a chunk at a time: the read's assembling
    task (pipeline/read_blocks.py) then holds a chunk, not 16 bytes per pair of the corpus."""

    CHUNK = 1 << 16

    def __init__(self, prefix: Optional[str] = None):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, their pairs)
        self.prefix, self.files = prefix, 0

    def hits(self, hashes: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(hashes), bool)
        for sorted_hashes, _ in self.runs:
            at = np.minimum(np.searchsorted(sorted_hashes, hashes), len(sorted_hashes) - 1)
            hit |= sorted_hashes[at] == hashes
        return hit

    def rows(self, h: int) -> list[int]:
        """The pairs with hash `h`, first first."""
        return sorted(int(p) for hashes, pairs in self.runs
                      for p in pairs[np.searchsorted(hashes, h):np.searchsorted(hashes, h, "right")])

    def add(self, hashes: np.ndarray, first_pair: int) -> None:
        """The hashes of pairs `first_pair`, `first_pair + 1`, ..."""
        if not len(hashes):
            return
        order = np.argsort(hashes, kind="stable")
        run = (hashes[order], first_pair + order.astype(np.int64))
        while self.runs and len(self.runs[-1][0]) <= len(run[0]):
            run = self._merge(self.runs.pop(), run)
        if self.prefix is not None and not isinstance(run[0], np.memmap):
            kept = self._new(len(run[0]))
            kept[0][:], kept[1][:] = run
            run = kept
        self.runs.append(run)

    def _new(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.prefix is None:
            return np.empty(n, np.int64), np.empty(n, np.int64)
        self.files += 2
        return tuple(np.memmap(f"{self.prefix}-{self.files - k}.bin", np.int64, "w+", shape=(n,)) for k in (1, 0))

    def _merge(self, a: tuple, b: tuple) -> tuple[np.ndarray, np.ndarray]:
        """Runs `a` and `b` as one, a chunk of each at a time: at each step every hash up to the smaller of the two
        chunks' last goes out."""
        out = self._new(len(a[0]) + len(b[0]))
        i = j = o = 0
        while i < len(a[0]) or j < len(b[0]):
            ia, jb = min(i + self.CHUNK, len(a[0])), min(j + self.CHUNK, len(b[0]))
            ends = [run[0][end - 1] for run, end in ((a, ia), (b, jb)) if end < len(run[0])]
            if ends:
                ia = i + int(np.searchsorted(a[0][i:ia], min(ends), "right"))
                jb = j + int(np.searchsorted(b[0][j:jb], min(ends), "right"))
            h = np.concatenate([a[0][i:ia], b[0][j:jb]])
            order = np.argsort(h, kind="stable")
            out[0][o:o + len(h)] = h[order]
            out[1][o:o + len(h)] = np.concatenate([a[1][i:ia], b[1][j:jb]])[order]
            o, i, j = o + len(h), ia, jb
        for array in (*a, *b):
            if isinstance(array, np.memmap):
                os.remove(array.filename)
        return out


@dataclass
class Checked:
    """One pairs row after its own checks (`check_pairs`): its reject, or its sides as items."""

    problem: Optional[dict]
    row: dict
    more: list
    qid: str
    has_id: bool
    dataset: object
    sides: list
    num: int
    content: Optional[tuple]  # (dataset, query item, positive item): what a pair without an id is told apart by
    group: Optional[str] = None


@dataclass
class ReadContext:
    """What checking a row needs besides the row: the config, the image probe (its results cached), captions."""

    cfg: InputConfig
    caption_mode: bool
    probe: ImageProbe
    captions: dict

    @classmethod
    def of(cls, cfg: InputConfig, caption_mode: bool) -> "ReadContext":
        return cls(cfg, caption_mode, ImageProbe(cfg.image_root, cfg.max_image_pixels, tuple(cfg.allowed_schemes),
                                                 max_bytes=cfg.max_image_bytes),
                   _load_captions(cfg.captions) if caption_mode else {})


def check_pairs(ctx: ReadContext, path, rows, numbers, first_n, file_dataset, shared) -> list[Checked]:
    """Each row's own checks (types, both sides' content and images, the group key), with no regard to other rows:
    a row without an id is named by its place in the file, `first_n + i`."""
    cfg, probe, captions, caption_mode = ctx.cfg, ctx.probe, ctx.captions, ctx.caption_mode
    probe.run({r.get(c) for r in rows for c in ("qry_image_path", "pos_image_path") if isinstance(r.get(c), str)})
    probe.run({p for r in rows for c in ("neg_image_path", "pos_image_path", "pos_extra_image_path")
               for p in _as_list(r.get(c)) if isinstance(p, str)})
    checked = []
    for i, row in enumerate(rows):
        n, num, qid = first_n + i, numbers[i], row.get("id")
        row, more = _split_positives(row)
        dataset = row.get("dataset") or file_dataset
        has_id = qid is not None
        if has_id:
            qid = str(qid)
        else:  # several files of one dataset (MMEB-train's splits of a subset): the file's stem keeps ids apart
            qid = synthetic_id(dataset, path, n, shared)
        sides, problem = [], _key_type_problem(path, num, qid, row)
        for text_col, image_col in (("qry", "qry_image_path"), ("pos_text", "pos_image_path")):
            if problem:
                break
            side = _side(row, text_col, image_col, probe, captions, caption_mode)
            if isinstance(side, dict):
                problem = _reject(path, num, qid, side["field"], side["reason"], side["detail"])
                break
            sides.append(side)
        if problem is None and cfg.group_key and row.get(cfg.group_key) is not None \
                and not isinstance(row.get(cfg.group_key), (str, int)):
            problem = _reject(path, num, qid, cfg.group_key, "bad_type",
                              f"group key must be a string or integer, got {row.get(cfg.group_key)!r}")
        content = None if problem else (str(dataset), sides[0][0], sides[1][0])
        group = row.get(cfg.group_key) if cfg.group_key else None
        checked.append(Checked(problem, row, more, qid, has_id, dataset, sides, num, content,
                               None if group is None else str(group)))
    return checked


def synthetic_id(dataset, path: str, n: int, shared: bool) -> str:
    """The query id of a row without one: its dataset and its place among the file's rows."""
    return f"{dataset}:{Path(path).stem}:{n}" if shared else f"{dataset}:{n}"


def pair_items(ctx: ReadContext, c: Checked, path, rejects: list) -> tuple[list, list]:
    """An accepted pair's input negatives and extra positives as items; what is unusable of them goes to
    `rejects`."""
    negs = _input_negatives(c.row, ctx.probe, ctx.captions, ctx.caption_mode, path, c.num, c.qid, rejects)
    extras = _extra_positives(c.more, {c.sides[1][0]}, ctx.probe, ctx.captions, ctx.caption_mode, path, c.num, c.qid,
                              rejects)
    return negs, extras


def query_values(c: Checked, negs: list, extras: list, k: int) -> dict:
    """An accepted pair's row of QUERY_COLUMNS."""
    row = c.row
    return {"query_id": c.qid, "dataset": str(c.dataset), "qry": row.get("qry") or "",
            "qry_image_path": row.get("qry_image_path") or "", "pos_text": row.get("pos_text") or "",
            "pos_image_path": row.get("pos_image_path") or "", "group": c.group, "qry_item_id": c.sides[0][0],
            "pos_item_id": c.sides[1][0], "input_neg_ids": [neg[0] for neg in negs],
            "pos_extra_ids": [e[0] for e in extras], "_file": k, "_n": c.num}


def check_candidates(ctx: ReadContext, rows: list[dict], numbers: list[int]) -> tuple:
    """A batch of candidate rows checked: (new items {id: (text, image, embed_text)}, the accepted rows' items and
    datasets (None: no dataset), their (item, group) pairs, the rejects)."""
    cfg, probe = ctx.cfg, ctx.probe
    probe.run({r.get("image_path") for r in rows if isinstance(r.get("image_path"), str)})
    items: dict[bytes, tuple] = {}
    group_pairs: set[tuple[bytes, str]] = set()
    members, datasets, rejects = [], [], []
    for n, row in zip(numbers, rows):
        text, p1 = _text_field(row, "text")
        image, p2 = _text_field(row, "image_path")
        side = {"field": "text", "reason": "bad_type", "detail": p1 or p2} if (p1 or p2) else \
            _content(text, image, "text", "image_path", probe, ctx.captions, ctx.caption_mode)
        if isinstance(side, dict):
            rejects.append(_reject(cfg.candidates, n, row.get("id"), side["field"], side["reason"], side["detail"],
                                   kind="candidate"))
            continue
        iid = side[0]
        items.setdefault(iid, side[1:])
        members.append(iid)
        datasets.append(str(row["dataset"]) if row.get("dataset") else None)
        if cfg.group_key and row.get(cfg.group_key) is not None:
            group_pairs.add((iid, str(row[cfg.group_key])))
    return items, members, datasets, group_pairs, rejects


class Dedup:
    """Which valid pairs are accepted, in input order: the first of each id, and, among pairs without an id, the
    first of each (dataset, query, positive). What an earlier chunk accepted is kept as hashes (`_Seen`), and a hash
    match is confirmed against that pair's columns in its chunk."""

    COLUMNS = ("query_id", "dataset", "qry_item_id", "pos_item_id", "_file", "_n")

    def __init__(self, paths: list[str], folder: Optional[str] = None):
        self.paths = paths
        self.seen = {name: _Seen(None if folder is None else f"{folder}/seen-{name}") for name in ("id", "content")}
        self.starts = [0]  # accepted pairs before each chunk
        self.chunks: list[tuple] = []  # accepted pairs: a table (or what opens it), and its rows
        self.pending = None

    def run(self, pairs: list[tuple]) -> dict[int, dict]:
        """(qid, has_id, content, path, number) of a chunk's valid pairs -> {index: duplicate reject}. `commit`
        then keeps the accepted ones."""
        id_hash = np.array([hash(p[0]) for p in pairs], np.int64)
        content_hash = np.array([hash(p[2]) for p in pairs], np.int64)
        id_hit, content_hit = self.seen["id"].hits(id_hash), self.seen["content"].hits(content_hash)
        batch_ids, batch_content, accepted, rejects = {}, {}, [], {}
        for j, (qid, has_id, content, path, num) in enumerate(pairs):
            key = content[1:]
            first = (self._first("id", qid, id_hash[j]) if id_hit[j] else None) or batch_ids.get(qid)
            if first:
                first_path, first_num, first_key = first
                same = first_key == key
                rejects[j] = _reject(path, num, qid, "id", "duplicate_row" if same else "duplicate_id",
                                     f"id {qid!r} already used by {_where(first_path, first_num)}"
                                     + ("" if same else " with different content; give every pair a unique id"))
            elif not has_id and (first := (self._first("content", content, content_hash[j])
                                           if content_hit[j] else None) or batch_content.get(content)):
                # No id to tell them apart: the same query and positive in one dataset is the same pair again
                rejects[j] = _reject(path, num, qid, None, "duplicate_row",
                                     f"same query, positive and dataset as {_where(*first[:2])}; "
                                     "remove the repeated row")
            else:
                batch_ids[qid] = (path, num, key)
                batch_content.setdefault(content, (path, num, key))
                accepted.append(j)
        self.pending = (id_hash[accepted], content_hash[accepted])
        return rejects

    def commit(self, table: pa.Table, rows: Optional[np.ndarray] = None) -> None:
        """The accepted pairs of the last `run`: `table` (COLUMNS; or a function that opens it, when a duplicate
        needs it), or its `rows`, in order."""
        for name, hashes in zip(("id", "content"), self.pending):
            self.seen[name].add(hashes, self.starts[-1])
        self.starts.append(self.starts[-1] + len(self.pending[0]))
        self.chunks.append((table, rows))
        self.pending = None

    def _first(self, kind: str, value, h: int) -> Optional[tuple]:
        """(path, number, (query item, positive item)) of the first accepted pair of an earlier chunk whose id
        (kind "id") or (dataset, query item, positive item) (kind "content") is `value`; None if there is none."""
        for g in self.seen[kind].rows(h):
            c = bisect.bisect_right(self.starts, g) - 1
            table, rows = self.chunks[c]
            table = table() if callable(table) else table
            at = g - self.starts[c] if rows is None else int(rows[g - self.starts[c]])
            pair = {name: table.column(name)[at].as_py() for name in self.COLUMNS}
            key = (pair["qry_item_id"], pair["pos_item_id"])
            if (pair["query_id"] if kind == "id" else (pair["dataset"], *key)) == value:
                return self.paths[pair["_file"]], pair["_n"], key
        return None


def exact_array(values: list, kind: pa.DataType) -> pa.Array:
    """`pa.array` in buffers of its exact size: a builder's grown-and-freed buffers, batch after batch between the
    kept ones, leave the allocator fragmented (measured: RSS ~50% above the bytes kept)."""
    return pa.concat_arrays([pa.array(values, kind)])


def _concat(chunks: list[pa.Array], kind: pa.DataType) -> pa.Array:
    return pa.concat_arrays(chunks) if chunks else pa.array([], kind)


def id_view(array: pa.Array) -> np.ndarray:
    """16-byte ids (binary(16), no nulls) as a numpy `S16` view: sorted and searched like their bytes."""
    return np.frombuffer(array.buffers()[1], "S16", count=array.offset + len(array))[array.offset:]


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


def hex_ids(ids: np.ndarray) -> pa.Array:
    """The ids as 32-character hex strings (their `item_id`), written straight into Arrow buffers: not a Python
    string each, and in Arrow's pool, which reuses the memory the reader frees."""
    raw = np.ascontiguousarray(ids).view(np.uint8)
    data, offsets = pa.allocate_buffer(2 * len(raw)), pa.allocate_buffer(4 * (len(ids) + 1))
    digits = np.frombuffer(data, np.uint8).reshape(-1, 2)
    np.take(_HEX_DIGITS, raw >> 4, out=digits[:, 0])
    np.take(_HEX_DIGITS, raw & 15, out=digits[:, 1])
    np.multiply(np.arange(len(ids) + 1, dtype=np.int32), 32, out=np.frombuffer(offsets, np.int32))
    return pa.Array.from_buffers(pa.string(), len(ids), [None, offsets, data], null_count=0)


def _where(source: str, number) -> str:
    """How a person finds a row: its line in a JSONL file, its 0-based index in a Parquet file."""
    return f"{source} {'row' if Path(str(source)).suffix.lower() in ('.parquet', '.pq') else 'line'} {number}"


def dataset_of(template: Optional[str], path: str) -> str:
    """`input.dataset` for the rows of `path`: literal, or with `{parent}` / `{stem}` filled in; default the stem."""
    p = Path(path)
    if not template:
        return p.stem
    if "{" in template:
        return template.format(parent=p.parent.name, stem=p.stem)
    return template


def _key_type_problem(path, n, qid, row) -> Optional[dict]:
    """A reject when `id` or `dataset` is not a string or an integer (a list, a mapping, a float...)."""
    for key in ("id", "dataset"):
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            return _reject(path, n, qid, key, "bad_type", f"{key} must be a string or an integer, got "
                           f"{type(value).__name__} {value!r}; convert the column")
    return None


def check_columns(path: str, rows: list[dict], cfg: InputConfig) -> None:
    """Refuse a pairs file whose first rows lack a query or positive column, or the configured group key."""
    if not rows:
        return
    columns = set().union(*(r.keys() for r in rows[:1000]))
    if not columns & {"qry", "qry_image_path"} or not columns & {"pos_text", "pos_image_path"}:
        raise InputError(f"{path}: a pairs file needs a query column (qry and/or qry_image_path) and a positive column "
                         f"(pos_text and/or pos_image_path); found columns: {', '.join(sorted(columns))}")
    if cfg.group_key and cfg.group_key not in columns:
        raise InputError(f"{path}: input.group_key is {cfg.group_key!r} but the file has no such column; "
                         f"columns: {', '.join(sorted(columns))}")


def _side(row, text_col, image_col, probe, captions, caption_mode):
    """(item_id, text, image_path, embed_text) of one side of a pair, or a reject description."""
    text, problem = _text_field(row, text_col)
    if problem:
        return {"field": text_col, "reason": "bad_type", "detail": problem}
    image, problem = _text_field(row, image_col)
    if problem:
        return {"field": image_col, "reason": "bad_type", "detail": problem}
    return _content(text, image, text_col, image_col, probe, captions, caption_mode)


def _content(text, image, text_col, image_col, probe, captions, caption_mode):
    if not text.strip() and not image.strip():
        return {"field": text_col, "reason": "empty_text",
                "detail": f"both {text_col} and {image_col} are empty or whitespace; give a text or an image"}
    digest = ""
    if image:
        digest, reason, detail = probe.results.get(image) or probe.check(image)
        if reason:
            return {"field": image_col, "reason": reason, "detail": detail}
    embed_text = text
    if image and caption_mode:
        caption = captions.get(image)
        if not caption:
            return {"field": image_col, "reason": "no_caption",
                    "detail": f"teacher.image_mode is caption but input.captions has no caption for {image!r}"}
        embed_text = f"{caption} {text}".strip() if text.strip() else caption
    return _item_key(text, digest), text, image, embed_text


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def row_has_negatives(row: dict) -> bool:
    """Whether a pairs row brings its own negatives: the queries then carry an `input_neg_idx` column."""
    return row.get("neg_text") is not None or row.get("neg_image_path") is not None


def _input_negatives(row, probe, captions, caption_mode, path, n, qid, rejects) -> list[tuple]:
    """The negatives a pairs row already has (`neg_text` / `neg_image_path`, scalars or aligned lists), as items.
    They become candidates of this query (marked `input`), scored and filtered like retrieved ones. An empty pair is
    no negative; an unusable one is a `candidate` reject and the query keeps the rest."""
    texts, images = _as_list(row.get("neg_text")), _as_list(row.get("neg_image_path"))
    out = []
    for i in range(max(len(texts), len(images))):
        text = texts[i] if i < len(texts) else ""
        image = images[i] if i < len(images) else ""
        text, image = "" if text is None else text, "" if image is None else image
        if not isinstance(text, str) or not isinstance(image, str):
            field_name = "neg_text" if not isinstance(text, str) else "neg_image_path"
            rejects.append(_reject(path, n, qid, field_name, "bad_type", f"negative {i}: expected a string, got "
                                   f"{type(text if field_name == 'neg_text' else image).__name__}", kind="candidate"))
            continue
        if not text.strip() and not image.strip():
            continue
        side = _content(text, image, "neg_text", "neg_image_path", probe, captions, caption_mode)
        if isinstance(side, dict):
            rejects.append(_reject(path, n, qid, side["field"], side["reason"], f"negative {i}: {side['detail']}",
                                   kind="candidate"))
            continue
        out.append(side)
    return out


def _split_positives(row: dict) -> tuple[dict, list[tuple[str, str, int, object, object]]]:
    """(the row with its positive as scalars, its extra positives as (text column, image column, index, text,
    image)). List-valued `pos_text` / `pos_image_path` (aligned, a scalar counts as a list of one): the first entry is
    the row's positive, the rest extra; `pos_extra_text` / `pos_extra_image_path` (aligned lists) are all extra."""
    extras = []
    if isinstance(row.get("pos_text"), (list, tuple)) or isinstance(row.get("pos_image_path"), (list, tuple)):
        texts, images = _as_list(row.get("pos_text")), _as_list(row.get("pos_image_path"))
        both = [(texts[i] if i < len(texts) else None, images[i] if i < len(images) else None)
                for i in range(max(len(texts), len(images)))] or [(None, None)]
        row = {**row, "pos_text": both[0][0], "pos_image_path": both[0][1]}
        extras += [("pos_text", "pos_image_path", i, t, im) for i, (t, im) in enumerate(both[1:], 1)]
    texts, images = _as_list(row.get("pos_extra_text")), _as_list(row.get("pos_extra_image_path"))
    extras += [("pos_extra_text", "pos_extra_image_path", i, texts[i] if i < len(texts) else None,
                images[i] if i < len(images) else None) for i in range(max(len(texts), len(images)))]
    return row, extras


def _extra_positives(extras, known: set[str], probe, captions, caption_mode, path, n, qid, rejects) -> list[tuple]:
    """The row's extra positives as items (each once, never the positive again). An unusable one (empty, a wrong
    type, a missing image) is a `candidate` reject naming the column and entry; the query keeps the rest."""
    out = []
    for text_col, image_col, i, text, image in extras:
        text, image = "" if text is None else text, "" if image is None else image
        if not isinstance(text, str) or not isinstance(image, str):
            field_name, value = (text_col, text) if not isinstance(text, str) else (image_col, image)
            rejects.append(_reject(path, n, qid, field_name, "bad_type", f"extra positive {field_name}[{i}]: expected"
                                   f" a string, got {type(value).__name__} {value!r}; convert the column to strings",
                                   kind="candidate"))
            continue
        side = _content(text, image, text_col, image_col, probe, captions, caption_mode)
        if isinstance(side, dict):
            rejects.append(_reject(path, n, qid, side["field"], side["reason"],
                                   f"extra positive {side['field']}[{i}]: {side['detail']}"
                                   + ("; remove the entry" if side["reason"] == "empty_text" else ""),
                                   kind="candidate"))
            continue
        if side[0] not in known:
            known.add(side[0])
            out.append(side)
    return out


def _load_captions(path: str) -> dict[str, str]:
    rows, _ = read_rows(path)
    if rows and not {"image_path", "caption"} <= set(rows[0]):
        raise InputError(f"{path}: input.captions needs columns image_path and caption; found {sorted(rows[0])}")
    return {r["image_path"]: r["caption"] for r in rows if isinstance(r.get("caption"), str) and r["caption"].strip()}


def check_reject_rate(rows_in: int, rejects: list[dict], cfg: InputConfig) -> None:
    """Refuse the input when more rows are unusable than `input.max_reject_fraction` / `max_rejects` allow: so many
    usually means a wrong image root or column, not bad rows."""
    n_rejected = len(rejects)
    over_fraction = rows_in and n_rejected / rows_in > cfg.max_reject_fraction
    over_count = cfg.max_rejects is not None and n_rejected > cfg.max_rejects
    if over_fraction or over_count:
        reasons: dict[str, int] = {}
        for r in rejects:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        first = rejects[0]
        limit = (f"input.max_reject_fraction={cfg.max_reject_fraction}" if over_fraction
                 else f"input.max_rejects={cfg.max_rejects}")
        raise InputError(
            f"{n_rejected} of {rows_in} input rows are unusable (above {limit}): {reasons}. First: "
            f"{_where(first['source'], first['row'])} field {first['field']}: {first['detail']}. Fix the input "
            "(or the image root), or raise the threshold.")


def drop_items(corpus: Corpus, failed: set[str], reason: str, detail: str) -> Corpus:
    """The corpus without the items in `failed`: their queries become rejects, they leave the candidate pools and
    the queries' extra positives and input negatives.

    Item rows are kept (row numbers stay stable); an item that is no query's query or positive and in no pool is
    simply never used."""
    if not failed:
        return corpus
    ids = corpus.items.column("item_id").to_pylist()
    bad = np.array([iid in failed for iid in ids], dtype=bool)
    q = corpus.queries
    qry_bad = bad[q.column("qry_idx").to_numpy()]
    pos_bad = bad[q.column("pos_idx").to_numpy()]
    rejects = list(corpus.rejects)
    qids = q.column("query_id").to_pylist()
    images = {side: q.column(f"{side}_image_path").to_pylist() for side in ("qry", "pos")}
    for r in np.flatnonzero(qry_bad | pos_bad):
        side = "qry" if qry_bad[r] else "pos"
        field_name = f"{side}_image_path" if images[side][r] else ("qry" if side == "qry" else "pos_text")
        rejects.append(_reject("embedding", None, qids[r], field_name, reason, detail))
    used = set(np.flatnonzero(qry_bad | pos_bad).tolist())
    query_items = set(q.column("qry_idx").to_numpy()[sorted(used)].tolist()) | \
        set(q.column("pos_idx").to_numpy()[sorted(used)].tolist())
    pools = {ds: pool[~bad[pool]] for ds, pool in corpus.pools.items()}
    embedded = input_negatives.candidate_pools(corpus.pools, q).values()  # the pools and the input negatives
    dropped_candidates = sorted({int(i) for pool in embedded for i in pool[bad[pool]]} - query_items)
    for i in dropped_candidates:
        rejects.append(_reject("embedding", None, None, "text", reason, f"item {ids[i]}: {detail}", kind="candidate"))
    q = extra_positives.without(extra_positives.without(q, bad), bad, input_negatives.COLUMN)
    return Corpus(q.filter(pa.array(~(qry_bad | pos_bad))), corpus.items, pools, corpus.item_groups,
                  corpus.n_groups, rejects, corpus.rows_in, corpus.candidate_rows_rejected + len(dropped_candidates))
