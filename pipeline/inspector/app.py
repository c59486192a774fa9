"""The inspector's HTTP server: standard-library ThreadingHTTPServer, server-rendered pages.

Why the standard library: the app is a handful of read-mostly routes for one person on their own machine; a
framework would add a dependency and nothing the pages need. It binds to 127.0.0.1 by default. Because any web page
the user visits can still send requests to a local port, the server checks the Host header when bound to loopback
(DNS rebinding), requires a per-process token on the one state-changing route (cross-site form posts), and sends a
Content-Security-Policy that allows only its own script and styles. Bound to any other address, every request must
carry the token (the printed URL's `?token=`, then a SameSite cookie), since anyone who can reach the port could
otherwise read the run and the form token. Requests are bounded: a socket timeout, a capped and validated body.
"""
from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
import sys
import traceback
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

from pipeline import blocklist
from pipeline.inspector import pages
from pipeline.inspector.assets import CSS, JS
from pipeline.inspector.images import Forbidden, ImageRoot, NotFound, TooLarge, image_limits, image_root_of
from pipeline.inspector.stats import StatsCache
from pipeline.inspector.store import Epoch, Filter, Run

PAGE_SIZE, MAX_PAGE_SIZE = 50, 200
MAX_FORM_BYTES = 64 * 1024
SOCKET_TIMEOUT_S = 10  # a client that stops sending (a short body, a slow header) frees its thread after this
COOKIE = "hardneg_token"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Inspector:
    """Everything the routes share: the run, the statistics cache, image roots and the form token."""

    def __init__(self, out: str | Path, epoch: int | None = None, image_root: str | Path | None = None,
                 who: str | None = None, require_token: bool = False):
        self.run = Run(out)
        self.default_epoch = epoch
        self.stats = StatsCache(self.run)
        self.token = secrets.token_urlsafe(24)
        self.who = who or blocklist.user()  # recorded with each mark; never taken from the request
        self.require_token = require_token  # on every request, not only on marks (a non-loopback bind)
        self._image_root = Path(image_root).resolve() if image_root else None
        self._roots: dict[tuple, ImageRoot] = {}

    def epoch(self, value: str) -> Epoch:
        try:
            return self.run.epoch(int(value) if value else self.default_epoch)
        except ValueError:
            raise HttpError(400, "epoch must be a number") from None
        except (KeyError, FileNotFoundError):
            raise HttpError(404, f"no complete epoch {value or self.default_epoch} in this run") from None

    def images(self, ep: Epoch) -> ImageRoot:
        root = self._image_root or image_root_of(ep.manifest, self.run.out)
        pixels, size = image_limits(ep.manifest)
        key = (root, pixels, size)
        if key not in self._roots:
            self._roots[key] = ImageRoot(root, max_pixels=pixels, max_bytes=size)
        return self._roots[key]

    def view(self, ep: Epoch, with_datasets: bool = False) -> pages.View:
        def thumb(path: str, size: int) -> str:
            return "/img?" + urlencode({"epoch": ep.number, "p": path, "s": size})

        def full(path: str) -> str:
            return "/img?" + urlencode({"epoch": ep.number, "p": path, "full": 1})

        return pages.View(ep.number, self.run.epochs, thumb, full, self.token, self.run.out.name,
                          ep.datasets() if with_datasets else [])


def token_ok(given: str | None, token: str) -> bool:
    """Constant-time comparison of bytes: a non-ASCII value is simply wrong, not an error."""
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode("ascii"))


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int) -> str | None:
    """What `hardneg inspect` prints when it is reachable from other machines."""
    if is_loopback(host):
        return None
    return (f"warning: --host {host} serves this run to every machine that can reach port {port}, over plain HTTP. "
            "Every request needs the token in the URL printed below; share it only with people who may read the "
            "run and mark false negatives.")


