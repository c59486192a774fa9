"""QQMM-embed teacher (`kind: qqmm`) on a tiny random checkpoint laid out as QQ-MM/QQMM-embed saves one.

The reference is written here from QQMM's published inference (`qqmm/utils/chat.py`, `processing_qqmm.py`,
`modeling_qqmm.py`, `configs/embed/qqmm-embed/mmeb.yaml`), not with the teacher's code: its system prompt and ChatML
prompt, its two image resizes (short side >= 448 / long side <= 1512, then a grid of 28-pixel cells), one `<image>`
token per 2x2 patch group plus one, all at one position, and the last prompt token's final hidden state. The vision
tower is spelled out with plain tensor operations from the checkpoint's weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tiny_vlms import save_tiny_qqmm

from pipeline.config import config_from_dict
from pipeline.teachers import load_teacher, teacher_fingerprint

SYSTEM = ("You are an AI assistant whose name is QQMM.\n- QQMM is a multi-modality conversational language model that "
          "is developed by Tencent QQ Team (腾讯QQ团队). It is designed to be helpful, honest, and harmless.\n- QQMM "
          "can understand and communicate fluently in the language chosen by the user such as English and 中文.\n"
          "- QQMM is capable of comprehending and articulating responses effectively based on the provided image.")
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_qqmm(tmp_path_factory.mktemp("qqmm") / "m")


@pytest.fixture(scope="module")
def teacher(ckpt):
    cfg = config_from_dict({"input": {"pairs": ["x.jsonl"]},
                            "teacher": {"kind": "qqmm", "model": str(ckpt), "dtype": "float32", "device": "cpu"}})
    return load_teacher(cfg.teacher)


def picture(w, h):
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                                     ((x // 13 + y // 7) % 2) * 255], -1).astype(np.uint8))


# (image size, size after QQMM's chat resize, size of the 28-pixel cell grid as (rows, cols))
SIZES = [((900, 700), (900, 700), (25, 32)),     # within bounds: cells rounded (896 x 700 pixels)
         ((200, 100), (896, 448), (16, 32)),     # short side up to 448
         ((300, 2000), (226, 1512), (54, 8))]    # short side up to 448, then the long side down to 1512


def reference_inputs(tok, image_id, text, image=None):
    user = "<image>\n" + text if image is not None else text
    prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if image is None:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        return ids, list(range(len(ids))), None, None
    size, chat, (rows, cols) = next(s for s in SIZES if s[0] == image.size)
    before, after = prompt.split("<image>")
    a, b = tok(before, add_special_tokens=False)["input_ids"], tok(after, add_special_tokens=False)["input_ids"]
    n = rows * cols + 1
    ids = a + [image_id] * n + b
    positions = list(range(len(a))) + [len(a)] * n + list(range(len(a) + 1, len(a) + 1 + len(b)))
    im = image.resize(chat, Image.Resampling.BICUBIC) if chat != size else image
    im = im.resize((cols * 28, rows * 28), Image.Resampling.BICUBIC)
    arr = ((np.asarray(im, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)
    h, w = rows * 2, cols * 2
    patches = arr.reshape(3, h, 14, w, 14).transpose(1, 3, 0, 2, 4).reshape(h * w, 3, 14, 14)
    return ids, positions, patches, (h, w)


def reference_vector(ckpt, ids, positions, patches=None, grid=None):
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2Model
    import json

    sd = load_file(str(ckpt / "model.safetensors"))
    cfg = json.loads((ckpt / "config.json").read_text())
    lm_cfg = {k: v for k, v in cfg["language_model_config"].items() if k != "model_type"}
    lm = Qwen2Model(Qwen2Config(**lm_cfg))
    lm.load_state_dict({k[len("language_model.model."):]: v for k, v in sd.items()
                        if k.startswith("language_model.model.")})
    lm.eval()
    ids_t = torch.tensor([ids])
    emb = lm.embed_tokens(ids_t)
    if patches is not None:
        g = lambda k: sd["vision_model." + k]  # noqa: E731
        h, w = grid
        x = torch.einsum("ncij,dcij->nd", torch.from_numpy(patches), g("patch_embed.weight"))
        heads, d = 2, x.shape[1]
        hd = d // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd // 2, 2).float() / (hd // 2)))
        rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ang = torch.cat([rr.reshape(-1, 1) * inv, cc.reshape(-1, 1) * inv], 1)  # (L, hd/2): rows then columns
        y = F.layer_norm(x, (d,), g("blocks.0.norm1.weight"), g("blocks.0.norm1.bias"), 1e-6)
        q, k, v = (y @ g("blocks.0.attn.qkv.weight").T + g("blocks.0.attn.qkv.bias")).view(-1, 3, heads, hd).unbind(1)

        def turn(t):
            t1, t2 = t[..., :hd // 2], t[..., hd // 2:]
            c, s = ang.cos()[:, None], ang.sin()[:, None]
            return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)

        q, k = turn(q), turn(k)
        att = torch.softmax(torch.einsum("lhd,mhd->hlm", q, k) / hd ** 0.5, -1)
        o = torch.einsum("hlm,mhd->lhd", att, v).reshape(-1, d)
        x = x + o @ g("blocks.0.attn.proj.weight").T + g("blocks.0.attn.proj.bias")
        y = F.layer_norm(x, (d,), g("blocks.0.norm2.weight"), g("blocks.0.norm2.bias"), 1e-6)
        y = y @ g("blocks.0.mlp.fc1.weight").T + g("blocks.0.mlp.fc1.bias")
        y = y * torch.sigmoid(1.702 * y)  # quick_gelu
        x = x + y @ g("blocks.0.mlp.fc2.weight").T + g("blocks.0.mlp.fc2.bias")
        groups = x.view(h // 2, 2, w // 2, 2, d).permute(0, 2, 1, 3, 4).reshape(-1, 4 * d)
        feats = torch.cat([sd["vision_abstractor.image_embedding"], groups])
        feats = F.gelu(feats @ sd["vision_abstractor.projection.0.weight"].T + sd["vision_abstractor.projection.0.bias"])
        feats = feats @ sd["vision_abstractor.projection.2.weight"].T + sd["vision_abstractor.projection.2.bias"]
        mask = ids_t[0] == cfg["image_token_id"]
        emb = emb.clone()
        emb[0, mask] = feats
    with torch.inference_mode():
        out = lm(inputs_embeds=emb, attention_mask=torch.ones_like(ids_t), position_ids=torch.tensor([positions]))
    v = out.last_hidden_state[0, -1].numpy()
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("size", [s[0] for s in SIZES] + [None])
def test_qqmm_reproduces_published_inference(ckpt, teacher, size):
    image = picture(*size) if size else None
    text = "Represent the given image for classification." if size else \
        "Represent the following answer to an image classification task: a lovely dog."
    tok = teacher.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == len(tok) - 1  # added after the checkpoint's vocabulary, as QQMM's processor does
    ids, positions, patches, grid = reference_inputs(tok, image_id, text, image)
    mmeb = ("<|image_1|>\n" + text) if size else text  # MMEB's placeholder is not part of QQMM's prompt
    prompt = teacher.format(mmeb, image is not None, "query")
    batch = teacher.model_inputs([prompt], [teacher.prepare_image(image)] if image else None)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["position_ids"][0].tolist() == positions
    if image:
        assert [tuple(g) for g in batch["grid_sizes"].tolist()] == [grid]
        assert np.abs(batch["pixel_values"].numpy() - patches).max() < 1e-5
    got = teacher.embed([mmeb], [image], "query")[0]
    ref = reference_vector(ckpt, ids, positions, patches, grid)
    assert float(got @ ref) >= 0.99999


def test_qqmm_batch_fingerprint_and_wrong_checkpoint(ckpt, teacher, tmp_path):
    texts = ["<|image_1|>\nRepresent the given image.", "a plain caption", "<|image_1|>"]
    images = [picture(200, 100), None, picture(900, 700)]
    together = teacher.embed(texts, images, "query")
    alone = np.concatenate([teacher.embed([t], [im], "query") for t, im in zip(texts, images)])
    assert np.abs(together - alone).max() < 1e-5 and np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    cfg = config_from_dict({"input": {"pairs": ["x.jsonl"]}, "teacher": {"kind": "qqmm", "model": str(ckpt)}}).teacher
    other = config_from_dict({"input": {"pairs": ["x.jsonl"]},
                              "teacher": {"kind": "qqmm", "model": str(ckpt), "system_prompt": "You embed."}}).teacher
    assert teacher_fingerprint(cfg, "query") != teacher_fingerprint(other, "query")
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    with pytest.raises(ValueError, match="not 'qqmm'"):
        load_teacher(config_from_dict({"input": {"pairs": ["x.jsonl"]},
                                       "teacher": {"kind": "qqmm", "model": str(tmp_path)}}).teacher)
