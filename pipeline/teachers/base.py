"""The teacher interface and how a config becomes a teacher.

A teacher is constructed inside a Ray actor (it holds the model); its fingerprint is computed on the driver from the
config and the model's files alone, without loading the model, so cache look-ups cost no model load.

What every backend shares lives here:

* the prompt of an item: `teacher.instructions[dataset][role]`, else `instructions["*"][role]`, else
  `query_prompt` / `candidate_prompt`; left out when the item's text already carries it (`skip_present_instructions`,
  the MMEB-train layout has the instruction inside `qry`);
* the image placeholder of the data (`<|image_1|>` in MMEB / VLM2Vec files), removed by text and dual encoders and
  mapped to the model's own image token by decoder VLMs;
* image size bounds (`min_pixels` / `max_pixels`), applied in the CPU decode stage and again (a no-op then) here;
* the fingerprint: weights, prompt and every teacher option that is not `free` (pipeline/config.py
  KEY_CLASSES); never batch size, device, padding side or worker counts.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import re
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import TeacherConfig, teacher_vector_keys

FINGERPRINT_VERSION = 3
ROLES = ("query", "candidate")
# Files of a model folder that do not change what the model computes.
_IGNORED = re.compile(r"(^|/)(\.[^/]*|README[^/]*|[^/]*\.md|LICENSE[^/]*|NOTICE[^/]*)$", re.IGNORECASE)


def resolve_model_path(model: str) -> str:
    """`pkg:MODULE` names a model bundled in an installed package; anything else is a folder or a hub id."""
    if model.startswith("pkg:"):
        module = importlib.import_module(model[4:])
        return str(module.get_model_path())
    return model


def _hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _memo_path(folder: str, stamp: tuple) -> Path:
    """Where the digest of `folder` with exactly these files (`stamp`) is remembered between processes."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hardneg" / "weights-digests"
    return root / hashlib.blake2b(repr((folder, stamp)).encode(), digest_size=16).hexdigest()


@lru_cache(maxsize=64)
def _files_digest(folder: str, stamp: tuple) -> str:
    """Content hash of the files listed in `stamp` (relative name, size, mtime, ctime, inode); files hashed in
    parallel. Remembered on disk for this exact stamp: a warm run of a 90 MB model skips 0.15 s of hashing, and any
    write, copy or touch of a file changes its stamp (ctime cannot be set back), so the files are hashed again."""
    memo = _memo_path(folder, stamp)
    try:
        known = memo.read_text()
        if re.fullmatch(r"[0-9a-f]{32}", known):
            return known
    except OSError:
        pass
    names = [s[0] for s in stamp]
    with ThreadPoolExecutor(min(8, max(1, len(names)))) as pool:  # hashlib releases the GIL on large buffers
        digests = list(pool.map(lambda n: _hash_file(Path(folder) / n), names))
    h = hashlib.blake2b(digest_size=16)
    for name, digest in zip(names, digests):
        h.update(name.encode() + b"\0" + digest.encode() + b"\n")
    try:  # best effort: a read-only home only costs the hashing next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(h.hexdigest())
        tmp.replace(memo)
    except OSError:
        pass
    return h.hexdigest()


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that take part in its digest (hidden files and docs are left out)."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not _IGNORED.search(str(p.relative_to(folder)).replace(os.sep, "/")))


def local_model_folder(model_path: str) -> Optional[Path]:
    """The folder holding the model: a local folder, or a hub id's snapshot in the local Hugging Face cache."""
    folder = Path(model_path).expanduser()
    if folder.is_dir():
        return folder
    if "/" in model_path and not model_path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model_path, local_files_only=True))
        except Exception:  # not cached (or no huggingface_hub): the hub id stands for itself
            return None
    return None


