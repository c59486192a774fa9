"""The inspector's HTTP routes, its defences, the static report and the subcommands, over the fixture run."""
from __future__ import annotations

import argparse
import http.client
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode, urlsplit

import pytest
from inspector_fixtures import make_run

from pipeline.inspector import cli, report
from pipeline.inspector.app import make_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("insp-app")
    out = make_run(base, epochs=2)
    (base / "secret.txt").write_text("top secret")
    (base / "images" / "escape.png").symlink_to(base / "secret.txt")
    srv = make_server(out, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


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


def test_pages_escape_untrusted_text_and_send_a_strict_csp(server):
    for path in ["/?q=script", "/query?id=clip_t2i:0003", "/query?id=clip_i2t:0003", "/stats"]:
        status, headers, body = request(server, "GET", path)
        assert status == 200, path
        assert "<script>alert" not in body and "<b>bold" not in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
    body = request(server, "GET", "/query?id=clip_t2i:0003")[2]
    assert "strawberry &lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in body
    assert re.findall(r"<script[^>]*>", body) == ['<script src="/static/app.js">']


def test_list_filters_and_paging(server):
    body = request(server, "GET", "/?dataset=clip_t2i&size=5")[2]
    assert body.count("<tr data-row=") == 5 and "clip_i2t:" not in body
    assert 'rel="next" href="/?epoch=1&amp;dataset=clip_t2i&amp;start=' in body
    body = request(server, "GET", "/?shortfall=yes")[2]
    assert 'class="badge warn"' in body
    assert request(server, "GET", "/?start=abc")[0] == 400
    assert request(server, "GET", "/?epoch=7")[0] == 404
    assert request(server, "GET", "/query?row=99999")[0] == 404


def test_query_page_shows_negatives_scores_and_dropped_candidates(server):
    body = request(server, "GET", "/query?epoch=0&row=17")[2]
    assert body.count('class="card neg"') == 3 and "margin" in body
    assert "same_as_positive" in body and 'class="v-negative"' in body
    narrowed = request(server, "GET", "/query?epoch=0&row=17&reason=rank_window")[2]
    assert 'class="v-negative"' not in narrowed and 'class="v-rank_window"' in narrowed


def test_images_never_leave_the_image_root(server):
    assert request(server, "GET", "/img?" + urlencode({"p": "0000.png", "s": 96}))[0] == 200
    status, headers, _ = request(server, "GET", "/img?" + urlencode({"p": "0000.png", "full": 1}))
    assert status == 200 and headers["Content-Type"] == "image/png"
    for bad in ["../secret.txt", "/etc/passwd", "escape.png", "..%2Fsecret.txt", "images/../../secret.txt"]:
        status, _, body = request(server, "GET", "/img?p=" + bad.replace("/", "%2F"))
        assert status == 403 and "top secret" not in body, bad
    assert request(server, "GET", "/img?p=nope.png")[0] == 404


def test_foreign_host_header_is_refused(server):
    assert request(server, "GET", "/", headers={"Host": "evil.example:80"})[0] == 403


def test_blocklist_post_needs_the_token_and_a_real_candidate(server):
    out = server.inspector.run.out
    path = out / "blocklist.jsonl"
    body = request(server, "GET", "/query?epoch=1&row=20")[2]
    token = re.search(r'name="token" value="([^"]+)"', body).group(1)
    item = re.search(r'name="item_id" value="([0-9a-f]{32})"', body).group(1)
    form = {"token": token, "epoch": 1, "row": 20, "query_id": "clip_t2i:0004", "item_id": item, "note": "<i>dup"}
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
    assert len(lines) == 1 and lines[0]["query_id"] == "clip_t2i:0004" and lines[0]["item_id"] == item
    assert set(lines[0]) == {"query_id", "item_id", "who", "when", "note"} and lines[0]["note"] == "<i>dup"
    page = request(server, "GET", urlsplit(results[0][1]["Location"]).path + "?" +
                   urlsplit(results[0][1]["Location"]).query)[2]
    assert "✓ in blocklist" in page and "&lt;i&gt;dup" in page


def test_report_is_self_contained_and_escaped(server, tmp_path):
    dest = report.write(server.inspector.run.out, tmp_path / "r.html", sample=32)
    html = dest.read_text()
    assert "data:image/" in html and "<svg" in html and "Across epochs" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|/)""", html)
    assert "<script" not in html and "&lt;script&gt;alert(1)" in html
    assert html.count('<section class="sample">') == 32


def test_cli_subcommands(server, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="hardneg")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", "some/out"])
    assert (args.host, args.port, args.epoch, args.func) == ("127.0.0.1", 8765, None, cli.inspect_cmd)
    out = str(server.inspector.run.out)
    args = parser.parse_args(["report", out, "--out", str(tmp_path / "r.html"), "--epoch", "0", "--sample", "3"])
    assert args.func(args) == 0 and (tmp_path / "r.html").stat().st_size > 0
    assert "epoch 0" in (tmp_path / "r.html").read_text()
    args = parser.parse_args(["report", str(tmp_path / "missing")])
    assert args.func(args) == 2
    args = parser.parse_args(["inspect", out, "--epoch", "5", "--port", "0"])
    assert args.func(args) == 2
    assert "no complete epoch 5" in capsys.readouterr().err
