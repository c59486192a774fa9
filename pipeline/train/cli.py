"""`hardneg train-reference`: the reference trainer on any (query, positive) pairs file (MMEB layout)."""
from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-reference", help="train the reference student (heads on frozen teacher vectors) and compare arms",
        description="Split PAIRS into training and held-out parts, mine the training part with `hardneg mine`, "
                    "train in-batch / random / mined / mined+EGA arms with several seeds, and report held-out "
                    "recall@1 / recall@5 (see docs/training.md).")
    p.add_argument("--pairs", required=True, help="Parquet or JSONL with id, dataset, qry, pos_text")
    p.add_argument("--work", required=True, help="folder for the mined run and the embedding cache")
    p.add_argument("--out", help="write the results JSON here (default: WORK/results.json)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, default=7, help="negatives per query")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--top-k", type=int, default=50, help="candidates retrieved per training query when mining")
    p.add_argument("--alpha", type=float, default=1.0, help="EGA amplification of the EGA arms")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="mining config override (repeatable), e.g. --set filters.margin_rel=0.1")
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import replace

    from pipeline.read import read_rows

    from pipeline.train.reference import ARMS, ReferenceConfig, format_table, run_reference

    pairs, _ = read_rows(args.pairs)
    for i, row in enumerate(pairs):
        row.setdefault("id", f"q{i}")
        row["dataset"] = row.get("dataset") or Path(args.pairs).stem
    rcfg = ReferenceConfig(steps=args.steps, seeds=tuple(args.seeds), k=args.k, batch_size=args.batch_size,
                           top_k=args.top_k, mine_overrides=tuple(args.overrides))
    arms = [replace(arm, alpha=args.alpha) if arm.alpha else arm for arm in ARMS]
    results = run_reference(pairs, args.work, rcfg, arms=arms)
    out = Path(args.out or Path(args.work) / "results.json")
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(format_table(results))
    return 0