def weights_digest(model_path: str) -> str:
    """Hash of the files of a model (weights, config, tokenizer, processor); by content, not by path or mtime,
    so a copied or touched checkpoint keeps its digest. A hub id that is not cached locally hashes by name."""
    folder = local_model_folder(model_path)
    if folder is None:
        return "hub:" + model_path
    files = model_files(folder)
    stats = [(p, p.stat()) for p in files]
    stamp = tuple((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                  for p, st in stats)
    return _files_digest(str(folder), stamp)


def resolve_instruction(cfg: TeacherConfig, role: str, dataset: Optional[str] = None) -> str:
    """The instruction (prompt prefix) of `role` items of `dataset`; see the module docstring for the order."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    entry = None
    if dataset is not None and dataset in cfg.instructions:
        entry = cfg.instructions[dataset]
    elif "*" in cfg.instructions:
        entry = cfg.instructions["*"]
    if entry is not None and role in entry:
        return entry[role]
    return cfg.query_prompt if role == "query" else cfg.candidate_prompt


def _squash(text: str) -> str:
    return " ".join(text.casefold().split())


def instruction_present(instruction: str, text: str) -> bool:
    """True when `text` already carries `instruction` (case and spacing aside, trailing ':' / '.' ignored)."""
    core = _squash(instruction).rstrip(" :.")
    return bool(core) and core in _squash(text)


def bound_pixels(image, min_pixels: Optional[int], max_pixels: Optional[int]):
    """`image` resized (aspect ratio kept) so that width * height lies in [min_pixels, max_pixels]; as is when it
    does already. Used by the CPU decode stage and by every backend, so a teacher sees the same pixels either way."""
    from PIL import Image

    w, h = image.size
    area = w * h
    scale = 1.0
    if max_pixels and area > max_pixels:
        scale = math.sqrt(max_pixels / area)
    elif min_pixels and area < min_pixels:
        scale = math.sqrt(min_pixels / area)
    if scale == 1.0:
        return image
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    if max_pixels and nw * nh > max_pixels:  # rounding up may overshoot by a row or a column
        nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    return image.resize((nw, nh), Image.Resampling.BICUBIC)


class Teacher(ABC):
    """Embeds items. `texts[i]` and `images[i]` (a PIL image or None) describe item i; `role` ("query" or
    "candidate") and `dataset` pick the instruction.

    A subclass sets `dim` in `__init__` and implements `embed`. Class attributes: `version` (bump it when the
    backend's output changes for the same model and inputs: it is part of the fingerprint) and
    `role_in_fingerprint` (set True when `embed` treats the roles differently beyond their prompts).
    """

    dim: int
    version: int = 1
    role_in_fingerprint: bool = False
    default_max_pixels: Optional[int] = None
    """The pixel bound when `teacher.max_pixels` is not set (decoded images travel as raw RGB to the actors)."""

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg

    # -- prompts and placeholders -------------------------------------------------------------------------------
    def prompt(self, role: str, dataset: Optional[str] = None) -> str:
        """The configured instruction of (role, dataset)."""
        return resolve_instruction(self.cfg, role, dataset)

    def instruction_for(self, text: str, role: str, dataset: Optional[str] = None) -> str:
        """The instruction to put before `text`: empty when the text already carries it."""
        instruction = self.prompt(role, dataset)
        if instruction and self.cfg.skip_present_instructions and instruction_present(instruction, text):
            return ""
        return instruction

    def prompted(self, text: str, role: str, dataset: Optional[str] = None) -> str:
        """Text with its instruction, the data's image placeholder removed (for teachers that see text only)."""
        text = self.strip_placeholder(text)
        return self.instruction_for(text, role, dataset) + text

    def strip_placeholder(self, text: str) -> str:
        placeholder = self.cfg.image_placeholder
        if not placeholder or placeholder not in text:
            return text
        return text.replace(placeholder, "").strip()

    def prepare_image(self, image):
        """RGB within the configured pixel bounds."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        return bound_pixels(image, self.cfg.min_pixels, max_pixels_of(self.cfg))

    # -- the interface ------------------------------------------------------------------------------------------
    @abstractmethod
    def embed(self, texts: list[str], images: list, role: str, dataset: Optional[str] = None) -> np.ndarray:
        """Return float32 (len(texts), dim), each row L2-normalised."""

    @classmethod
    def fingerprint_parts(cls, cfg: TeacherConfig) -> dict:
        """What changes the vectors besides the teacher options (which `teacher_fingerprint` adds by itself): the
        model's files. Subclasses add what else their vectors depend on (call super() to keep the weights)."""
        path = resolve_model_path(cfg.model)
        weights = weights_digest(path)
        return {"weights": weights, "model": cfg.model if weights.startswith("hub:") else None}

    @classmethod
    def tokens_per_item(cls, cfg: TeacherConfig) -> int:
        """Sequence length an item may take (used to choose a batch size that fits memory)."""
        return cfg.max_length or 128

    @classmethod
    def auto_batch_size(cls, cfg: TeacherConfig, memory_bytes: float, on_gpu: bool) -> int:
        """A batch size that fits `memory_bytes` (one device, or one actor's share of host memory): what is left
        after the weights, divided by a per-item activation estimate; a power of two, at most 256 (GPU) / 64 (CPU).
        The estimate is deliberately rough: `teacher.batch_size` set to a number overrides it, and GPU actors halve
        a batch that runs out of memory anyway."""
        info = model_size(resolve_model_path(cfg.model))
        elem = 2 if on_gpu else 4
        weights = info["params"] * elem
        per_item = cls.tokens_per_item(cfg) * info["hidden"] * elem * 24  # activations of a layer, with headroom
        free = memory_bytes * 0.8 - weights
        cap = 256 if on_gpu else 64
        if free <= per_item:
            return 1
        return int(min(cap, 2 ** int(math.log2(free / per_item))))


def model_size(model_path: str) -> dict:
    """Rough parameter count (weight bytes / 2) and hidden size of a local model; defaults for unknown models."""
    folder = local_model_folder(model_path)
    params, hidden = 1.0e9, 2048
    if folder is None:
        return {"params": params, "hidden": hidden}
    weight_bytes = sum(p.stat().st_size for p in folder.rglob("*")
                       if p.suffix in (".safetensors", ".bin", ".pt", ".pth") and p.is_file())
    if weight_bytes:
        params = weight_bytes / 2
    try:
        config = json.loads((folder / "config.json").read_text())
        hidden = int((config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size") or hidden)
    except (OSError, ValueError, TypeError):
        pass
    return {"params": params, "hidden": hidden}


def max_pixels_of(cfg: TeacherConfig) -> Optional[int]:
    """`teacher.max_pixels`, else the backend's default bound."""
    return cfg.max_pixels or teacher_class(cfg).default_max_pixels


def decode_bounds(cfg: TeacherConfig) -> tuple[Optional[int], Optional[int]]:
    """(min_pixels, max_pixels) of the CPU decode stage; none where the teacher sizes images itself
    (`image_resize: smart / squash`: one resize, by the family's own rule, not two)."""
    if getattr(cfg, "image_resize", "bound") != "bound":
        return None, None
    return cfg.min_pixels, max_pixels_of(cfg)


def teacher_class(cfg: TeacherConfig) -> type[Teacher]:
    if cfg.kind == "sentence-transformers":
        from .sentence_transformers import SentenceTransformerTeacher
        return SentenceTransformerTeacher
    if cfg.kind == "hf-clip":
        from .hf_clip import HFClipTeacher
        return HFClipTeacher
    if cfg.kind == "hf-vlm":
        from .hf_vlm import HFVLMTeacher
        return HFVLMTeacher
    if cfg.kind == "qqmm":
        from .qqmm import QQMMTeacher
        return QQMMTeacher
    module_name, _, class_name = (cfg.cls or "").partition(":")
    if not module_name or not class_name:
        raise ValueError(f"teacher.cls: {cfg.cls!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"teacher.cls: cannot import {module_name!r} ({exc}); is it installed or on PYTHONPATH "
                         "(of every Ray worker, too)?") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Teacher)):
        raise ValueError(f"teacher.cls: {cfg.cls} is not a subclass of pipeline.teachers.Teacher")
    return cls


# Teacher options the fingerprint holds in a derived form: the model by its files (fingerprint_parts), the prompts as
# the one prompt of the (role, dataset), so datasets and roles with equal prompts share vectors.
_DERIVED = ("model", "query_prompt", "candidate_prompt", "instructions")


def teacher_fingerprint(cfg: TeacherConfig, role: str, dataset: Optional[str] = None) -> str:
    """Keys the embedding cache (with each item's input key, pipeline/embed.py): equal for equal vectors, different
    otherwise. It holds every teacher option that is not `free` in pipeline/config.py KEY_CLASSES (a new option is
    in it without being named here), the model's files, the prompt of this role and dataset and the backend's
    version. Batch size, device, padding side, attention kernel and worker counts are `free`: they do not change the
    vectors (beyond float rounding)."""
    cls = teacher_class(cfg)
    options = {k: getattr(cfg, k) for k in teacher_vector_keys() if k not in _DERIVED}
    options["max_pixels"] = cfg.max_pixels or cls.default_max_pixels
    parts = cls.fingerprint_parts(cfg)
    parts.update(options=options, impl=f"{cls.__module__}.{cls.__qualname__}/{cls.version}",
                 role_prompt=resolve_instruction(cfg, role, dataset), version=FINGERPRINT_VERSION)
    if cls.role_in_fingerprint:
        parts["role"] = role
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def load_teacher(cfg: TeacherConfig) -> Teacher:
    return teacher_class(cfg)(cfg)


def call_embed(teacher: Teacher, texts: list[str], images: list, role: str, dataset: Optional[str]) -> np.ndarray:
    """`teacher.embed`, passing `dataset` only to teachers whose `embed` takes it (older custom teachers)."""
    if _takes_dataset(type(teacher)):
        return teacher.embed(texts, images, role, dataset=dataset)
    if teacher.cfg.instructions:
        raise TypeError(f"{type(teacher).__name__}.embed takes no `dataset` argument, but teacher.instructions "
                        "are per dataset: add `dataset=None` to its signature and use self.prompt(role, dataset)")
    return teacher.embed(texts, images, role)


@lru_cache(maxsize=None)
def _takes_dataset(cls: type) -> bool:
    params = inspect.signature(cls.embed).parameters
    return "dataset" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str):
    """`auto`: bfloat16 on a GPU that has it (else float16), float32 on CPU."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def require_text_only(images: list, teacher: str) -> None:
    if any(img is not None for img in images):
        raise ValueError(f"{teacher} embeds text only: set teacher.image_mode: caption (with input.captions) "
                         "or use an image-text teacher such as kind: hf-clip or kind: hf-vlm")
