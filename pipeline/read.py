"""Read the corpus: pairs (and an optional candidate corpus) in, validated queries and content-addressed items out.

Every input row either becomes a query or a reject with its file, row, field and reason; nothing is dropped silently.
An item's identity is the hash of its normalised text and its image bytes, so identical content is one item and a
copy of the positive can never come back as its own negative.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

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
    return " ".join(unicodedata.normalize("NFKC", text).split())


def item_id(text: str, image_digest: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(b"t:" + normalise_text(text).encode() + b"\0i:" + image_digest.encode())
    return h.hexdigest()


def read_rows(path: str) -> tuple[list[dict], list[dict]]:
    """Rows of a Parquet or JSONL file as dicts, plus rejects for JSONL lines that are not JSON objects."""
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            return pq.read_table(path).to_pylist(), []
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"{path}: cannot read Parquet file: {exc}") from exc
    if suffix in (".jsonl", ".json", ".ndjson"):
        try:
            return pa_json.read_json(path).to_pylist(), []
        except pa.ArrowInvalid:
            return _read_jsonl_lines(path)
        except OSError as exc:
            raise InputError(f"{path}: cannot read JSONL file: {exc}") from exc
    raise InputError(f"{path}: unsupported file type {suffix!r}; give Parquet (.parquet) or JSON lines (.jsonl)")


def _read_jsonl_lines(path: str) -> tuple[list[dict], list[dict]]:
    """Line by line, for files whose rows disagree on types (pyarrow's reader rejects the whole file then)."""
    rows, rejects = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                rejects.append(_reject(path, len(rows) + len(rejects), None, None, "bad_json",
                                       f"line {n + 1} is not valid JSON ({exc.msg}); fix or remove the line"))
                continue
            if not isinstance(row, dict):
                rejects.append(_reject(path, len(rows) + len(rejects), None, None, "bad_json",
                                       f"line {n + 1} is a JSON {type(row).__name__}, not an object"))
                continue
            rows.append(row)
    return rows, rejects


def _reject(source, row, query_id, field_name, reason, detail, kind="query") -> dict:
    return {"kind": kind, "source": str(source), "row": row, "query_id": query_id, "field": field_name,
            "reason": reason, "detail": detail}


class ImageProbe:
    """Checks every referenced image once: inside the root, readable, within the pixel bound, decodable."""

    def __init__(self, root: str, max_pixels: int, allowed_schemes: tuple[str, ...] = ()):
        self.root = root.rstrip("/")
        self.max_pixels = max_pixels
        self.allowed_schemes = allowed_schemes
        self.results: dict[str, tuple[Optional[str], Optional[str], str]] = {}

    def url(self, rel: str) -> tuple[Optional[str], Optional[str]]:
        """The location of `rel` under the root, or (None, reason) when it is not allowed."""
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
        location, reason = self.url(rel)
        if reason == "bad_uri_scheme":
            return None, reason, (f"{rel!r} uses a URI scheme that is not allowed (allowed: "
                                  f"{', '.join(self.allowed_schemes) or 'none'}); give a path under the image root")
        if reason:
            return None, reason, f"{rel!r} leads outside the image root {self.root}; give a path under the root"
        try:
            data = open_bytes(location)
        except FileNotFoundError:
            return None, "missing_image", f"{location} does not exist; fix the path or add the file"
        except OSError as exc:
            return None, "missing_image", f"{location} cannot be read: {exc}"
        try:
            check_image_bytes(data, self.max_pixels)
        except ImageTooLarge as exc:
            return None, "image_too_large", f"{location}: {exc}"
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


def open_bytes(location: str) -> bytes:
    if "://" in location:
        import fsspec

        with fsspec.open(location, "rb") as f:
            return f.read()
    with open(location, "rb") as f:
        return f.read()


def check_image_bytes(data: bytes, max_pixels: int):
    """Decode an image after checking its header's size, so a decompression bomb is refused before it expands."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"{width}x{height} pixels is above input.max_image_pixels={max_pixels}")
        im.verify()
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def open_image(root: str, rel: str, max_pixels: int):
    """Decoded PIL image of an already probed path (used by the embedding actors)."""
    location, reason = ImageProbe(root, max_pixels).url(rel)
    if reason:
        raise ValueError(f"{rel}: {reason}")
    return check_image_bytes(open_bytes(location), max_pixels)


def _text_field(row: dict, name: str) -> tuple[str, Optional[str]]:
    value = row.get(name)
    if value is None:
        return "", None
    if not isinstance(value, str):
        return "", f"expected a string, got {type(value).__name__} {value!r}; convert the column to strings"
    return value, None


def load_corpus(cfg: InputConfig, caption_mode: bool) -> Corpus:
    """Read and validate every input file; see the module docstring."""
    rejects: list[dict] = []
    raw: list[tuple[str, int, dict]] = []
    for path in cfg.pairs:
        rows, bad = read_rows(path)
        rejects.extend(bad)
        _check_columns(path, rows, cfg)
        raw.extend((path, i, r) for i, r in enumerate(rows))
    rows_in = len(raw) + len(rejects)

    captions = _load_captions(cfg.captions) if caption_mode else {}
    probe = ImageProbe(cfg.image_root, cfg.max_image_pixels)
    probe.run({r.get(c) for _, _, r in raw for c in ("qry_image_path", "pos_image_path") if isinstance(r.get(c), str)})

    items: dict[str, tuple[str, str, str]] = {}  # item_id -> (text, image_path, embed_text)
    queries, seen_ids = [], {}
    group_pairs: set[tuple[str, str]] = set()
    for path, n, row in raw:
        qid = row.get("id")
        dataset = row.get("dataset") or cfg.dataset or Path(path).stem
        qid = str(qid) if qid is not None else f"{dataset}:{n}"
        sides, problem = [], None
        for text_col, image_col in (("qry", "qry_image_path"), ("pos_text", "pos_image_path")):
            side = _side(row, text_col, image_col, probe, captions, caption_mode)
            if isinstance(side, dict):
                problem = _reject(path, n, qid, side["field"], side["reason"], side["detail"])
                break
            sides.append(side)
        if problem is None and cfg.group_key and row.get(cfg.group_key) is not None \
                and not isinstance(row.get(cfg.group_key), (str, int)):
            problem = _reject(path, n, qid, cfg.group_key, "bad_type",
                              f"group key must be a string or integer, got {row.get(cfg.group_key)!r}")
        if problem is None:
            key = (sides[0][0], sides[1][0])
            if qid in seen_ids:
                first_path, first_row, first_key = seen_ids[qid]
                same = first_key == key
                problem = _reject(path, n, qid, "id", "duplicate_row" if same else "duplicate_id",
                                  f"id {qid!r} already used by {first_path} row {first_row}"
                                  + ("" if same else " with different content; give every pair a unique id"))
            else:
                seen_ids[qid] = (path, n, key)
        if problem:
            rejects.append(problem)
            continue
        group = row.get(cfg.group_key) if cfg.group_key else None
        group = None if group is None else str(group)
        for iid, text, image, embed_text in sides:
            items.setdefault(iid, (text, image, embed_text))
        queries.append({"query_id": qid, "dataset": str(dataset), "qry": row.get("qry") or "",
                        "qry_image_path": row.get("qry_image_path") or "", "pos_text": row.get("pos_text") or "",
                        "pos_image_path": row.get("pos_image_path") or "", "group": group,
                        "qry_item_id": sides[0][0], "pos_item_id": sides[1][0], "_order": (path, n)})
        if group is not None:
            group_pairs.add((sides[1][0], group))

    pool_members: dict[str, set[str]] = {}
    for q in queries:
        pool_members.setdefault(q["dataset"], set()).add(q["pos_item_id"])
    candidate_rejects = 0
    if cfg.candidates:
        candidate_rejects = _add_candidates(cfg, probe, captions, caption_mode, items, pool_members, group_pairs,
                                            rejects)

    _check_reject_rate(rows_in, [r for r in rejects if r["kind"] == "query"], cfg)
    return _assemble(queries, items, pool_members, group_pairs, rejects, rows_in, candidate_rejects)


def _check_columns(path: str, rows: list[dict], cfg: InputConfig) -> None:
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
    return item_id(text, digest), text, image, embed_text


def _load_captions(path: str) -> dict[str, str]:
    rows, _ = read_rows(path)
    if rows and not {"image_path", "caption"} <= set(rows[0]):
        raise InputError(f"{path}: input.captions needs columns image_path and caption; found {sorted(rows[0])}")
    return {r["image_path"]: r["caption"] for r in rows if isinstance(r.get("caption"), str) and r["caption"].strip()}


def _add_candidates(cfg, probe, captions, caption_mode, items, pool_members, group_pairs, rejects) -> int:
    rows, bad = read_rows(cfg.candidates)
    rejects.extend({**r, "kind": "candidate"} for r in bad)
    probe.run({r.get("image_path") for r in rows if isinstance(r.get("image_path"), str)})
    count = len(bad)
    for n, row in enumerate(rows):
        text, p1 = _text_field(row, "text")
        image, p2 = _text_field(row, "image_path")
        side = {"field": "text", "reason": "bad_type", "detail": p1 or p2} if (p1 or p2) else \
            _content(text, image, "text", "image_path", probe, captions, caption_mode)
        if isinstance(side, dict):
            rejects.append(_reject(cfg.candidates, n, row.get("id"), side["field"], side["reason"], side["detail"],
                                   kind="candidate"))
            count += 1
            continue
        iid = side[0]
        items.setdefault(iid, side[1:])
        targets = [row["dataset"]] if row.get("dataset") else list(pool_members)
        for ds in targets:
            pool_members.setdefault(str(ds), set()).add(iid)
        if cfg.group_key and row.get(cfg.group_key) is not None:
            group_pairs.add((iid, str(row[cfg.group_key])))
    return count


def _check_reject_rate(rows_in: int, rejects: list[dict], cfg: InputConfig) -> None:
    n_rejected = len(rejects)
    if rows_in and n_rejected / rows_in > cfg.max_reject_fraction:
        reasons: dict[str, int] = {}
        for r in rejects:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        first = rejects[0]
        raise InputError(
            f"{n_rejected} of {rows_in} input rows are unusable (above input.max_reject_fraction="
            f"{cfg.max_reject_fraction}): {reasons}. First: {first['source']} row {first['row']} field "
            f"{first['field']}: {first['detail']}. Fix the input (or the image root), or raise the threshold.")


def _assemble(queries, items, pool_members, group_pairs, rejects, rows_in, candidate_rejects) -> Corpus:
    ids = sorted(items)
    index = {iid: i for i, iid in enumerate(ids)}
    modality = [MODALITIES[(2 if items[i][0].strip() and items[i][1] else 1 if items[i][1] else 0)] for i in ids]
    item_table = pa.table({
        "item_id": pa.array(ids, pa.string()),
        "text": pa.array([items[i][0] for i in ids], pa.string()),
        "image_path": pa.array([items[i][1] for i in ids], pa.string()),
        "modality": pa.array(modality, pa.string()),
        "embed_text": pa.array([items[i][2] for i in ids], pa.string()),
    })
    queries.sort(key=lambda q: (q["dataset"], q.pop("_order")))
    qtable = pa.Table.from_pylist(queries, schema=pa.schema([
        ("query_id", pa.string()), ("dataset", pa.string()), ("qry", pa.string()), ("qry_image_path", pa.string()),
        ("pos_text", pa.string()), ("pos_image_path", pa.string()), ("group", pa.string()),
        ("qry_item_id", pa.string()), ("pos_item_id", pa.string())]))
    qtable = qtable.append_column("qry_idx", pa.array([index[q["qry_item_id"]] for q in queries], pa.int32()))
    qtable = qtable.append_column("pos_idx", pa.array([index[q["pos_item_id"]] for q in queries], pa.int32()))
    pools = {ds: np.array(sorted(index[i] for i in members), dtype=np.int64) for ds, members in pool_members.items()}
    groups = sorted({g for _, g in group_pairs} | {q["group"] for q in queries if q["group"] is not None})
    gindex = {g: k for k, g in enumerate(groups)}
    item_groups = np.array(sorted(index[i] * max(len(groups), 1) + gindex[g] for i, g in group_pairs), np.int64)
    qtable = qtable.append_column("group_code", pa.array(
        [gindex[q["group"]] if q["group"] is not None else -1 for q in queries], pa.int32()))
    return Corpus(qtable, item_table, pools, item_groups, max(len(groups), 1), rejects, rows_in, candidate_rejects)
