"""Hugging Face dual encoders (CLIP, SigLIP, SigLIP 2) through AutoModel + AutoProcessor.

An item with both an image and a text is embedded as the normalised sum of its two unit vectors, so text-only,
image-only and mixed items all live on one sphere.
"""
from __future__ import annotations

import numpy as np

from .base import Teacher, normalise, pick_device, resolve_model_path


def _features(output) -> "torch.Tensor":
    """transformers 4 returns a tensor from get_*_features, transformers 5 an output whose pooler_output it is."""
    return output if hasattr(output, "shape") else output.pooler_output


class HFClipTeacher(Teacher):
    def __init__(self, cfg):
        super().__init__(cfg)
        import torch
        from transformers import AutoModel, AutoProcessor

        path = resolve_model_path(cfg.model)
        self.device = pick_device(cfg.device)
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModel.from_pretrained(path, torch_dtype=dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        text_cfg = self.model.config.text_config
        self.max_length = cfg.max_length or getattr(text_cfg, "max_position_embeddings", 77)
        # SigLIP was trained on max_length padding; its text tower is not padding-invariant otherwise.
        self.padding = "max_length" if "siglip" in self.model.config.model_type else True
        self.dim = int(getattr(self.model.config, "projection_dim", 0) or text_cfg.hidden_size)

    def _text(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.processor(text=texts, padding=self.padding, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        with torch.inference_mode():
            return _features(self.model.get_text_features(**batch)).float().cpu().numpy()

    def _image(self, images: list) -> np.ndarray:
        import torch

        batch = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            return _features(self.model.get_image_features(**batch)).float().cpu().numpy()

    def embed(self, texts: list[str], images: list, role: str) -> np.ndarray:
        prompt = self.prompt(role)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        has_text = np.array([bool(t.strip()) for t in texts])
        has_image = np.array([im is not None for im in images])
        if has_text.any():
            idx = np.flatnonzero(has_text)
            out[idx] += normalise(self._text([prompt + texts[i] for i in idx]))
        if has_image.any():
            idx = np.flatnonzero(has_image)
            out[idx] += normalise(self._image([images[i] for i in idx]))
        return normalise(out)

    @classmethod
    def fingerprint_parts(cls, cfg) -> dict:
        return {**super().fingerprint_parts(cfg), "fusion": "sum-of-unit-vectors"}
