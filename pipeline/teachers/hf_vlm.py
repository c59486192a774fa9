"""Decoder VLM embedders (VLM2Vec, QQMM / LLaVA-OneVision, GME, Qwen2-VL / Qwen2.5-VL based, SmolVLM / Idefics3...)
loaded with `transformers` (`AutoModel`, else `AutoModelForImageTextToText`, else `AutoModelForCausalLM`, and
`AutoProcessor`).

An item becomes one prompt: plain (`{image}\\n{instruction}{text}{suffix}`, VLM2Vec style) or the processor's chat
template (`prompt_format: chat`, an optional system prompt, the assistant turn opened by default). The data's image
placeholder (`<|image_1|>` in MMEB files) is replaced by the model's own image token (`image_token`, default the
processor's, wrapped in `<|vision_start|>...<|vision_end|>` for the Qwen2-VL family as its chat template does); an
image item without a placeholder gets the image first. The vector is the hidden state of the last real token
(`pooling: last`, found from the attention mask, so left and right padding give the same vector) or the mean over
real tokens (`pooling: mean`), L2-normalised. Text-only and image items of a batch run as separate forward passes,
so processors that want one image per text are never handed a mixed batch.

Family-specific encoding is declared in the config, never implied by the transformers version: `prompt_format:
replace` swaps the placeholder for the image token and leaves the text byte for byte (VLM2Vec); `position_ids:
sequential` numbers real tokens 0..n-1 in every M-RoPE section (VLM2Vec's training; transformers >= 5.3 would give
Qwen2-VL image tokens 3-D positions); `image_resize: smart / squash` sizes images by Qwen2-VL's rule (or to a fixed
size first) with one PIL bicubic resample, and the processor then only cuts patches.

`transformers` needs torchvision for the *video* processors of Qwen2-VL and LLaVA-OneVision; where torchvision is
missing the processor is loaded without its video part (images and text work as usual).
"""
from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from .base import Teacher, normalise, pick_device, pick_dtype, resolve_model_path

MODEL_CLASSES = ("AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM")


@contextmanager
def _quiet_transformers(errors_only: bool = False):
    """No progress bars while loading; with `errors_only`, no load report either (loading a generation checkpoint
    into a base model lists the unused lm_head, which is expected: missing weights are checked by the caller)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if errors_only:
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _processor_class_name(path: str) -> Optional[str]:
    folder = Path(path)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            value = json.loads((folder / name).read_text()).get("processor_class")
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return value
    try:
        from transformers import AutoConfig
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        return PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(path).model_type)
    except Exception:
        return None


def load_processor(path: str, trust_remote_code: bool = False):
    """`AutoProcessor`, or (where torchvision is missing) the same processor class without its video processor."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        if "orchvision" not in str(exc):
            raise
        import transformers

        name = _processor_class_name(path)
        base = getattr(transformers, name, None) if name else None
        if base is None:
            raise

        keep = lambda names: [a for a in names if a != "video_processor"]  # noqa: E731
        namespace = {"attributes": keep(getattr(base, "attributes", []))}  # transformers 4: a class attribute
        if hasattr(base, "get_attributes"):  # transformers 5: a class method
            namespace["get_attributes"] = classmethod(lambda cls: keep(base.get_attributes()))
        return type(f"{base.__name__}WithoutVideo", (base,), namespace).from_pretrained(path)


def load_model(path: str, model_class: str, dtype, trust_remote_code: bool, attn_implementation: Optional[str]):
    import transformers

    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    names = MODEL_CLASSES if model_class == "auto" else (model_class,)
    error = None
    with _quiet_transformers(errors_only=True):
        for name in names:
            try:
                model, info = getattr(transformers, name).from_pretrained(path, output_loading_info=True, **kwargs)
                break
            except ValueError as exc:  # "Unrecognized configuration class ... for this kind of AutoModel"
                error = exc
        else:
            raise error
    missing = list((info or {}).get("missing_keys") or [])
    if missing:
        warnings.warn(f"{path}: {len(missing)} weights are not in the checkpoint and were initialised at random "
                      f"(e.g. {missing[:3]}); check teacher.model_class and the checkpoint", stacklevel=2)
    return model


def default_image_text(processor, tokenizer) -> str:
    token = getattr(processor, "image_token", None) or "<image>"
    vocab = tokenizer.get_vocab()
    if token == "<|image_pad|>" and "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:
        return "<|vision_start|><|image_pad|><|vision_end|>"
    return token


