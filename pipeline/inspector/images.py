"""Images from inside the run's image root, and nothing outside it.

Why so strict: image paths come from the data, and the server answers anyone who can reach its port, so a path
must not read arbitrary files. A path is refused when it is absolute, a URI, has a `..` part, or resolves (after
following symlinks) outside the root; only regular files that Pillow decodes as raster images are served, with their
real type. The run's `input.max_image_pixels` and `input.max_image_bytes` bound what is read and decoded (checked on
the file size and the image header, before any pixel is decoded), so one huge image cannot bloat the server.
"""
from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from PIL import Image

from pipeline.config import InputConfig
from pipeline.read import IMAGE_FORMATS

THUMB_SIZES = (96, 160, 320)
WEB_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


class Forbidden(Exception):
    """The path tries to leave the image root (HTTP 403)."""


class NotFound(Exception):
    """No image at that path (HTTP 404)."""


class TooLarge(Exception):
    """Above the run's `input.max_image_pixels` or `input.max_image_bytes` (HTTP 413)."""


def image_limits(manifest: dict) -> tuple[int, int]:
    """(max pixels, max bytes) of an image: the run's `input.max_image_pixels` / `max_image_bytes`, else defaults."""
    cfg = (manifest.get("config") or {}).get("input") or {}
    pixels, size = cfg.get("max_image_pixels"), cfg.get("max_image_bytes")
    return (pixels if isinstance(pixels, int) and pixels > 0 else InputConfig.max_image_pixels,
            size if isinstance(size, int) and size > 0 else InputConfig.max_image_bytes)


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
    def __init__(self, root: Path | None, cache_size: int = 4096, max_pixels: int = InputConfig.max_image_pixels,
                 max_bytes: int = InputConfig.max_image_bytes):
        self.root = root.resolve() if root else None
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self._cache: OrderedDict[tuple, tuple[bytes, str]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._decoding = threading.BoundedSemaphore(2)  # at most two images decoded at once: bounded memory

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

    def _open(self, rel: str) -> tuple[Image.Image, Path]:
        """The image, opened but not decoded, within the byte and pixel limits; TooLarge or NotFound otherwise."""
        path = self.resolve(rel)
        size = path.stat().st_size
        if size > self.max_bytes:
            raise TooLarge(f"{size} bytes is above input.max_image_bytes={self.max_bytes}")
        try:
            im = Image.open(path, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:
            raise TooLarge(str(e)) from e
        except (OSError, ValueError) as e:
            raise NotFound(rel) from e
        width, height = im.size
        if width * height > self.max_pixels:
            im.close()
            raise TooLarge(f"{width}x{height} pixels is above input.max_image_pixels={self.max_pixels}")
        return im, path

    def original(self, rel: str) -> tuple[bytes, str]:
        """The file's bytes, only for the common web image formats (anything else is served as its largest
        thumbnail), so that no file is ever sent with a type a browser would run or render as a document."""
        im, path = self._open(rel)
        with im:
            fmt = im.format
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
        im, _ = self._open(rel)
        try:
            with self._decoding, im:
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
        except (Forbidden, NotFound, TooLarge):
            return None
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
