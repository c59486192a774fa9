"""`hardneg inspect` and `hardneg report`: `register(subparsers)` adds both to the main command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="browse mined pairs, dropped candidates and statistics in a local web app",
        description="Serve a local web app over one run's shards: queries with positives and negatives, the "
                    "candidates each filter dropped, statistics, and marking false negatives into "
                    "OUT/blocklist.jsonl.")
    p.add_argument("run", metavar="OUT", help="the run's output folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only); any other address prints a warning "
                        "and every request then needs the token of the printed URL")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--epoch", type=int, default=None, help="epoch to open (default: the latest complete one)")
    p.add_argument("--image-root", default=None,
                   help="image folder, when the run's config.input.image_root does not resolve from here")
    p.add_argument("--who", default=None,
                   help="name recorded with each false negative marked in this session (default: the OS user)")
    p.set_defaults(func=inspect_cmd)

    r = subparsers.add_parser(
        "report", help="write the statistics and a sample of queries as one self-contained HTML file",
        description="Write one HTML file (inline styles, SVG charts and data: URI thumbnails, no script) with "
                    "the statistics of an epoch and a sample of its queries, to attach to an experiment log.")
    r.add_argument("run", metavar="OUT", help="the run's output folder")
    r.add_argument("--out", dest="dest", metavar="FILE.html", default=None,
                   help="where to write (default: ./report-<OUT name>-epochNNNN.html)")
    r.add_argument("--epoch", type=int, default=None, help="epoch to report (default: the latest complete one)")
    r.add_argument("--sample", type=int, default=20, help="queries to include (default 20)")
    r.add_argument("--image-root", default=None, help="image folder, as for `inspect`")
    r.set_defaults(func=report_cmd)


def inspect_cmd(args: argparse.Namespace) -> int:
    from pipeline.inspector.app import exposure_warning, make_server
    from pipeline.preflight import check_port

    check_port(args.port)
    try:
        server = make_server(args.run, args.host, args.port, args.epoch, args.image_root, verbose=True,
                             who=args.who)
    except (FileNotFoundError, KeyError) as e:
        print(f"hardneg inspect: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"hardneg inspect: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    try:
        ep = server.inspector.run.epoch(args.epoch)
    except (FileNotFoundError, KeyError):
        print(f"hardneg inspect: no complete epoch {args.epoch if args.epoch is not None else ''} in {args.run}",
              file=sys.stderr)
        server.server_close()
        return 2
    warning = exposure_warning(args.host, server.server_address[1])
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"hardneg inspector: {ep.total:,} queries in epoch {ep.number} of {args.run}\n  {server.url}  "
          f"(Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def report_cmd(args: argparse.Namespace) -> int:
    from pipeline.inspector import report
    from pipeline.inspector.store import Run

    from pipeline.preflight import check_writable_file

    if args.dest:
        check_writable_file(args.dest, "--out")  # before the report is built
    try:
        number = Run(args.run).epoch(args.epoch).number
        dest = args.dest or f"report-{Path(args.run).resolve().name}-epoch{number:04d}.html"
        check_writable_file(dest, "--out")
        path = report.write(args.run, dest, number, args.sample, args.image_root)
    except (FileNotFoundError, KeyError) as e:
        print(f"hardneg report: no such run or epoch: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
