"""QQMM-embed (QQ-MM/QQMM-embed, the model family of the EGA paper), encoded as its published inference does it
(`qqmm/utils/chat.py` EmbedBot, `qqmm/models/qqmm_nav_qwen2/`, `configs/embed/qqmm-embed/mmeb.yaml`). Our own code:

* model: a Qwen2-VL NaViT vision tower (14-pixel patches, 2-D rotary positions, each image attends to itself, no
  merger), an abstractor (each 2x2 group of patch features concatenated, a learned image embedding put first, an
  MLP), and a Qwen2.5 language model; weights read from the checkpoint's own files (`vision_model.*`,
  `vision_abstractor.*`, `language_model.*`), its `config.json` (`model_type: qqmm`) giving the sizes;
* prompt: ChatML with QQMM's own system prompt; the user turn is `<image>\\n` + the text for an image item; the
  assistant turn opened;
* image: the short side brought up to 448, then the long side down to 1512 (aspect ratio kept, PIL bicubic), then
  a grid of 28-pixel cells (sides rounded, at most 2048 cells), resized once more to it and cut into 14-pixel patches;
* tokens: one `<image>` token per 2x2 patch group plus one, all at one shared position (the text after an image
  continues at the next position);
* vector: the final hidden state of the prompt's last token, L2-normalised.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from .base import Teacher, normalise, pick_device, pick_dtype, resolve_model_path

SYSTEM_PROMPT = (
    "You are an AI assistant whose name is QQMM.\n"
    "- QQMM is a multi-modality conversational language model that is developed by Tencent QQ Team (腾讯QQ团队). "
    "It is designed to be helpful, honest, and harmless.\n"
    "- QQMM can understand and communicate fluently in the language chosen by the user such as English and 中文.\n"
    "- QQMM is capable of comprehending and articulating responses effectively based on the provided image.")
IMAGE_TOKEN = "<image>"
PATCH, MERGE = 14, 2
CELL = PATCH * MERGE
MIN_SHORT, MAX_LONG = 448, 1512        # chat.py: before the image processor
MAX_CELLS = 8192 // (MERGE * MERGE)    # mmeb.yaml max_single_num_patches.image, in 2x2 cells
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def chat_size(width: int, height: int) -> tuple[int, int]:
    """QQMM's chat resize: the short side up to 448, then the long side down to 1512 (sides truncated to ints)."""
    if min(width, height) < MIN_SHORT:
        if width <= height:
            width, height = MIN_SHORT, int(MIN_SHORT / width * height)
        else:
            width, height = int(MIN_SHORT / height * width), MIN_SHORT
    if max(width, height) > MAX_LONG:
        if width >= height:
            width, height = MAX_LONG, int(MAX_LONG * height / width)
        else:
            width, height = int(MAX_LONG * width / height), MAX_LONG
    return width, height


