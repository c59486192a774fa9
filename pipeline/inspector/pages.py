"""HTML rendering for the app and the report.

Why one place: every string from the data (captions, ids, dataset names, paths, notes) is untrusted and may hold
markup or `<script>`; all of it goes through `esc` (text and attribute values alike) and every link through `href`,
so nothing in the data can become markup. The app adds a Content-Security-Policy that forbids inline script as a
second line of defence. Renderers take a `View` that says how to point at images (server URLs or data: URIs) and
whether blocklist forms are shown (not in the static report).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Callable
from urllib.parse import urlencode

from pipeline.inspector import plots
from pipeline.inspector.assets import CSS
from pipeline.inspector.stats import EpochStats
from pipeline.inspector.store import BANDS, Filter, Page
from pipeline.filters import REASONS

REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
VERDICT_ORDER = ["negative", "unsampled", *REASONS]


def esc(v) -> str:
    return "" if v is None else escape(str(v), quote=True)


def href(path: str, **params) -> str:
    """An escaped URL with the non-empty parameters."""
    q = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return esc(path + ("?" + q if q else ""))


def num(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{round(v, digits) + 0.0:.{digits}f}" if isinstance(v, float) else f"{v:,}"  # never "-0.0000"


@dataclass
class View:
    """How a page points at things: `thumb(path, px)` and `full(path)` give an image source or None."""

    epoch: int
    epochs: list[int]
    thumb: Callable[[str, int], str | None]
    full: Callable[[str], str | None] = lambda p: None
    token: str | None = None  # blocklist forms only when set (the live app)
    run_name: str = ""
    datasets: list[str] = field(default_factory=list)


def image(view: View, path: str | None, size: int = 96, cls: str = "thumb") -> str:
    if not path:
        return ""
    src = view.thumb(path, size)
    if not src:
        return f'<span class="noimg" title="{esc(path)}">image: {esc(path)}</span>'
    tag = f'<img class="{cls}" src="{esc(src)}" alt="{esc(path)}" title="{esc(path)}" loading="lazy">'
    full = view.full(path)
    return f'<a href="{esc(full)}" target="_blank" rel="noopener">{tag}</a>' if full else tag


def layout(view: View, title: str, body: str, active: str = "", inline_css: bool = False) -> str:
    css = (f'<meta http-equiv="Content-Security-Policy" content="{esc(REPORT_CSP)}"><style>{CSS}</style>'
           if inline_css else '<link rel="stylesheet" href="/static/style.css">')
    head = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"{css}</head><body>")
    if inline_css:
        return head + f"<main>{body}</main></body></html>"
    nav = "".join(f'<a href="{href(p, epoch=view.epoch)}" class="{"on" if active == k else ""}">{label}</a>'
                  for k, p, label in (("list", "/", "Queries"), ("stats", "/stats", "Statistics")))
    picker = ""
    if len(view.epochs) > 1:
        opts = "".join(f'<option value="{e}"{" selected" if e == view.epoch else ""}>epoch {e}</option>'
                       for e in view.epochs)
        target = "/stats" if active == "stats" else "/"
        picker = (f'<form method="get" action="{target}"><select name="epoch" data-autosubmit aria-label="epoch">'
                  f"{opts}</select><noscript><button>go</button></noscript></form>")
    else:
        picker = f"<span>epoch {view.epoch}</span>"
    return (head + f'<header class="top"><a class="brand" href="{href("/", epoch=view.epoch)}">hardneg inspector</a>'
            f'<nav>{nav}</nav>{picker}<span class="run">{esc(view.run_name)}</span></header>'
            f'<main>{body}</main><script src="/static/app.js"></script></body></html>')


# ---------------------------------------------------------------------------------------------------------- list


def list_page(view: View, flt: Filter, page: Page, total: int, size: int) -> str:
    ds_opts = "".join(f'<option value="{esc(d)}"{" selected" if d == flt.dataset else ""}>{esc(d)}</option>'
                      for d in view.datasets)
    band_opts = "".join(f'<option value="{k}"{" selected" if k == flt.band else ""}>{esc(label)}</option>'
                        for k, (label, _, _) in BANDS.items())
    sf_opts = "".join(f'<option value="{k}"{" selected" if k == flt.shortfall else ""}>{label}</option>'
                      for k, label in (("yes", "with shortfall"), ("no", "without shortfall")))
    form = (f'<form class="filters" method="get" action="/"><input type="hidden" name="epoch" value="{view.epoch}">'
            f'<label>dataset<select name="dataset"><option value="">all</option>{ds_opts}</select></label>'
            f'<label>hardness band<select name="band"><option value="">any</option>{band_opts}</select></label>'
            f'<label>shortfall<select name="shortfall"><option value="">any</option>{sf_opts}</select></label>'
            f'<label>search id or text<input type="search" name="q" value="{esc(flt.search)}" size="28"></label>'
            f'<button type="submit">Filter</button><a href="{href("/", epoch=view.epoch)}">clear</a></form>')
    params = dict(epoch=view.epoch, dataset=flt.dataset, band=flt.band, shortfall=flt.shortfall, q=flt.search)
    if flt.active():
        summary = (f"{len(page.rows)} matching quer{'y' if len(page.rows) == 1 else 'ies'} from row "
                   f"{page.start:,} of {total:,}" + (" (more below)" if page.next_start is not None else ""))
    else:
        summary = (f"rows {page.start + 1:,}–{page.start + len(page.rows):,} of {total:,}" if page.rows
                   else f"no rows here ({total:,} in this epoch)")
    pager = [f'<a href="{href("/", **params)}">first</a>'] if page.start else []
    if page.start and not flt.active():
        pager.append(f'<a href="{href("/", **params, start=max(0, page.start - size))}">prev</a>')
    if page.next_start is not None:
        pager.append(f'<a rel="next" href="{href("/", **params, start=page.next_start)}">next</a>')
    rows = "".join(_list_row(view, r) for r in page.rows)
    table = (f'<table class="queries"><thead><tr><th>#</th><th>query</th><th>positive</th>'
             f'<th class="num">pos score</th><th>negatives</th><th class="num">hardest</th>'
             f'<th class="num">margin</th><th class="num">shortfall</th></tr></thead><tbody>{rows}</tbody></table>'
             if page.rows else '<p class="muted">Nothing matches.</p>')
    body = (f"<h1>Queries</h1>{form}<div class=\"pager\"><span class=\"muted\" id=\"summary\">{summary}</span>"
            f"{''.join(pager)}</div>{table}<div class=\"pager\">{''.join(pager)}</div>")
    return layout(view, "Queries · hardneg inspector", body, "list")


def _list_row(view: View, r: dict) -> str:
    scores = [s for s in (r.get("neg_scores") or []) if s is not None]
    top = max(scores) if scores else None
    pos = r.get("pos_score")
    margin = pos - top if top is not None and pos is not None else None
    minis = []
    for path, text in list(zip(r.get("neg_image_path") or [], r.get("neg_text") or []))[:4]:
        minis.append(image(view, path, 96, "thumb mini") if path else f'<span class="badge">{esc(text[:40])}</span>')
    qlink = href("/query", epoch=view.epoch, row=r["_row"])
    shortfall = r.get("shortfall") or 0
    short_cell = f'<span class="badge warn">{shortfall}</span>' if shortfall else "0"
    return (f'<tr data-row="{r["_row"]}"><td class="num"><a href="{qlink}">{r["_row"]}</a></td>'
            f'<td><div class="cell">{image(view, r.get("qry_image_path"))}<div>'
            f'<a class="qlink mono" href="{qlink}">{esc(r.get("query_id"))}</a><br>'
            f'<span class="badge ds">{esc(r.get("dataset"))}</span><div class="clip">{esc(r.get("qry"))}</div>'
            f"</div></div></td>"
            f'<td><div class="cell">{image(view, r.get("pos_image_path"))}<div class="clip">{esc(r.get("pos_text"))}'
            f"</div></div></td>"
            f'<td class="num">{num(pos)}</td><td><b>{len(scores)}</b> {"".join(minis)}</td>'
            f'<td class="num">{num(top)}</td><td class="num">{num(margin)}</td>'
            f'<td class="num">{short_cell}</td></tr>')


# --------------------------------------------------------------------------------------------------------- query


def query_detail(view: View, row: dict, cands: dict | None, items: dict[str, dict], blocked: dict[str, dict],
                 reason: str = "", marked: str = "", in_report: bool = False) -> str:
    """Query, positive, negatives and retrieved candidates of one row; shared by the query page and the report."""
    pos = row.get("pos_score")
    pos_rank = None
    if cands:
        for item, rank in zip(cands.get("cand_item_ids") or [], cands.get("cand_ranks") or []):
            if item == row.get("pos_item_id"):
                pos_rank = rank
                break
    meta = [("dataset", esc(row.get("dataset"))), ("group", esc(row.get("group"))),
            ("query item", f'<span class="mono">{esc(row.get("qry_item_id"))}</span>'),
            ("negatives", f'{num(row.get("num_negatives"))}'),
            ("shortfall", f'{num(row.get("shortfall"))}')]
    out = [f'<dl class="meta">{"".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in meta)}</dl>']
    if marked:
        out.append(f'<div class="flash" id="flash">{esc(marked)}</div>')
    pos_metrics = [("score", num(pos)), ("rank", num(pos_rank) if pos_rank is not None else "not retrieved"),
                   ("item", f'<span class="mono">{esc(row.get("pos_item_id"))}</span>')]
    out.append(f'<div class="pair"><div class="card q-card"><h3>Query</h3>'
               f'{image(view, row.get("qry_image_path"), 320, "thumb big")}'
               f'<div class="text">{esc(row.get("qry"))}</div></div>'
               f'<div class="card pos-card"><h3>Positive</h3>{image(view, row.get("pos_image_path"), 320, "thumb big")}'
               f'<div class="text">{esc(row.get("pos_text"))}</div>{_metrics(pos_metrics)}'
               f'{_extra_positives(view, row)}</div></div>')
    negs = []
    rels = row.get("neg_rel_scores") or []
    fields = zip(row.get("neg_item_ids") or [], row.get("neg_text") or [], row.get("neg_image_path") or [],
                 row.get("neg_scores") or [], row.get("neg_ranks") or [])
    for i, (item, text, path, score, rank) in enumerate(fields):
        rel = rels[i] if i < len(rels) else (score / pos if pos else None)
        metrics = [("score", num(score)), ("rank", num(rank)),
                   ("margin", num(pos - score if pos is not None and score is not None else None)),
                   ("× pos", num(rel)), ("item", f'<span class="mono">{esc(item)}</span>')]
        negs.append(f'<div class="card neg" id="item-{esc(item)}" data-item="{esc(item)}">'
                    f"<h3>negative {i + 1}</h3>{image(view, path, 160, 'thumb')}"
                    f'<div class="text">{esc(text)}</div>{_metrics(metrics)}'
                    f"{_block_control(view, row, item, blocked)}</div>")
    out.append(f'<h2>Negatives ({len(negs)})</h2><div class="negs">{"".join(negs)}</div>'
               if negs else '<h2>Negatives</h2><p class="muted">This query has no negatives.</p>')
    out.append(_candidates(view, row, cands, items, blocked, reason, in_report))
    return "".join(out)


def _extra_positives(view: View, row: dict) -> str:
    """The row's extra positives (`pos_extra_*`: from the input, or relabelled known true matches)."""
    extras = list(zip(row.get("pos_extra_item_ids") or [], row.get("pos_extra_text") or [],
                      row.get("pos_extra_image_path") or [], row.get("pos_extra_scores") or []))
    if not extras:
        return ""
    lis = "".join(f'<li data-item="{esc(item)}">{image(view, path)}<span class="text">{esc(text)}</span> '
                  f'<span class="muted">score {num(score)}</span></li>' for item, text, path, score in extras)
    return f'<h4>Extra positives ({len(extras)})</h4><ul class="extra-pos">{lis}</ul>'


