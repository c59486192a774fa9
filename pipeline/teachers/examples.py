"""A teacher written the way a user writes their own: `kind: custom`, `cls: pipeline.teachers.examples:HashingTeacher`.

It needs no model: a text is a bag of hashed character trigrams, an image a 4x4 grid of mean colours, and an item
with both is the normalised sum of the two unit vectors. Its vectors are crude but deterministic, which makes it the
fast stand-in for pipeline tests and the template for plugging in a model of one's own (see docs/teachers.md).
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from .base import Teacher, normalise


class HashingTeacher(Teacher):
    version = 1
    TEXT_DIM = 48

    def __init__(self, cfg):
        super().__init__(cfg)      # keeps cfg: prompts, instructions, placeholder and pixel bounds come with it
        self.dim = self.TEXT_DIM + 48

    def _text(self, text: str) -> np.ndarray:
        v = np.zeros(self.TEXT_DIM, np.float32)
        padded = f"  {text.casefold()}  "
        for i in range(len(padded) - 2):
            h = int.from_bytes(hashlib.blake2b(padded[i:i + 3].encode(), digest_size=4).digest(), "little")
            v[h % self.TEXT_DIM] += 1.0 if h & (1 << 31) else -1.0
        return v

    def _image(self, image) -> np.ndarray:
        small = np.asarray(self.prepare_image(image).resize((4, 4)), dtype=np.float32) / 255.0
        return small.reshape(-1) - small.mean()

    def embed(self, texts: list[str], images: list, role: str, dataset: Optional[str] = None) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, (text, image) in enumerate(zip(texts, images)):
            text = self.strip_placeholder(text)
            if text.strip():
                out[i, :self.TEXT_DIM] = normalise(self._text(self.instruction_for(text, role, dataset) + text)[None])
            if image is not None:
                out[i, self.TEXT_DIM:] = normalise(self._image(image)[None])
        return normalise(out)

    @classmethod
    def fingerprint_parts(cls, cfg) -> dict:
        # No weights: only what changes the vectors (the base adds the prompt and the class version).
        return {"placeholder": cfg.image_placeholder, "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels}
