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
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None, eos_token="<|endoftext|>",
                             pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


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
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
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
