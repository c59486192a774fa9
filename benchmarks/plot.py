"""One picture of the benchmark results: wall time against sentence-transformers per size, and the overhead split.

Reads `benchmarks/results/vs_st-*.json` and `overhead-*.json` (written by vs_sentence_transformers.py and
overhead.py) and draws `docs/img/benchmarks.png`:

    python benchmarks/plot.py
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ST, HN, RAY, WARM = "#888888", "#1f77b4", "#aec7e8", "#2ca02c"


def _size(path: Path) -> int:
    return int(re.search(r"-(\d+)\.json$", path.name).group(1))


def plot(results: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = sorted(results.glob("vs_st-*.json"), key=_size)
    over = sorted(results.glob("overhead-*.json"), key=_size)
    panels = len(vs) + bool(over)
    if not panels:
        raise SystemExit(f"no vs_st-N.json or overhead-N.json in {results}: run the benchmarks first")
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    for ax, path in zip(axes[0], vs):
        s = json.loads(path.read_text())["summary"]
        names = ["sentence-\ntransformers", "hardneg", "hardneg\ncache warm"]
        ax.bar(0, s["st"]["wall_s"], color=ST)
        for x, tag in ((1, "hardneg"), (2, "hardneg-2")):
            ax.bar(x, s[tag]["ray_start_s"], color=RAY, label="Ray start" if x == 1 else None)
            ax.bar(x, s[tag]["mine_s"], bottom=s[tag]["ray_start_s"], color=HN if x == 1 else WARM)
        for x, tag in ((0, "st"), (1, "hardneg"), (2, "hardneg-2")):
            ax.text(x, s[tag]["wall_s"], f"{s[tag]['wall_s']:.1f} s", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(3), names, fontsize=8)
        ax.set_ylabel("wall time (s)")
        ax.set_title(f"{_size(path):,} pairs: {s['speedup_cold']:.2f}x cold, "
                     f"{s['speedup_warm_cache_vs_st']:.0f}x warm cache", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    if over:
        ax = axes[0][-1]
        res = json.loads(over[-1].read_text())
        r = res["runs"][0]
        f, sr, m = r["forward"], r["search"], r["mine"]
        ax.bar(0, f["forward_s"], color=HN, label="(a) model forward")
        ax.bar(0, f["tokenize_s"], bottom=f["forward_s"], color=RAY, label="(a') tokenizer")
        ax.bar(0, sr["search_s"], bottom=f["encode_s"], color=WARM, label="(b) FAISS search")
        ax.bar(1, m["mine_s"], color=ST, label="(c) hardneg mine")
        ax.bar(1, m["ray_start_s"], bottom=m["mine_s"], color="#dddddd", label="Ray start")
        ax.set_xticks(range(2), ["(a) + (b)", "(c)"], fontsize=8)
        ax.set_ylabel("wall time (s)")
        ax.set_title(f"overhead, {res['n']:,} pairs: (c)/((a)+(b)) = "
                     f"{r['ratios']['c_over_forward_plus_search']:.2f}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--out", default=str(REPO / "docs" / "img" / "benchmarks.png"))
    a = p.parse_args(argv)
    print(f"-> {plot(Path(a.results), Path(a.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