class Handler(BaseHTTPRequestHandler):
    server: "InspectorServer"
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S

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
        if getattr(self, "_cookie", None):
            self.send_header("Set-Cookie", self._cookie)
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

    def _access(self, args: dict[str, str]) -> None:
        """When bound beyond loopback: the token from `?token=` (which also sets the cookie) or the cookie."""
        insp = self.server.inspector
        if not insp.require_token:
            return
        if token_ok(args.get("token"), insp.token):
            self._cookie = f"{COOKIE}={insp.token}; Path=/; HttpOnly; SameSite=Strict"
            return
        jar = SimpleCookie()
        try:
            jar.load(self.headers.get("Cookie") or "")
        except CookieError:
            pass
        if not token_ok(jar[COOKIE].value if COOKIE in jar else None, insp.token):
            raise HttpError(403, "this inspector is shared on the network: open the URL with ?token=... that "
                                 "`hardneg inspect` printed")

    def _dispatch(self, routes: dict) -> None:
        url = urlsplit(self.path)
        self._cookie = None
        try:
            if not self._host_ok():
                raise HttpError(403, "unexpected Host header")
            args = self._args(url.query)
            self._access(args)
            route = routes.get(url.path)
            if route is None:
                raise HttpError(404, "no such page")
            route(args)
        except HttpError as e:
            self.close_connection = True  # a refused POST may leave its body unread on the connection
            self._html(pages.error_page(e.status, str(e)), e.status)
        except TimeoutError:  # the client stopped sending: free the thread, answer if it still listens
            self.close_connection = True
            try:
                self._html(pages.error_page(408, "request body not received in time"), 408)
            except OSError:
                pass
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
        items = ep.items(list(cands.get("cand_item_ids") or [])) if cands else {}
        listed = blocklist.read(insp.run.blocklist_path)
        blocked = listed.for_query(data["query_id"])
        marked = args.get("marked", "")
        if marked in blocked:  # only a pair that is really listed for this query is named; anything else: nothing
            marked = (f"Added {marked} to blocklist.jsonl." if args.get("added") == "1"
                      else f"{marked} was already in blocklist.jsonl.")
        elif args.get("reviewed") == "1" and listed.review_of(data["query_id"]):
            marked = ("Recorded: reviewed, nothing to mark." if args.get("added") == "1"
                      else "This query was already recorded as reviewed.")
        else:
            marked = ""
        self._html(pages.query_page(insp.view(ep), data, cands, items, blocked, ep.total, args.get("reason", ""),
                                    marked, listed.skipped, listed.review_of(data["query_id"])))

    def stats_page(self, args) -> None:
        insp = self.server.inspector
        ep = insp.epoch(args.get("epoch", ""))
        history = [insp.stats.get(n) for n in insp.run.epochs if n <= ep.number]
        self._html(pages.stats_page(insp.view(ep), insp.stats.get(ep.number), history,
                                    blocklist.read(insp.run.blocklist_path).skipped))

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
        except TooLarge as e:
            raise HttpError(413, f"image not shown: {e}") from None
        except (NotFound, ValueError):
            raise HttpError(404, "no such image") from None
        self._send(200, data, mime, {"Cache-Control": "private, max-age=3600"})

    def _body(self) -> bytes:
        """The request body: a decimal Content-Length of at most MAX_FORM_BYTES, read within the socket timeout."""
        raw = (self.headers.get("Content-Length") or "0").strip()
        if not raw.isdigit() or not raw.isascii():
            raise HttpError(400, "Content-Length must be a non-negative number")
        length = int(raw)
        if length > MAX_FORM_BYTES:
            raise HttpError(413, "form too large")
        body = self.rfile.read(length)
        if len(body) != length:
            raise HttpError(400, "request body shorter than its Content-Length")
        return body

    def block(self, _args) -> None:
        insp = self.server.inspector
        form = self._args(self._body().decode("utf-8", "replace"))
        if not token_ok(form.get("token"), insp.token):
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
        if form.get("nothing") == "1":  # "reviewed, nothing to mark": a line with no item
            if item:
                raise HttpError(400, "a review with nothing to mark names no item")
            added, _ = blocklist.append(insp.run.blocklist_path, qid, None, form.get("note", ""), insp.who)
            self._redirect("/query?" + urlencode({"epoch": ep.number, "row": row, "reviewed": 1,
                                                  "added": int(added)}) + "#flash")
            return
        if item not in (data.get("neg_item_ids") or []) and item not in (cands.get("cand_item_ids") or []):
            raise HttpError(400, "that item is not a candidate of this query")
        added, _ = blocklist.append(insp.run.blocklist_path, qid, item, form.get("note", ""), insp.who)
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
        """The address to open; with the access token when every request needs it."""
        host, port = self.server_address[:2]
        base = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        return base + "?" + urlencode({"token": self.inspector.token}) if self.inspector.require_token else base


def make_server(out: str | Path, host: str = "127.0.0.1", port: int = 8765, epoch: int | None = None,
                image_root: str | Path | None = None, verbose: bool = False, who: str | None = None,
                require_token: bool | None = None) -> InspectorServer:
    """A bound, not yet serving, server (port 0 picks a free port); call serve_forever(). Every request needs the
    token when `require_token`, which defaults to "bound beyond loopback"."""
    if require_token is None:
        require_token = not is_loopback(host)
    return InspectorServer(Inspector(out, epoch, image_root, who, require_token), host, port, verbose)
