"""Known false negatives: `OUT/blocklist.jsonl` (plus `filters.blocklist`), one JSON object a line with `query_id`
and `item_id`. The one reader and writer for the miner, the inspector and the training side.

Why one module: the file is written by a person's clicks while a miner or a trainer reads it, and a hand edit or a
crash can leave a torn line. Every reader treats such a line the same way: it is skipped and counted (the count goes
into the epoch's `_stats.json`, the inspector's statistics and a warning), never fatal and never silent. Appends take
an exclusive `flock` and write one complete line in one `write`; readers take a shared `flock`, so no reader sees
half a line and two marks never interleave.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FILENAME = "blocklist.jsonl"
MAX_FIELD = 2000
_lock = threading.Lock()  # flock is per open file, so threads of one process also need a lock of their own
log = logging.getLogger(__name__)


def parse_line(raw: bytes) -> dict | None:
    """The entry on one line, or None when it is not a JSON object with a non-empty `query_id` and an `item_id`
    that is non-empty or null (null: the query was reviewed and had nothing to mark)."""
    try:
        e = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(e, dict) or "item_id" not in e:
        return None
    for key in ("query_id", "item_id"):
        v = e.get(key)
        if key == "item_id" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
            return None
        e[key] = str(v)
    return e


@dataclass
class Blocklist:
    """The readable entries of one or more blocklist files, and where the malformed lines were."""

    entries: list[dict] = field(default_factory=list)  # marked (query_id, item_id) pairs
    skipped: list[str] = field(default_factory=list)  # "path:line" of each malformed line
    reviewed: set[str] = field(default_factory=set)  # query ids with any line: a person looked at them
    reviews: list[dict] = field(default_factory=list)  # the `"item_id": null` lines: reviewed, nothing to mark

    def reviewed_rows(self, query_ids: list[str]) -> np.ndarray:
        """Rows of `query_ids` that a person reviewed (calibration counts their unmarked candidates as negatives)."""
        return np.array([i for i, q in enumerate(query_ids) if q in self.reviewed], np.int64)

    def for_query(self, query_id: str) -> dict[str, dict]:
        """item_id -> entry for one query."""
        return {e["item_id"]: e for e in self.entries if e["query_id"] == query_id}

    def review_of(self, query_id: str) -> dict | None:
        """The first "reviewed, nothing to mark" line of one query, if any."""
        return next((e for e in self.reviews if e["query_id"] == query_id), None)

    def by_query(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for e in self.entries:
            out.setdefault(e["query_id"], set()).add(e["item_id"])
        return out

    def codes(self, queries: pa.Table, items: pa.Table) -> np.ndarray:
        """Sorted codes query_row * n_items + item_row of the listed pairs (the miner's `blocklist` filter); pairs
        naming a query or item this run does not hold are ignored."""
        if not self.entries:
            return np.zeros(0, np.int64)
        qpos = pc.index_in(pa.array([e["query_id"] for e in self.entries], pa.string()),
                           value_set=queries.column("query_id")).to_numpy(zero_copy_only=False)
        ipos = pc.index_in(pa.array([e["item_id"] for e in self.entries], pa.string()),
                           value_set=items.column("item_id")).to_numpy(zero_copy_only=False)
        ok = ~(np.isnan(qpos.astype(float)) | np.isnan(ipos.astype(float)))
        return np.unique(qpos[ok].astype(np.int64) * items.num_rows + ipos[ok].astype(np.int64))

    def summary(self) -> dict:
        """What `_stats.json` records under "blocklist"."""
        return {"entries": len(self.entries), "reviewed_queries": len(self.reviewed),
                "skipped_lines": len(self.skipped), "skipped_at": self.skipped[:20]}


def read(*paths: str | Path) -> Blocklist:
    """Every readable entry of the files that exist; malformed lines are skipped, counted and warned about."""
    out = Blocklist()
    for path in paths:
        path = Path(path)
        try:
            f = path.open("rb")
        except (FileNotFoundError, IsADirectoryError):
            continue
        with f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            try:
                lines = f.read().split(b"\n")
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            e = parse_line(raw)
            if e is None:
                out.skipped.append(f"{path}:{n}")
                continue
            out.reviewed.add(e["query_id"])
            (out.entries if e["item_id"] is not None else out.reviews).append(e)
    if out.skipped:
        log.warning("blocklist: skipped %d malformed line(s) (not a JSON object with query_id and item_id): %s",
                    len(out.skipped), ", ".join(out.skipped[:5]) + (" ..." if len(out.skipped) > 5 else ""))
    return out


def append(path: str | Path, query_id: str, item_id: str | None, note: str = "", who: str | None = None
           ) -> tuple[bool, dict]:
    """Append (query_id, item_id) unless it is already listed. Returns (added, the entry now in the file).
    `item_id=None` records "reviewed, nothing to mark" (calibration counts the query's candidates as negatives)."""
    if not query_id or item_id == "":
        raise ValueError("query_id is required, and item_id is an item or None (reviewed, nothing to mark)")
    entry = {
        "query_id": str(query_id)[:MAX_FIELD],
        "item_id": None if item_id is None else str(item_id)[:MAX_FIELD],
        "who": str(who or user())[:200],
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "note": str(note)[:MAX_FIELD],
    }
    with _lock, open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.seek(0)
            for raw in f:
                e = parse_line(raw)
                if e is not None and e["query_id"] == entry["query_id"] and e["item_id"] == entry["item_id"]:
                    return False, e
            line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":  # close a torn last line so that the new entry stays a line of its own
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return True, entry


def user() -> str:
    """Who marks, as the server sees it: the OS user running it."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "inspector"
