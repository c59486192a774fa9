"""Tiny randomly initialised checkpoints of real VLM architectures (Qwen2-VL, LLaVA-OneVision) and of SigLIP,
built from configs and saved / loaded like real ones (save_pretrained / from_pretrained). For tests only.

Tokenizers are byte-level BPE without merges (every byte one token) plus each model's special tokens, so they are
built offline. Processors are saved part by part when transformers cannot build them whole (Qwen2-VL's and
LLaVA-OneVision's processors need torchvision for their video part; the teacher loads them without it).
"""
from __future__ import annotations

import json
from pathlib import Path

QWEN_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
             "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
             "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAVA_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
              "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
              "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_tokenizer(specials: list[str]):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    vocab = {s: i for i, s in enumerate(sorted(ByteLevel.alphabet()))}
    try:
        tok = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    except TypeError:  # transformers 4 builds a fast tokenizer from files or from a `tokenizers` object
        from tokenizers import Tokenizer, decoders, models

        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        tok = Qwen2TokenizerFast(tokenizer_object=backend, unk_token=None, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def _mrope(section: list[int], theta: float) -> dict:
    """M-RoPE settings as the installed transformers spells them (`rope_parameters` from 5.0, `rope_scaling` before)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {"rope_type": "default", "mrope_section": section, "rope_theta": theta}}
    return {"rope_scaling": {"type": "mrope", "mrope_section": section}, "rope_theta": theta}


def _save_processor(folder: Path, processor_cls, image_processor, tokenizer, chat_template: str, extra: dict):
    """Save the processor whole where transformers can build it, else its parts and a processor_config.json."""
    try:
        processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                                  **extra)
        processor.save_pretrained(folder)
        return
    except (ImportError, AttributeError, ValueError, TypeError):
        pass
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": processor_cls.__name__, **extra}))
    (folder / "chat_template.jinja").write_text(chat_template)


def save_tiny_qwen2_vl(folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _byte_tokenizer(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                           "<|video_pad|>"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|image_pad|>", "<|video_pad|>",
                                                      "<|vision_start|>", "<|vision_end|>")}
    image_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    image_processor = image_cls(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                temporal_patch_size=2)
    _save_processor(folder, Qwen2VLProcessor, image_processor, tok, QWEN_CHAT, {})
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         **_mrope([2, 3, 3], 1e4),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    return folder


def save_tiny_llava_onevision(folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _byte_tokenizer(["<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<image>", "<video>")}
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_cls = getattr(transformers, "LlavaOnevisionImageProcessorPil", None) or \
        transformers.LlavaOnevisionImageProcessor
    image_processor = image_cls(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    _save_processor(folder, LlavaOnevisionProcessor, image_processor, tok, LLAVA_CHAT,
                    {"num_image_tokens": 16, "vision_feature_select_strategy": "full", "image_token": "<image>",
                     "video_token": "<video>", "vision_aspect_ratio": "anyres_max_9"})
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1)
    torch.manual_seed(seed)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(folder)
    return folder


def save_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _byte_tokenizer([])
    tok.pad_token = "<pad>"
    tok.add_special_tokens({"pad_token": "<pad>"})
    image_cls = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    image_processor = image_cls(size={"height": 32, "width": 32})
    SiglipProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    config = SiglipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, projection_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8))
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(folder)
    return folder


def save_tiny_qqmm(folder: Path, seed: int = 0) -> Path:
    """A QQMM-embed checkpoint as QQ-MM/QQMM-embed lays it out: config.json (`model_type: qqmm`, nested language /
    vision / abstractor configs) and safetensors named `vision_model.*` (Qwen2-VL NaViT), `vision_abstractor.*`
    (image embedding + MLP over 2x2 patch groups), `language_model.*` (Qwen2 causal LM). The tokenizer has no
    `<image>` token: QQMM's processor adds it at load, so it takes the next id."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _byte_tokenizer(["<|im_start|>", "<|im_end|>"])
    tok.save_pretrained(folder)
    image_id = len(tok)
    lm = dict(model_type="qwen2", vocab_size=image_id + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, rope_theta=1e6,
              rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    vision = dict(model_type="qwen2vl_navit", depth=1, hidden_size=32, num_heads=2, mlp_ratio=2,
                  hidden_act="quick_gelu", patch_size=14, in_channels=3)
    config = dict(model_type="qqmm", architectures=["QQMMForCausalLM"], language_model_config=lm,
                  vision_model_config=vision, vision_abstractor_config={"projection_type": "mlp2x_gelu"},
                  image_token_id=image_id, vision_output_key="", torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    torch.manual_seed(seed)
    state = {f"language_model.{k}": v.contiguous() for k, v in
             Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in lm.items() if k != "model_type"})).state_dict().items()}
    d, hidden = vision["hidden_size"], lm["hidden_size"]
    rnd = lambda *shape, std=0.05: torch.randn(*shape) * std  # noqa: E731
    state.update({
        "vision_model.patch_embed.weight": rnd(d, 3, 14, 14),
        "vision_model.blocks.0.norm1.weight": 1 + rnd(d), "vision_model.blocks.0.norm1.bias": rnd(d),
        "vision_model.blocks.0.norm2.weight": 1 + rnd(d), "vision_model.blocks.0.norm2.bias": rnd(d),
        "vision_model.blocks.0.attn.qkv.weight": rnd(3 * d, d, std=0.3), "vision_model.blocks.0.attn.qkv.bias": rnd(3 * d),
        "vision_model.blocks.0.attn.proj.weight": rnd(d, d, std=0.3), "vision_model.blocks.0.attn.proj.bias": rnd(d),
        "vision_model.blocks.0.mlp.fc1.weight": rnd(2 * d, d, std=0.3), "vision_model.blocks.0.mlp.fc1.bias": rnd(2 * d),
        "vision_model.blocks.0.mlp.fc2.weight": rnd(d, 2 * d, std=0.3), "vision_model.blocks.0.mlp.fc2.bias": rnd(d),
        "vision_abstractor.image_embedding": rnd(1, 4 * d),
        "vision_abstractor.projection.0.weight": rnd(hidden, 4 * d, std=0.3),
        "vision_abstractor.projection.0.bias": rnd(hidden),
        "vision_abstractor.projection.2.weight": rnd(hidden, hidden, std=0.3),
        "vision_abstractor.projection.2.bias": rnd(hidden),
    })
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def picture(size):
    """A deterministic RGB test picture of `size` (width, height): gradients and a checker pattern."""
    import numpy as np
    from PIL import Image

    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                                     ((x // 13 + y // 7) % 2) * 255], -1).astype(np.uint8))
