"""Lazy reading, filters, statistics, blocklist writing and image-path safety of the inspector, without a server."""
from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from inspector_fixtures import EVIL, make_run

from pipeline.inspector import blocklist
from pipeline.inspector.images import Forbidden, ImageRoot, NotFound, image_root_of
from pipeline.inspector.stats import Histogram, compute
from pipeline.inspector.store import BANDS, Filter, Run, hardest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return Run(make_run(tmp_path_factory.mktemp("insp"), epochs=2))


def full_table(ep) -> pa.Table:
    return pa.concat_tables(pq.read_table(s.path) for s in ep.shards)


def test_epochs_latest_by_default_and_partial_folders_ignored(run):
    (run.out / ".epoch=0007.partial").mkdir(exist_ok=True)
    (run.out / "epoch=0009").mkdir(exist_ok=True)  # no manifest: not complete
    assert run.epochs == [0, 1]
    assert run.epoch().number == 1
    with pytest.raises(KeyError):
        run.epoch(7)


def test_pages_cross_files_and_row_groups(run):
    ep = run.epoch(0)
    assert len(ep.shards) == 2 and ep.shards[0].meta.num_row_groups > 1
    want = full_table(ep).column("query_id").to_pylist()
    got, start = [], 0
    while start is not None:
        page = ep.page(Filter(), start, 6)
        got += [r["query_id"] for r in page.rows]
        assert [r["_row"] for r in page.rows] == list(range(start, start + len(page.rows)))
        start = page.next_start
    assert got == want
    assert ep.read(12, 5, ["query_id"]) == [{"query_id": want[i], "_row": i} for i in range(12, 17)]


@pytest.mark.parametrize("flt", [
    Filter(dataset="clip_t2i"), Filter(shortfall="yes"), Filter(shortfall="no"), Filter(band="hard"),
    Filter(band="none"), Filter(search="SCRIPT"), Filter(dataset="clip_i2t", band="easy", search="i2t"),
])
def test_filtered_pages_match_a_full_scan(run, flt):
    ep = run.epoch(1)
    rows = full_table(ep).to_pylist()

    def expected(r):
        top = max(r["neg_rel_scores"]) if r["neg_rel_scores"] else None
        _, lo, hi = BANDS.get(flt.band, ("", None, None))
        hay = " ".join([r["query_id"], r["qry"], r["pos_text"]]).lower()
        return ((not flt.dataset or r["dataset"] == flt.dataset)
                and (flt.shortfall != "yes" or r["shortfall"] > 0) and (flt.shortfall != "no" or r["shortfall"] == 0)
                and (flt.band not in BANDS or (top is None if lo is None else top is not None and lo <= top < hi))
                and (not flt.search or flt.search.lower() in hay))

    want = [i for i, r in enumerate(rows) if expected(r)]
    got, start = [], 0
    while start is not None:
        page = ep.page(flt, start, 3)
        assert len(page.rows) <= 3
        got += [r["_row"] for r in page.rows]
        start = page.next_start
    assert got == want and want  # each case selects something


def test_dataset_filter_skips_row_groups_by_statistics(run, monkeypatch):
    ep = run.epoch(0)
    seen = []
    real = Filter.mask
    monkeypatch.setattr(Filter, "mask", lambda self, batch: seen.append(batch.num_rows) or real(self, batch))
    page = ep.page(Filter(dataset="clip_t2i"), 0, 100)
    assert {r["dataset"] for r in page.rows} == {"clip_t2i"} and len(page.rows) == 16
    assert sum(seen) < ep.total - 10  # the groups holding only clip_i2t were never decoded


def test_find_candidates_and_items(run):
    ep = run.epoch(1)
    row = ep.find("clip_t2i:0003")
    data = ep.row(row)
    assert data["qry"] == EVIL and ep.find("nope") is None
    cands = ep.candidates(row, data["query_id"])
    assert cands["query_id"] == "clip_t2i:0003" and len(cands["cand_item_ids"]) == 8
    assert ep.candidates(0, "clip_t2i:0003") == cands  # a misaligned row falls back to a lookup by id
    items = run.items(cands["cand_item_ids"] + ["missing"])
    assert set(items) == set(cands["cand_item_ids"])
    assert all(i["image_path"] for i in items.values())  # text->image: the candidates are images
    assert ep.datasets() == ["clip_i2t", "clip_t2i"]


