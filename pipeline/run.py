"""The run folder on disk: what hardneg writes there, one writer at a time, and epochs swapped in atomically.

- Ownership: `OUT/_run/hardneg.json` marks a folder hardneg made. A folder that exists, is not empty and holds no
  marker is refused before any work, and `--overwrite` deletes only hardneg's own entries (`_run/`, `epoch=*`, its
  hidden partial folders, `_checkpoints/`): `blocklist.jsonl` and anything else stay.
- One writer: `OUT/_run/lock` is held with flock(2) for the whole of a mine; a second writer refuses at once (or waits
  when asked) with the holder's pid and host. The kernel drops the lock when its process dies, so a killed run never
  leaves a lock behind.
- Binding: `_run/run.json` (what the folder is bound to) is written only once retrieval results are saved, so a run
  that fails earlier (bad input, a crash) leaves the folder free for a corrected config.
- Atomic epochs: an epoch is built in a partial folder of its writer's own and exchanged with the old one in one
  rename (renameat2 RENAME_EXCHANGE on Linux, renamex_np RENAME_SWAP on macOS), so `OUT/epoch=NNNN` is never missing
  and never half-written.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from . import blocklist
from .write import write_json

RUN_DIR = "_run"
MARKER = "hardneg.json"       # in _run/: hardneg made this folder
LOCK = "lock"                 # in _run/: flock(2) held by the one writer; holds its pid and host
IDENTITY = "run.json"         # in _run/: what the folder is bound to, written once retrieval is saved
CHECKPOINTS = "_checkpoints"  # student checkpoints the Refresher saved from memory
LAYOUT = 1
EPOCH_NAME = re.compile(r"epoch=\d{4,}$")
HIDDEN_EPOCH = re.compile(r"\.epoch=\d{4,}\.")  # an epoch's partial folder (and, mid-swap, its old copy)
LOCK_POLL_S = 0.2


class RunMismatch(RuntimeError):
    """OUT cannot take this run: it holds another config's run, is not a folder hardneg made, or is being written."""


class NotARunFolder(RunMismatch):
    """OUT holds files hardneg did not write."""


class FolderLocked(RunMismatch):
    """Another process is writing OUT."""


def epoch_dir(out: str | Path, epoch: int) -> Path:
    return Path(out) / f"epoch={epoch:04d}"


def is_run_folder(out: str | Path) -> bool:
    """A folder hardneg made: it has the marker (or, from before the marker, a bound run.json)."""
    run = Path(out) / RUN_DIR
    return (run / MARKER).is_file() or (run / IDENTITY).is_file()


def check_ownable(out: str | Path) -> None:
    """Raise NotARunFolder unless OUT is missing, empty (but for a `blocklist.jsonl` of known false negatives, which
    a user may bring to a new run) or a run folder: hardneg never mixes into a user's folder."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise NotARunFolder(f"--out {out} is a file, not a folder; give a new or empty folder")
    entries = sorted(e for e in os.listdir(out) if e != blocklist.FILENAME)
    if entries == [RUN_DIR] and not is_run_folder(out):
        time.sleep(1.0)  # another hardneg is claiming this new folder right now: its marker follows in a moment
    if not entries or is_run_folder(out):
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise NotARunFolder(
        f"--out {out} ({out.resolve()}) is not empty and is not a hardneg run folder (it holds {shown}, and no "
        f"{RUN_DIR}/{MARKER}). hardneg writes only into a new or empty folder or one it made, and never deletes "
        "files it did not write: give a new or empty --out folder")


# Locks held by this process: resolved lock path -> [fd, owning thread, depth]. flock conflicts between two open
# file descriptions even in one process, so a thread that already holds OUT's lock re-enters it here instead.
_held: dict[str, list] = {}
_held_guard = threading.Lock()


def holds_lock(out: str | Path) -> bool:
    """Whether this thread holds OUT's writer lock."""
    entry = _held.get(str((Path(out) / RUN_DIR / LOCK).resolve()))
    return entry is not None and entry[1] == threading.get_ident()


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']} (since {info['since']}: {info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def _writer_lock(path: Path, out: Path, wait: float) -> Iterator[None]:
    key, me = str(path.resolve()), threading.get_ident()
    with _held_guard:
        entry = _held.get(key)
        if entry is not None and entry[1] == me:
            entry[2] += 1
            mine = entry
        else:
            mine = None
    if mine is None:
        mine = _acquire(path, key, out, wait)
    try:
        yield
    finally:
        with _held_guard:
            mine[2] -= 1
            if mine[2] == 0:
                del _held[key]
                os.ftruncate(mine[0], 0)
                os.close(mine[0])  # closing the last descriptor releases the flock


