"""``lplgrad manifest show|verify|export|extract``: read a committed query run and hand it to labelers.

    lplgrad manifest show s3://bucket/queries                       # follows LATEST
    lplgrad manifest verify s3://bucket/queries/2026-11-21
    lplgrad manifest extract s3://bucket/queries/2026-11-21 --out s3://bucket/to-label/2026-11-21
    lplgrad manifest export s3://bucket/queries/2026-11-21 --format label-studio \
        --image-url-prefix s3://bucket/to-label/2026-11-21 --out tasks-2026-11-21.json
    lplgrad manifest export runs/query --format csv --out selection.csv
    lplgrad manifest report s3://bucket/queries/2026-11-21 --out report-2026-11-21.html

The same commands run as ``python -m ray_jobs.manifest_cli show ...``. None of them starts Ray.
URIs are local paths or any fsspec URI; ``--storage-option KEY=VALUE`` (repeatable) applies to
every URI (S3 endpoint and credentials otherwise come from ``AWS_ENDPOINT_URL`` and the usual
AWS variables). Exit status: 0 on success, 2 on an input error (one line:
``lplgrad manifest CMD: error: ... (fix)``), 1 on a failed verification or (extract) selected keys
whose images were not found.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.manifest.export import (
    EXPORT_FORMATS,
    export_selection,
    extract_images,
    format_summary,
    open_run,
    run_summary,
)
from pipeline.manifest.verify import verify_run
from pipeline.storage import parse_storage_options
from ray_jobs._shared.errors import one_line_errors

__all__ = ["add_commands", "main"]

_COMMANDS = "{show,verify,export,extract,report}"


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uri", help="run directory {out}/{run_id}, or the output root {out} (follows LATEST)")
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for every URI, repeatable (endpoint_url=http://host:9000)",
    )


def _pool_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pool", help="the pool's current location, when it moved since the run (shards are matched by file name)"
    )


def _add_manifest_commands(subparsers: Any) -> None:
    show = subparsers.add_parser("show", help="summarise a run: inputs, counts, top rows")
    _run_arguments(show)
    show.add_argument("--top", type=int, default=10, help="selection rows to print (default 10)")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(func=run_show)

    verify = subparsers.add_parser(
        "verify", help="check a run is complete, matches the schema and its checksums; exit 1 if not"
    )
    _run_arguments(verify)
    verify.add_argument(
        "--quick",
        action="store_true",
        help="skip streaming the scores' key column and hashing every file "
        "(row counts and file sizes are still checked)",
    )
    verify.set_defaults(func=run_verify)

    export = subparsers.add_parser("export", help="write the selection as CSV, JSON Lines or Label Studio tasks")
    _run_arguments(export)
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--out", required=True, help="destination file (path or fsspec URI), or - for stdout")
    export.add_argument(
        "--image-url-prefix",
        metavar="PREFIX",
        help="image URLs are PREFIX/KEY.EXT (required for label-studio; adds an image column otherwise)",
    )
    export.add_argument("--image-ext", help="extension of every image (default: looked up in the pool)")
    _pool_argument(export)
    export.set_defaults(func=run_export)

    extract = subparsers.add_parser("extract", help="copy the selected images out of the pool as KEY.EXT files")
    _run_arguments(extract)
    extract.add_argument("--out", required=True, help="destination folder or fsspec prefix")
    _pool_argument(extract)
    extract.add_argument(
        "--search-pool",
        action="store_true",
        help="look through every shard for keys not found in the shard the selection names",
    )
    extract.set_defaults(func=run_extract)

    report = subparsers.add_parser(
        "report", help="write one self-contained HTML page: selected images, scores, class mix, errors"
    )
    _run_arguments(report)
    report.add_argument("--out", help="HTML file (path or fsspec URI; default: report-RUN_ID.html here)")
    report.add_argument("--max-images", type=int, default=1000, help="thumbnails shown, rank order (default 1000)")
    _pool_argument(report)
    report.set_defaults(func=run_report)


def add_commands(subparsers: Any) -> None:
    """Add ``manifest show|verify|export|extract`` to a top-level CLI.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers()`` returned; each leaf parser sets
            ``func`` to a callable ``(args) -> int`` exit code.
    """
    manifest = subparsers.add_parser(
        "manifest",
        help="show, verify, export, extract and report committed query runs",
        description="Read committed query runs (selection manifests).",
    )
    _add_manifest_commands(manifest.add_subparsers(dest="manifest_command", required=True, metavar=_COMMANDS))


@one_line_errors("manifest")
def run_show(args: argparse.Namespace) -> int:
    """Print a run's summary (text, or JSON with ``--json``)."""
    summary = run_summary(open_run(args.uri, parse_storage_options(args.storage_option)), top=args.top)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    return 0


@one_line_errors("manifest")
def run_verify(args: argparse.Namespace) -> int:
    """Verify a run; list its problems and exit 1 when there are any."""
    result = verify_run(args.uri, parse_storage_options(args.storage_option), scan_scores=not args.quick)
    if result.ok:
        print(f"ok: {result.uri}")
        return 0
    print(f"{result.uri}: {len(result.problems)} problem(s)", file=sys.stderr)
    for problem in result.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1


@one_line_errors("manifest")
def run_export(args: argparse.Namespace) -> int:
    """Export the selection; says how many rows went where."""
    run = open_run(args.uri, parse_storage_options(args.storage_option))
    to_stdout = args.out == "-"
    data = export_selection(
        run,
        args.format,
        None if to_stdout else args.out,
        image_url_prefix=args.image_url_prefix,
        image_ext=args.image_ext,
        pool=args.pool,
    )
    if to_stdout:
        sys.stdout.write(data.decode())
    else:
        print(f"exported {run.manifest.counts.selected} rows of {run.uri} as {args.format} to {args.out}")
    return 0


@one_line_errors("manifest")
def run_extract(args: argparse.Namespace) -> int:
    """Extract the selected images; lists missing keys and exits 1 when there are any."""
    run = open_run(args.uri, parse_storage_options(args.storage_option))
    report = extract_images(run, args.out, pool=args.pool, search_pool=args.search_pool)
    print(
        json.dumps(
            {
                "run": run.uri,
                "out": report.out,
                "written": len(report.written),
                "missing": len(report.missing),
                "shards_read": report.shards_read,
                "bytes": report.bytes_written,
            }
        )
    )
    for key, reason in sorted(report.missing.items()):
        print(f"missing {key}: {reason}", file=sys.stderr)
    return 1 if report.missing else 0


@one_line_errors("manifest")
def run_report(args: argparse.Namespace) -> int:
    """Write the run's HTML report; says where and what it holds."""
    from pipeline.report import write_run_report  # matplotlib and jinja2 load only for this command

    options = parse_storage_options(args.storage_option)
    run = open_run(args.uri, options)
    out = args.out or f"report-{run.run_id}.html"
    report = write_run_report(run.uri, out, options, max_images=args.max_images, pool=args.pool)
    shown = sum(t.src is not None for t in report.thumbnails)
    print(f"report of {run.uri}: {shown} of {report.selected} selected images, {report.errors_total} errors -> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m ray_jobs.manifest_cli {show,verify,export,extract} ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.manifest_cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_manifest_commands(parser.add_subparsers(dest="manifest_command", required=True, metavar=_COMMANDS))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
