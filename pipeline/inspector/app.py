"""The inspector's HTTP server: standard-library ThreadingHTTPServer, server-rendered pages.

Why the standard library: the app is a handful of read-mostly routes for one person on their own machine; a
framework would add a dependency and nothing the pages need. It binds to 127.0.0.1 by default. Because any web page
the user visits can still send requests to a local port, the server checks the Host header when bound to loopback
(DNS rebinding), requires a per-process token on the one state-changing route (cross-site form posts), and sends a
Content-Security-Policy that allows only its own script and styles.
"""
from __future__ import annotations

import hmac
import secrets
import socket
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from pipeline.inspector import blocklist, pages
from pipeline.inspector.assets import CSS, JS
from pipeline.inspector.images import Forbidden, ImageRoot, NotFound, image_root_of
from pipeline.inspector.stats import StatsCache
from pipeline.inspector.store import Epoch, Filter, Run

PAGE_SIZE, MAX_PAGE_SIZE = 50, 200
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Inspector:
    """Everything the routes share: the run, the statistics cache, image roots and the form token."""

    def __init__(self, out: str | Path, epoch: int | None = None, image_root: str | Path | None = None):
        self.run = Run(out)
        self.default_epoch = epoch
        self.stats = StatsCache(self.run)
        self.token = secrets.token_urlsafe(24)
        self._image_root = Path(image_root).resolve() if image_root else None
        self._roots: dict[Path | None, ImageRoot] = {}

    def epoch(self, value: str) -> Epoch:
        try:
            return self.run.epoch(int(value) if value else self.default_epoch)
        except ValueError:
            raise HttpError(400, "epoch must be a number") from None
        except (KeyError, FileNotFoundError):
            raise HttpError(404, f"no complete epoch {value or self.default_epoch} in this run") from None

    def images(self, ep: Epoch) -> ImageRoot:
        root = self._image_root or image_root_of(ep.manifest, self.run.out)
        if root not in self._roots:
            self._roots[root] = ImageRoot(root)
        return self._roots[root]

    def view(self, ep: Epoch, with_datasets: bool = False) -> pages.View:
        def thumb(path: str, size: int) -> str:
            return "/img?" + urlencode({"epoch": ep.number, "p": path, "s": size})

        def full(path: str) -> str:
            return "/img?" + urlencode({"epoch": ep.number, "p": path, "full": 1})

        return pages.View(ep.number, self.run.epochs, thumb, full, self.token, self.run.out.name,
                          ep.datasets() if with_datasets else [])