def _acquire(path: Path, key: str, out: Path, wait: float) -> list:
    deadline, announced = time.monotonic() + wait, False
    while True:
        with _held_guard:
            if key not in _held:  # else another thread of this process holds it
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                else:
                    info = {"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "command": " ".join(sys.argv)[:300]}
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
                    _held[key] = entry = [fd, threading.get_ident(), 1]
                    return entry
                holder = _holder(path)
            else:
                holder = f"another thread of this process (pid {os.getpid()})"
        if time.monotonic() >= deadline:
            waited = f" after waiting {wait:g}s" if wait > 0 else ""
            raise FolderLocked(f"{out} is being written by {holder}{waited}; two runs never write one folder. "
                               "Wait for it to finish (or pass --wait-lock to wait), or give another --out")
        if not announced:
            print(f"hardneg: {out} is being written by {holder}; waiting for it to finish", file=sys.stderr)
            announced = True
        time.sleep(min(LOCK_POLL_S, max(0.0, deadline - time.monotonic())))


@contextmanager
def claim(out: str | Path, wait: float = 0.0) -> Iterator["RunFolder"]:
    """Refuse a folder hardneg did not make, then hold OUT's writer lock until the block ends.

    `wait`: seconds to wait for another writer (0 refuses at once, math.inf waits as long as it takes). Re-entrant
    in one thread, so a caller that holds the lock (the Refresher) can call `mine`, which takes it again.
    """
    out = Path(out)
    if not holds_lock(out):
        check_ownable(out)
    (out / RUN_DIR).mkdir(parents=True, exist_ok=True)
    with _writer_lock(out / RUN_DIR / LOCK, out, wait):
        folder = RunFolder(out)
        if not (folder.run_dir / MARKER).is_file():
            write_json(folder.run_dir / MARKER, {"tool": "hardneg", "layout": LAYOUT})
        yield folder


class RunFolder:
    """OUT while this thread holds its lock: the bound identity, what hardneg may delete, the epochs."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.run_dir = self.out / RUN_DIR

    def identity(self) -> dict | None:
        try:
            return json.loads((self.run_dir / IDENTITY).read_text()).get("identity")
        except FileNotFoundError:
            return None

    def bind(self, identity: dict) -> None:
        """Bind the folder to a run's identity: called once its retrieval results are saved, never before."""
        write_json(self.run_dir / IDENTITY, {"identity": identity})

    def drop_unbound(self) -> None:
        """Without run.json nothing under _run/ is trusted (a run stopped before binding): drop kept retrievals."""
        for path in self.run_dir.iterdir():
            if path.name not in (MARKER, LOCK):
                _remove(path, ())

    def clear(self, keep: Iterable[str | Path] = ()) -> None:
        """Delete what hardneg wrote (and only that): `_run/` content, epochs, partial folders, `_checkpoints/`.
        `keep`: paths that must survive (the checkpoint this run is about to mine with)."""
        kept = [Path(p).resolve() for p in keep if p]
        for path in self.run_dir.iterdir():
            if path.name not in (MARKER, LOCK):
                _remove(path, kept)
        for path in self.out.iterdir():
            if EPOCH_NAME.match(path.name) or HIDDEN_EPOCH.match(path.name) or path.name == CHECKPOINTS:
                _remove(path, kept)

    def mismatch_message(self, saved: dict, identity: dict) -> str:
        changed = _changed_keys(saved, identity)
        return (f"{self.out} holds a run of a different input, teacher or index config (changed: {', '.join(changed)}). "
                "Mine into a new --out folder to keep both, or pass --overwrite to replace this run: it deletes "
                "this folder's epochs and kept retrieval (only what hardneg wrote; blocklist.jsonl and other "
                "files stay)")


def _remove(path: Path, keep: list[Path]) -> None:
    """Delete `path` except the kept paths under it."""
    resolved = path.resolve()
    if any(k == resolved or resolved in k.parents for k in keep):
        if path.is_dir() and not path.is_symlink() and resolved not in keep:
            for child in path.iterdir():
                _remove(child, keep)
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _changed_keys(saved: dict, identity: dict, prefix: str = "") -> list[str]:
    """The dotted config keys (and input files) whose values differ, e.g. `retrieve.top_k`."""
    changed = []
    for key in sorted(set(saved) | set(identity)):
        a, b = saved.get(key), identity.get(key)
        if a == b:
            continue
        if key == "inputs_sha" and not prefix and isinstance(a, dict) and isinstance(b, dict):
            changed += [f"content of {p}" for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)]
        elif isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, "" if key == "config" and not prefix else f"{prefix}{key}.")
        else:
            changed.append(prefix + key)
    return changed[:8] + (["..."] if len(changed) > 8 else []) if not prefix else changed


class EpochFolder:
    """Builds `OUT/epoch=NNNN` in a partial folder of this writer's own and swaps it in on `commit()`.

    Made only under OUT's lock (`claim`): partial folders left by killed writers are then stale and are removed.
    """

    def __init__(self, out: Path, epoch: int):
        out = Path(out)
        if not holds_lock(out):
            raise RuntimeError(f"an epoch of {out} is written only while holding its lock (pipeline.run.claim)")
        self.final = epoch_dir(out, epoch)
        for stale in out.iterdir():
            if HIDDEN_EPOCH.match(stale.name):
                _remove(stale, [])
        self.tmp = out / f".{self.final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        (self.tmp / "_candidates").mkdir(parents=True)

    def commit(self) -> Path:
        """Swap the finished epoch in: readers see the old folder or the new one, never neither."""
        if self.final.exists():
            if exchange(self.tmp, self.final):  # self.tmp now holds the old epoch
                shutil.rmtree(self.tmp)
                return self.final
            # no atomic exchange on this platform or filesystem: two renames, a moment without the folder
            old = self.final.with_name(f".{self.final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old)
        else:
            os.rename(self.tmp, self.final)
        return self.final


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the platform or filesystem cannot (NFS, old kernels)."""
    swap = _swap_call()
    if swap is None:
        return False
    if swap(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _swap_call():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd, rename_exchange = -100, 2
        return lambda a, b: fn(at_fdcwd, a, at_fdcwd, b, rename_exchange)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rename_swap = 2
        return lambda a, b: fn(a, b, rename_swap)
    return None
