"""Lazy reading, filters, statistics and image-path safety of the inspector, without a server, on a real mined run
(tests/inspector_fixtures.py)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from inspector_fixtures import EVIL, N_IMAGES, TOP_K, copy_run

from pipeline.config import load_config
from pipeline.inspector.images import Forbidden, ImageRoot, NotFound, TooLarge, image_root_of
from pipeline.inspector.stats import Histogram, compute
from pipeline.inspector.store import BANDS, Filter, Run, hardest
from pipeline.mine import mine


@pytest.fixture(scope="module")
def run(mined_run):
    return Run(mined_run)


def full_table(ep) -> pa.Table:
    return pa.concat_tables(pq.read_table(s.path) for s in ep.shards)


def test_epochs_latest_by_default_and_partial_folders_ignored(mined_run, tmp_path):
    run = Run(copy_run(mined_run, tmp_path / "out"))
    (run.out / ".epoch=0007.partial").mkdir(exist_ok=True)
    (run.out / "epoch=0009").mkdir(exist_ok=True)  # no manifest: not complete
    assert run.epochs == [0, 1]
    assert run.epoch().number == 1
    with pytest.raises(KeyError):
        run.epoch(7)


def test_pages_cross_files_and_row_groups(run):
    ep = run.epoch(0)
    assert len(ep.shards) == 5 and ep.shards[0].meta.num_row_groups > 1
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
    Filter(dataset="t2i"), Filter(shortfall="yes"), Filter(shortfall="no"), Filter(band="hard"),
    Filter(band="none"), Filter(search="SCRIPT"), Filter(dataset="i2t", band="easy", search="i2t"),
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
    page = ep.page(Filter(dataset="t2i"), 0, 100)
    assert {r["dataset"] for r in page.rows} == {"t2i"} and len(page.rows) == N_IMAGES
    assert sum(seen) < ep.total - 2 * N_IMAGES + 10  # the groups holding only cls and i2t were never decoded


def test_find_candidates_and_items(run):
    ep = run.epoch(1)
    row = ep.find("t2i-001")
    data = ep.row(row)
    assert data["qry"] == EVIL and ep.find("nope") is None
    cands = ep.candidates(row, data["query_id"])
    assert cands["query_id"] == "t2i-001" and len(cands["cand_item_ids"]) == TOP_K
    assert ep.candidates(0, "t2i-001") == cands  # a misaligned row falls back to a lookup by id
    items = ep.items(cands["cand_item_ids"] + ["missing"])
    assert set(items) == set(cands["cand_item_ids"])
    assert all(i["image_path"].startswith("images/") for i in items.values())  # text->image: candidates are images
    i2t = ep.candidates(ep.find("i2t-002"), "i2t-002")
    assert all(i["text"] for i in ep.items(i2t["cand_item_ids"]).values())  # image->text: they are captions
    assert ep.datasets() == ["cls", "i2t", "t2i"]


def test_every_candidate_of_every_epoch_is_found_in_the_retrieval_the_manifest_names(run):
    """The miner keeps items under _run/<retrieval id>/ (pipeline/mine.py); an epoch's manifest names it."""
    for number in run.epochs:
        ep = run.epoch(number)
        rid = ep.manifest["retrieval_id"]
        assert ep.items_dir == run.out / "_run" / rid and (ep.items_dir / "items.arrow").is_file()
        assert not (ep.items_dir / "items.parquet").exists()  # written once, as Arrow
        for r in ep.read(0, ep.total, ["query_id"]):
            ids = ep.candidates(r["_row"], r["query_id"])["cand_item_ids"]
            found = ep.items(ids)
            assert set(found) == set(ids), r["query_id"]
            assert all(i["text"] or i["image_path"] for i in found.values())


def test_a_manifest_naming_no_or_a_foreign_retrieval_finds_no_items(mined_run, tmp_path):
    out = copy_run(mined_run, tmp_path / "out")
    path = out / "epoch=0000" / "_manifest.json"
    for rid in (None, "../../elsewhere", "missing"):
        manifest = json.loads(path.read_text())
        manifest["retrieval_id"] = rid
        path.write_text(json.dumps(manifest))
        ep = Run(out).epoch(0)
        assert ep.items_dir is None and ep.items(["anything"]) == {}


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
    assert st.per_dataset["t2i"].queries == N_IMAGES
    assert st.drops == json.loads((ep.dir / "_stats.json").read_text())["drops"]
    assert st.rejects == {"missing_image": 1, "empty_text": 1}
    edges, counts = st.neg.coarse(20)
    assert counts.sum() == len(negs) and len(edges) == len(counts) + 1 and len(counts) <= 20
    assert edges[0] <= min(negs) and edges[-1] >= max(negs)