class Handler(BaseHTTPRequestHandler):
    server: "InspectorServer"
    protocol_version = "HTTP/1.1"

    # ----------------------------------------------------------------------------------------------- plumbing
    def _args(self, query: str) -> dict[str, str]:
        return {k: v[0][:1000] for k, v in parse_qs(query, keep_blank_values=True).items()}

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _html(self, html: str, status: int = 200) -> None:
        self._send(status, html.encode("utf-8"), "text/html; charset=utf-8", {"Cache-Control": "no-store"})

    def _redirect(self, location: str) -> None:
        self._send(303, b"", "text/plain", {"Location": location, "Cache-Control": "no-store"})

    def _host_ok(self) -> bool:
        if self.server.server_address[0] not in ("127.0.0.1", "::1"):
            return True
        host = self.headers.get("Host") or ""
        name = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
        return name in LOOPBACK_NAMES

    def _dispatch(self, routes: dict) -> None:
        url = urlsplit(self.path)
        try:
            if not self._host_ok():
                raise HttpError(403, "unexpected Host header")
            route = routes.get(url.path)
            if route is None:
                raise HttpError(404, "no such page")
            route(self._args(url.query))
        except HttpError as e:
            self.close_connection = True  # a refused POST may leave its body unread on the connection
            self._html(pages.error_page(e.status, str(e)), e.status)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # noqa: BLE001 - one bad row must not take the server down; the trace goes to stderr
            traceback.print_exc(file=sys.stderr)
            self._html(pages.error_page(500, "internal error (see the inspector's terminal)"), 500)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch({"/": self.list_page, "/query": self.query_page, "/stats": self.stats_page,
                        "/img": self.image, "/static/style.css": self.css, "/static/app.js": self.js})

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch({"/blocklist": self.block})

    def log_message(self, fmt: str, *args) -> None:
        if self.server.verbose:
            super().log_message(fmt, *args)

    # --------------------------------------------------------------------------------------------------- routes
    def css(self, _args) -> None:
        self._send(200, CSS.encode(), "text/css; charset=utf-8", {"Cache-Control": "max-age=3600"})

    def js(self, _args) -> None:
        self._send(200, JS.encode(), "text/javascript; charset=utf-8", {"Cache-Control": "max-age=3600"})

    def list_page(self, args) -> None:
        insp = self.server.inspector
        ep = insp.epoch(args.get("epoch", ""))
        flt = Filter(args.get("dataset", ""), args.get("band", ""), args.get("shortfall", ""),
                     args.get("q", "").strip())
        try:
            start = max(0, int(args.get("start") or 0))
            size = min(MAX_PAGE_SIZE, max(1, int(args.get("size") or PAGE_SIZE)))
        except ValueError:
            raise HttpError(400, "start and size must be numbers") from None
        page = ep.page(flt, start, size)
        self._html(pages.list_page(insp.view(ep, with_datasets=True), flt, page, ep.total, size))

    def query_page(self, args) -> None:
        insp = self.server.inspector
        ep = insp.epoch(args.get("epoch", ""))
        if args.get("id"):
            row = ep.find(args["id"])
            if row is None:
                raise HttpError(404, "no query with that id in this epoch")
        else:
            try:
                row = int(args.get("row", ""))
            except ValueError:
                raise HttpError(400, "give row=N or id=QUERY_ID") from None
        data = ep.row(row) if 0 <= row < ep.total else None
        if data is None:
            raise HttpError(404, "no such row")
        cands = ep.candidates(row, data["query_id"])
        items = insp.run.items(list(cands.get("cand_item_ids") or [])) if cands else {}
        blocked = blocklist.for_query(insp.run.blocklist_path, data["query_id"])
        marked = ""
        if args.get("marked"):
            marked = (f"Added {args['marked']} to blocklist.jsonl." if args.get("added") == "1"
                      else f"{args['marked']} was already in blocklist.jsonl.")
        self._html(pages.query_page(insp.view(ep), data, cands, items, blocked, ep.total, args.get("reason", ""),
                                    marked))

    def stats_page(self, args) -> None:
        insp = self.server.inspector
        ep = insp.epoch(args.get("epoch", ""))
        history = [insp.stats.get(n) for n in insp.run.epochs if n <= ep.number]
        self._html(pages.stats_page(insp.view(ep), insp.stats.get(ep.number), history))

    def image(self, args) -> None:
        insp = self.server.inspector
        root = insp.images(insp.epoch(args.get("epoch", "")))
        try:
            if args.get("full"):
                data, mime = root.original(args.get("p", ""))
            else:
                data, mime = root.thumbnail(args.get("p", ""), int(args.get("s") or 96))
        except Forbidden:
            raise HttpError(403, "image path outside the image root") from None
        except (NotFound, ValueError):
            raise HttpError(404, "no such image") from None
        self._send(200, data, mime, {"Cache-Control": "private, max-age=3600"})

    def block(self, _args) -> None:
        insp = self.server.inspector
        length = int(self.headers.get("Content-Length") or 0)
        if length > 64 * 1024:
            raise HttpError(413, "form too large")
        form = self._args(self.rfile.read(length).decode("utf-8", "replace"))
        if not hmac.compare_digest(form.get("token", ""), insp.token):
            raise HttpError(403, "stale or missing form token: reload the page")
        origin = self.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != self.headers.get("Host"):
            raise HttpError(403, "cross-origin request")
        ep = insp.epoch(form.get("epoch", ""))
        qid, item = form.get("query_id", ""), form.get("item_id", "")
        try:
            row = int(form.get("row", ""))
        except ValueError:
            row = -1
        data = ep.row(row) if 0 <= row < ep.total else None
        if data is None or data["query_id"] != qid:
            row = ep.find(qid)
            data = ep.row(row) if row is not None else None
        if data is None:
            raise HttpError(404, "no such query in this epoch")
        cands = ep.candidates(row, qid) or {}
        if item not in (data.get("neg_item_ids") or []) and item not in (cands.get("cand_item_ids") or []):
            raise HttpError(400, "that item is not a candidate of this query")
        added, _ = blocklist.append(insp.run.blocklist_path, qid, item, form.get("note", ""),
                                    form.get("who") or None)
        self._redirect("/query?" + urlencode({"epoch": ep.number, "row": row, "marked": item,
                                              "added": int(added)}) + "#flash")


class InspectorServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, inspector: Inspector, host: str, port: int, verbose: bool = False):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.inspector = inspector
        self.verbose = verbose
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def make_server(out: str | Path, host: str = "127.0.0.1", port: int = 8765, epoch: int | None = None,
                image_root: str | Path | None = None, verbose: bool = False) -> InspectorServer:
    """A bound, not yet serving, server (port 0 picks a free port); call serve_forever()."""
    return InspectorServer(Inspector(out, epoch, image_root), host, port, verbose)
