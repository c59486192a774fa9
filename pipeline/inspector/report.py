"""`hardneg report`: the statistics page and a sample of queries as one self-contained HTML file.

Why self-contained: it is attached to an experiment log and opened later, elsewhere, offline. Styles are inline,
charts are inline SVG, thumbnails are data: URIs, there is no script, and a Content-Security-Policy meta tag forbids
the page from loading anything at all from outside itself.
"""
from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

from pipeline import blocklist
from pipeline.inspector import pages
from pipeline.inspector.images import ImageRoot, image_limits, image_root_of
from pipeline.inspector.stats import compute
from pipeline.inspector.store import Run

REPORT_THUMB = 160


def sample_rows(total: int, n: int) -> list[int]:
    """`n` rows spread evenly over the epoch (rows are sorted by dataset, so every dataset shows up)."""
    n = max(0, min(n, total))
    return sorted({i * total // n for i in range(n)}) if n else []


def build(out: str | Path, epoch: int | None = None, sample: int = 20, image_root: str | Path | None = None) -> str:
    run = Run(out)
    ep = run.epoch(epoch)
    listed = blocklist.read(run.blocklist_path)
    pixels, size = image_limits(ep.manifest)
    root = ImageRoot(Path(image_root) if image_root else image_root_of(ep.manifest, run.out), max_pixels=pixels,
                     max_bytes=size)
    history = [compute(run.epoch(n)) for n in run.epochs if n <= ep.number]
    view = pages.View(ep.number, run.epochs, lambda p, s: root.data_uri(p, min(s, REPORT_THUMB)),
                      run_name=run.out.name)
    parts = [f"<h1>hardneg report · {pages.esc(run.out.name)} · epoch {ep.number}</h1>",
             f'<p class="muted">{pages.esc(run.out.resolve())} · generated '
             f'{dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")} · epochs in run: '
             f'{", ".join(str(e) for e in run.epochs)}</p>',
             "<h2>Statistics</h2>", pages.blocklist_warning(listed.skipped), pages.stats_section(history[-1], history)]
    rows = sample_rows(ep.total, sample)
    parts.append(f"<h2>Sample of {len(rows)} of {ep.total:,} queries</h2>")
    for r in rows:
        data = ep.row(r)
        cands = ep.candidates(r, data["query_id"])
        items = ep.items(list(cands.get("cand_item_ids") or [])) if cands else {}
        blocked = listed.for_query(data["query_id"])
        parts.append(f'<section class="sample"><h2>Query <span class="mono">{pages.esc(data["query_id"])}</span>'
                     f' <span class="muted">row {r:,}</span></h2>'
                     + pages.query_detail(view, data, cands, items, blocked, in_report=True) + "</section>")
    return pages.layout(view, f"hardneg report · {run.out.name} · epoch {ep.number}", "".join(parts),
                        inline_css=True)


def write(out: str | Path, dest: str | Path, epoch: int | None = None, sample: int = 20,
          image_root: str | Path | None = None) -> Path:
    """Build the report and put it at `dest` atomically (a reader never sees half a file)."""
    html = build(out, epoch, sample, image_root)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".report-", suffix=".html")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(html)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    return dest
