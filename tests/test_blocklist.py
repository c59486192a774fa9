"""`pipeline.blocklist`, the one reader and writer of blocklist.jsonl: atomic, deduplicated appends under a lock, and
a torn or malformed line skipped and counted by every reader (miner, inspector, training dataset) on a real run."""
from __future__ import annotations

import http.client
import json
import multiprocessing
import threading

import pyarrow.parquet as pq
import pytest
from inspector_fixtures import copy_run

from pipeline import blocklist
from pipeline.config import load_config
from pipeline.inspector.app import make_server
from pipeline.inspector.stats import compute
from pipeline.inspector.store import Run
from pipeline.mine import mine
from pipeline.train import ShardDataset

TORN = '{"query_id": "t2i-0'  # what a crash or a killed editor leaves at the end of the file
BAD_LINES = [TORN, "not json", "[1, 2]", '{"query_id": "q"}',
             '{"query_id": true, "item_id": "i"}', '{"query_id": "", "item_id": "i"}']


def test_appends_are_deduplicated_and_whole_lines_across_threads(tmp_path):
    path = tmp_path / "blocklist.jsonl"
    path.write_text('{"query_id": "q0", "item_id": "i0", "who": "x", "when": "t", "note": ""}\n' + TORN)
    results = []

    def click(k):
        results.append(blocklist.append(path, f"q{k % 4}", f"i{k % 4}", note=f"<b>{k}</b>", who="tester")[0])

    threads = [threading.Thread(target=click, args=(k,)) for k in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert lines[1] == TORN  # kept (hardneg never deletes what a person wrote), closed by a newline, skipped
    got = blocklist.read(path)
    assert sorted((e["query_id"], e["item_id"]) for e in got.entries) == [(f"q{k}", f"i{k}") for k in range(4)]
    assert got.skipped == [f"{path}:2"]
    assert results.count(True) == 3  # q0/i0 was already listed
    e = got.for_query("q1")["i1"]
    assert e["who"] == "tester" and e["when"].endswith("+00:00") and e["note"].startswith("<b>")


def _marker(path: str, worker: int) -> None:
    for k in range(25):
        blocklist.append(path, f"q{worker}", f"i{k}", note="x" * 3000)  # notes are capped; lines stay long


def test_concurrent_processes_never_tear_a_line(tmp_path):
    path = tmp_path / "blocklist.jsonl"
    procs = [multiprocessing.get_context("fork").Process(target=_marker, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    got = blocklist.read(path)
    assert got.skipped == [] and len(got.entries) == 100 == len(path.read_text().splitlines())
    assert len(got.entries[0]["note"]) == blocklist.MAX_FIELD


def test_every_kind_of_malformed_line_is_skipped_and_counted(tmp_path, caplog):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"query_id": "q1", "item_id": "i1"}\n' + "\n".join(BAD_LINES) + "\n\n")
    b.write_bytes(b'{"query_id": 7, "item_id": "i7"}\n{"query_id": "\xff", "item_id": "i"}\n')
    got = blocklist.read(a, b, tmp_path / "absent.jsonl")
    assert [(e["query_id"], e["item_id"]) for e in got.entries] == [("q1", "i1"), ("7", "i7")]
    assert got.skipped == [f"{a}:{n}" for n in range(2, 2 + len(BAD_LINES))] + [f"{b}:2"]
    assert got.summary()["skipped_lines"] == len(BAD_LINES) + 1
    assert "skipped 7 malformed line(s)" in caplog.text


def test_a_line_with_a_null_item_marks_the_query_reviewed_and_blocks_nothing(tmp_path):
    path = tmp_path / "blocklist.jsonl"
    path.write_text('{"query_id": "q1", "item_id": "i1"}\n{"query_id": "q2", "item_id": null}\n')
    got = blocklist.read(path)
    assert got.skipped == [] and [(e["query_id"], e["item_id"]) for e in got.entries] == [("q1", "i1")]
    assert got.reviewed_rows(["q0", "q1", "q2", "q3"]).tolist() == [1, 2]


@pytest.fixture(scope="module")
def marked_run(mined_run, tmp_path_factory):
    """A copy of the mined run whose blocklist holds one real false negative and a torn last line."""
    out = copy_run(mined_run, tmp_path_factory.mktemp("blocklist") / "out")
    ep = json.loads((out / "epoch=0001" / "_manifest.json").read_text())
    row = next(r for r in pq.read_table(out / "epoch=0001" / ep["files"][0]["path"]).to_pylist()
               if r["num_negatives"])
    blocklist.append(out / "blocklist.jsonl", row["query_id"], row["neg_item_ids"][0], who="tester")
    with open(out / "blocklist.jsonl", "a") as f:
        f.write(TORN)
    return out, row["query_id"], row["neg_item_ids"][0]


def test_the_miner_honours_the_good_lines_and_counts_the_torn_one(marked_run, mined_run):
    out, qid, item = marked_run
    cfg = load_config(mined_run.parent / "hardneg.yaml")
    mine(cfg, out, epoch=2)  # used to raise "a blocklist line must be a JSON object"
    stats = json.loads((out / "epoch=0002" / "_stats.json").read_text())
    assert stats["blocklist"] == {"entries": 1, "reviewed_queries": 1, "skipped_lines": 1,
                                  "skipped_at": [f"{out / 'blocklist.jsonl'}:2"]}
    assert stats["drops"]["blocklist"] == 1
    shown = compute(Run(out).epoch(2)).blocklist  # the inspector's statistics page shows what the miner read
    assert (shown["entries"], shown["skipped_lines"]) == (1, 1)


def test_the_training_dataset_reads_the_good_lines_and_counts_the_torn_one(marked_run):
    out, qid, item = marked_run
    ds = ShardDataset(out, 1, 3)
    suspects = ds.suspects()  # used to crash with a JSONDecodeError
    row = ds.table.column("query_id").to_pylist().index(qid)
    assert item in suspects[row]
    assert len(ds.blocklist.entries) == 1 and len(ds.blocklist.skipped) == 1


def test_the_inspector_shows_the_count(marked_run):
    out, qid, item = marked_run
    srv = make_server(out, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
        for path in [f"/query?epoch=1&id={qid}", "/stats?epoch=1"]:
            conn.request("GET", path)
            body = conn.getresponse().read().decode()
            assert "blocklist.jsonl: 1 malformed line skipped (line 2)" in body, path
        conn.request("GET", f"/query?epoch=1&id={qid}")
        assert "✓ in blocklist · tester" in conn.getresponse().read().decode()  # the good line still counts
    finally:
        srv.shutdown()
        srv.server_close()