def cell_grid(width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of 28-pixel cells for an image (the NaViT image processor with QQMM's MMEB settings)."""
    if width >= height and width > MAX_LONG:
        height, width = int(MAX_LONG * height / width), MAX_LONG
    elif height > width and height > MAX_LONG:
        height, width = MAX_LONG, int(MAX_LONG * width / height)
    height, width = max(height, CELL), max(width, CELL)
    rows, cols = round(height / CELL), round(width / CELL)
    if rows * cols > MAX_CELLS:
        rows, cols = int((MAX_CELLS * height / width) ** 0.5), int((MAX_CELLS * width / height) ** 0.5)
        if rows < 1:  # a strip thinner than one cell: one row (column) of as many cells as allowed
            rows, cols = 1, MAX_CELLS
        elif cols < 1:
            rows, cols = MAX_CELLS, 1
    return rows, cols


def image_patches(image) -> tuple[np.ndarray, tuple[int, int]]:
    """(patches (rows*2 * cols*2, 3, 14, 14) float32 in row-major patch order, (patch rows, patch cols))."""
    from PIL import Image

    image = image.convert("RGB") if image.mode != "RGB" else image
    size = chat_size(*image.size)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    rows, cols = cell_grid(*image.size)
    h, w = rows * MERGE, cols * MERGE
    image = image.resize((w * PATCH, h * PATCH), Image.Resampling.BICUBIC)
    arr = (np.asarray(image, np.float32) * np.float32(1 / 255) - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    arr = arr.transpose(2, 0, 1).reshape(3, h, PATCH, w, PATCH).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(arr.reshape(h * w, 3, PATCH, PATCH)), (h, w)


def image_token_count(grid: tuple[int, int]) -> int:
    return -(-grid[0] // MERGE) * -(-grid[1] // MERGE) + 1


def shared_positions(ids: list[int], image_id: int) -> list[int]:
    """Every token of a run of image tokens at one position; every other token one position further."""
    out, pos, prev_image = [], -1, False
    for t in ids:
        is_image = t == image_id
        if not (is_image and prev_image):
            pos += 1
        out.append(pos)
        prev_image = is_image
    return out


def _modules():
    import torch
    from torch import nn
    from torch.nn import functional as F

    def rope(x, freqs):  # x (heads, L, d); freqs (L, d/2): pairs (i, i + d/2) turned by freqs[:, i]
        x1, x2 = x.float().chunk(2, dim=-1)
        cos, sin = freqs.cos()[None], freqs.sin()[None]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).to(x.dtype)

    class Attention(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dim, dim * 3)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x, lengths, freqs):
            q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, -1).permute(1, 2, 0, 3).unbind(0)
            q, k = rope(q, freqs), rope(k, freqs)
            out = [F.scaled_dot_product_attention(a, b, c) for a, b, c in
                   zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))]
            return self.proj(torch.cat(out, 1).transpose(0, 1).flatten(1))

    class Mlp(nn.Module):
        def __init__(self, dim, hidden, act):
            super().__init__()
            from transformers.activations import ACT2FN

            self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), ACT2FN[act], nn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(c["hidden_size"], eps=1e-6), nn.LayerNorm(c["hidden_size"], eps=1e-6)
            self.attn = Attention(c["hidden_size"], c["num_heads"])
            self.mlp = Mlp(c["hidden_size"], int(c["hidden_size"] * c["mlp_ratio"]), c["hidden_act"])

        def forward(self, x, lengths, freqs):
            x = x + self.attn(self.norm1(x), lengths, freqs)
            return x + self.mlp(self.norm2(x))

    class NaViT(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.patch_embed = nn.Conv2d(c.get("in_channels", 3), c["hidden_size"], c["patch_size"],
                                         c["patch_size"], bias=False)
            self.blocks = nn.ModuleList(Block(c) for _ in range(c["depth"]))
            rot = c["hidden_size"] // c["num_heads"] // 2
            self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot)), persistent=False)

        def forward(self, patches, grids):
            x = self.patch_embed(patches).flatten(1)
            pos = torch.cat([torch.cartesian_prod(torch.arange(h), torch.arange(w)) for h, w in grids])
            table = torch.outer(torch.arange(max(max(g) for g in grids), device=x.device).float(),
                                self.inv_freq.float())
            freqs = table[pos.to(x.device)].flatten(1)
            lengths = [h * w for h, w in grids]
            for block in self.blocks:
                x = block(x, lengths, freqs)
            return x

    class Abstractor(nn.Module):
        def __init__(self, projection_type, in_dim, out_dim, exist_cls_embedding=False):
            super().__init__()
            depth = int(projection_type.removeprefix("mlp").removesuffix("x_gelu"))
            self.image_embedding = nn.Parameter(torch.zeros(1, 4 * in_dim))
            layers = [nn.Linear(4 * in_dim, out_dim)]
            for _ in range(depth - 1):
                layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
            self.projection = nn.Sequential(*layers)
            self.cls = exist_cls_embedding

        def forward(self, x, grids):
            out = []
            for chunk, (h, w) in zip(x.split([h * w + self.cls for h, w in grids]), grids):
                chunk = chunk[self.cls:].view(h, w, -1)
                chunk = F.pad(chunk, (0, 0, 0, w % 2, 0, h % 2))
                h2, w2, d = chunk.shape[0] // 2, chunk.shape[1] // 2, chunk.shape[2]
                out += [self.image_embedding, chunk.view(h2, 2, w2, 2, d).permute(0, 2, 1, 3, 4).reshape(h2 * w2, 4 * d)]
            return self.projection(torch.cat(out))

    return NaViT, Abstractor


