"""configs/mmeb.yaml on a tiny tree in the published MMEB-train layout (20 subsets, one Parquet per subset and split,
images under images/SUBSET/, `<|image_1|>` in the texts), and image sources: an fsspec `memory://` image root and
URI schemes in the data that `input.allowed_schemes` allows or refuses."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus import DEMO, demo_items, write_jsonl

from pipeline.config import InputConfig, load_config
from pipeline.embed import decode_images, to_pil
from pipeline.mine import mine
from pipeline.read import load_corpus

ROOT = Path(__file__).resolve().parents[1]
IMG = "<|image_1|>\n"
VQA = IMG + "Represent the given image with the following question: "
SUBSETS = {  # subset -> (query text, query has image, positive text, positive has image), as the published files
    "ImageNet_1K": (IMG + "Represent the given image for classification", True, "{label}", False),
    "N24News": (IMG + "Represent the given news image with the following caption for domain classification: "
                "{caption}", True, "{label}", False),
    "HatefulMemes": (IMG + "Represent the given image for binary classification to determine whether it constitutes"
                     " hateful speech or not", True, "{label}", False),
    "VOC2007": (IMG + "Identify the object shown in the image", True, "{label}", False),
    "SUN397": (IMG + "Identify the scene shown in the image", True, "{label}", False),
    **{name: (VQA + "what is shown in {caption}?", True, "{caption}", False)
       for name in ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W")},
    "VisDial": ("Represent the given dialogue about an image, which is used for image retrieval: Q: what is it? "
                "A: {caption}", False, IMG + "Represent the given image.", True),
    "CIRR": (IMG + "Given an image, find a similar everyday image with the described changes: more {label}", True,
             IMG + "Represent the given image.", True),
    "VisualNews_t2i": ("Retrieve an image of this news caption. {caption}", False, IMG + "Represent the given image.",
                       True),
    "VisualNews_i2t": (IMG + "Find a caption for the news in the given photo.", True, "{caption}", False),
    "MSCOCO_t2i": ("Find me an everyday image that matches the given caption: {caption}", False,
                   IMG + "Represent the given image.", True),
    "MSCOCO_i2t": (IMG + "Find an image caption describing the given everyday image.", True, "{caption}", False),
    "NIGHTS": (IMG + "Find a day-to-day image that looks similar to the provided image.", True,
               IMG + "Represent the given image.", True),
    "WebQA": (IMG + "Find a Wikipedia image that answers this question: which {label}?", False,
              IMG + "Represent the given Wikipedia image with related text information: {caption}", True),
    "MSCOCO": (IMG + 'Select the portion of the image that isolates the object labeled as "{label}"', True,
               IMG + "Represent the given cropped image of the object", True),
}
ROWS = 4


def build_tree(root: Path) -> Path:
    """ROOT/data/MMEB-train/SUBSET/original-00000-of-00001.parquet (+ one diverse_instruction split), images under
    images/SUBSET/Train/, and ROOT/configs/mmeb.yaml copied from the repository."""
    tree = root / "data" / "MMEB-train"
    items = demo_items(ROWS * 2)
    for s, (subset, (qry, qry_img, pos, pos_img)) in enumerate(SUBSETS.items()):
        rows = []
        for i in range(ROWS):
            a, b = items[i], items[(i + s) % len(items)]
            image_dir = tree / "images" / subset / "Train"
            image_dir.mkdir(parents=True, exist_ok=True)
            qpath, ppath = f"images/{subset}/Train/q{i}.png", f"images/{subset}/Train/p{i}.png"
            shutil.copyfile(DEMO / a["image_path"], tree / qpath)
            shutil.copyfile(DEMO / b["image_path"], tree / ppath)
            fill = {"caption": a["caption"], "label": a["category"].split("/")[-1]}
            rows.append({"qry": qry.format(**fill), "qry_image_path": qpath if qry_img else "",
                         "pos_text": pos.format(**fill), "pos_image_path": ppath if pos_img else "",
                         "neg_text": "", "neg_image_path": ""})
        (tree / subset).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), tree / subset / "original-00000-of-00001.parquet")
        if subset == "ImageNet_1K":
            diverse = [{**r, "qry": r["qry"].replace("for classification", "by its class")} for r in rows]
            pq.write_table(pa.Table.from_pylist(diverse), tree / subset / "diverse_instruction-00000-of-00001.parquet")
    (root / "configs").mkdir(exist_ok=True)
    shutil.copyfile(ROOT / "configs" / "mmeb.yaml", root / "configs" / "mmeb.yaml")
    return tree


def test_mmeb_config_mines_the_published_layout(ray_session, tmp_path, shared_cache):
    tree = build_tree(tmp_path)
    cfg = load_config(tmp_path / "configs" / "mmeb.yaml", [
        # a model-free teacher by import path stands in for the VLM (the same config otherwise)
        "teacher.kind=custom", "teacher.cls=pipeline.teachers.examples:HashingTeacher", "teacher.batch_size=auto",
        f"embed.cache_dir={shared_cache}", "retrieve.top_k=3", "sample.n_negatives=1", "filters.margin_rel=null",
        "filters.near_duplicate=null", "filters.positive_quantile=null", "run.progress=false", "embed.num_actors=1"])
    assert len(cfg.input.pairs) == 20 and cfg.input.image_root == str(tree)
    assert set(cfg.teacher.instructions) == set(SUBSETS)
    cfg.input.pairs.append(str(tree / "ImageNet_1K" / "diverse_instruction-00000-of-00001.parquet"))
    result = mine(cfg, tmp_path / "out")
    frame = pd.read_parquet(result.epoch_dir)
    stats = result.stats
    assert stats["queries_in"] == 21 * ROWS and stats["queries_rejected"] == 0 and len(frame) == 21 * ROWS
    assert set(frame.dataset) == set(SUBSETS)  # the subset folder names the dataset
    assert frame.query_id.is_unique and "ImageNet_1K:diverse_instruction-00000-of-00001:0" in set(frame.query_id)
    # per-subset candidate pools: every negative is a positive of the query's own subset
    positives = frame.groupby("dataset").pos_item_id.agg(set)
    for ds, negs in zip(frame.dataset, frame.neg_item_ids):
        assert set(negs) <= positives[ds]
    fingerprints = stats["embed"]["queries"]["fingerprints"]  # one per instruction: the six VQA subsets share one
    assert set(fingerprints) == set(SUBSETS) and len(set(fingerprints.values())) == len(SUBSETS) - 5
    assert fingerprints["OK-VQA"] == fingerprints["ChartQA"] != fingerprints["ImageNet_1K"]
    assert stats["retrieval"]["VisDial"]["pool"] == ROWS
    assert 1 <= stats["embed"]["candidates"]["batch_size"] <= 64  # `auto` on CPU actors: a power of two, <= 64


def test_teacher_configs_load_on_the_mmeb_layout(tmp_path):
    tree = build_tree(tmp_path)
    for name in ("clip", "siglip", "vlm2vec", "qqmm"):
        shutil.copyfile(ROOT / "configs" / f"{name}.yaml", tmp_path / "configs" / f"{name}.yaml")
        cfg = load_config(tmp_path / "configs" / f"{name}.yaml")
        assert [Path(p).parent.name for p in cfg.input.pairs] == sorted(SUBSETS), name
        assert cfg.input.image_root == str(tree) and cfg.input.dataset == "{parent}"
        assert cfg.teacher.kind in ("hf-clip", "hf-vlm", "qqmm") and not cfg.teacher.trust_remote_code


def test_mmeb_instructions_are_not_doubled():
    from pipeline.config import TeacherConfig
    from pipeline.teachers import load_teacher

    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "mmeb.yaml").read_text())["teacher"]
    cfg = TeacherConfig(kind="custom", cls="pipeline.teachers.examples:HashingTeacher",
                        instructions=raw["instructions"])
    t = load_teacher(cfg)
    fill = {"caption": "a red fruit", "label": "fruit"}
    for subset, (qry, _, pos, _) in SUBSETS.items():
        assert t.instruction_for(qry.format(**fill), "query", subset) == "", subset
        assert t.instruction_for(pos.format(**fill), "candidate", subset) == "", subset
        # data without the instruction (a re-export that stripped it) gets the subset's own
        assert t.instruction_for("a red fruit", "query", subset) == raw["instructions"][subset]["query"]


# -------------------------------------------------------------------------------------------- image sources

@pytest.fixture
def memory_images():
    import fsspec

    fs = fsspec.filesystem("memory")
    paths = []
    for i, it in enumerate(demo_items(3)):
        with fs.open(f"/imgs/{i}.png", "wb") as f:
            f.write((DEMO / it["image_path"]).read_bytes())
        paths.append(f"{i}.png")
    yield paths
    fs.rm("/imgs", recursive=True)


def test_memory_image_root_and_allowed_schemes(tmp_path, memory_images):
    rows = [{"id": "a", "qry": "first", "pos_image_path": memory_images[0]},
            {"id": "b", "qry": "second", "pos_image_path": memory_images[1]},
            {"id": "c", "qry": "third", "pos_image_path": "memory:///imgs/2.png"},   # a URI in the data
            {"id": "d", "qry": "fourth", "pos_image_path": "file:///etc/hostname"}]  # a scheme never allowed
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    refused = load_corpus(InputConfig(pairs=[str(pairs)], image_root="memory://imgs"), caption_mode=False)
    assert sorted(refused.queries.column("query_id").to_pylist()) == ["a", "b"]
    assert {r["query_id"]: r["reason"] for r in refused.rejects} == {"c": "bad_uri_scheme", "d": "bad_uri_scheme"}
    allowed = load_corpus(InputConfig(pairs=[str(pairs)], image_root="memory://imgs", allowed_schemes=["memory"]),
                          caption_mode=False)
    assert sorted(allowed.queries.column("query_id").to_pylist()) == ["a", "b", "c"]
    assert [r["reason"] for r in allowed.rejects] == ["bad_uri_scheme"]
    # the CPU decode stage reads the same sources (and bounds the pixels)
    plan = pa.table({"image_paths": [[memory_images[0], "", "memory:///imgs/2.png"]]})
    out = decode_images(plan, {"image_paths": "images"}, "memory://imgs", 10**8, allowed_schemes=("memory",),
                        max_pixels=24 * 24)
    decoded = to_pil(out.column("images")[0].as_py())
    assert decoded[1] is None and all(im.width * im.height <= 24 * 24 for im in (decoded[0], decoded[2]))
    with pytest.raises(ValueError, match="bad_uri_scheme"):
        decode_images(plan, {"image_paths": "images"}, "memory://imgs", 10**8)
