"""`hardneg export`: registered by pipeline/cli.py like the other sub-command modules."""
from __future__ import annotations

from . import FORMATS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a mined epoch in another trainer's format (docs/export.md)",
        description="Write epoch N of the run in OUT as FORMAT into DIR, with the run's lineage in "
                    "DIR/_hardneg_export.yaml. DIR must be empty, or hold a previous export and --overwrite.")
    p.add_argument("out", help="run folder written by `hardneg mine`")
    p.add_argument("--epoch", type=int, default=0, help="epoch to export (default 0)")
    p.add_argument("--format", required=True, choices=list(FORMATS), dest="fmt")
    p.add_argument("--to", required=True, help="destination folder (created; must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous export in DIR (only the files it listed are deleted)")
    p.add_argument("--style", choices=["triplet", "n-tuple", "labeled-list"],
                   help="sentence-transformers: layout (default triplet)")
    p.add_argument("--scores", action="store_true", help="sentence-transformers: add the teacher's scores")
    p.add_argument("--n-negatives", type=int, help="sentence-transformers n-tuple: negatives per row "
                   "(default: the run's sample.n_negatives)")
    p.add_argument("--samples-per-shard", type=int, help="webdataset: samples per tar shard (default 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    """An ExportError is a user error: pipeline/cli.py prints it as one line and exits with 2."""
    from . import export

    options = {"style": args.style, "scores": args.scores or None, "n_negatives": args.n_negatives,
               "samples_per_shard": args.samples_per_shard}
    record = export(args.out, args.epoch, args.fmt, args.to, overwrite=args.overwrite,
                    progress=not args.no_progress, **options)
    counts = {k: v for k, v in record["exported"].items() if not isinstance(v, dict)}
    print(f"wrote {args.fmt} export of {args.out} epoch {args.epoch} to {args.to}: {len(record['files'])} files, "
          + ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, list)))
    return 0
