"""sentence-transformers text models (e.g. all-MiniLM-L6-v2, bge, e5, gte)."""
from __future__ import annotations

import numpy as np

from .base import Teacher, normalise, pick_device, require_text_only, resolve_model_path


class SentenceTransformerTeacher(Teacher):
    def __init__(self, cfg):
        super().__init__(cfg)
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(resolve_model_path(cfg.model), device=pick_device(cfg.device))
        if cfg.max_length:
            self.model.max_seq_length = cfg.max_length
        self.dim = self.model.get_sentence_embedding_dimension()

    def embed(self, texts: list[str], images: list, role: str) -> np.ndarray:
        require_text_only(images, "a sentence-transformers teacher")
        prompt = self.prompt(role)
        vectors = self.model.encode([prompt + t for t in texts], batch_size=len(texts), convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return normalise(vectors)