def test_hardest_handles_empty_lists_and_any_order():
    arr = pa.array([[0.2, 0.9, 0.5], [], [0.1]], pa.list_(pa.float32()))
    got = hardest(arr)
    assert got[0] == pytest.approx(0.9) and np.isnan(got[1]) and got[2] == pytest.approx(0.1)


def test_statistics_match_the_rows(run):
    ep = run.epoch(1)
    rows = full_table(ep).to_pylist()
    st = compute(ep)
    negs = [s for r in rows for s in r["neg_scores"]]
    margins = [r["pos_score"] - s for r in rows for s in r["neg_scores"]]
    assert st.queries == len(rows) and st.neg.n == len(negs)
    assert st.pos.mean == pytest.approx(np.mean([r["pos_score"] for r in rows]), abs=1e-6)
    assert st.margin.mean == pytest.approx(np.mean(margins), abs=1e-6)
    assert st.shortfall_queries == sum(r["shortfall"] > 0 for r in rows)
    assert sum(st.negs_per_query.values()) == len(rows)
    assert st.per_dataset["clip_t2i"].queries == 16
    assert st.drops == json.loads((ep.dir / "_stats.json").read_text())["drops"]
    assert st.rejects == {"missing_image": 1, "empty_text": 1}
    edges, counts = st.neg.coarse(20)
    assert counts.sum() == len(negs) and len(edges) == len(counts) + 1 and len(counts) <= 20
    assert edges[0] <= min(negs) and edges[-1] >= max(negs)


def test_histogram_clips_and_ignores_nan():
    h = Histogram(-1, 1)
    h.add(np.array([-5.0, 0.0, np.nan, 5.0]))
    assert h.n == 3 and h.counts[0] == 1 and h.counts[-1] == 1 and h.mean == 0


def test_blocklist_is_append_only_deduplicated_and_safe_across_threads(tmp_path):
    path = tmp_path / "blocklist.jsonl"
    path.write_text('{"query_id": "q0", "item_id": "i0", "who": "x", "when": "t", "note": ""}\n{"query_id": "q')
    results = []

    def click(k):
        results.append(blocklist.append(path, f"q{k % 4}", f"i{k % 4}", note=f"<b>{k}</b>", who="tester")[0])

    threads = [threading.Thread(target=click, args=(k,)) for k in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert lines[1] == '{"query_id": "q'  # the torn line is kept, closed, and skipped by readers
    entries = blocklist.entries(path)
    assert sorted((e["query_id"], e["item_id"]) for e in entries) == [(f"q{k}", f"i{k}") for k in range(4)]
    assert results.count(True) == 3  # q0/i0 was already listed
    e = blocklist.for_query(path, "q1")["i1"]
    assert e["who"] == "tester" and e["when"].endswith("+00:00") and e["note"].startswith("<b>")


def test_image_paths_cannot_leave_the_root(run, tmp_path):
    root = image_root_of(run.epoch().manifest, run.out)
    images = ImageRoot(root)
    (tmp_path / "secret.png").write_bytes((root / "0000.png").read_bytes())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "notes.txt").write_text("<html>not an image</html>")
    data, mime = images.thumbnail("0000.png", 96)
    assert (mime, data[:3]) in (("image/png", b"\x89PN"), ("image/jpeg", b"\xff\xd8\xff"))
    assert images.original("0000.png")[1] == "image/png"
    for bad in ["../secret.png", "/etc/passwd", "0000.png/../../secret.png", "link.png", "file:///etc/passwd",
                "~/x.png", "C:/x.png", "a\\..\\b.png"]:
        with pytest.raises(Forbidden):
            images.thumbnail(bad)
    for missing in ["nope.png", "notes.txt", ""]:
        with pytest.raises(NotFound):
            images.original(missing)
    assert images.data_uri("0000.png").startswith(f"data:{mime};base64,")
    assert images.data_uri("../secret.png") is None


def test_relative_image_root_resolves_against_the_output(tmp_path):
    out = make_run(tmp_path, epochs=1, image_root_relative=True)
    root = image_root_of(Run(out).epoch().manifest, out)
    assert root == (tmp_path / "images").resolve()


def test_an_epoch_written_again_is_read_again(tmp_path):
    run = Run(make_run(tmp_path, epochs=1))
    assert run.epoch(0).total == 32
    path = run.out / "epoch=0000" / "_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = manifest["files"][:1]
    tmp = path.with_name("m.tmp")
    tmp.write_text(json.dumps(manifest))
    tmp.replace(path)  # what a writer does: a new file renamed into place
    assert run.epoch(0).total == 14