def smart_size(width: int, height: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) by Qwen2-VL's rule: each side rounded to a multiple of `factor`, then scaled (aspect ratio
    kept) until the pixel count lies in [min_pixels, max_pixels]. A strip longer than 200 times its width becomes a
    square first (VLM2Vec's processor; transformers' raises)."""
    if max(width, height) / min(width, height) > 200:
        width = height = max(factor, width, height)
    w = max(factor, round(width / factor) * factor)
    h = max(factor, round(height / factor) * factor)
    if w * h > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w = max(factor, math.floor(width / beta / factor) * factor)
        h = max(factor, math.floor(height / beta / factor) * factor)
    elif w * h < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        w = math.ceil(width * beta / factor) * factor
        h = math.ceil(height * beta / factor) * factor
    return w, h


class VLMRunner:
    """A processor and a model on a device; turns (prompt, image) lists into model inputs. Shared by the VLM
    teacher and the VLM judge."""

    def __init__(self, path: str, *, model_class: str, device: str, dtype: str, trust_remote_code: bool,
                 attn_implementation: Optional[str], padding_side: str, image_token: Optional[str]):
        import torch

        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.processor = load_processor(path, trust_remote_code)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = padding_side
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_model(path, model_class, self.dtype, trust_remote_code, attn_implementation)
        self.model.to(self.device).eval()
        self.image_text = image_token or default_image_text(self.processor, self.tokenizer)
        self.nested_images = any(n in type(self.processor).__name__ for n in ("Idefics", "SmolVLM", "Mllama"))
        self.processor_resizes = True  # False: images arrive sized by the teacher, the processor only patchifies
        self.torch = torch

    def chat(self, messages: list[dict], generation_prompt: bool) -> str:
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if not getattr(owner, "chat_template", None):
            raise ValueError("prompt_format: chat needs a chat template, and this processor has none; "
                             "use prompt_format: plain")
        return owner.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def inputs(self, prompts: list[str], images: Optional[list[list]]) -> dict:
        """Model inputs on the device; `images[i]` lists prompt i's images in the order of its image tokens."""
        kwargs = {"text": prompts, "padding": True, "return_tensors": "pt"}
        if images and any(images):
            kwargs["images"] = images if self.nested_images else [im for group in images for im in group]
            if not self.processor_resizes:
                kwargs["do_resize"] = False
        batch = self.processor(**kwargs)
        out = {}
        for key, value in batch.items():
            if hasattr(value, "to"):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            out[key] = value
        return out

    def split_oom(self, fn, n: int):
        """fn(slice) over all n rows; on CUDA out-of-memory the rows are halved and retried (down to one)."""
        def run(lo, hi):
            try:
                return [fn(slice(lo, hi))]
            except self.torch.cuda.OutOfMemoryError:
                if hi - lo == 1:
                    raise
                self.torch.cuda.empty_cache()
                mid = (lo + hi) // 2
                return run(lo, mid) + run(mid, hi)
        return np.concatenate(run(0, n))


def last_token_index(mask):
    """Index of the last attended position of each row, whatever side the padding is on."""
    length = mask.shape[1]
    return length - 1 - mask.flip(1).int().argmax(1)


def pool(hidden, mask, how: str):
    import torch

    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(mask)]