def blocklist_warning(skipped: list[str] | None) -> str:
    """The malformed lines the blocklist readers skip, named so that someone fixes them."""
    if not skipped:
        return ""
    where = ", ".join(s.rsplit(":", 1)[-1] for s in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
    return (f'<div class="flash warn" id="blocklist-skipped">blocklist.jsonl: {len(skipped)} malformed '
            f'line{"s" if len(skipped) != 1 else ""} skipped (line {esc(where)}): each line must be one JSON '
            "object with query_id and item_id.</div>")


def _metrics(pairs: list[tuple[str, str]]) -> str:
    return '<dl class="metrics">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def _block_control(view: View, row: dict, item: str, blocked: dict[str, dict]) -> str:
    if item in blocked:
        e = blocked[item]
        return (f'<div class="blocked">✓ in blocklist · {esc(e.get("who"))} · {esc(e.get("when"))}'
                f'{" · " + esc(e.get("note")) if e.get("note") else ""}</div>')
    if not view.token:
        return ""
    return (f'<form class="block" method="post" action="/blocklist">'
            f'<input type="hidden" name="token" value="{esc(view.token)}">'
            f'<input type="hidden" name="epoch" value="{view.epoch}">'
            f'<input type="hidden" name="row" value="{row["_row"]}">'
            f'<input type="hidden" name="query_id" value="{esc(row.get("query_id"))}">'
            f'<input type="hidden" name="item_id" value="{esc(item)}">'
            f'<input type="text" name="note" placeholder="note (optional)" maxlength="500" aria-label="note">'
            f'<button type="submit" title="write to blocklist.jsonl">Mark false negative</button></form>')


def _candidates(view: View, row: dict, cands: dict | None, items: dict[str, dict], blocked: dict[str, dict],
                reason: str, in_report: bool) -> str:
    if not cands:
        return '<h2>Retrieved candidates</h2><p class="muted">No _candidates file for this epoch.</p>'
    pos = row.get("pos_score")
    entries = list(zip(cands.get("cand_item_ids") or [], cands.get("cand_scores") or [],
                       cands.get("cand_ranks") or [], cands.get("cand_verdicts") or []))
    counts: dict[str, int] = {}
    for *_, v in entries:
        counts[v] = counts.get(v, 0) + 1
    dropped = sum(n for v, n in counts.items() if v not in ("negative", "unsampled"))
    order = sorted(counts, key=lambda v: (VERDICT_ORDER.index(v) if v in VERDICT_ORDER else 99, v))
    if in_report:
        chips = " ".join(f'<span class="badge">{esc(v)}: {counts[v]}</span>' for v in order)
    else:
        base = dict(epoch=view.epoch, row=row["_row"])
        links = [("", f"all {len(entries)}"), ("dropped", f"dropped {dropped}")] + \
                [(v, f"{v} {counts[v]}") for v in order]
        chips = " ".join(f'<span class="on">{esc(label)}</span>' if key == reason else
                         f'<a href="{href("/query", **base, reason=key)}#candidates">{esc(label)}</a>'
                         for key, label in links)
    shown = [e for e in entries if not reason or e[3] == reason or
             (reason == "dropped" and e[3] not in ("negative", "unsampled"))]
    trs = []
    for item, score, rank, verdict in shown:
        info = items.get(item) or {}
        mark = _block_control(view, row, item, blocked) if verdict == "unsampled" or item in blocked else ""
        pic = "" if in_report else image(view, info.get("image_path"))
        trs.append(f'<tr class="v-{esc(verdict)}" data-item="{esc(item)}"><td class="num">{num(rank)}</td>'
                   f'<td class="num">{num(score)}</td>'
                   f'<td class="num">{num(pos - score if pos is not None and score is not None else None)}</td>'
                   f'<td class="verdict">{esc(verdict)}</td>'
                   f'<td><div class="cell">{pic}<div><div class="text">{esc(info.get("text"))}</div>'
                   f'<span class="mono muted">{esc(item)}</span>'
                   f'{"" if info or not item else " <span class=muted>(not in the item table)</span>"}'
                   f"{mark}</div></div></td></tr>")
    table = (f'<table class="cands"><thead><tr><th class="num">rank</th><th class="num">score</th>'
             f'<th class="num">margin</th><th>verdict</th><th>item</th></tr></thead><tbody>{"".join(trs)}</tbody>'
             f"</table>")
    head = f'<h2 id="candidates">Retrieved candidates ({len(entries)}, {dropped} dropped by a filter)</h2>'
    if in_report:
        return head + f'<div class="chips">{chips}</div><details><summary>table</summary>{table}</details>'
    return head + f'<div class="chips">{chips}</div>{table}'


def review_control(view: View, row: dict, blocked: dict[str, dict], review: dict | None) -> str:
    """Whether a person reviewed this query (any blocklist line: calibration then counts its unmarked candidates as
    confirmed negatives), and the button that records "reviewed, nothing to mark" (a line with a null item)."""
    if review is not None or blocked:
        who = review or max(blocked.values(), key=lambda e: str(e.get("when")))
        what = "nothing to mark" if review is not None else f"{len(blocked)} marked"
        return (f'<div class="review done" id="review">✓ reviewed ({what}) · {esc(who.get("who"))} · '
                f'{esc(who.get("when"))}{" · " + esc(who.get("note")) if who.get("note") else ""}</div>')
    if not view.token:
        return ""
    return (f'<form class="block review" id="review" method="post" action="/blocklist">'
            f'<span class="muted">Not reviewed yet. Looked at every candidate and none is a false negative?</span>'
            f'<input type="hidden" name="token" value="{esc(view.token)}">'
            f'<input type="hidden" name="epoch" value="{view.epoch}">'
            f'<input type="hidden" name="row" value="{row["_row"]}">'
            f'<input type="hidden" name="query_id" value="{esc(row.get("query_id"))}">'
            f'<input type="hidden" name="nothing" value="1">'
            f'<input type="text" name="note" placeholder="note (optional)" maxlength="500" aria-label="review note">'
            f'<button type="submit" title="write a line with no item to blocklist.jsonl">'
            f"Reviewed, nothing to mark</button></form>")


def query_page(view: View, row: dict, cands: dict | None, items: dict[str, dict], blocked: dict[str, dict],
               total: int, reason: str = "", marked: str = "", skipped: list[str] | None = None,
               review: dict | None = None) -> str:
    r = row["_row"]
    nav = [f'<a href="{href("/", epoch=view.epoch, start=(r // 50) * 50)}">← list</a>']
    if r > 0:
        nav.append(f'<a href="{href("/query", epoch=view.epoch, row=r - 1)}">prev query</a>')
    if r + 1 < total:
        nav.append(f'<a href="{href("/query", epoch=view.epoch, row=r + 1)}">next query</a>')
    body = (f'<div class="pager">{"".join(nav)}<span class="muted">row {r:,} of {total:,}</span></div>'
            f'<h1>Query <span class="mono" id="qid">{esc(row.get("query_id"))}</span></h1>'
            + blocklist_warning(skipped) + review_control(view, row, blocked, review)
            + query_detail(view, row, cands, items, blocked, reason, marked))
    return layout(view, f"{row.get('query_id')} · hardneg inspector", body)


# --------------------------------------------------------------------------------------------------------- stats


def stats_section(st: EpochStats, history: list[EpochStats]) -> str:
    """KPIs, distributions, drops, negatives per query, per dataset; and trends when there are several epochs."""
    total_drops = sum(st.drops.values())
    kpis = [("queries written", num(st.queries))]
    kpis += [(k.replace("_", " "), num(v)) for k, v in st.run_counts.items() if k != "queries_written"]
    kpis += [("negatives per query", num(st.mean_negatives, 2)), ("with shortfall", num(st.shortfall_queries)),
             ("mean positive score", num(st.pos.mean, 3)), ("mean negative score", num(st.neg.mean, 3)),
             ("mean margin", num(st.margin.mean, 3)), ("candidates dropped", num(total_drops))]
    if st.blocklist:
        kpis += [("blocklist entries read", num(st.blocklist.get("entries"))),
                 ("queries reviewed (any blocklist line)", num(st.blocklist.get("reviewed_queries"))),
                 ("blocklist lines skipped (malformed)", num(st.blocklist.get("skipped_lines")))]
    out = ['<div class="kpis">' + "".join(f'<div class="kpi"><b>{v}</b><span>{esc(k)}</span></div>'
                                          for k, v in kpis) + "</div>"]
    figs = [
        plots.histogram("Teacher scores", [("positive", *st.pos.coarse()), ("negative", *st.neg.coarse())],
                        "cosine similarity to the query"),
        plots.histogram("Margin to the positive (pos − neg)", [("negatives", *st.margin.coarse())],
                        "pos score − neg score"),
        plots.bars("Candidates dropped per filter", sorted(st.drops.items(), key=lambda kv: -kv[1]), "candidates"),
        plots.bars("Negatives per query", [(f"{k} negatives", v) for k, v in sorted(st.negs_per_query.items())],
                   "queries"),
    ]
    ds = sorted(st.per_dataset.items())
    if ds:
        figs += [plots.bars("Queries per dataset", [(k, d.queries) for k, d in ds], "queries"),
                 plots.bars("Mean negatives per query, per dataset",
                            [(k, d.negatives / d.queries if d.queries else 0) for k, d in ds]),
                 plots.bars("Mean margin (pos − neg), per dataset",
                            [(k, d.margin_sum / d.negatives if d.negatives else 0) for k, d in ds])]
    if st.rejects:
        figs.append(plots.bars("Rejected rows per reason", st.rejects.most_common(), "rows"))
    figs += [plots.tradeoff(f"False negatives, {k}: {plots.fn_estimate(r['estimate'])}", r.get("curve", []),
                            r["estimate"]["fn_rate"]) for k, r in sorted(st.false_negatives.items())
             if isinstance(r, dict) and r.get("evidence")]
    out.append('<div class="grid">' + "".join(f'<div class="figure">{f}</div>' for f in figs) + "</div>")
    if ds:
        rows = "".join(f'<tr><td>{esc(k)}</td><td class="num">{num(d.queries)}</td>'
                       f'<td class="num">{num(d.negatives / d.queries if d.queries else None, 2)}</td>'
                       f'<td class="num">{num(d.shortfall_queries)}</td>'
                       f'<td class="num">{num(d.pos_sum / d.queries if d.queries else None, 3)}</td>'
                       f'<td class="num">{num(d.margin_sum / d.negatives if d.negatives else None, 3)}</td></tr>'
                       for k, d in ds)
        out.append('<h2>Per dataset</h2><table class="per-dataset"><thead><tr><th>dataset</th>'
                   '<th class="num">queries</th><th class="num">negatives / query</th>'
                   '<th class="num">with shortfall</th><th class="num">mean pos score</th>'
                   f'<th class="num">mean margin</th></tr></thead><tbody>{rows}</tbody></table>')
    if len(history) > 1:
        out.append(_trends(history))
    return "".join(out)


def _trends(history: list[EpochStats]) -> str:
    xs = [h.epoch for h in history]
    figs = [
        plots.lines("Mean scores across epochs", xs, [("positive", [h.pos.mean for h in history]),
                                                      ("negative", [h.neg.mean for h in history]),
                                                      ("margin", [h.margin.mean for h in history])],
                    "epoch", "mean"),
        plots.lines("Negatives and shortfall per query", xs,
                    [("negatives / query", [h.mean_negatives for h in history]),
                     ("share with shortfall", [h.shortfall_queries / h.queries if h.queries else None
                                               for h in history])], "epoch", "per query"),
    ]
    reasons = sorted({r for h in history for r in h.drops})
    head = "".join(f'<th class="num">{esc(r)}</th>' for r in reasons)
    rows = "".join(f'<tr><td>{h.epoch}</td><td class="num">{num(h.queries)}</td>'
                   + "".join(f'<td class="num">{num(h.drops.get(r, 0))}</td>' for r in reasons) + "</tr>"
                   for h in history)
    return ('<h2>Across epochs</h2><div class="grid">' + "".join(f'<div class="figure">{f}</div>' for f in figs)
            + f'</div><h2>Drops per filter across epochs</h2><table class="trend"><thead><tr><th>epoch</th>'
              f'<th class="num">queries</th>{head}</tr></thead><tbody>{rows}</tbody></table>')


def stats_page(view: View, st: EpochStats, history: list[EpochStats], skipped: list[str] | None = None) -> str:
    body = f"<h1>Statistics · epoch {view.epoch}</h1>" + blocklist_warning(skipped) + stats_section(st, history)
    return layout(view, "Statistics · hardneg inspector", body, "stats")


def error_page(status: int, message: str) -> str:
    """A bare page: errors are rendered without touching the run, which may be what failed."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{status}</title></head><body>'
            f'<h1>{status}</h1><p>{esc(message)}</p><p><a href="/">back to the list</a></p></body></html>')
