"""End to end: the real mined run (tests/inspector_fixtures.py: the bundled demo images and captions, the offline
MiniLM teacher in caption mode), served and driven in headless Chromium: the list with images, a query's negatives
with scores and its candidates with their thumbnails, a filter, marking a false negative (and the next epoch
honouring it), and a `<script>` caption shown as text."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from inspector_fixtures import EVIL, N_IMAGES, TOP_K, copy_run

from pipeline.config import load_config
from pipeline.inspector import report
from pipeline.inspector.app import make_server
from pipeline.mine import mine

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def mined(mined_run, tmp_path_factory):
    """(config, a private copy of the mined run): the marking test writes its blocklist and mines into it."""
    return load_config(mined_run.parent / "hardneg.yaml"), copy_run(mined_run, tmp_path_factory.mktemp("e2e") / "out")


@pytest.fixture(scope="module")
def server(mined):
    srv = make_server(mined[1], port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_mined_run_is_served_and_reported(server, mined, tmp_path):
    import urllib.request

    ep = server.inspector.run.epoch()
    assert ep.total == 3 * N_IMAGES and len(ep.shards) == 5
    for path in ["", "?dataset=i2t", "?band=hard", "query?row=0", "query?id=t2i-001", "stats"]:
        with urllib.request.urlopen(server.url + path) as resp:
            assert resp.status == 200
    html = report.write(mined[1], tmp_path / "r.html", sample=4).read_text()
    assert "data:image/" in html and "Teacher scores" in html and "not in the item table" not in html


# ------------------------------------------------------------------------------------------------ in a browser


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser tests need Debian's Chromium at {CHROMIUM}: run tests/browser_setup.sh")
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package: "
                                                                 "run tests/browser_setup.sh")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1300, "height": 900})
    pg = ctx.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    yield pg
    ctx.close()


def loaded_images(pg) -> list[int]:
    pg.wait_for_load_state("networkidle")
    return pg.evaluate("Array.from(document.images).filter(i => i.complete).map(i => i.naturalWidth)")


def test_list_renders_with_images(server, page):
    page.goto(server.url)
    assert page.locator("tr[data-row]").count() == 50
    assert f"rows 1–50 of {3 * N_IMAGES}" in page.inner_text("#summary")
    first = page.locator("tr[data-row]").first.locator("img")
    assert first.count() >= 1
    widths = loaded_images(page)
    assert len(widths) >= 10 and all(w > 0 for w in widths)  # every image that loaded is a real picture


def test_query_page_shows_negatives_with_scores(server, page, mined):
    ep = server.inspector.run.epoch()
    row = next(r for r in ep.read(0, ep.total) if r["num_negatives"] == 3)
    page.goto(server.url)
    page.click(f'tr[data-row="{row["_row"]}"] a.qlink')
    page.wait_for_url("**/query?*")
    assert page.inner_text("#qid") == row["query_id"]
    cards = page.locator(".card.neg")
    assert cards.count() == 3
    for k, score in enumerate(row["neg_scores"]):
        text = cards.nth(k).inner_text()
        assert f"{score:.4f}" in text and f"{row['pos_score'] - score:.4f}" in text
    cands = ep.candidates(row["_row"], row["query_id"])["cand_item_ids"]
    assert page.locator("table.cands tbody tr").count() == len(cands)
    assert all(w > 0 for w in loaded_images(page))


@pytest.mark.parametrize("query_id", ["t2i-003", "i2t-003"])
def test_every_candidate_shows_its_picture_or_its_text(server, page, query_id):
    page.goto(f"{server.url}query?id={query_id}")
    page.wait_for_load_state("networkidle")
    rows = page.locator("table.cands tbody tr")
    assert rows.count() == TOP_K and "not in the item table" not in page.inner_text("table.cands")
    for k in range(TOP_K):
        row = rows.nth(k)
        if query_id.startswith("t2i"):  # candidates are images: a thumbnail that really loaded
            img = row.locator("img.thumb")
            assert img.count() == 1
            assert img.evaluate("i => i.complete && i.naturalWidth") > 0
        else:  # candidates are captions
            assert row.locator(".text").inner_text().strip()


def test_filter_narrows_the_list(server, page):
    page.goto(server.url)
    before = page.locator("tr[data-row]").count()
    page.select_option("select[name=dataset]", "i2t")
    page.click("form.filters button")
    page.wait_for_url("**dataset=i2t**")
    rows = page.locator("tr[data-row]")
    assert 0 < rows.count() < before
    assert set(page.locator("tr[data-row] .badge.ds").all_inner_texts()) == {"i2t"}
    page.fill("input[name=q]", "I2T-00")  # i2t-000 ... i2t-009
    page.press("input[name=q]", "Enter")
    page.wait_for_url("**q=I2T-00**")
    assert page.locator("tr[data-row]").count() == 10


def test_script_caption_renders_as_text(server, page):
    for url in [server.url + "?q=script", server.url + "query?id=t2i-001", server.url + "query?id=i2t-001"]:
        page.goto(url)
        page.wait_for_load_state("networkidle")
        assert EVIL in page.inner_text("main")
        assert page.evaluate("document.querySelectorAll('script').length") == 1
        assert page.evaluate("Array.from(document.images).every(i => !i.src.endsWith('/x'))")
    assert page.dialogs == []


def test_marking_a_false_negative_lands_in_the_blocklist_and_the_next_epoch_honours_it(server, page, mined):
    cfg, out = mined
    ep = server.inspector.run.epoch(0)
    row = next(r for r in ep.read(0, ep.total) if r["num_negatives"] == 3)
    item = row["neg_item_ids"][0]
    page.goto(f"{server.url}query?epoch=0&row={row['_row']}")
    card = page.locator(f'.card.neg[data-item="{item}"]')
    card.locator("input[name=note]").fill("same object, other angle")
    card.locator("button").click()
    page.wait_for_url("**marked=**")
    assert "Added" in page.inner_text("#flash")
    assert "in blocklist" in page.locator(f'.card.neg[data-item="{item}"]').inner_text()
    lines = [json.loads(x) for x in (out / "blocklist.jsonl").read_text().splitlines()]
    assert [(e["query_id"], e["item_id"], e["note"]) for e in lines] == [
        (row["query_id"], item, "same object, other angle")]

    mine(cfg, out, epoch=2)  # re-filters the kept candidates; reads OUT/blocklist.jsonl
    ep2 = server.inspector.run.epoch(2)
    r2 = ep2.row(ep2.find(row["query_id"]))
    assert item not in r2["neg_item_ids"]
    page.goto(f"{server.url}query?epoch=2&row={r2['_row']}&reason=blocklist")
    blocked = page.locator("table.cands tbody tr")
    assert blocked.count() == 1 and blocked.get_attribute("data-item") == item


def test_reviewed_nothing_to_mark_in_the_browser(server, page, mined, tmp_path):
    """The button above the query: one click writes a line with no item, and the page then says it was reviewed."""
    _, out = mined
    listed = (out / "blocklist.jsonl").read_text() if (out / "blocklist.jsonl").exists() else ""
    ep = server.inspector.run.epoch(0)
    row = next(r for r in ep.read(0, ep.total, ["query_id"]) if r["query_id"] not in listed)
    page.goto(f"{server.url}query?epoch=0&row={row['_row']}")
    box = page.locator("form.review")
    assert box.is_visible() and "Not reviewed yet" in box.inner_text()
    box.locator("input[name=note]").fill("checked all 12")
    box.screenshot(path=str(tmp_path / "review-button.png"))
    box.locator("button").click()
    page.wait_for_url("**reviewed=1**")
    assert "reviewed, nothing to mark" in page.inner_text("#flash")
    done = page.locator("#review")
    assert done.inner_text().startswith("✓ reviewed (nothing to mark)") and "checked all 12" in done.inner_text()
    assert page.locator("form.review").count() == 0
    done.screenshot(path=str(tmp_path / "reviewed.png"))
    lines = [json.loads(x) for x in (out / "blocklist.jsonl").read_text().splitlines()]
    assert [(e["item_id"], e["note"]) for e in lines if e["query_id"] == row["query_id"]] == [(None, "checked all 12")]