class HFVLMTeacher(Teacher):
    version = 1
    default_max_pixels = 1280 * 28 * 28  # 1280 patches of 28 x 28: the bound Qwen2-VL's examples use

    def __init__(self, cfg):
        super().__init__(cfg)
        self.runner = VLMRunner(resolve_model_path(cfg.model), model_class=cfg.model_class, device=cfg.device,
                                dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                attn_implementation=cfg.attn_implementation, padding_side=cfg.padding_side,
                                image_token=cfg.image_token)
        model = self.runner.model
        self.base = getattr(model, "model", model) if type(model).__name__.endswith(
            ("ForConditionalGeneration", "ForCausalLM", "ForImageTextToText")) else model
        config = model.config
        text_config = getattr(config, "text_config", None) or config
        self.dim = int(text_config.hidden_size)
        rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
        self.mrope = bool(rope.get("mrope_section")) if isinstance(rope, dict) else False
        image_processor = getattr(self.runner.processor, "image_processor", None)
        # Qwen2-VL-family processors take any image whose sides are multiples of the patch grid: the teacher's own
        # resize is then the only one (the processor would otherwise re-round and resample with its own backend).
        self.runner.processor_resizes = cfg.image_resize == "bound" or not hasattr(image_processor, "merge_size")

    # -- prompts ------------------------------------------------------------------------------------------------
    def _truncate(self, text: str) -> str:
        if not self.cfg.max_length or not text:
            return text
        ids = self.runner.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.cfg.max_length:
            return text
        return self.runner.tokenizer.decode(ids[:self.cfg.max_length])

    def format(self, text: str, has_image: bool, role: str, dataset: Optional[str] = None) -> str:
        """The prompt of one item (before the processor expands the image token)."""
        cfg, placeholder = self.cfg, self.cfg.image_placeholder
        instruction = self.instruction_for(text, role, dataset)
        if cfg.prompt_format == "replace":
            return self._replace(text, instruction, has_image) + cfg.suffix
        head, sep = "", "\n"  # head: text before an image that sits inside the text
        if placeholder and placeholder in text:
            before, _, after = text.partition(placeholder)
            after = after.replace(placeholder, "")  # one image per item
            if not has_image:
                text = (before + after).strip()
            elif before.strip():
                head, text = self._truncate(before), after
            else:
                text = after.lstrip(" \t\r\n")
                sep = after[:len(after) - len(text)] or "\n"
        text = self._truncate(text)
        if cfg.prompt_format == "chat":
            content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": instruction + head + text}]
            messages = ([{"role": "system", "content": [{"type": "text", "text": cfg.system_prompt}]}]
                        if cfg.system_prompt else []) + [{"role": "user", "content": content}]
            return self.runner.chat(messages, cfg.generation_prompt) + cfg.suffix
        if not has_image:
            return instruction + text + cfg.suffix
        if head:
            return instruction + head + self.runner.image_text + text + cfg.suffix
        return self.runner.image_text + sep + instruction + text + cfg.suffix

    def _replace(self, text: str, instruction: str, has_image: bool) -> str:
        """`prompt_format: replace`: the data's text as it is, the placeholder swapped for the image token in place
        (the instruction, where one is added, right after the image and its whitespace)."""
        placeholder, image = self.cfg.image_placeholder, self.runner.image_text
        if not placeholder or placeholder not in text:
            text = self._truncate(text)
            return image + " " + instruction + text if has_image else instruction + text
        before, _, after = text.partition(placeholder)
        after = after.replace(placeholder, "")  # one image per item
        if not has_image:
            return instruction + self._truncate(before + after)
        rest = after.lstrip(" \t\r\n")
        if before.strip():
            return instruction + self._truncate(before) + image + after[:len(after) - len(rest)] + self._truncate(rest)
        return before + image + after[:len(after) - len(rest)] + instruction + self._truncate(rest)

    def prepare_image(self, image):
        """`image_resize: bound` as every backend; `squash` to `image_size`, then (and for `smart`) Qwen2-VL's rule
        within [min_pixels, max_pixels]; one PIL bicubic resample, as VLM2Vec's processor did."""
        cfg = self.cfg
        if cfg.image_resize == "bound":
            return super().prepare_image(image)
        from PIL import Image

        if image.mode != "RGB":
            image = image.convert("RGB")
        factor = cfg.image_factor
        if cfg.image_resize == "squash":
            image = image.resize(tuple(cfg.image_size), Image.Resampling.BICUBIC)
        elif min(image.size) < factor:  # too thin for one patch: VLM2Vec blows such images up to 2x2 patches
            image = image.resize((2 * factor, 2 * factor), Image.Resampling.BICUBIC)
        size = smart_size(*image.size, factor, cfg.min_pixels or 4 * factor * factor,
                          cfg.max_pixels or self.default_max_pixels)
        return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)

    # -- embedding ----------------------------------------------------------------------------------------------
    def model_inputs(self, prompts: list[str], images: Optional[list]) -> dict:
        """The model's inputs of a batch of prompts (and one image each): the processor's, plus position ids where
        `position_ids: sequential` (0, 1, 2... over real tokens; the same in all three M-RoPE sections)."""
        batch = self.runner.inputs(prompts, [[im] for im in images] if images else None)
        if self.cfg.position_ids == "sequential":
            mask = batch["attention_mask"].long()
            positions = (mask.cumsum(-1) - 1).clamp(min=0) * mask
            batch["position_ids"] = positions[None].expand(3, -1, -1) if self.mrope else positions
        return batch

    def _forward(self, prompts: list[str], images: Optional[list]) -> np.ndarray:
        torch = self.runner.torch

        def run(rows: slice) -> np.ndarray:
            batch = self.model_inputs(prompts[rows], images[rows] if images else None)
            with torch.inference_mode():
                out = self.base(**batch, use_cache=False)
                hidden = getattr(out, "last_hidden_state", None)
                if hidden is None:
                    hidden = self.runner.model(**batch, use_cache=False, output_hidden_states=True).hidden_states[-1]
                return pool(hidden, batch["attention_mask"], self.cfg.pooling).float().cpu().numpy()

        return self.runner.split_oom(run, len(prompts))

    def embed(self, texts: list[str], images: list, role: str, dataset: Optional[str] = None) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        has_image = np.array([im is not None for im in images], dtype=bool)
        for group in (np.flatnonzero(~has_image), np.flatnonzero(has_image)):
            if not len(group):
                continue
            with_images = bool(has_image[group[0]])
            prompts = [self.format(texts[i], with_images, role, dataset) for i in group]
            pics = [self.prepare_image(images[i]) for i in group] if with_images else None
            out[group] = self._forward(prompts, pics)
        return normalise(out)

    @classmethod
    def tokens_per_item(cls, cfg) -> int:
        return (cfg.max_length or 256) + (cfg.max_pixels or cls.default_max_pixels) // (28 * 28)
