"""sentence-transformers text models (e.g. all-MiniLM-L6-v2, bge, e5, gte).

Text only: an image item is embedded by its caption (`teacher.image_mode: caption`); the data's image placeholder
(`<|image_1|>`) is removed from the text. The instruction of (role, dataset) is put before each text.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .base import Teacher, normalise, pick_device, require_text_only, resolve_model_path


class SentenceTransformerTeacher(Teacher):
    def __init__(self, cfg):
        super().__init__(cfg)
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(resolve_model_path(cfg.model), device=pick_device(cfg.device),
                                         trust_remote_code=cfg.trust_remote_code)
        if cfg.max_length:
            self.model.max_seq_length = cfg.max_length
        dimension = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension  # renamed in sentence-transformers 6
        self.dim = dimension()

    def embed(self, texts: list[str], images: list, role: str, dataset: Optional[str] = None) -> np.ndarray:
        require_text_only(images, "a sentence-transformers teacher")
        vectors = self.model.encode([self.prompted(t, role, dataset) for t in texts], batch_size=len(texts),
                                    convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        return normalise(vectors)
