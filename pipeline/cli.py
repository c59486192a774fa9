"""`hardneg` command line. `mine` is called by other tools and scripts: add options, never rename them."""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import traceback

from .config import load_config
from .errors import user_errors


# Modules that add their own subcommands with `register(subparsers)`.
SUBCOMMANDS = ("pipeline.inspector.cli", "pipeline.train.cli", "pipeline.export.cli")


def cmd_mine(args) -> int:
    from .preflight import check_config_file, check_mine

    check_config_file(args.config)
    cfg = load_config(args.config, args.set)
    if args.no_progress:
        cfg.run.progress = False
    check_mine(cfg, args.out, args.teacher_checkpoint)  # before Ray and the model start

    from .mine import RunMismatch, mine
    from .stats import EpochStats

    try:
        result = mine(cfg, args.out, epoch=args.epoch, overwrite=args.overwrite, resume=args.resume,
                      checkpoint=args.teacher_checkpoint, mix_teacher=args.mix_teacher,
                      wait_lock=args.wait_lock)
    except (RunMismatch, ValueError) as exc:
        return fail(exc, args.debug)
    if result.skipped:
        print(f"{result.epoch_dir} is already complete for this config (use --overwrite to write it again)")
    else:
        how = "reused the kept retrieval" if result.reused_retrieval else "embedded and retrieved"
        print(f"wrote {result.epoch_dir} ({how}, {result.stats['timings']['total_s']:.1f}s)")
    print(EpochStats.summary_text(result.stats))
    print(f"shards: {result.epoch_dir}/part-*.parquet   rejects: {result.epoch_dir}/_rejects.jsonl")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hardneg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("mine", help="mine hard negatives into OUT/epoch=NNNN/ Parquet shards")
    p.add_argument("--config", required=True, help="YAML config (see docs/configuration.md)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sample.n_negatives=8 (repeatable)")
    p.add_argument("--epoch", type=int, default=0, help="epoch to write; reuses the kept retrieval (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing epoch, or a run of another config (deletes only what hardneg wrote)")
    p.add_argument("--wait-lock", type=float, nargs="?", const=math.inf, default=0.0, metavar="SECONDS",
                   help="when another hardneg run is writing OUT, wait for it (at most SECONDS if given) instead of "
                        "stopping at once")
    p.add_argument("--resume", action="store_true",
                   help="continue the run already in OUT (refuses to start a new one); finished work is kept")
    p.add_argument("--teacher-checkpoint", metavar="PATH",
                   help="re-embed and re-mine with these weights (e.g. the student after an epoch)")
    p.add_argument("--mix-teacher", type=float, default=0.0, metavar="W",
                   help="with --teacher-checkpoint: blend W of the configured teacher's scores into the checkpoint's")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_mine)
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(sub)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    for command in sub.choices.values():  # `hardneg mine ... --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand; an error the user can fix is one line on stderr and exit code 2 (`--debug`: traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except user_errors() as exc:
        return fail(exc, args.debug)


def fail(exc: BaseException, debug: bool) -> int:
    """One line on stderr (a YAML parser's message spans several), the traceback only with --debug; exit code 2."""
    if debug:
        traceback.print_exc()
    print("hardneg: error: " + " ".join(str(exc).split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
