"""Images from inside the run's image root, and nothing outside it.

Why so strict: image paths come from the data, and the server answers anyone who can reach its port, so a path
must not read arbitrary files. A path is refused when it is absolute, a URI, has a `..` part, or resolves (after
following symlinks) outside the root; only files that Pillow decodes as images are served, with their real type.
"""
from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from PIL import Image

THUMB_SIZES = (96, 160, 320)
WEB_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


class Forbidden(Exception):
    """The path tries to leave the image root (HTTP 403)."""


class NotFound(Exception):
    """No image at that path (HTTP 404)."""


def image_root_of(manifest: dict, out: Path) -> Path | None:
    """The run's image root: `config.input.image_root` of the manifest. A relative root is tried against the
    current folder, the output folder and its parent, first existing wins."""
    root = ((manifest.get("config") or {}).get("input") or {}).get("image_root")
    if not root or "://" in str(root):
        return None
    p = Path(root)
    if p.is_absolute():
        return p
    for base in (Path.cwd(), out, out.parent):
        if (base / p).is_dir():
            return (base / p).resolve()
    return None


class ImageRoot:
    def __init__(self, root: Path | None, cache_size: int = 4096):
        self.root = root.resolve() if root else None
        self._cache: OrderedDict[tuple, tuple[bytes, str]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def resolve(self, rel: str) -> Path:
        if self.root is None or not rel:
            raise NotFound(rel)
        if "\x00" in rel or "\\" in rel or "://" in rel or rel.startswith(("/", "~")) or (len(rel) > 1 and
                                                                                        rel[1] == ":"):
            raise Forbidden(rel)
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts:
            raise Forbidden(rel)
        path = (self.root / pure).resolve()
        if not path.is_relative_to(self.root):
            raise Forbidden(rel)
        if not path.is_file():
            raise NotFound(rel)
        return path

    def original(self, rel: str) -> tuple[bytes, str]:
        """The file's bytes, only for the common web image formats (anything else is served as its largest
        thumbnail), so that no file is ever sent with a type a browser would run or render as a document."""
        path = self.resolve(rel)
        try:
            with Image.open(path) as im:
                fmt = im.format
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise NotFound(rel) from e
        if fmt not in WEB_FORMATS:
            return self.thumbnail(rel, THUMB_SIZES[-1])
        return path.read_bytes(), WEB_FORMATS[fmt]

    def thumbnail(self, rel: str, size: int = THUMB_SIZES[0]) -> tuple[bytes, str]:
        """A PNG (keeps clip-art transparency) or JPEG at most `size` px on its long side; cached in memory."""
        size = min(THUMB_SIZES, key=lambda s: abs(s - size))
        path = self.resolve(rel)
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            with Image.open(path) as im:
                im.draft("RGB", (size, size))
                im.thumbnail((size, size))
                alpha = im.mode in ("RGBA", "LA", "P")
                im = im.convert("RGBA" if alpha else "RGB")
                buf = io.BytesIO()
                im.save(buf, "PNG" if alpha else "JPEG", **({"optimize": True} if alpha else {"quality": 82}))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise NotFound(rel) from e
        got = (buf.getvalue(), "image/png" if alpha else "image/jpeg")
        with self._lock:
            self._cache[key] = got
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return got

    def data_uri(self, rel: str, size: int = THUMB_SIZES[0]) -> str | None:
        """A thumbnail as a data: URI for the static report; None when there is no servable image."""
        try:
            data, mime = self.thumbnail(rel, size)
        except (Forbidden, NotFound):
            return None
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
