"""WebDataset tar shards with the images inlined, for image training without the image root.

One sample per query: `KEY.json` (ids, texts, scores, ranks, and which image file is which), `KEY.qry.EXT`,
`KEY.pos.EXT` and `KEY.neg0.EXT`, `KEY.neg1.EXT`, ... for the sides that have an image (EXT: the image's own
suffix, its bytes unchanged). KEY is the row's number in the epoch (query ids may hold dots, which WebDataset
reserves). Images are read through the same root and path checks as mining. Members carry no timestamps.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import PurePosixPath

from ..read import ImageProbe, open_bytes
from .common import ExportError, PartWriter


class _TarWriter(PartWriter):
    def __init__(self, folder, samples_per_shard):
        super().__init__(folder, "shard", "tar", samples_per_shard)

    def _open(self, path):
        return tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, members: list[tuple[str, bytes]]) -> None:
        self._roll()
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._handle.addfile(info, io.BytesIO(data))
        self.in_part += 1
        self.rows += 1


def write(source, folder, lineage, options) -> dict:
    per_shard = int(options.get("samples_per_shard") or 1000)
    options["samples_per_shard"] = per_shard
    inp = source.config.get("input", {})
    probe = ImageProbe(source.image_root, int(inp.get("max_image_pixels") or 10**9),
                       tuple(inp.get("allowed_schemes") or ()), max_bytes=inp.get("max_image_bytes"))
    writer = _TarWriter(folder, per_shard)
    counts = {"samples": 0, "images": 0}
    n = 0
    for batch in source.batches():
        for r in batch.to_pylist():
            key = f"{n:09d}"
            n += 1
            members, files = [], {}
            sides = [("qry", r["qry_image_path"]), ("pos", r["pos_image_path"])] + \
                [(f"neg{i}", p) for i, p in enumerate(r["neg_image_path"])]
            for side, rel in sides:
                if not rel:
                    continue
                ext = PurePosixPath(rel).suffix.lower().lstrip(".") or "img"
                members.append((f"{key}.{side}.{ext}", _image(probe, rel)))
                files[side] = f"{side}.{ext}"
            meta = {k: v for k, v in r.items()}
            meta["images"] = files
            writer.add([(f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())] + members)
            counts["samples"] += 1
            counts["images"] += len(members)
    writer.close()
    counts["shards"] = len(writer.paths)
    return counts


def _image(probe: ImageProbe, rel: str) -> bytes:
    location, reason = probe.url(rel)
    if reason:
        raise ExportError(f"image {rel!r} cannot be read from the image root {probe.root} ({reason})")
    try:
        return open_bytes(location, probe.max_bytes)
    except (OSError, ValueError) as exc:
        raise ExportError(f"image {location} cannot be read ({exc}); the image root {probe.root} must be "
                          "reachable to inline images") from None
