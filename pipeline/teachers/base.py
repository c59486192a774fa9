"""The teacher interface and how a config becomes a teacher.

A teacher is constructed inside a Ray actor (it holds the model); its fingerprint is computed on the driver from the
config and the weight files alone, without loading the model, so cache look-ups cost no model load.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..config import TeacherConfig

FINGERPRINT_VERSION = 1
ROLES = ("query", "candidate")


def resolve_model_path(model: str) -> str:
    """`pkg:MODULE` names a model bundled in an installed package; anything else is a folder or a hub id."""
    if model.startswith("pkg:"):
        module = importlib.import_module(model[4:])
        return str(module.get_model_path())
    return model


@lru_cache(maxsize=32)
def _files_digest(folder: str, stamp: tuple) -> str:
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_digest(model_path: str) -> str:
    """Hash of every file of a local model folder (weights, config, tokenizer, processor); a hub id hashes by name."""
    folder = Path(model_path)
    if not folder.is_dir():
        return "hub:" + model_path
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file())
    return _files_digest(str(folder), stamp)


class Teacher(ABC):
    """Embeds items. `texts[i]` and `images[i]` (a PIL image or None) describe item i; `role` picks the prompt."""

    dim: int

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg

    def prompt(self, role: str) -> str:
        return self.cfg.query_prompt if role == "query" else self.cfg.candidate_prompt

    @abstractmethod
    def embed(self, texts: list[str], images: list, role: str) -> np.ndarray:
        """Return float32 (len(texts), dim), each row L2-normalised."""

    @classmethod
    def fingerprint_parts(cls, cfg: TeacherConfig) -> dict:
        """What, besides the prompt, changes the vectors: the model's files and the preprocessing settings."""
        return {"model": cfg.model, "weights": weights_digest(resolve_model_path(cfg.model)),
                "max_length": cfg.max_length, "image_mode": cfg.image_mode}


def teacher_class(cfg: TeacherConfig) -> type[Teacher]:
    if cfg.kind == "sentence-transformers":
        from .sentence_transformers import SentenceTransformerTeacher
        return SentenceTransformerTeacher
    if cfg.kind == "hf-clip":
        from .hf_clip import HFClipTeacher
        return HFClipTeacher
    module_name, _, class_name = (cfg.cls or "").partition(":")
    if not module_name or not class_name:
        raise ValueError(f"teacher.cls: {cfg.cls!r} must look like 'package.module:ClassName'")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Teacher)):
        raise ValueError(f"teacher.cls: {cfg.cls} is not a subclass of pipeline.teachers.Teacher")
    return cls


def teacher_fingerprint(cfg: TeacherConfig, role: str) -> str:
    parts = teacher_class(cfg).fingerprint_parts(cfg)
    parts.update(kind=cfg.kind, cls=cfg.cls, role_prompt=cfg.query_prompt if role == "query" else cfg.candidate_prompt,
                 version=FINGERPRINT_VERSION)
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=12).hexdigest()


def load_teacher(cfg: TeacherConfig) -> Teacher:
    return teacher_class(cfg)(cfg)


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def require_text_only(images: list, teacher: str) -> None:
    if any(img is not None for img in images):
        raise ValueError(f"{teacher} embeds text only: set teacher.image_mode: caption (with input.captions) "
                         "or use an image-text teacher such as kind: hf-clip")


