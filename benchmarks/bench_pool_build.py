"""Pool build speed: Ray tasks (one per partition) beside the single-process builder, in one run.

    python benchmarks/bench_pool_build.py                                # 20k 28x28 PNGs in a temp folder
    python benchmarks/bench_pool_build.py --images 1000000 --folder /work/bench-data/fmnist-1m --json

Setup (not timed): a folder of ``--images`` PNGs in ten class folders, made from Fashion-MNIST
(``/usr/share/datasets/fashion-mnist``; its 70,000 images are PNG-encoded once and repeated under
new names, so N can be any size), written by ``--setup-workers`` processes. With ``--folder`` a
folder made by an earlier run (same N) is reused and kept; a temp folder is deleted at the end.

Timed, each over the whole folder, listing included: ``build_pool`` in this process (serial) and
``build_partitioned`` with Ray tasks (``RayPartitionWriter``) on a local Ray started beforehand
(its start-up is reported, not counted, as on a running cluster). Both builds are checked to give
the same index; both pools are deleted afterwards. The machine's load average is reported with the
figures: on a shared machine the ratio is only meaningful beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from pipeline.pools import (
    IdxSource,
    ImageFolderSource,
    build_partitioned,
    build_pool,
    build_settings,
    encode_image,
)
from ray_jobs._shared.pool_build import DEFAULT_TASK_CPUS, RayPartitionWriter

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
_MARKER = ".bench-pool-build.json"


def _encoded_fashion_mnist() -> tuple[list[bytes], np.ndarray]:
    images, labels = [], []
    for split in ("train", "test"):
        source = IdxSource(FASHION_MNIST, split=split)
        images.extend(encode_image(image, "png") for image in source.images)
        labels.append(source.labels)
    return images, np.concatenate(labels)


_PNGS: list[bytes] = []
_LABELS: np.ndarray = np.zeros(0)


def _write_range(args: tuple[str, int, int]) -> int:
    folder, start, stop = args
    n = len(_PNGS)
    for i in range(start, stop):
        # i-th file: image i mod 70,000 under a unique name in its class folder.
        with open(f"{folder}/{CLASSES[int(_LABELS[i % n])]}/{i:07d}.png", "wb") as f:
            f.write(_PNGS[i % n])
    return stop - start


def make_folder(folder: Path, images: int, workers: int) -> float:
    """Write ``images`` PNGs into ``folder/<class>/``; reuse a complete folder from an earlier run."""
    marker = folder / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("images") == images:
        return 0.0
    if folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    global _PNGS, _LABELS
    _PNGS, _LABELS = _encoded_fashion_mnist()
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
    step = 20_000
    ranges = [(str(folder), s, min(s + step, images)) for s in range(0, images, step)]
    # fork: the workers inherit the encoded images instead of receiving them per task.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        written = sum(pool.imap_unordered(_write_range, ranges))
    assert written == images
    marker.write_text(json.dumps({"images": images}))
    return time.perf_counter() - start


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Set up, build twice (serial, Ray), check, clean up; return the figures."""
    temp = None
    if args.folder:
        folder = Path(args.folder)
    else:
        temp = Path(tempfile.mkdtemp(prefix="bench-pool-build-"))
        folder = temp / "images"
    out_root = Path(tempfile.mkdtemp(prefix="bench-pool-out-", dir=args.out_dir))
    setup_s = make_folder(folder, args.images, args.setup_workers)
    load_before = _load()
    figures: dict[str, Any] = {
        "images": args.images,
        "shard_samples": args.shard_samples,
        "partitions": -(-args.images // args.shard_samples),
        "cores": os.cpu_count(),
        "setup_s": round(setup_s, 1),
    }
    try:
        figures["load_avg_at_serial_start"] = _load()
        start = time.perf_counter()
        serial_index = build_pool(
            ImageFolderSource(str(folder)), str(out_root / "serial"), shard_samples=args.shard_samples
        )
        serial_s = time.perf_counter() - start

        ray_temp = tempfile.mkdtemp(prefix="bench-pool-ray-", dir="/tmp")
        start = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=args.ray_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            _temp_dir=ray_temp,
        )
        init_s = time.perf_counter() - start
        try:
            figures["load_avg_at_ray_start"] = _load()
            start = time.perf_counter()
            source = ImageFolderSource(str(folder))
            writer = RayPartitionWriter(task_cpus=args.task_cpus, progress=False)
            report = build_partitioned(
                source, str(out_root / "ray"), build_settings(source, shard_samples=args.shard_samples), write=writer
            )
            ray_s = time.perf_counter() - start
        finally:
            ray.shutdown()
            shutil.rmtree(ray_temp, ignore_errors=True)
        assert writer.executor == "ray"
        assert report.index.shards == serial_index.shards, "the Ray build and the serial build differ"
        assert report.index.num_samples == args.images
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    figures.update(
        {
            "serial_s": round(serial_s, 1),
            "serial_images_per_s": round(args.images / serial_s),
            "ray_s": round(ray_s, 1),
            "ray_images_per_s": round(args.images / ray_s),
            "ray_over_serial": round(serial_s / ray_s, 2),
            "ray_init_s": round(init_s, 1),
            "ray_cpus": args.ray_cpus,
            "task_cpus": args.task_cpus,
            "pool_bytes": report.index.total_bytes,
            "load_avg_1_5_15_before": load_before,
            "load_avg_1_5_15_after": _load(),
            "note": "load averages are 1/5/15-minute; on a shared machine read the ratio beside each phase's load",
        }
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000, help="images in the folder (default 20000)")
    parser.add_argument("--folder", help="image folder to make or reuse (kept); default a temp folder, deleted")
    parser.add_argument("--out-dir", help="where the two pools are written (deleted afterwards); default the temp dir")
    parser.add_argument("--shard-samples", type=int, default=10_000, help="samples per partition and shard")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="logical CPUs of the local Ray")
    parser.add_argument("--task-cpus", type=float, default=DEFAULT_TASK_CPUS, help="CPUs each partition task reserves")
    parser.add_argument("--setup-workers", type=int, default=os.cpu_count(), help="processes writing the folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    figures = run(args)
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{figures['images']:,} PNGs (28x28), {figures['partitions']} partitions, {figures['cores']} cores")
    print(f"  serial (one process): {figures['serial_images_per_s']:>8,} images/s  ({figures['serial_s']} s)")
    print(
        f"  Ray ({figures['ray_cpus']} CPUs, {figures['task_cpus']}/task): {figures['ray_images_per_s']:>8,} images/s  "
        f"({figures['ray_s']} s; {figures['ray_over_serial']}x serial; Ray start-up {figures['ray_init_s']} s)"
    )
    print(
        f"  load average (1/5/15 min) at the serial start {figures['load_avg_at_serial_start']}, "
        f"at the Ray start {figures['load_avg_at_ray_start']}, after {figures['load_avg_1_5_15_after']}"
    )


if __name__ == "__main__":
    main()
