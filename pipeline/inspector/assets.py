"""The stylesheet and the one small script, as strings.

Why strings in a module: they ship inside the Python package whatever its packaging config, the app serves them
from its own origin (so the Content-Security-Policy can forbid every inline and remote script), and the static
report inlines the same CSS.
"""

CSS = """
:root { --fg:#1d232a; --muted:#5d6873; --line:#d9dee3; --bg:#f6f7f9; --card:#fff; --accent:#2f6fb0;
        --bad:#b23a2a; --ok:#2f7d4a; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg);
       background:var(--bg); }
header.top { display:flex; gap:18px; align-items:center; padding:8px 18px; background:#1f2d3d; color:#fff; }
header.top a { color:#fff; text-decoration:none; }
header.top .brand { font-weight:700; }
header.top nav a { margin-right:12px; opacity:.85; }
header.top nav a.on { opacity:1; border-bottom:2px solid #fff; }
header.top .run { margin-left:auto; opacity:.8; font-size:12px; }
header.top select { font:inherit; }
main { padding:14px 18px 40px; max-width:1500px; }
h1 { font-size:20px; margin:6px 0 10px; word-break:break-all; }
h2 { font-size:16px; margin:22px 0 8px; }
a { color:var(--accent); }
.muted { color:var(--muted); }
.mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size:12px; word-break:break-all; }
form.filters { display:flex; flex-wrap:wrap; gap:8px; align-items:end; background:var(--card); padding:10px;
               border:1px solid var(--line); border-radius:6px; }
form.filters label { display:flex; flex-direction:column; font-size:12px; color:var(--muted); }
form.filters input, form.filters select, form.filters button { font:inherit; padding:4px 6px; }
table { border-collapse:collapse; width:100%; background:var(--card); }
th, td { border-bottom:1px solid var(--line); padding:6px 8px; text-align:left; vertical-align:top; }
th { font-size:12px; color:var(--muted); font-weight:600; background:#eef1f4; position:sticky; top:0; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; white-space:nowrap; }
.clip { display:-webkit-box; -webkit-line-clamp:3; -webkit-box-orient:vertical; overflow:hidden; max-width:340px;
        white-space:pre-wrap; word-break:break-word; }
.text { white-space:pre-wrap; word-break:break-word; margin:6px 0; }
img.thumb { display:block; max-width:96px; max-height:96px; background:#fff; border:1px solid var(--line); }
img.big { max-width:320px; max-height:320px; }
img.mini { display:inline-block; max-width:44px; max-height:44px; margin:0 2px 2px 0; }
.noimg { display:inline-block; font-size:11px; color:var(--muted); border:1px dashed var(--line); padding:2px 4px;
         word-break:break-all; max-width:160px; }
.cell { display:flex; gap:8px; align-items:flex-start; }
.badge { display:inline-block; font-size:11px; padding:1px 6px; border-radius:9px; background:#e4e9ef;
         color:#33404d; margin-right:4px; white-space:nowrap; }
.badge.warn { background:#fbe3d9; color:var(--bad); }
.pager { margin:12px 0; display:flex; gap:14px; align-items:center; }
.pair { display:grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap:12px; align-items:start; }
.card { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:10px; }
.card h3 { margin:0 0 6px; font-size:13px; color:var(--muted); }
.negs { display:grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap:10px; }
.metrics { display:grid; grid-template-columns:auto 1fr; gap:0 10px; font-size:12px; margin:6px 0; }
.metrics dt { color:var(--muted); } .metrics dd { margin:0; font-variant-numeric: tabular-nums; }
dl.meta { display:grid; grid-template-columns:max-content 1fr; gap:2px 12px; margin:0 0 10px; }
dl.meta dt { color:var(--muted); } dl.meta dd { margin:0; }
form.block { display:flex; flex-wrap:wrap; gap:4px; margin-top:6px; }
form.block input[type=text] { flex:1 1 140px; min-width:0; font:inherit; font-size:12px; padding:3px; }
form.block button { font:inherit; font-size:12px; }
.blocked { color:var(--bad); font-size:12px; margin-top:6px; }
form.review { align-items:center; margin:8px 0; padding:6px 10px; border:1px dashed #bbb; border-radius:6px; }
.review.done { margin:8px 0; padding:6px 10px; background:#e2f3e8; border-radius:6px; font-size:13px; }
.flash { background:#e2f3e8; border:1px solid #b9dec5; padding:6px 10px; border-radius:6px; margin:8px 0; }
.flash.warn { background:#fdf1dc; border-color:#ecd3a0; }
.chips a, .chips span { margin-right:6px; }
.chips .on { font-weight:700; text-decoration:none; color:var(--fg); }
tr.v-negative td { background:#f1f7ff; }
tr.v-unsampled td { background:#fbfbfb; }
.verdict { font-family: ui-monospace, monospace; font-size:12px; }
.grid { display:grid; grid-template-columns: repeat(auto-fill, minmax(570px, 1fr)); gap:12px; }
.figure { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:6px; overflow-x:auto; }
svg.chart { width:100%; height:auto; font:11px system-ui, sans-serif; }
svg.chart .ct { font-size:13px; font-weight:600; fill:#1d232a; }
svg.chart .cl, svg.chart .tk { fill:#4a5560; }
svg.chart .ax { stroke:#8b96a1; } svg.chart .gr { stroke:#e6e9ec; }
.kpis { display:flex; flex-wrap:wrap; gap:10px; margin:8px 0 14px; }
.kpi { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:8px 12px; min-width:130px; }
.kpi b { display:block; font-size:18px; }
.kpi span { font-size:12px; color:var(--muted); }
details { margin:8px 0; }
section.sample { border-top:2px solid var(--line); margin-top:22px; }
"""

# Auto-submits the epoch picker, and disables a blocklist button once clicked so a double click sends one request
# (the server deduplicates anyway).
JS = """
document.querySelectorAll('select[data-autosubmit]').forEach(function (s) {
  s.addEventListener('change', function () { s.form.submit(); });
});
document.querySelectorAll('form.block').forEach(function (f) {
  f.addEventListener('submit', function () {
    var b = f.querySelector('button');
    if (b) { b.disabled = true; b.textContent = 'Saving…'; }
  });
});
"""
