"""Bad input: every row becomes a query or a reject with its file, row, field and reason."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from corpus import copy_images, demo_items, write_jsonl
from pipeline.config import InputConfig
from pipeline.read import InputError, item_id, load_corpus


@pytest.fixture
def tree(tmp_path):
    items = demo_items(4)
    root = copy_images(tmp_path / "root", items)
    good = open(root / items[0]["image_path"], "rb").read()
    (root / "images" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "images" / "notimage.png").write_bytes(b"this is text, not a PNG")
    Image.new("RGB", (300, 300), "white").save(root / "images" / "big.png")
    os.symlink("/etc/hostname", root / "images" / "escape.png")
    return root, items


def rows_with_every_problem(items):
    ok = [{"id": f"ok{i}", "qry": it["caption"], "pos_image_path": it["image_path"]} for i, it in enumerate(items)]
    bad = [
        {"id": "empty", "qry": "   ", "qry_image_path": "", "pos_text": "x"},
        {"id": "missing", "qry": "a", "pos_image_path": "images/nope.png"},
        {"id": "truncated", "qry": "a", "pos_image_path": "images/truncated.png"},
        {"id": "notimage", "qry": "a", "pos_image_path": "images/notimage.png"},
        {"id": "big", "qry": "a", "pos_image_path": "images/big.png"},
        {"id": "dotdot", "qry": "a", "pos_image_path": "../secret.png"},
        {"id": "absolute", "qry": "a", "pos_image_path": "/etc/passwd"},
        {"id": "symlink", "qry": "a", "pos_image_path": "images/escape.png"},
        {"id": "scheme", "qry": "a", "pos_image_path": "http://example.com/x.png"},
        {"id": "ok0", "qry": "different content", "pos_text": "other"},
        {"id": "ok1", "qry": items[1]["caption"], "pos_image_path": items[1]["image_path"]},
        {"id": "badtype", "qry": 42, "pos_text": "x"},
    ]
    return ok + bad


EXPECTED = {"empty": ("qry", "empty_text"), "missing": ("pos_image_path", "missing_image"),
            "truncated": ("pos_image_path", "corrupt_image"), "notimage": ("pos_image_path", "corrupt_image"),
            "big": ("pos_image_path", "image_too_large"), "dotdot": ("pos_image_path", "path_escapes_root"),
            "absolute": ("pos_image_path", "path_escapes_root"), "symlink": ("pos_image_path", "path_escapes_root"),
            "scheme": ("pos_image_path", "bad_uri_scheme"), "badtype": ("qry", "bad_type")}


def test_every_bad_row_is_rejected_with_its_reason_and_the_good_rows_are_kept(tree):
    root, items = tree
    pairs = write_jsonl(root / "pairs.jsonl", rows_with_every_problem(items))
    corpus = load_corpus(InputConfig(pairs=[str(pairs)], image_root=str(root), max_image_pixels=250 * 250,
                                     max_reject_fraction=0.9), caption_mode=False)
    assert corpus.queries.column("query_id").to_pylist() == ["ok0", "ok1", "ok2", "ok3"]
    by_id = {r["query_id"]: r for r in corpus.rejects}
    for qid, (field, reason) in EXPECTED.items():
        assert (by_id[qid]["field"], by_id[qid]["reason"]) == (field, reason), qid
        assert by_id[qid]["source"] == str(pairs) and isinstance(by_id[qid]["row"], int)
    # the same id with other content is a conflict; the same id with the same content is a repeated row
    dup = [r for r in corpus.rejects if r["query_id"] in ("ok0", "ok1")]
    assert sorted(r["reason"] for r in dup) == ["duplicate_id", "duplicate_row"]
    assert "pairs.jsonl line 1 " in next(r for r in dup if r["reason"] == "duplicate_id")["detail"]
    assert corpus.rows_in == corpus.queries.num_rows + len(corpus.rejects)
    big = by_id["big"]["detail"]
    assert "300x300" in big and "max_image_pixels" in big


def test_wrongly_typed_jsonl_rows_and_broken_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"qry": "a", "pos_text": "b"}\n{"qry": 5, "pos_text": "b"}\nnot json\n[1, 2]\n'
                    '{"qry": "c", "pos_text": "d"}\n')
    corpus = load_corpus(InputConfig(pairs=[str(path)], max_reject_fraction=0.9), caption_mode=False)
    assert corpus.queries.num_rows == 2
    assert sorted(r["reason"] for r in corpus.rejects) == ["bad_json", "bad_json", "bad_type"]
    assert any("line 3 is not valid JSON" in r["detail"] for r in corpus.rejects)
    assert corpus.rows_in == 5


def test_parquet_column_of_the_wrong_type_is_rejected_row_by_row(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"qry": ["a", "b"], "pos_text": pa.array([1, 2], pa.int64())}), path)
    with pytest.raises(InputError, match=r"2 of 2 input rows are unusable.*bad_type.*field pos_text: expected a string"):
        load_corpus(InputConfig(pairs=[str(path)]), caption_mode=False)


def test_file_level_problems_are_clear_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(InputError, match=r"p.jsonl: a pairs file needs a query column .* found columns: answer, question"):
        load_corpus(InputConfig(pairs=[str(path)]), caption_mode=False)
    path = write_jsonl(tmp_path / "q.jsonl", [{"qry": "a", "pos_text": "b"}])
    with pytest.raises(InputError, match="input.group_key is 'label' but the file has no such column"):
        load_corpus(InputConfig(pairs=[str(path)], group_key="label"), caption_mode=False)
    with pytest.raises(InputError, match="unsupported file type '.csv'"):
        load_corpus(InputConfig(pairs=[str(tmp_path / "x.csv")]), caption_mode=False)


def test_identity_is_content_not_spelling(tmp_path):
    rows = [{"id": "a", "qry": "a dog", "pos_text": "A  red\tball "}, {"id": "b", "qry": "a cat", "pos_text": "A red ball"}]
    corpus = load_corpus(InputConfig(pairs=[str(write_jsonl(tmp_path / "p.jsonl", rows))]), caption_mode=False)
    pos = corpus.queries.column("pos_item_id").to_pylist()
    assert pos[0] == pos[1] == item_id("A red ball", "")
    assert corpus.items.num_rows == 3  # two queries, one shared positive
    assert item_id("a red ball", "") != item_id("A red ball", "")  # case is content


def test_caption_mode_needs_a_caption_for_every_image(tree):
    root, items = tree
    captions = root / "captions.jsonl"
    write_jsonl(captions, [{"image_path": it["image_path"], "caption": it["caption"]} for it in items[:3]])
    rows = [{"id": f"q{i}", "qry": "find it", "pos_image_path": it["image_path"]} for i, it in enumerate(items)]
    corpus = load_corpus(InputConfig(pairs=[str(write_jsonl(root / "p.jsonl", rows))], image_root=str(root),
                                     captions=str(captions)), caption_mode=True)
    assert [r["reason"] for r in corpus.rejects] == ["no_caption"]
    embed_texts = dict(zip(corpus.items.column("image_path").to_pylist(), corpus.items.column("embed_text").to_pylist()))
    assert embed_texts[items[0]["image_path"]] == items[0]["caption"]


def test_mostly_broken_input_stops_with_a_clear_message(tmp_path):
    rows = [{"qry": "", "pos_text": "x"}] * 3 + [{"qry": "a", "pos_text": "b"}]
    with pytest.raises(InputError, match=r"3 of 4 input rows are unusable .*empty_text.*Fix the input"):
        load_corpus(InputConfig(pairs=[str(write_jsonl(tmp_path / "p.jsonl", rows))]), caption_mode=False)


# ------------------------------------------------------------------ text kept as written, rows numbered as lines

def test_text_that_is_not_utf8_is_rejected_naming_its_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"qry": "a", "pos_text": "b"}\n'
                     b'{"qry": "caf\xe9 latin-1", "pos_text": "coffee"}\n'
                     b'{"qry": "c", "pos_text": "lone \\ud800 escape"}\n'
                     b'{"qry": "d", "pos_text": "e"}\n')
    corpus = load_corpus(InputConfig(pairs=[str(path)], max_reject_fraction=0.9), caption_mode=False)
    assert corpus.queries.column("qry").to_pylist() == ["a", "d"]
    assert [(r["row"], r["field"], r["reason"]) for r in corpus.rejects] == \
        [(2, "qry", "bad_encoding"), (3, "pos_text", "bad_encoding")]
    assert "line 2: field 'qry' is not valid UTF-8 text (byte 0xe9" in corpus.rejects[0]["detail"]
    assert all("\ufffd" not in t for t in corpus.items.column("text").to_pylist())  # nothing silently replaced


@pytest.mark.parametrize("column", ["id", "group"])
def test_date_like_strings_stay_strings(tmp_path, column):
    rows = [{"qry": f"q{i}", "pos_text": f"p{i}", column: f"2021-05-0{i + 1}"} for i in range(3)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    corpus = load_corpus(InputConfig(pairs=[str(path)], group_key="group" if column == "group" else None),
                         caption_mode=False)
    assert corpus.rejects == []
    got = corpus.queries.column("query_id" if column == "id" else "group").to_pylist()
    assert got == ["2021-05-01", "2021-05-02", "2021-05-03"]


def test_repeated_rows_without_ids_are_found_by_content(tmp_path):
    rows = [{"qry": "a dog", "pos_text": "a ball"}, {"qry": "a cat", "pos_text": "a ball"},
            {"qry": "a  dog ", "pos_text": "a ball"},  # the same content, spelled with other whitespace
            {"qry": "a dog", "pos_text": "a ball", "dataset": "other"}]  # another dataset: another pair
    corpus = load_corpus(InputConfig(pairs=[str(write_jsonl(tmp_path / "p.jsonl", rows))]), caption_mode=False)
    assert corpus.queries.num_rows == 3
    (dup,) = corpus.rejects
    assert (dup["reason"], dup["row"]) == ("duplicate_row", 3)
    assert "same query, positive and dataset as " + str(tmp_path / "p.jsonl") + " line 1" in dup["detail"]


def test_reject_rows_are_file_lines_after_bad_and_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"qry": "a", "pos_text": "b"}\n\nnot json\n{"qry": "", "pos_text": "c"}\n'
                    '{"qry": "d", "pos_text": "e"}\n{"qry": "f", "pos_text": 5}\n')
    corpus = load_corpus(InputConfig(pairs=[str(path)], max_reject_fraction=0.9), caption_mode=False)
    assert sorted((r["row"], r["reason"]) for r in corpus.rejects) == \
        [(3, "bad_json"), (4, "empty_text"), (6, "bad_type")]
    lines = path.read_text().splitlines()
    assert all(lines[r["row"] - 1].startswith(("not", "{")) for r in corpus.rejects)


@pytest.mark.parametrize("text", [
    json.dumps([{"qry": f"q{i}", "pos_text": f"p{i}"} for i in range(5)], indent=2),  # pretty-printed array
    "[\n" + ",\n".join(json.dumps({"qry": f"q{i}", "pos_text": f"p{i}"}) for i in range(5)) + "\n]\n",
    json.dumps([{"qry": f"q{i}", "pos_text": f"p{i}"} for i in range(5)]),  # an array on one line
    json.dumps({"data": [{"qry": "q", "pos_text": "p"}]}, indent=2),  # one object over several lines
    "qry,pos_text\na,b\nc,d\n",  # not JSON at all
], ids=["pretty-array", "array-one-per-line", "array-one-line", "pretty-object", "csv"])
def test_a_json_document_is_one_clear_error_not_n_broken_rows(tmp_path, text):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(InputError, match=r"pairs.jsonl: expected JSON Lines \(one object per line\)") as exc:
        load_corpus(InputConfig(pairs=[str(path)]), caption_mode=False)
    assert "\n" not in str(exc.value)


def test_reject_details_carry_no_object_reprs(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "text.png").write_bytes(b"plain text, not an image")
    rows = [{"qry": "a", "pos_image_path": "images/text.png"}, {"qry": "b", "pos_text": "c"}]
    corpus = load_corpus(InputConfig(pairs=[str(write_jsonl(tmp_path / "p.jsonl", rows))], image_root=str(tmp_path)),
                         caption_mode=False)
    (bad,) = corpus.rejects
    assert bad["reason"] == "corrupt_image" and "not an image in a readable format" in bad["detail"]
    assert " object at 0x" not in bad["detail"] and "<_io" not in bad["detail"]


def test_batch_boundaries_do_not_change_the_corpus(tmp_path, monkeypatch):
    """Rows are read a batch at a time: ids, contents and items seen in an earlier batch count exactly as in one."""
    import numpy as np

    import pipeline.read as read

    rows = [{"id": "a", "qry": "red  ball", "pos_text": "a ball", "grp": "g1", "neg_text": ["blue car", " "]},
            {"qry": "sky", "pos_text": "blue sky", "pos_extra_text": ["the sky", "blue sky"], "grp": 2},
            {"id": "b", "qry": "tree", "pos_text": "a tree"},
            {"id": "a", "qry": "red ball", "pos_text": "a ball"},  # same id and content: a repeated row
            {"qry": "sky", "pos_text": "blue sky"},  # no id, same content as the second row
            {"id": "b", "qry": "bush", "pos_text": "a bush"},  # same id, other content
            {"id": "c", "qry": "red ball", "pos_text": "the sky", "grp": "g1"}]
    jsonl = write_jsonl(tmp_path / "one.jsonl", rows)
    with open(jsonl, "a") as f:
        f.write("{broken\n")
    pq.write_table(pa.table({"id": ["d", "a", "e"], "qry": ["cat", "dog", "red ball "], "pos_text": ["a cat"] * 3,
                             "grp": ["g2", None, "g1"]}), tmp_path / "two.parquet")
    candidates = write_jsonl(tmp_path / "cands.jsonl", [{"text": "a cat"}, {"text": "moon", "dataset": "other"},
                                                        {"text": "sun", "grp": "g3"}, {"text": ""}])
    cfg = InputConfig(pairs=[str(jsonl), str(tmp_path / "two.parquet")], candidates=str(candidates),
                      group_key="grp", max_reject_fraction=0.9)
    whole = load_corpus(cfg, caption_mode=False)
    monkeypatch.setattr(read, "BATCH_ROWS", 2)
    batched = load_corpus(cfg, caption_mode=False)
    assert [(r["query_id"], r["reason"]) for r in whole.rejects] == [
        (None, "bad_json"), ("a", "duplicate_row"), ("one:4", "duplicate_row"), ("b", "duplicate_id"),
        ("a", "duplicate_id"), (None, "empty_text")]
    assert whole.items.column("text").to_pylist()[whole.queries.column("qry_idx")[0].as_py()] == "red  ball"
    assert batched.queries.equals(whole.queries) and batched.items.equals(whole.items)
    assert list(batched.pools) == list(whole.pools) == ["one", "two", "other"]
    assert all(np.array_equal(batched.pools[k], whole.pools[k]) for k in whole.pools)
    assert np.array_equal(batched.item_groups, whole.item_groups) and batched.n_groups == whole.n_groups == 4
    assert (batched.rejects, batched.rows_in, batched.candidate_rows_rejected) == \
        (whole.rejects, whole.rows_in, whole.candidate_rows_rejected)


def test_reading_runs_no_garbage_collection_and_leaves_the_collector_as_it_was(tmp_path):
    """A batch's per-row objects set off collections, full ones too (a walk over every object of the process),
    while the reader ran; it reads with the collector off, and leaves it on, or off if it was off."""
    import gc

    rows = [{"id": f"q{i}", "qry": f"query {i}", "pos_text": f"positive {i} " * 20} for i in range(3000)]
    cfg = InputConfig(pairs=[str(write_jsonl(tmp_path / "p.jsonl", rows))])
    collections = []
    callback = lambda phase, info: collections.append(info["generation"]) if phase == "start" else None  # noqa
    gc.callbacks.append(callback)
    try:
        corpus = load_corpus(cfg, caption_mode=False)
    finally:
        gc.callbacks.remove(callback)
    assert corpus.queries.num_rows == 3000
    assert collections in ([], [0])  # at most a young collection once the collector is back on, none while reading
    assert gc.isenabled()
    gc.disable()
    try:
        load_corpus(cfg, caption_mode=False)
        assert not gc.isenabled()
    finally:
        gc.enable()
