"""`hardneg export`: one mined epoch written in the layout another trainer reads (docs/export.md).

Each format is a module with `write(source, folder, lineage, options) -> counts`; this file only dispatches.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from ..progress import Progress
from .common import BATCH_ROWS, EpochSource, ExportError, ExportFolder

# format name -> (module, fixed options)
FORMATS = {
    "sentence-transformers": ("sentence_transformers", {}),
    "labeled-list": ("sentence_transformers", {"style": "labeled-list"}),
    "flagembedding": ("flagembedding", {}),
    "tevatron": ("tevatron", {}),
    "vlm2vec": ("vlm2vec", {"layout": "main"}),
    "vlm2vec-b3": ("vlm2vec", {"layout": "b3"}),
    "mme5": ("mme5", {}),
    "hf": ("hf", {}),
    "webdataset": ("webdataset", {}),
    "ranked": ("ranked", {}),
}

__all__ = ["FORMATS", "ExportError", "export"]


def export(out: str | Path, epoch: int, fmt: str, to: str | Path, overwrite: bool = False,
           batch_rows: int = BATCH_ROWS, progress: bool = False, **options) -> dict:
    """Write epoch `epoch` of run `out` as `fmt` into `to`; returns the lineage record (with files and counts).
    Rows are read `batch_rows` at a time; `progress` shows queries/s and ETA on stderr."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    module, fixed = FORMATS[fmt]
    writer = importlib.import_module(f"{__name__}.{module}")
    source = EpochSource(out, epoch, batch_rows)
    folder = ExportFolder(Path(to), overwrite=overwrite).open(source.out)
    options = {**{k: v for k, v in options.items() if v is not None}, **fixed}
    lineage = {**source.lineage(), "format": fmt, "options": options}
    try:
        with Progress(f"export {fmt}", total=source.rows, unit="queries", enabled=progress) as bar:
            source.progress = bar
            counts = writer.write(source, folder, lineage, options)
        return folder.commit({**lineage, "exported": counts})
    except BaseException:
        folder.abort()
        raise
