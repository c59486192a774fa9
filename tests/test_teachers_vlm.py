"""The decoder-VLM teacher (`kind: hf-vlm`) on tiny random checkpoints of two real architectures, Qwen2-VL and
LLaVA-OneVision, saved and loaded like real ones; and one end-to-end mining run with it on the demo images."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from corpus import DEMO, copy_images, demo_items, write_jsonl
from tiny_vlms import save_tiny_llava_onevision, save_tiny_qwen2_vl

from pipeline.config import TeacherConfig, config_from_dict
from pipeline.mine import mine
from pipeline.teachers import load_teacher, teacher_fingerprint
from pipeline.teachers.base import call_embed

TOL = 1e-4  # float32 on CPU: the same item in another batch or padded on the other side, up to summation order
ARCHS = {"qwen2_vl": save_tiny_qwen2_vl, "llava_onevision": save_tiny_llava_onevision}


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {name: save(root / name) for name, save in ARCHS.items()}


@pytest.fixture(scope="module")
def images():
    return [Image.open(DEMO / it["image_path"]).convert("RGB") for it in demo_items(3)]


def teacher(folder, **kw):
    return load_teacher(TeacherConfig(kind="hf-vlm", model=str(folder), **kw))


ITEMS = [("<|image_1|>\nRepresent the given image for classification", 0),  # image + text (MMEB style)
         ("a strawberry on a plate, drawn in a simple style", None),         # text only
         ("", 1),                                                            # image only
         ("short", None),
         ("<|image_1|> what flag is this?", 2)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_vectors_do_not_depend_on_batch_or_padding_side(vlms, images, arch):
    texts = [t for t, _ in ITEMS]
    imgs = [images[i] if i is not None else None for _, i in ITEMS]
    left, right = teacher(vlms[arch]), teacher(vlms[arch], padding_side="right")
    v = left.embed(texts, imgs, "query")
    assert v.shape == (len(texts), left.dim) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    alone = np.concatenate([left.embed([t], [im], "query") for t, im in zip(texts, imgs)])
    assert np.abs(v - alone).max() < TOL
    assert np.abs(v - right.embed(texts, imgs, "query")).max() < TOL
    assert np.abs(v - right.embed(texts[::-1], imgs[::-1], "query")[::-1]).max() < TOL
    # text-only, image-only and image+text items all embed, to distinct points
    assert len({tuple(np.round(row, 4)) for row in v}) == len(texts)
    # mean pooling is another vector, and padding-invariant as well
    mean = teacher(vlms[arch], pooling="mean")
    m = mean.embed(texts, imgs, "query")
    assert np.abs(m - v).max() > 1e-3
    assert np.abs(m - np.concatenate([mean.embed([t], [im], "query") for t, im in zip(texts, imgs)])).max() < TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prompts_image_token_and_pixel_bounds(vlms, images, arch):
    t = teacher(vlms[arch])
    token = t.runner.image_text
    # the data's placeholder becomes the model's own image token (Qwen2-VL: wrapped in vision start/end)
    assert t.format("<|image_1|>\nRepresent the given image.", True, "query") == \
        token + "\nRepresent the given image."
    assert ("<|vision_start|>" in token) == (arch == "qwen2_vl")
    assert t.format("<|image_1|> no image here", False, "query") == "no image here"
    assert t.format("a caption", True, "query") == token + "\na caption"
    chat = teacher(vlms[arch], prompt_format="chat", system_prompt="You embed.")
    prompt = chat.format("a caption", True, "query")
    assert prompt.startswith("<|im_start|>system\nYou embed.") and prompt.endswith("<|im_start|>assistant\n")
    # per-dataset instructions: a prompt change changes the vector and the fingerprint
    cfg = dict(instructions={"vqa": {"query": "Represent the given image with the following question: "}})
    inst = teacher(vlms[arch], **cfg)
    assert inst.format("what flag?", True, "query", "vqa") == \
        token + "\nRepresent the given image with the following question: what flag?"
    a = call_embed(inst, ["what flag?"], [images[2]], "query", "vqa")
    b = call_embed(inst, ["what flag?"], [images[2]], "query", "other")
    assert np.abs(a - b).max() > 1e-3
    tc = TeacherConfig(kind="hf-vlm", model=str(vlms[arch]), **cfg)
    assert teacher_fingerprint(tc, "query", "vqa") != teacher_fingerprint(tc, "query", "other")
    assert teacher_fingerprint(tc, "candidate", "vqa") == teacher_fingerprint(tc, "candidate", "other")
    # image size bounds: fewer pixels, fewer image tokens, another vector
    big = images[0].resize((224, 224))
    bounded = teacher(vlms[arch], max_pixels=32 * 32)
    n_tokens = lambda tt: int(tt.runner.inputs([tt.format("", True, "query")],  # noqa: E731
                                               [[tt.prepare_image(big)]])["input_ids"].shape[1])
    assert n_tokens(bounded) < n_tokens(t)
    assert np.abs(bounded.embed([""], [big], "query") - t.embed([""], [big], "query")).max() > 1e-4
    assert not t.cfg.trust_remote_code  # remote code is an explicit opt-in


def test_mines_demo_images_end_to_end_with_per_dataset_instructions(ray_session, vlms, tmp_path, shared_cache):
    """Two tasks over real images (image -> caption, caption -> image), each with its own query instruction."""
    items = demo_items(16)
    copy_images(tmp_path, items)
    rows = []
    for i, it in enumerate(items):
        rows.append({"id": f"i2t{i}", "dataset": "i2t", "qry": "<|image_1|>\n", "qry_image_path": it["image_path"],
                     "pos_text": it["caption"]})
        rows.append({"id": f"t2i{i}", "dataset": "t2i", "qry": it["caption"],
                     "pos_text": "<|image_1|>\nRepresent the given image.", "pos_image_path": it["image_path"]})
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = config_from_dict({
        "input": {"pairs": [str(pairs)], "image_root": str(tmp_path)},
        "teacher": {"kind": "hf-vlm", "model": str(vlms["qwen2_vl"]), "batch_size": 16, "max_pixels": 56 * 56,
                    "instructions": {"i2t": {"query": "Find an image caption describing the given image: "},
                                     "t2i": {"query": "Find me an image that matches the given caption: "}}},
        "embed": {"cache_dir": shared_cache, "num_actors": 1},
        "retrieve": {"top_k": 8}, "filters": {"margin_rel": None, "near_duplicate": None, "positive_quantile": None},
        "sample": {"n_negatives": 2}, "run": {"progress": False}})
    result = mine(cfg, tmp_path / "out")
    frame = pd.read_parquet(result.epoch_dir)
    assert len(frame) == 32 and (frame.num_negatives == 2).all()
    i2t = frame[frame.dataset == "i2t"]
    captions = {it["caption"] for it in items}
    assert all(set(n) <= captions for n in i2t.neg_text)  # per-dataset pools: a caption task gets captions
    assert all(all(p.startswith("images/") for p in n) for n in frame[frame.dataset == "t2i"].neg_image_path)
    stats = json.loads((result.epoch_dir / "_stats.json").read_text())
    queries = stats["embed"]["queries"]
    assert set(queries["fingerprints"]) == {"i2t", "t2i"} and queries["items"] == 32
    assert stats["embed"]["candidates"]["items"] == 32  # no candidate instruction: one vector per item
    assert np.isfinite(np.concatenate(frame.neg_scores.to_list())).all()
