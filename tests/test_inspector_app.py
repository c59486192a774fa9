"""The inspector's HTTP routes, its defences, the static report and the subcommands, over a real mined run
(tests/inspector_fixtures.py), with a live server on 127.0.0.1."""
from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from html import escape
from urllib.parse import urlencode, urlsplit

import pytest
from inspector_fixtures import EVIL, N_IMAGES, TOP_K, copy_run

from pipeline.inspector import app, cli, report
from pipeline.inspector.app import make_server


def serve(out, **kw):
    srv = make_server(out, port=0, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def server(mined_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("insp-app")
    out = copy_run(mined_run, base / "out")  # marks are written into this copy
    (base / "secret.txt").write_text("top secret")
    escape_link = mined_run.parent / "images" / f"escape-{base.name}.png"
    escape_link.symlink_to(base / "secret.txt")
    srv = serve(out, who="tester")
    srv.escape_link = escape_link.name
    yield srv
    srv.shutdown()
    srv.server_close()
    escape_link.unlink()


def request(srv, method, path, body=None, headers=None):
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    hdrs = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    if body is not None:
        hdrs["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data.decode("utf-8", "replace")


def raw_request(srv, data: bytes, wait: float = 10) -> tuple[bytes, float]:
    """Send bytes as they are; returns what came back before the server closed, and how long that took."""
    s = socket.create_connection(srv.server_address[:2], timeout=wait)
    t0 = time.monotonic()
    s.sendall(data)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except TimeoutError:
        pass
    s.close()
    return got, time.monotonic() - t0


def form_of(srv, row: int, epoch: int = 1) -> dict:
    """The first mark form on a query page, as the browser would post it."""
    body = request(srv, "GET", f"/query?epoch={epoch}&row={row}")[2]
    token = re.search(r'name="token" value="([^"]+)"', body).group(1)
    qid = re.search(r'name="query_id" value="([^"]+)"', body).group(1)
    item = re.search(r'name="item_id" value="([0-9a-f]{32})"', body).group(1)
    return {"token": token, "epoch": epoch, "row": row, "query_id": qid, "item_id": item}


def test_pages_escape_untrusted_text_and_send_a_strict_csp(server):
    for path in ["/?q=script", "/query?id=t2i-001", "/query?id=i2t-001", "/stats"]:
        status, headers, body = request(server, "GET", path)
        assert status == 200, path
        assert "<script>alert" not in body and "<b>bold" not in body and "<img src=x>" not in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
    body = request(server, "GET", "/query?id=t2i-001")[2]
    assert escape(EVIL) in body
    assert re.findall(r"<script[^>]*>", body) == ['<script src="/static/app.js">']


def test_list_filters_and_paging(server):
    body = request(server, "GET", "/?dataset=t2i&size=5")[2]
    assert body.count("<tr data-row=") == 5 and "i2t-" not in body and "cls-" not in body
    assert 'rel="next" href="/?epoch=1&amp;dataset=t2i&amp;start=' in body
    body = request(server, "GET", "/?shortfall=yes")[2]
    assert 'class="badge warn"' in body and "cls-" in body
    assert request(server, "GET", "/?start=abc")[0] == 400
    assert request(server, "GET", "/?epoch=7")[0] == 404
    assert request(server, "GET", "/query?row=99999")[0] == 404


def candidate_rows(body: str) -> list[str]:
    table = body.split('<table class="cands">', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr class=\"v-[^\"]+\" data-item=.*?</tr>", table, re.S)


def test_candidates_show_their_text_and_thumbnail(server):
    """Every retrieved candidate of every query is found in the run's item table: images as thumbnails that load,
    texts as text; none reads "(not in the item table)" (issue 13 item 6)."""
    ep = server.inspector.run.epoch()
    for r in ep.read(0, ep.total, ["query_id", "dataset"]):
        body = request(server, "GET", f"/query?epoch={ep.number}&row={r['_row']}")[2]
        assert "not in the item table" not in body, r["query_id"]
        rows = candidate_rows(body)
        assert len(rows) == len(ep.candidates(r["_row"], r["query_id"])["cand_item_ids"]) > 0
        for tr in rows:
            text = re.search(r'<div class="text">(.*?)</div>', tr, re.S).group(1)
            thumbs = re.findall(r'<img class="thumb" src="([^"]+)"', tr)
            if r["dataset"] == "t2i":  # the candidates are images
                assert len(thumbs) == 1, tr
            else:  # image->text and classification: captions and class names
                assert text.strip() and not thumbs, tr
    body = request(server, "GET", "/query?id=t2i-003")[2]
    for src in re.findall(r'<img class="thumb" src="([^"]+)"', "".join(candidate_rows(body))):
        status, headers, data = request(server, "GET", src.replace("&amp;", "&"))
        assert status == 200 and headers["Content-Type"] in ("image/png", "image/jpeg")
    body = request(server, "GET", "/query?id=i2t-001")[2]
    assert len(candidate_rows(body)) == TOP_K


def test_query_page_shows_negatives_scores_and_dropped_candidates(server):
    ep = server.inspector.run.epoch(0)
    row = ep.find("t2i-004")
    data = ep.row(row)
    body = request(server, "GET", f"/query?epoch=0&row={row}")[2]
    assert body.count('class="card neg"') == data["num_negatives"] == 3
    for score in data["neg_scores"]:
        assert f"{score:.4f}" in body
    assert "same_as_positive" in body and 'class="v-negative"' in body
    verdicts = ep.candidates(row, data["query_id"])["cand_verdicts"]
    dropped = next(v for v in verdicts if v not in ("negative", "unsampled", "same_as_positive"))
    narrowed = request(server, "GET", f"/query?epoch=0&row={row}&reason={dropped}")[2]
    assert 'class="v-negative"' not in narrowed and len(candidate_rows(narrowed)) == verdicts.count(dropped)


def test_images_never_leave_the_image_root(server):
    assert request(server, "GET", "/img?" + urlencode({"p": "images/0000.png", "s": 96}))[0] == 200
    status, headers, _ = request(server, "GET", "/img?" + urlencode({"p": "images/0000.png", "full": 1}))
    assert status == 200 and headers["Content-Type"] == "image/png"
    for bad in ["../secret.txt", "/etc/passwd", f"images/{server.escape_link}", "..%2Fsecret.txt",
                "images/../../secret.txt"]:
        status, _, body = request(server, "GET", "/img?p=" + bad.replace("/", "%2F"))
        assert status == 403 and "top secret" not in body, bad
    assert request(server, "GET", "/img?p=images/nope.png")[0] == 404


def test_foreign_host_header_is_refused(server):
    assert request(server, "GET", "/", headers={"Host": "evil.example:80"})[0] == 403


def test_blocklist_post_needs_the_token_and_a_real_candidate(server):
    path = server.inspector.run.out / "blocklist.jsonl"
    row = server.inspector.run.epoch(1).find("t2i-004")
    form = {**form_of(server, row), "note": "<i>dup", "who": "mallory"}
    assert request(server, "POST", "/blocklist", urlencode({**form, "token": "x"}))[0] == 403
    assert request(server, "POST", "/blocklist", urlencode({**form, "item_id": "f" * 32}))[0] == 400
    assert request(server, "POST", "/blocklist", urlencode(form),
                   {"Origin": "http://evil.example"})[0] == 403
    assert not path.exists()

    with ThreadPoolExecutor(6) as pool:  # a burst of clicks on the same button
        results = list(pool.map(lambda _: request(server, "POST", "/blocklist", urlencode(form)), range(6)))
    assert {r[0] for r in results} == {303}
    assert sum("added=1" in r[1]["Location"] for r in results) == 1
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["query_id"] == "t2i-004" and lines[0]["item_id"] == form["item_id"]
    assert set(lines[0]) == {"query_id", "item_id", "who", "when", "note"} and lines[0]["note"] == "<i>dup"
    assert lines[0]["who"] == "tester"  # the server's --who, never the form's "mallory"
    added = next(r for r in results if "added=1" in r[1]["Location"])
    page = request(server, "GET", urlsplit(added[1]["Location"]).path + "?" + urlsplit(added[1]["Location"]).query)[2]
    assert "✓ in blocklist" in page and "&lt;i&gt;dup" in page and "mallory" not in page
    assert f"Added {form['item_id']} to blocklist.jsonl." in page


def test_report_is_self_contained_escaped_and_names_every_candidate(server, tmp_path):
    dest = report.write(server.inspector.run.out, tmp_path / "r.html", sample=3 * N_IMAGES)
    html = dest.read_text()
    assert "data:image/" in html and "<svg" in html and "Across epochs" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|/)""", html)
    assert "<script" not in html and "&lt;script&gt;alert(1)" in html
    assert html.count('<section class="sample">') == 3 * N_IMAGES
    assert "not in the item table" not in html
    ep = server.inspector.run.epoch()
    i2t = ep.candidates(ep.find("i2t-002"), "i2t-002")
    for item in ep.items(i2t["cand_item_ids"]).values():  # candidate captions appear in the report
        assert escape(item["text"]) in html


def test_cli_subcommands(server, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="hardneg")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", "some/out"])
    assert (args.host, args.port, args.epoch, args.who, args.func) == ("127.0.0.1", 8765, None, None,
                                                                       cli.inspect_cmd)
    out = str(server.inspector.run.out)
    args = parser.parse_args(["report", out, "--out", str(tmp_path / "r.html"), "--epoch", "0", "--sample", "3"])
    assert args.func(args) == 0 and (tmp_path / "r.html").stat().st_size > 0
    assert "epoch 0" in (tmp_path / "r.html").read_text()
    args = parser.parse_args(["report", str(tmp_path / "missing")])
    assert args.func(args) == 2
    args = parser.parse_args(["inspect", out, "--epoch", "5", "--port", "0"])
    assert args.func(args) == 2
    assert "no complete epoch 5" in capsys.readouterr().err


# --------------------------------------------------------------------------------- hardening (issue 13 item 16)


def post_head(srv, length: str, body: bytes = b"") -> bytes:
    port = srv.server_address[1]
    return (f"POST /blocklist HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-www-form-urlencoded"
            f"\r\nContent-Length: {length}\r\n\r\n").encode() + body


@pytest.mark.parametrize("length, status", [("abc", 400), ("-1", 400), ("+5", 400), ("1e3", 400), ("٣", 400),
                                            (str(10**12), 413)])
def test_a_bad_content_length_is_refused_not_a_server_error(server, length, status):
    got, _ = raw_request(server, post_head(server, length, b"token=x"))
    assert got.startswith(f"HTTP/1.1 {status} ".encode()), got[:80]
    assert b"Traceback" not in got


def test_a_body_shorter_than_its_length_frees_the_handler_thread(server, monkeypatch):
    def handlers() -> int:
        return sum(t.name.endswith("(process_request_thread)") for t in threading.enumerate())

    monkeypatch.setattr(app.Handler, "timeout", 1)
    before = handlers()
    got, took = raw_request(server, post_head(server, "100", b"token=x"), wait=30)
    assert got.startswith(b"HTTP/1.1 408 ")  # answered after the socket timeout, connection closed
    assert took < 20
    for _ in range(50):
        if handlers() <= before:
            break
        time.sleep(0.1)
    assert handlers() <= before  # the handler thread is gone
    assert request(server, "GET", "/stats")[0] == 200


@pytest.mark.parametrize("token", ["é" * 32, "%C3%A9" * 8, "\udcff"])
def test_a_non_ascii_token_is_a_403(server, token):
    row = server.inspector.run.epoch(1).find("t2i-005")
    form = urlencode({**form_of(server, row), "token": "T"}).replace("token=T", "token=" + token)
    got, _ = raw_request(server, post_head(server, str(len(form.encode("utf-8", "surrogatepass"))),
                                           form.encode("utf-8", "surrogatepass")))
    assert got.startswith(b"HTTP/1.1 403 "), got[:80]
    assert not (server.inspector.run.out / "blocklist.jsonl").exists() or "t2i-005" not in (
        server.inspector.run.out / "blocklist.jsonl").read_text()


def test_a_huge_image_is_refused_before_decoding(server, monkeypatch, tmp_path):
    """12000 x 12000 pixels is above the run's input.max_image_pixels (64 M): 413, nothing decoded."""
    from PIL import Image, ImageFile

    big = server.inspector.images(server.inspector.run.epoch()).root / "images" / f"huge-{tmp_path.name}.png"
    Image.new("1", (12000, 12000)).save(big)
    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real(im))
    try:
        for extra in ({"s": 96}, {"full": 1}):
            status, _, body = request(server, "GET", "/img?" + urlencode({"p": f"images/{big.name}", **extra}))
            assert status == 413 and "12000x12000 pixels is above input.max_image_pixels=64000000" in body
        assert (12000, 12000) not in decoded
    finally:
        big.unlink()


def test_the_flash_names_only_a_pair_that_is_really_listed(server):
    for marked in ["ANY", "<b>x</b>", "f" * 32]:
        body = request(server, "GET", "/query?" + urlencode({"id": "t2i-006", "marked": marked, "added": 1}))[2]
        assert 'id="flash"' not in body and "Added" not in body and "<b>x" not in body


def test_a_network_bind_warns_and_needs_the_token_on_every_request(server, monkeypatch, capsys):
    assert [app.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2")] == [True] * 5
    assert [app.is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.7", "example.org")] == [False] * 4
    assert app.exposure_warning("127.0.0.1", 8765) is None
    assert "0.0.0.0" in app.exposure_warning("0.0.0.0", 8765)

    # `hardneg inspect --host 0.0.0.0`, bound to 127.0.0.1 for the test: a warning, a URL with the token
    real = app.make_server
    made = []
    monkeypatch.setattr(app, "make_server", lambda out, host, *a, **kw: made.append(
        real(out, "127.0.0.1", *a, require_token=not app.is_loopback(host), **kw)) or made[-1])
    monkeypatch.setattr(app.InspectorServer, "serve_forever", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    parser = argparse.ArgumentParser(prog="hardneg")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", str(server.inspector.run.out), "--host", "0.0.0.0", "--port", "0"])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert "warning: --host 0.0.0.0 serves this run to every machine" in err
    assert f"?token={made[0].inspector.token}" in out and made[0].inspector.require_token
    monkeypatch.undo()

    shared = serve(server.inspector.run.out, require_token=True)
    try:
        token = shared.inspector.token
        for path in ["/", "/stats", "/query?row=0", "/img?p=images/0000.png", "/?" + urlencode({"token": "é" * 4})]:
            assert request(shared, "GET", path)[0] == 403, path
        assert request(shared, "POST", "/blocklist", urlencode(form_of(server, 0)))[0] == 403
        status, headers, _ = request(shared, "GET", "/?" + urlencode({"token": token}))
        assert status == 200 and "SameSite=Strict" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
        cookie = {"Cookie": headers["Set-Cookie"].split(";")[0]}
        assert request(shared, "GET", "/img?p=images/0000.png", headers=cookie)[0] == 200
        assert request(shared, "GET", "/query?row=0", headers={"Cookie": "hardneg_token=wrong"})[0] == 403
        form = {**form_of(server, 0), "token": "x"}
        assert request(shared, "POST", "/blocklist", urlencode(form), headers=cookie)[0] == 403  # form token too
    finally:
        shared.shutdown()
        shared.server_close()


# ------------------------------------------------------------ reviewed, nothing to mark (issue 14 item 1: evidence)


def review_form(srv, row: int, epoch: int = 1) -> dict:
    """The fields of a query page's "Reviewed, nothing to mark" form, as the browser would post them."""
    body = request(srv, "GET", f"/query?epoch={epoch}&row={row}")[2]
    form = re.search(r'<form class="block review".*?</form>', body, re.S)
    return dict(re.findall(r'name="(\w+)" value="([^"]*)"', form.group(0))) if form else {}


def test_reviewed_nothing_to_mark_is_one_line_that_calibration_counts(mined_run, tmp_path):
    """The button appends `"item_id": null` through the same token / origin checks and locked append as a mark; the
    page then shows the query as reviewed, and the next epoch's calibration rests on the reviews (a dataset with
    20 or more reviewed queries is estimated from them)."""
    import json as _json

    from pipeline.config import load_config
    from pipeline.mine import mine

    out = copy_run(mined_run, tmp_path / "out")
    path = out / "blocklist.jsonl"
    srv = serve(out, who="tester")
    try:
        ep = srv.inspector.run.epoch(1)
        t2i = [r for r in ep.read(0, ep.total, ["query_id", "dataset", "neg_item_ids"]) if r["dataset"] == "t2i"]
        first = t2i[0]
        form = review_form(srv, first["_row"])
        assert form["nothing"] == "1" and form["query_id"] == first["query_id"] and "item_id" not in form
        assert request(srv, "POST", "/blocklist", urlencode({**form, "token": "x"}))[0] == 403
        assert request(srv, "POST", "/blocklist", urlencode(form), {"Origin": "http://evil.example"})[0] == 403
        assert request(srv, "POST", "/blocklist", urlencode({**form, "item_id": first["neg_item_ids"][0]}))[0] == 400
        assert not path.exists()

        with ThreadPoolExecutor(4) as pool:  # a burst of clicks: one line
            results = list(pool.map(lambda _: request(srv, "POST", "/blocklist", urlencode(form)), range(4)))
        assert {r[0] for r in results} == {303} and sum("added=1" in r[1]["Location"] for r in results) == 1
        for r in t2i[1:]:
            status, headers, _ = request(srv, "POST", "/blocklist", urlencode(review_form(srv, r["_row"])))
            assert status == 303 and "reviewed=1" in headers["Location"] and "added=1" in headers["Location"]
        lines = [_json.loads(line) for line in path.read_text().splitlines()]
        assert sorted(e["query_id"] for e in lines) == sorted(r["query_id"] for r in t2i)
        assert {(e["item_id"], e["who"]) for e in lines} == {(None, "tester")}

        loc = urlsplit(next(r for r in results if "added=1" in r[1]["Location"])[1]["Location"])  # the click that added
        page = request(srv, "GET", loc.path + "?" + loc.query)[2]
        assert "✓ reviewed (nothing to mark) · tester" in page and 'class="block review"' not in page
        assert "reviewed, nothing to mark." in page  # the flash
        other = next(r for r in ep.read(0, ep.total, ["query_id", "dataset"]) if r["dataset"] == "i2t")
        assert review_form(srv, other["_row"])  # not reviewed: the button is there
        mark = form_of(srv, other["_row"])
        assert request(srv, "POST", "/blocklist", urlencode(mark))[0] == 303
        page = request(srv, "GET", f"/query?epoch=1&row={other['_row']}")[2]
        assert "✓ reviewed (1 marked) · tester" in page and not review_form(srv, other["_row"])

        mine(load_config(mined_run.parent / "hardneg.yaml"), out, epoch=2)  # reads OUT/blocklist.jsonl
        stats = _json.loads((out / "epoch=0002" / "_stats.json").read_text())
        assert (stats["blocklist"]["entries"], stats["blocklist"]["reviewed_queries"]) == (1, len(t2i) + 1)
        fn = stats["false_negatives"]["per_dataset"]["t2i"]
        assert (fn["evidence"]["estimated_from"], fn["evidence"]["queries"]) == ("blocklist", len(t2i))
        assert "queries reviewed (any blocklist line)" in request(srv, "GET", "/stats?epoch=2")[2]
    finally:
        srv.shutdown()
        srv.server_close()