def build_qqmm(config: dict, attn_implementation: Optional[str] = None):
    """The QQMM module tree (names as in the checkpoint) from its config.json, weights uninitialised."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    NaViT, Abstractor = _modules()
    lm_config = dict(config["language_model_config"])
    lm_config = AutoConfig.for_model(**{k: v for k, v in lm_config.items() if k not in ("_name_or_path",)})
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}

    class QQMM(nn.Module):
        def __init__(self):
            super().__init__()
            vision = config["vision_model_config"]
            self.vision_model = NaViT(vision)
            self.vision_abstractor = Abstractor(**config["vision_abstractor_config"], in_dim=vision["hidden_size"],
                                                out_dim=lm_config.hidden_size)
            self.language_model = AutoModelForCausalLM.from_config(lm_config, **kwargs)

    with torch.device("meta"):
        model = QQMM()
    return model


def load_qqmm(folder: Path, dtype, device: str, attn_implementation: Optional[str] = None):
    import torch
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "qqmm":
        raise ValueError(f"{folder}/config.json: model_type is {config.get('model_type')!r}, not 'qqmm': "
                         "teacher.kind: qqmm reads QQMM-embed checkpoints (QQ-MM/QQMM-embed)")
    model = build_qqmm(config, attn_implementation)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors weights")
    wanted = {k for k in model.state_dict() if not k.startswith("language_model.lm_head.")}
    seen = set()
    for f in files:
        state = {k: v.to(dtype) for k, v in load_file(str(f), device="cpu").items() if k in wanted}
        model.load_state_dict(state, strict=False, assign=True)
        seen |= set(state)
    missing = sorted(wanted - seen)
    if missing:
        raise ValueError(f"{folder}: {len(missing)} weights missing from the checkpoint (e.g. {missing[:3]})")
    model.language_model.lm_head = torch.nn.Identity()  # the vector is a hidden state: no vocabulary projection
    # buffers that are not in the checkpoint (rotary frequencies) are recomputed on the device
    model.vision_model.inv_freq = _inv_freq(config["vision_model_config"])
    lm = model.language_model.model
    lm.rotary_emb = type(lm.rotary_emb)(config=lm.config)
    return model.to(device).eval(), config


def _inv_freq(vision: dict):
    import torch

    rot = vision["hidden_size"] // vision["num_heads"] // 2
    return 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))


class QQMMTeacher(Teacher):
    """`kind: qqmm`. `teacher.model`: the checkpoint folder (config.json + safetensors); `teacher.tokenizer`: the
    tokenizer folder when the checkpoint has none (QQMM-embed's code repository ships it as
    qqmm/models/Qwen2_5-7B-Instruct)."""

    version = 1

    def __init__(self, cfg):
        super().__init__(cfg)
        import torch
        from tokenizers import AddedToken
        from transformers import AutoTokenizer

        from .hf_vlm import _quiet_transformers

        folder = Path(resolve_model_path(cfg.model)).expanduser()
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.model, config = load_qqmm(folder, self.dtype, self.device, cfg.attn_implementation)
        with _quiet_transformers(errors_only=True):  # config.json is not a transformers model type
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or str(folder))
        if IMAGE_TOKEN not in self.tokenizer.get_vocab():  # QQMM's processor adds it at load: the next id
            self.tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        self.image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if config.get("image_token_id") is not None and config["image_token_id"] != self.image_id:
            raise ValueError(f"{folder}: the checkpoint's image_token_id {config['image_token_id']} is not the "
                             f"tokenizer's {IMAGE_TOKEN} ({self.image_id}): check teacher.tokenizer")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.dim = int(config["language_model_config"]["hidden_size"])
        self.torch = torch

    def format(self, text: str, has_image: bool, role: str, dataset: Optional[str] = None) -> str:
        text = self.strip_placeholder(text)
        text = self.instruction_for(text, role, dataset) + text
        user = IMAGE_TOKEN + "\n" + text if has_image else text
        system = self.cfg.system_prompt or SYSTEM_PROMPT
        return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                "<|im_start|>assistant\n")

    def prepare_image(self, image):
        return image.convert("RGB") if image.mode != "RGB" else image

    def model_inputs(self, prompts: list[str], images: Optional[list]) -> dict:
        """Token ids (each image token repeated to the image's count), shared positions, patches and grids; left
        padded."""
        torch = self.torch
        rows, patches, grids = [], [], []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if self.cfg.max_length:
                ids = ids[:self.cfg.max_length]
            if images and images[i] is not None:
                p, grid = image_patches(images[i])
                patches.append(p)
                grids.append(grid)
                at = ids.index(self.image_id)
                ids = ids[:at] + [self.image_id] * image_token_count(grid) + ids[at + 1:]
            rows.append(ids)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
            positions[i, width - len(ids):] = torch.tensor(shared_positions(ids, self.image_id))
        out = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
        if patches:
            out["pixel_values"] = torch.from_numpy(np.concatenate(patches))
            out["grid_sizes"] = torch.tensor(grids)
        return out

    def _forward(self, batch: dict) -> np.ndarray:
        torch = self.torch
        model = self.model
        ids = batch["input_ids"].to(self.device)
        embeds = model.language_model.get_input_embeddings()(ids)
        if "pixel_values" in batch:
            grids = [tuple(g) for g in batch["grid_sizes"].tolist()]
            vision = model.vision_model(batch["pixel_values"].to(self.device, self.dtype), grids)
            vision = model.vision_abstractor(vision, grids)
            embeds = embeds.masked_scatter((ids == self.image_id)[..., None], vision.to(embeds.dtype))
        mask = batch["attention_mask"].to(self.device)
        out = model.language_model.model(inputs_embeds=embeds, attention_mask=mask,
                                         position_ids=batch["position_ids"].to(self.device), use_cache=False)
        return out.last_hidden_state[:, -1].float().cpu().numpy()  # left padded: the last column is the last token

    def embed(self, texts: list[str], images: list, role: str, dataset: Optional[str] = None) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with self.torch.inference_mode():
            for i in range(len(texts)):  # one item a call, as QQMM's EmbedBot: no padding reaches the model
                image = self.prepare_image(images[i]) if images[i] is not None else None
                batch = self.model_inputs([self.format(texts[i], image is not None, role, dataset)],
                                          [image] if image is not None else None)
                out[i] = self._forward(batch)[0]
        return normalise(out)

    @classmethod
    def fingerprint_parts(cls, cfg) -> dict:
        return {**super().fingerprint_parts(cfg), "encoding": "qqmm-embed-v1 chat.py"}

    @classmethod
    def tokens_per_item(cls, cfg) -> int:
        return (cfg.max_length or 256) + MAX_CELLS
