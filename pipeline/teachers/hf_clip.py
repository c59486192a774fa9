"""Hugging Face dual encoders (CLIP, SigLIP, SigLIP 2) through AutoModel + AutoProcessor.

An item with both an image and a text is embedded as the normalised sum of its two unit vectors, so text-only,
image-only and mixed items all live on one sphere. The instruction of (role, dataset) is put before the text part;
the data's image placeholder (`<|image_1|>`) is removed from it, and a text that was nothing but the placeholder
leaves an image-only item.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .base import Teacher, normalise, pick_device, pick_dtype, resolve_model_path


def _features(output) -> "torch.Tensor":
    """transformers 4 returns a tensor from get_*_features, transformers 5 an output whose pooler_output it is."""
    return output if hasattr(output, "shape") else output.pooler_output


class HFClipTeacher(Teacher):
    default_max_pixels = 1024 * 1024  # CLIP / SigLIP processors resize to at most a few hundred pixels a side

    def __init__(self, cfg):
        super().__init__(cfg)
        import torch
        from transformers import AutoModel, AutoProcessor

        path = resolve_model_path(cfg.model)
        self.device = pick_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, self.device)
        if cfg.dtype == "auto" and self.device.startswith("cuda"):
            dtype = torch.float16  # CLIP / SigLIP checkpoints are published for fp16 inference
        kwargs = {"trust_remote_code": cfg.trust_remote_code}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        from .hf_vlm import _quiet_transformers

        with _quiet_transformers():
            self.model = AutoModel.from_pretrained(path, dtype=dtype, **kwargs).to(self.device).eval()
            self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        text_cfg = self.model.config.text_config
        self.max_length = cfg.max_length or getattr(text_cfg, "max_position_embeddings", 77)
        # SigLIP pools the last position and was trained on max_length padding; CLIP pools its EOS token, which
        # right padding keeps where the model looks for it. Either way a text's vector is padding-invariant.
        self.siglip = "siglip" in self.model.config.model_type
        self.padding = "max_length" if self.siglip else True
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "right"
        self.dim = int(getattr(self.model.config, "projection_dim", 0) or text_cfg.hidden_size)

    def _text(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.processor(text=texts, padding=self.padding, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        if self.siglip:  # trained attending to its padding: the tokenizers return a mask that would hide it
            batch.pop("attention_mask", None)
        with torch.inference_mode():
            return _features(self.model.get_text_features(**batch)).float().cpu().numpy()

    def _image(self, images: list) -> np.ndarray:
        import torch

        batch = self.processor(images=[self.prepare_image(im) for im in images], return_tensors="pt").to(self.device)
        batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            return _features(self.model.get_image_features(**batch)).float().cpu().numpy()

    def embed(self, texts: list[str], images: list, role: str, dataset: Optional[str] = None) -> np.ndarray:
        texts = [self.strip_placeholder(t) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        has_text = np.array([bool(t.strip()) for t in texts])
        has_image = np.array([im is not None for im in images])
        if has_text.any():
            idx = np.flatnonzero(has_text)
            out[idx] += normalise(self._text([self.instruction_for(texts[i], role, dataset) + texts[i]
                                              for i in idx]))
        if has_image.any():
            idx = np.flatnonzero(has_image)
            out[idx] += normalise(self._image([images[i] for i in idx]))
        return normalise(out)

    @classmethod
    def fingerprint_parts(cls, cfg) -> dict:
        return {**super().fingerprint_parts(cfg), "fusion": "sum-of-unit-vectors", "siglip_text": "unmasked"}

    @classmethod
    def tokens_per_item(cls, cfg) -> int:
        return max(cfg.max_length or 77, 256)  # the image tower's patches dominate
