"""Fidelity of `kind: hf-clip` to how CLIP and SigLIP were trained, on tiny random checkpoints: reference token ids,
pixels and vectors are built here from the published recipes, not with the teacher's code. CLIP: `<|startoftext|>`
text `<|endoftext|>`, pooled at the end-of-text token, shortest side resized to the input size (bicubic), centre
crop, CLIP mean / std. SigLIP: text padded to the full context length (as trained; it pools the last position), image
squashed to the input size, mean / std 0.5. (open_clip itself imports torchvision, which this environment does not
have, so it is not run here: docs/teachers.md.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


from pipeline.config import TeacherConfig
from pipeline.teachers import load_teacher

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
TEXTS = ["a red fire truck", "a photo of a small dog sleeping on a very long green sofa in the afternoon"]


@pytest.fixture(scope="module")
def models(tiny_dual_models):
    return tiny_dual_models


@pytest.fixture(scope="module")
def photo():
    y, x = np.mgrid[0:70, 0:90]
    return Image.fromarray(np.stack([x * 255 // 89, y * 255 // 69, ((x // 9 + y // 5) % 2) * 255], -1).astype(np.uint8))


def unit(v):
    v = np.asarray(v, np.float32).ravel()
    return v / np.linalg.norm(v)


def test_clip_text_and_image_match_the_published_recipe(models, photo):
    from transformers import CLIPModel

    teacher = load_teacher(TeacherConfig(kind="hf-clip", model=str(models["clip"]), dtype="float32", device="cpu"))
    model = CLIPModel.from_pretrained(models["clip"]).eval()
    tok = teacher.processor.tokenizer
    bos, eos = tok.convert_tokens_to_ids("<|startoftext|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    got = teacher.embed(TEXTS, [None, None], "query")  # one batch: the short text is padded
    for text, vec in zip(TEXTS, got):
        words = tok(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[bos] + words + [eos]])
        with torch.inference_mode():
            hidden = model.text_model(input_ids=ids).last_hidden_state[0, -1]  # the end-of-text token
            ref = model.text_projection(hidden)
        assert float(vec @ unit(ref)) >= 0.99999
    # image: shortest side to 32 (bicubic), centre crop 32 x 32
    w, h = photo.size
    resized = photo.resize((round(32 * w / h), 32), Image.Resampling.BICUBIC)
    left = (resized.width - 32) // 2
    arr = (np.asarray(resized.crop((left, 0, left + 32, 32)), np.float32) / 255 - CLIP_MEAN) / CLIP_STD
    pixels = torch.from_numpy(arr.transpose(2, 0, 1)[None].copy())
    with torch.inference_mode():
        ref = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    got = teacher.embed([""], [photo], "candidate")[0]
    assert float(got @ unit(ref)) >= 0.99999


def test_siglip_pads_text_to_the_context_length_and_squashes_images(models, photo):
    from transformers import SiglipModel

    teacher = load_teacher(TeacherConfig(kind="hf-clip", model=str(models["siglip"]),
                                         dtype="float32", device="cpu"))
    model = SiglipModel.from_pretrained(models["siglip"]).eval()
    tok = teacher.processor.tokenizer
    context = model.config.text_config.max_position_embeddings
    got = teacher.embed(TEXTS, [None, None], "query")
    for text, vec in zip(TEXTS, got):
        ids = tok(text, add_special_tokens=True)["input_ids"][:context]
        ids = torch.tensor([ids + [tok.pad_token_id] * (context - len(ids))])
        with torch.inference_mode():
            out = model.text_model(input_ids=ids)
        ref = out.pooler_output  # SigLIP's head on the last position
        assert float(vec @ unit(ref)) >= 0.99999
        # unpadded or with the padding masked, a short text is another vector: SigLIP was trained attending to it
        if len(tok(text)["input_ids"]) < context:
            with torch.inference_mode():
                short = model.text_model(input_ids=torch.tensor([tok(text)["input_ids"]])).pooler_output
                masked = model.text_model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).pooler_output
            assert float(vec @ unit(short)) < 0.9999 and float(vec @ unit(masked)) < 0.9999
    arr = (np.asarray(photo.resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 255 - 0.5) / 0.5
    with torch.inference_mode():
        ref = model.vision_model(pixel_values=torch.from_numpy(arr.transpose(2, 0, 1)[None].copy())).pooler_output
    got = teacher.embed([""], [photo], "candidate")[0]
    assert float(got @ unit(ref)) >= 0.99999
