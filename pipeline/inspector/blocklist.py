"""`OUT/blocklist.jsonl`: known false negatives, appended by the inspector, honoured by the next epoch's filters.

Why the locking: two clicks (two threads, or two inspector processes on one run) must never interleave half lines
or add the same pair twice. A process-wide lock plus an exclusive `flock` on the file serialise the check-then-append;
each entry is one `write` of one complete line in append mode, and a torn last line left by some other writer is
closed before the new entry so that every line stays one JSON object.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import json
import os
import threading
from pathlib import Path

_lock = threading.Lock()
MAX_FIELD = 2000


def entries(path: Path) -> list[dict]:
    """Every readable entry; a malformed line is skipped, not fatal."""
    if not path.is_file():
        return []
    out = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict):
                out.append(e)
    return out


def for_query(path: Path, query_id: str) -> dict[str, dict]:
    """item_id -> entry for one query."""
    return {str(e.get("item_id")): e for e in entries(path) if e.get("query_id") == query_id}


def append(path: Path, query_id: str, item_id: str, note: str = "", who: str | None = None) -> tuple[bool, dict]:
    """Append (query_id, item_id) unless it is already listed. Returns (added, the entry now in the file)."""
    if not query_id or not item_id:
        raise ValueError("query_id and item_id are required")
    entry = {
        "query_id": str(query_id)[:MAX_FIELD],
        "item_id": str(item_id)[:MAX_FIELD],
        "who": (who or _user())[:200],
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "note": str(note)[:MAX_FIELD],
    }
    with _lock, open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.seek(0)
            for raw in f:
                try:
                    e = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(e, dict) and e.get("query_id") == entry["query_id"] \
                        and e.get("item_id") == entry["item_id"]:
                    return False, e
            line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return True, entry


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "inspector"
