"""Reference training run: in-batch info-NCE vs + random / + mined hard negatives vs + EGA, on real text offline.

Data: docstrings of installed scientific Python packages (summary line -> the rest of the docstring), read with
`benchmarks.textdata`; teacher and frozen base: the offline all-MiniLM-L6-v2. The training split is mined by
`pipeline.mine`; see pipeline/train/reference.py for the student and the protocol, docs/training.md for the table.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.train_reference    # or benchmarks/train_reference.py; writes
                                                                       # benchmarks/results/train_reference.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/train_reference.py` works too

import torch  # noqa: E402

from benchmarks.textdata import describe, docstring_pairs  # noqa: E402
from pipeline.read import normalise_text as normalise  # noqa: E402
from pipeline.train.reference import ARMS, Arm, ReferenceConfig, format_table, run_reference  # noqa: E402

# numpydoc-style packages: a summary line, then a description of what the object does
PACKAGES = ("scipy", "sklearn", "numpy", "pandas", "networkx")


def mixed_pairs(n: int) -> list[dict]:
    """n pairs, an equal share from each package (the first ones of each, in textdata's fixed order), unique by
    normalised content on both sides across packages too."""
    per = -(-n // len(PACKAGES))
    seen, pairs = set(), []
    for package in PACKAGES:
        for row in docstring_pairs(per, packages=(package,)):
            q, p = normalise(row["qry"]), normalise(row["pos_text"])
            if q not in seen and p not in seen:
                seen.update((q, p))
                pairs.append({**row, "id": f"d{len(pairs)}"})
    return pairs[:n]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5000, help="docstring pairs, at most (20%% held out)")
    parser.add_argument("--steps", type=int, default=ReferenceConfig.steps)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(ReferenceConfig.seeds))
    parser.add_argument("--work", default="/tmp/hardneg-train-reference", help="mined run and embedding cache")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_reference.json"))
    parser.add_argument("--alphas", type=float, nargs="*", default=[],
                        help="extra '+ mined + EGA' arms with these alphas (an ablation in the same run)")
    parser.add_argument("--arms", action="append", default=None,
                        help="run only this arm, by name (repeatable; default: all), e.g. --arms '+ mined hard "
                             "negatives' to compare mining filters quickly")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="mining config override KEY=VALUE (repeatable), e.g. --set filters.margin_rel=0.1")
    args = parser.parse_args(argv)
    arms = ARMS + tuple(Arm(f"+ mined hard negatives + EGA, alpha={a:g}", "mined", alpha=a) for a in args.alphas)
    if args.arms is not None:
        unknown = sorted(set(args.arms) - {a.name for a in arms})
        if unknown:
            parser.error(f"--arms: unknown {unknown}; the arms are {[a.name for a in arms]}")
        arms = tuple(a for a in arms if a.name in args.arms)
    torch.set_num_threads(1)  # the student's matrices are small: one thread is as fast, and kind to a shared machine
    pairs = mixed_pairs(args.pairs)
    rcfg = ReferenceConfig(steps=args.steps, seeds=tuple(args.seeds), mine_overrides=tuple(args.overrides))
    results = run_reference(pairs, args.work, rcfg, arms=arms, log=lambda m: print(m, file=sys.stderr, flush=True))
    results["data"] = {"source": "docstrings", **describe(pairs, PACKAGES)}
    given = argv if argv is not None else sys.argv[1:]
    results["command"] = shlex.join(["python", "-m", "benchmarks.train_reference", *given])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