def test_histogram_clips_and_ignores_nan():
    h = Histogram(-1, 1)
    h.add(np.array([-5.0, 0.0, np.nan, 5.0]))
    assert h.n == 3 and h.counts[0] == 1 and h.counts[-1] == 1 and h.mean == 0


def test_image_paths_cannot_leave_the_root(run, tmp_path):
    images = ImageRoot(image_root_of(run.epoch().manifest, run.out))
    probe = images.root / "images" / f"probe-{tmp_path.name}"  # beside the run's images, removed afterwards
    probe.mkdir()
    try:
        (tmp_path / "secret.png").write_bytes((images.root / "images" / "0000.png").read_bytes())
        (probe / "link.png").symlink_to(tmp_path / "secret.png")
        (probe / "notes.txt").write_text("<html>not an image</html>")
        data, mime = images.thumbnail("images/0000.png", 96)
        assert (mime, data[:3]) in (("image/png", b"\x89PN"), ("image/jpeg", b"\xff\xd8\xff"))
        assert images.original("images/0000.png")[1] == "image/png"
        for bad in ["../secret.png", "/etc/passwd", "images/0000.png/../../../secret.png",
                    f"images/{probe.name}/link.png", "file:///etc/passwd", "~/x.png", "C:/x.png", "a\\..\\b.png"]:
            with pytest.raises(Forbidden):
                images.thumbnail(bad)
        for missing in ["images/nope.png", f"images/{probe.name}/notes.txt", ""]:
            with pytest.raises(NotFound):
                images.original(missing)
        assert images.data_uri("images/0000.png").startswith(f"data:{mime};base64,")
        assert images.data_uri("../secret.png") is None
    finally:
        shutil.rmtree(probe)


def test_images_above_the_runs_pixel_limit_are_refused_before_decoding(run, tmp_path, monkeypatch):
    from PIL import Image, ImageFile

    Image.new("1", (400, 300)).save(tmp_path / "wide.png")
    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real(im))
    small = ImageRoot(tmp_path, max_pixels=400 * 300 - 1)
    for call in (small.thumbnail, small.original):
        with pytest.raises(TooLarge, match="400x300 pixels is above input.max_image_pixels=119999"):
            call("wide.png")
    assert small.data_uri("wide.png") is None and decoded == []
    assert ImageRoot(tmp_path, max_pixels=400 * 300).thumbnail("wide.png")[1].startswith("image/")
    assert decoded[0] == (400, 300)  # decoded once allowed
    with pytest.raises(TooLarge, match="bytes is above input.max_image_bytes"):
        ImageRoot(tmp_path, max_bytes=10).thumbnail("wide.png")


def test_relative_image_root_resolves_against_the_output(run, tmp_path, monkeypatch):
    manifest = run.epoch().manifest
    root = image_root_of(manifest, run.out)
    assert root == run.out.parent.resolve()  # the config said ".", resolved against the config's folder
    monkeypatch.chdir(tmp_path)
    relative = {**manifest, "config": {**manifest["config"], "input": {"image_root": root.name}}}
    assert image_root_of(relative, root.parent) == root  # tried against OUT
    assert image_root_of(relative, root.parent / "out") == root  # and against its parent


def test_an_epoch_written_again_is_read_again(mined_run, tmp_path):
    run = Run(copy_run(mined_run, tmp_path / "out"))
    before = run.epoch(0)
    assert before.total == 3 * N_IMAGES and max(r["num_negatives"] for r in before.read(0, before.total)) == 3
    cfg = load_config(mined_run.parent / "hardneg.yaml", ["sample.n_negatives=1", "sample.min_negatives=1"])
    mine(cfg, run.out, epoch=0, overwrite=True)  # re-filters the kept retrieval: nothing is embedded again
    after = run.epoch(0)
    assert after is not before and max(r["num_negatives"] for r in after.read(0, after.total)) == 1
