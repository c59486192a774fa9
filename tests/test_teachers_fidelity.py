"""Fidelity of the decoder-VLM teacher to VLM2Vec's training-time encoding (TIGER-AI-Lab/VLM2Vec, Qwen2-VL backbone),
on a tiny random Qwen2-VL checkpoint saved and loaded like a real one.

The reference inputs are written here from VLM2Vec's published recipe, not with the teacher's code: the MMEB text
with `<|image_1|>` replaced by the bare `<|image_pad|>` (expanded to one token per 2x2 patch group); the image resized
once (PIL bicubic) by Qwen2-VL's rule within VLM2Vec's 3136-1003520 pixels, normalised with the CLIP mean / std and
cut into 14-pixel patches in Qwen2-VL's order; positions 0..n-1 (VLM2Vec's code finds no `<|vision_start|>`, so it
never gives image tokens 3-D positions); the last token's final hidden state, L2-normalised.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tiny_vlms import save_tiny_qwen2_vl

from pipeline.config import TeacherConfig, config_from_dict
from pipeline.teachers import load_teacher, teacher_fingerprint

ROOT = Path(__file__).resolve().parents[1]
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
COS = 0.99999


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2vl") / "m")


@pytest.fixture(scope="module")
def photo():
    """A 900 x 700 image with structure (VLM2Vec's rule keeps it at 896 x 700: 32 x 25 groups of 2x2 patches)."""
    y, x = np.mgrid[0:700, 0:900]
    rgb = np.stack([(x * 255 // 899), (y * 255 // 699), ((x // 37 + y // 23) % 2) * 255], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def vlm2vec_teacher(folder, **overrides):
    """The teacher section of configs/vlm2vec.yaml, pointed at the tiny checkpoint, float32 on CPU."""
    section = yaml.safe_load((ROOT / "configs/vlm2vec.yaml").read_text())["teacher"]
    section.update(model=str(folder), dtype="float32", device="cpu", batch_size=4, **overrides)
    cfg = config_from_dict({"input": {"pairs": ["x.jsonl"]}, "teacher": section}).teacher
    return load_teacher(cfg)


def reference_pixels(image: Image.Image, width: int, height: int):
    """Qwen2-VL's patches of `image` resized to width x height: (grid_h * grid_w, 3 * 2 * 14 * 14), grid (1, gh, gw)."""
    arr = (np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), np.float32) / 255 - MEAN) / STD
    frames = np.repeat(arr.transpose(2, 0, 1)[None], 2, axis=0)  # one still image = two identical frames
    gh, gw = height // 14, width // 14
    p = frames.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return p.reshape(gh * gw, 3 * 2 * 14 * 14), np.array([[1, gh, gw]])


def reference_vector(folder, ids, pixels=None, grid=None):
    """VLM2Vec's encode path: the backbone on (ids, pixels, sequential positions), last token, normalised."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([ids])
    positions = torch.arange(ids.shape[1])[None, None].expand(3, 1, -1)
    kwargs = {}
    if pixels is not None:
        kwargs = {"pixel_values": torch.from_numpy(pixels), "image_grid_thw": torch.from_numpy(grid)}
    with torch.inference_mode():
        h = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions, **kwargs)
    v = h.last_hidden_state[0, -1].numpy()
    return v / np.linalg.norm(v)


CASES = [  # (MMEB text, with image?, VLM2Vec's prompt before the image token is expanded)
    ("<|image_1|>\nRepresent the given image for classification", True,
     "<|image_pad|>\nRepresent the given image for classification"),
    ("<|image_1|>", True, "<|image_pad|>"),  # bare placeholder: no "\n" after the image, the image's last token pooled
    ("<|image_1|> Find a caption for the news in the given photo.", True,
     "<|image_pad|> Find a caption for the news in the given photo."),
    ("A red fire truck parked by the station. ", False, "A red fire truck parked by the station. "),
]


@pytest.mark.parametrize("text,with_image,prompt", CASES)
def test_vlm2vec_config_reproduces_training_encoding(qwen, photo, text, with_image, prompt):
    teacher = vlm2vec_teacher(qwen)
    tok = teacher.runner.tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert teacher.format(text, with_image, "query") == prompt
    if with_image:
        pixels, grid = reference_pixels(photo, 896, 700)
        n_image = 32 * 25
        ids = tok(prompt.replace("<|image_pad|>", "<|image_pad|>" * n_image))["input_ids"]
        assert ids.count(pad) == n_image
    else:
        pixels = grid = None
        ids = tok(prompt)["input_ids"]
    image = [teacher.prepare_image(photo)] if with_image else None
    assert image is None or image[0].size == (896, 700)
    batch = teacher.model_inputs([prompt], image)
    assert batch["input_ids"][0].tolist() == ids
    # sequential positions in all three M-RoPE sections, whatever the transformers version would compute itself
    assert batch["position_ids"].shape == (3, 1, len(ids))
    assert (batch["position_ids"] == np.arange(len(ids))).all()
    if with_image:
        assert batch["image_grid_thw"].tolist() == grid.tolist()
        assert np.abs(batch["pixel_values"].numpy() - pixels).max() < 1e-4
    ref = reference_vector(qwen, ids, pixels, grid)
    got = teacher.embed([text], [photo if with_image else None], "query")[0]
    assert float(got @ ref) >= COS


def test_a_batch_of_mixed_items_matches_the_reference_item_by_item(qwen, photo):
    """Left padding, text and image items in one call: each vector is still the reference's."""
    teacher = vlm2vec_teacher(qwen)
    small = photo.resize((90, 40))  # 84 x 28 is under 3136 pixels: scaled up to 84 x 56, 3 x 2 groups
    texts = [c[0] for c in CASES[:2]] + [CASES[3][0], "<|image_1|>\nRepresent the given image."]
    images = [photo, small, None, small]
    got = teacher.embed(texts, images, "query")
    tok = teacher.runner.tokenizer
    assert teacher.prepare_image(small).size == (84, 56)
    refs = []
    for text, image in zip(texts, images):
        prompt = text.replace("<|image_1|>", "<|image_pad|>")
        if image is None:
            refs.append(reference_vector(qwen, tok(prompt)["input_ids"]))
            continue
        w, h = (896, 700) if image is photo else (84, 56)
        pixels, grid = reference_pixels(image, w, h)
        n = (w // 28) * (h // 28)
        refs.append(reference_vector(qwen, tok(prompt.replace("<|image_pad|>", "<|image_pad|>" * n))["input_ids"],
                                     pixels, grid))
    assert (np.einsum("ij,ij->i", got, np.stack(refs)) >= COS).all()


def test_squash_resolution_and_what_each_option_changes(qwen, photo):
    """VLM2Vec's "mid" / "high" squash (then the processor bound); each option is in the cache key and changes the
    encoding where VLM2Vec's and the model's own defaults differ."""
    strip = vlm2vec_teacher(qwen).prepare_image(photo.resize((8000, 35)))  # > 200:1 -> a square, then bounded
    assert strip.size == (980, 980)
    mid = vlm2vec_teacher(qwen, image_resize="squash", image_size=[672, 672])
    assert mid.prepare_image(photo).size == (672, 672)
    high = vlm2vec_teacher(qwen, image_resize="squash", image_size=[1344, 1344])
    assert high.prepare_image(photo).size == (980, 980)  # 1344^2 > 1003520 pixels: Qwen2-VL's rule brings it down
    pixels, grid = reference_pixels(photo.resize((672, 672), Image.Resampling.BICUBIC), 672, 672)
    batch = mid.model_inputs(["<|image_pad|>"], [mid.prepare_image(photo)])
    assert batch["image_grid_thw"].tolist() == [[1, 48, 48]]
    assert np.abs(batch["pixel_values"].numpy() - pixels).max() < 1e-4

    base = dict(kind="hf-vlm", model=str(qwen), image_token="<|image_pad|>")
    prints = {teacher_fingerprint(TeacherConfig(**base, **kw), "query") for kw in (
        {}, {"position_ids": "sequential"}, {"image_resize": "smart"}, {"prompt_format": "replace"},
        {"image_resize": "squash", "image_size": [672, 672]}, {"image_resize": "squash", "image_size": [1344, 1344]})}
    assert len(prints) == 6
    # the model's own positions (M-RoPE from transformers 5.3 on) are left to the model: no position ids passed
    own = vlm2vec_teacher(qwen, position_ids="model")
    assert "position_ids" not in own.model_inputs(["<|image_pad|>"], [own.prepare_image(photo)])
    # plain format adds "\n" after a bare image, replace does not
    assert vlm2vec_teacher(qwen, prompt_format="plain").format("<|image_1|>", True, "query") == "<|image_pad|>\n"


def test_squash_without_a_size_is_a_config_error():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="image_size"):
        config_from_dict({"input": {"pairs": ["x.jsonl"]},
                          "teacher": {"kind": "hf-vlm", "model": "m", "image_resize": "squash"}})


# LLaVA-OneVision (anyres_max_9), tiny checkpoint: 32-pixel tiles of 8-pixel patches (4 x 4 features a tile), tile
# grids (height, width) 32x32, 32x64, 64x32, 64x64. The image-token count follows LLaVA-OneVision's rule: the grid
# whose downscaled image keeps the most pixels (then wastes the fewest), its features cropped to the image's aspect
# ratio, one newline feature per row, plus the 16 features of the whole image squashed to one tile:
LLAVA_CASES = [((900, 700), (2, 2), 16 + 6 * (8 + 1)),   # 64x64 grid: 8x8 features, 6 rows kept for 900:700
               ((40, 120), (2, 1), 16 + 8 * (2 + 1)),    # 64x32 grid (2 tiles high): 8x4 features, 2 columns kept
               ((32, 32), (1, 1), 16 + 4 * (4 + 1))]     # one tile


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from tiny_vlms import save_tiny_llava_onevision

    return save_tiny_llava_onevision(tmp_path_factory.mktemp("llava") / "m")


@pytest.mark.parametrize("size,tiles,n_image", LLAVA_CASES)
def test_llava_onevision_image_tokens_pixels_and_vector(llava, photo, size, tiles, n_image):
    import torch
    from transformers import AutoModel

    teacher = load_teacher(TeacherConfig(kind="hf-vlm", model=str(llava), dtype="float32", device="cpu"))
    image = photo.resize(size)
    text = "<|image_1|>\nRepresent the given image for classification"
    prompt = teacher.format(text, True, "query")
    assert prompt == "<image>\nRepresent the given image for classification"
    tok = teacher.runner.tokenizer
    ids = tok("<image>" * n_image + "\nRepresent the given image for classification")["input_ids"]
    batch = teacher.model_inputs([prompt], [teacher.prepare_image(image)])
    assert batch["input_ids"][0].tolist() == ids
    assert "position_ids" not in batch  # 1-D RoPE: the model's own 0..n-1
    assert batch["image_sizes"].tolist() == [[size[1], size[0]]]
    assert batch["pixel_values"].shape == (1, 1 + tiles[0] * tiles[1], 3, 32, 32)
    # the first tile is the whole image squashed to 32 x 32, normalised with the checkpoint's CLIP mean / std
    base = (np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 255 - MEAN) / STD
    assert np.abs(batch["pixel_values"][0, 0].numpy() - base.transpose(2, 0, 1)).max() < 1e-4
    model = AutoModel.from_pretrained(llava, dtype=torch.float32).eval()
    ids_t = torch.tensor([ids])
    with torch.inference_mode():
        out = model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), position_ids=torch.arange(len(ids))[None],
                    pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    ref = out.last_hidden_state[0, -1].numpy()
    got = teacher.embed([text], [image], "query")[0]
    assert float(got @ (ref / np.linalg.norm(ref))) >= COS


def test_decode_stage_leaves_resizing_to_the_teacher_in_smart_and_squash_modes(tmp_path, photo):
    """One resize by the family's rule, not the decode stage's bound first (two resamplings change the pixels)."""
    import pyarrow as pa

    from pipeline.embed import decode_images, to_pil
    from pipeline.teachers.base import decode_bounds

    photo.save(tmp_path / "p.png")
    base = dict(kind="hf-vlm", model="m", min_pixels=3136, max_pixels=56 * 56 * 4)
    for mode, extra, size in (("bound", {}, (126, 98)), ("smart", {}, (900, 700)),
                              ("squash", {"image_size": [672, 672]}, (900, 700))):
        bounds = decode_bounds(TeacherConfig(**base, image_resize=mode, **extra))
        table = decode_images(pa.table({"paths": [["p.png"]]}), {"paths": "images"}, str(tmp_path),
                              10 ** 8, min_pixels=bounds[0], max_pixels=bounds[1])
        assert to_pil(table.column("images").to_pylist()[0])[0].size == size, mode
