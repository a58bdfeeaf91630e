"""``lplgrad pool build`` and ``lplgrad pool label``: make pools and labeled sets.

    lplgrad pool build --synthetic 20000 --out /data/pools/synth --seed 0
    lplgrad pool build --idx /usr/share/datasets/fashion-mnist --split train --out s3://bucket/pools/fmnist-train \
        --storage-option endpoint_url=http://minio:9000
    lplgrad pool build --cifar ~/data/cifar-10-batches-py --split test --encoding png --out /data/pools/cifar-test
    lplgrad pool build --image-folder ~/photos --out gs://bucket/pools/photos --encoding jpg
    lplgrad pool build --image-folder s3://bucket/raw/photos --out s3://bucket/pools/photos --address auto
    lplgrad pool build --idx /usr/share/datasets/fashion-mnist --out /data/pools/fmnist --serial
    lplgrad pool label --pool /data/pools/synth --labels answers.csv --out /data/pools/labeled-1 \
        --append-to /data/pools/labeled-0

The same commands run without the ``lplgrad`` entry point as ``python -m ray_jobs.pool_cli build ...``.
``pool build`` writes its partitions (``--shard-samples`` consecutive samples each) as Ray tasks on the
cluster at ``--address`` (default: ``RAY_ADDRESS``, else a local Ray); ``--serial`` writes them in this
process without Ray. Either way the index is written last, and running the same command again on an
unfinished build resumes it (docs/pools.md, "Building on a cluster"). ``pool label`` is one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.pools import (
    DEFAULT_SHARD_BYTES,
    DEFAULT_SHARD_SAMPLES,
    ENCODINGS,
    BuildReport,
    CifarSource,
    IdxSource,
    ImageFolderSource,
    ImageSource,
    PartitionedSource,
    PoolIndex,
    brace_pattern,
    build_partitioned,
    build_settings,
    label_pool,
    shard_name,
    synthetic,
)
from pipeline.storage import parse_storage_options
from ray_jobs._shared.errors import one_line_errors

__all__ = ["add_commands", "main"]


def _common_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="new pool prefix: path, file://, s3://, gs://, ...")
    parser.add_argument(
        "--shard-samples",
        type=int,
        default=DEFAULT_SHARD_SAMPLES,
        help=f"maximum samples per shard (default {DEFAULT_SHARD_SAMPLES})",
    )
    parser.add_argument(
        "--shard-bytes",
        type=int,
        default=DEFAULT_SHARD_BYTES,
        help=f"target maximum bytes per shard (default {DEFAULT_SHARD_BYTES})",
    )
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for every URI, repeatable (endpoint_url=http://host:9000, "
        "anon=true, client_kwargs.region_name=eu-west-1)",
    )


def _add_build(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "build",
        help="build a pool from images, IDX, CIFAR or a synthetic task",
        description="Build a pool: WebDataset shards plus index.json.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image-folder", metavar="DIR", help="folder of images, optional class subfolders")
    source.add_argument("--idx", metavar="DIR", help="folder of MNIST/Fashion-MNIST IDX files (gzip or raw)")
    source.add_argument("--cifar", metavar="DIR", help="local CIFAR-10/100 python batch folder (trusted file)")
    source.add_argument("--synthetic", metavar="N", type=int, help="N images of a learnable synthetic task")
    parser.add_argument(
        "--split",
        choices=("train", "test"),
        default=None,
        help="split for sources that have one (default train; image folders: a subfolder)",
    )
    parser.add_argument(
        "--encoding",
        choices=ENCODINGS,
        default=None,
        help="image encoding (default: keep jpg/png/webp files, else png)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --synthetic")
    parser.add_argument("--num-classes", type=int, default=10, help="classes of --synthetic")
    parser.add_argument("--image-size", type=int, default=32, help="height and width of --synthetic")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="channels of --synthetic")
    parser.add_argument("--class-names", help="comma-separated class names replacing the source's")
    parser.add_argument("--unlabeled", action="store_true", help="drop labels (a pool for annotators)")
    parser.add_argument(
        "--address",
        help="Ray cluster to build on (auto, HOST:PORT, ray://HOST:10001; default RAY_ADDRESS, else a local Ray)",
    )
    parser.add_argument(
        "--task-cpus",
        type=float,
        default=0.5,
        help="CPUs each partition's Ray task reserves (default 0.5: reads, encoding and uploads interleave)",
    )
    parser.add_argument("--serial", action="store_true", help="write every partition in this process, without Ray")
    _common_output(parser)
    parser.set_defaults(func=run_build)


def _add_label(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "label",
        help="make a labeled pool from a pool and a key,label table",
        description="Write a labeled pool (samples with cls) from a pool and a CSV/Parquet key,label table.",
    )
    parser.add_argument("--pool", required=True, help="pool the keys refer to")
    parser.add_argument("--labels", required=True, help="CSV (header key,label) or Parquet table")
    parser.add_argument("--append-to", help="existing labeled pool whose samples come first")
    parser.add_argument("--classes", help="comma-separated class list, for pools without one")
    _common_output(parser)
    parser.set_defaults(func=run_label)


def _add_pool_commands(subparsers: Any) -> None:
    _add_build(subparsers)
    _add_label(subparsers)


def add_commands(subparsers: Any) -> None:
    """Add ``pool build`` and ``pool label`` to a top-level CLI.

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned; each leaf
            parser sets ``func`` to a callable ``(args) -> int`` exit code.
    """
    pool = subparsers.add_parser("pool", help="build and label pools", description="Build and label pools.")
    _add_pool_commands(pool.add_subparsers(dest="pool_command", required=True, metavar="{build,label}"))


def _source(args: argparse.Namespace, storage_options: dict[str, Any]) -> ImageSource:
    split = args.split or "train"
    if args.image_folder:
        return ImageFolderSource(args.image_folder, split=args.split, storage_options=storage_options)
    if args.idx:
        return IdxSource(args.idx, split=split, storage_options=storage_options)
    if args.cifar:
        return CifarSource(args.cifar, split=split)
    return synthetic(
        args.synthetic,
        seed=args.seed,
        num_classes=args.num_classes,
        image_size=args.image_size,
        channels=args.channels,
        split=split,
    )


def _summary(uri: str, index: PoolIndex, **extra: Any) -> str:
    names = [s.name for s in index.shards]
    # A partition that overflowed --shard-bytes adds pool-NNNNNN_0001.tar: no brace pattern covers those.
    contiguous = names == [shard_name(i) for i in range(len(names))]
    return json.dumps(
        {
            "pool": uri,
            "samples": index.num_samples,
            "shards": len(index.shards),
            "bytes": index.total_bytes,
            "labeled": index.labeled,
            "classes": len(index.classes) if index.classes else None,
            "brace_pattern": brace_pattern(len(index.shards)) if contiguous else None,
            **extra,
        }
    )


@one_line_errors("pool")
def run_build(args: argparse.Namespace) -> int:
    """Run ``pool build``; prints a one-line JSON summary."""
    storage_options = parse_storage_options(args.storage_option)
    class_names = [c.strip() for c in args.class_names.split(",")] if args.class_names else None
    source = _source(args, storage_options)
    assert isinstance(source, PartitionedSource)  # every source the command offers hands out ranges
    settings = build_settings(
        source,
        encoding=args.encoding,
        shard_samples=args.shard_samples,
        shard_bytes=args.shard_bytes,
        class_names=class_names,
        unlabeled=args.unlabeled,
    )
    if args.serial:
        report: BuildReport = build_partitioned(source, args.out, settings, storage_options)
        executor = "process" if report.written else "none"
    else:
        from ray_jobs._shared.pool_build import RayPartitionWriter  # Ray only when it is asked for

        writer = RayPartitionWriter(args.address, task_cpus=args.task_cpus)
        report = build_partitioned(source, args.out, settings, storage_options, write=writer)
        executor = writer.executor
    extra = {"partitions": report.partitions, "written": report.written, "kept": report.kept, "executor": executor}
    print(_summary(args.out, report.index, **extra))
    return 0


@one_line_errors("pool")
def run_label(args: argparse.Namespace) -> int:
    """Run ``pool label``; prints a one-line JSON summary."""
    storage_options = parse_storage_options(args.storage_option)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    report = label_pool(
        args.pool,
        args.labels,
        args.out,
        append_to=args.append_to,
        classes=classes,
        storage_options=storage_options,
        shard_samples=args.shard_samples,
        shard_bytes=args.shard_bytes,
    )
    print(
        _summary(
            args.out, report.index, added=report.added, carried=report.carried, already_labeled=report.already_labeled
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m ray_jobs.pool_cli {build,label} ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.pool_cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_pool_commands(parser.add_subparsers(dest="pool_command", required=True, metavar="{build,label}"))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
