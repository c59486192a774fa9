"""The read stage as block tasks (pipeline/read_blocks.py) writes the one-task read's files, byte for byte, whatever
the block size, with the same rejects in the same order and the same errors."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus import base_config, copy_images, demo_items, write_jsonl
from pipeline.config import config_from_dict
from pipeline.read import InputError, load_corpus
from pipeline.read_blocks import read_blocks
from pipeline.search import write_corpus


def _input(tmp_path):
    items = demo_items(6)
    root = copy_images(tmp_path, items)
    rows = []
    for i, it in enumerate(items * 3):
        row = {"id": f"q{i}", "dataset": "a" if i % 3 else "b", "qry": f"{it['caption']} {i % 7}",
               "pos_text": f"clip art of {it['category']}", "grp": it["category"].split("/")[0]}
        if i % 4 == 0:
            row["pos_image_path"] = it["image_path"]
        if i % 5 == 0:
            row["neg_text"] = [f"not {it['caption']}", " ", items[(i + 1) % 6]["caption"]]
        if i % 6 == 1:
            row["pos_extra_text"] = [f"also {it['category']}", f"clip art of {it['category']}"]
        rows.append(row)
    rows += [{"id": "q3", "qry": rows[3]["qry"], "pos_text": rows[3]["pos_text"], "dataset": "a",
              "grp": rows[3]["grp"]},  # the same id and content as an earlier block's row: a repeated row
             {"id": "q4", "qry": "other", "pos_text": "content"},  # the same id, other content
             {"qry": "no id", "pos_text": "one", "dataset": "a"},
             {"id": "bad-image", "qry": "x", "pos_image_path": "images/nope.png"},
             {"id": "empty", "qry": "  ", "pos_text": "x"},
             {"qry": "no id", "pos_text": "one", "dataset": "a", "neg_text": ["x"]},  # no id, same content
             {"qry": "no id 2", "pos_text": "two", "dataset": "a", "neg_image_path": ["images/nope.png"]},
             {"id": "extra-bad", "qry": "y", "pos_text": "z", "pos_extra_text": ["", "fine"], "grp": "g9"}]
    pairs = write_jsonl(tmp_path / "one.jsonl", rows)
    with open(pairs, "a") as f:
        f.write("{broken\n\n")
        f.write(json.dumps({"qry": "after", "pos_text": "the broken line", "dataset": "b"}) + "\n")
    pq.write_table(pa.table({"id": ["p0", "q1", "p2", "p3", None, None],
                             "qry": ["cat", "dog", "red", "cat", "sun", "sun"],
                             "pos_text": ["a cat", "a dog", "a ball", "a cat", "a sun", "a sun"],
                             "grp": ["g2", None, "g1", "g2", None, None]}), tmp_path / "two.parquet", row_group_size=2)
    candidates = write_jsonl(tmp_path / "cands.jsonl", [
        {"text": "a cat"}, {"text": "moon", "dataset": "other"}, {"text": "sun", "grp": "g3"}, {"text": ""},
        {"text": "star", "dataset": "a", "image_path": items[0]["image_path"]}, {"image_path": "images/nope.png"},
        {"text": "comet"}, {"text": "moon", "dataset": "late"}])
    raw = base_config(pairs, str(tmp_path / "cache"), retrieve={"block_rows": 4})
    raw["input"].update(pairs=[str(pairs), str(tmp_path / "two.parquet")], candidates=str(candidates),
                        group_key="grp", image_root=str(root), max_reject_fraction=0.9)
    return config_from_dict(raw)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_blocks_write_the_one_task_read_s_files_byte_for_byte(tmp_path, monkeypatch):
    import pipeline.read as read

    cfg = _input(tmp_path)
    one = write_corpus(load_corpus(cfg.input, caption_mode=False), tmp_path / "one", cfg.retrieve.block_rows)
    reasons = [(r["query_id"], r["reason"]) for r in one.rejects]
    assert {"duplicate_row", "duplicate_id", "missing_image", "empty_text", "bad_json"} <= {r for _, r in reasons}
    assert ("a:23", "duplicate_row") in reasons  # a row without an id, named by its place in the file
    expected = _files(tmp_path / "one")
    for block_rows, batch_rows in ((1, 10_000), (3, 10_000), (7, 2), (10_000, 10_000), (10_000, 3)):
        monkeypatch.setattr(read, "BATCH_ROWS", batch_rows)  # a block reads its rows a batch at a time
        meta = read_blocks(cfg, tmp_path / f"blocks-{block_rows}-{batch_rows}", use_ray=False,
                           block_rows=block_rows)
        assert meta == one, block_rows
        files = _files(tmp_path / f"blocks-{block_rows}-{batch_rows}")
        assert sorted(files) == sorted(expected)
        for name, data in expected.items():
            assert files[name] == data, (block_rows, name)


@pytest.mark.parametrize("case", ["duplicate", "columns", "document", "no rows", "mostly broken"])
def test_blocks_raise_the_one_task_read_s_errors(tmp_path, case):
    """A user error found in any block is the error the one-task read raises, word for word."""
    pairs = tmp_path / "pairs.jsonl"
    if case == "duplicate":  # a duplicate id in another block, with a reject rate that stops the run
        write_jsonl(pairs, [{"id": "x", "qry": "a", "pos_text": "b"}] + [{"id": "x", "qry": "c", "pos_text": "d"}] * 3)
    elif case == "columns":
        write_jsonl(pairs, [{"question": "a", "pos_text": "b"}] * 3)
    elif case == "document":
        pairs.write_text('\n\n{\n  "qry": "a",\n  "pos_text": "b"\n}\n')
    elif case == "no rows":
        pairs.write_text("\n\n\n")
    else:
        write_jsonl(pairs, [{"qry": "a", "pos_text": "b"}, {"qry": " ", "pos_text": "b"}, {"qry": "x", "pos_text": ""},
                            {"qry": "y", "pos_text": 3}])
    cfg = config_from_dict(base_config(pairs, str(tmp_path / "cache")))
    with pytest.raises(InputError) as one:
        load_corpus(cfg.input, caption_mode=False)
    for block_rows in (1, 2):
        error = read_blocks(cfg, tmp_path / f"blocks-{block_rows}", use_ray=False, block_rows=block_rows)
        assert isinstance(error, InputError) and str(error) == str(one.value), (block_rows, str(one.value))


def test_blocks_as_ray_tasks_write_the_same_files(ray_session, tmp_path):
    """The block tasks and the assembling task in Ray workers: the files and metadata of the one-task read."""
    cfg = _input(tmp_path)
    one = write_corpus(load_corpus(cfg.input, caption_mode=False), tmp_path / "one", cfg.retrieve.block_rows)
    assert read_blocks(cfg, tmp_path / "ray", use_ray=True, block_rows=5) == one
    assert _files(tmp_path / "ray") == _files(tmp_path / "one")
