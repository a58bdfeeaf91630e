"""Parallel pool builds: Ray tasks write partitions, the driver writes the index last; re-runs resume.

What must be identical between the Ray build and the serial build (docs/pools.md, "Building on a
cluster"): partition i holds samples i*S .. (i+1)*S-1 of the source in order and writes
pool-{i:06d}.tar (then pool-{i:06d}_0001.tar, ... past --shard-bytes), so the shards are
byte-identical and the indexes equal except `created`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.pools import (
    INDEX_NAME,
    ImageFolderSource,
    PartialBuildError,
    PoolExistsError,
    UnfinishedPoolError,
    build_partitioned,
    build_pool,
    build_settings,
    iter_pool_samples,
    resolve_pool,
    write_partitions_serially,
)
from pipeline.storage import filesystem_for
from ray_jobs._shared.pool_build import RayPartitionWriter

SHARD_SAMPLES = 5
# Small enough that some partitions overflow into pool-NNNNNN_0001.tar, large enough for several samples.
SHARD_BYTES = 9 * 1024


def _png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """23 images in 3 class folders (one JPEG): 5 partitions of 5, the last one short."""
    root = tmp_path_factory.mktemp("images") / "imgs"
    rng = np.random.default_rng(0)
    for c, count in (("coat", 8), ("dress", 7), ("shirt", 8)):
        (root / c).mkdir(parents=True)
        for i in range(count):
            (root / c / f"{i:02d}.png").write_bytes(_png(rng))
    jpeg = io.BytesIO()
    Image.new("RGB", (9, 9), (0, 200, 0)).save(jpeg, format="JPEG")
    (root / "dress" / "photo.jpg").write_bytes(jpeg.getvalue())
    return root


@pytest.fixture(scope="module")
def serial_pool(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "pool"
    build_pool(ImageFolderSource(str(folder)), str(out), shard_samples=SHARD_SAMPLES, shard_bytes=SHARD_BYTES)
    return out


def _settings(source: ImageFolderSource):
    return build_settings(source, shard_samples=SHARD_SAMPLES, shard_bytes=SHARD_BYTES)


def _index(pool: Path) -> dict:
    doc = json.loads((pool / INDEX_NAME).read_text())
    doc.pop("created")
    return doc


def _assert_same_pool(pool: Path, reference: Path) -> None:
    assert _index(pool) == _index(reference)
    for shard in _index(reference)["shards"]:
        assert (pool / shard["name"]).read_bytes() == (reference / shard["name"]).read_bytes(), shard["name"]
    assert sorted(p.name for p in pool.iterdir()) == sorted(p.name for p in reference.iterdir())  # no _build/ left


def _key_shards(pool: str, storage_options: dict | None = None) -> dict[str, str]:
    return {s.key: s.shard.rsplit("/", 1)[-1] for s in iter_pool_samples(resolve_pool(pool, storage_options))}


def test_ray_build_equals_the_serial_build(ray_local, folder: Path, serial_pool: Path, tmp_path: Path) -> None:
    source = ImageFolderSource(str(folder))
    writer = RayPartitionWriter(progress=False)
    report = build_partitioned(source, str(tmp_path / "pool"), _settings(source), write=writer)
    assert writer.executor == "ray"
    assert (report.partitions, report.written, report.kept) == (5, 5, 0)
    _assert_same_pool(tmp_path / "pool", serial_pool)
    index = _index(serial_pool)
    assert index["num_samples"] == 24 and index["classes"] == ["coat", "dress", "shirt"]
    assert index["image_encoding"] == "mixed" and index["labeled"] is True
    names = [s["name"] for s in index["shards"]]
    assert "pool-000000.tar" in names and any("_0001.tar" in n for n in names)  # an overflowing partition
    # The deterministic assignment: sample j of the sorted folder lives in partition j // 5.
    keys = _key_shards(str(tmp_path / "pool"))
    ordered = sorted(keys)  # the folder's keys sort like its paths (class folders, then names)
    for j, key in enumerate(ordered):
        assert keys[key].startswith(f"pool-{j // SHARD_SAMPLES:06d}"), (key, keys[key])


class _Interrupted(Exception):
    pass


def _interrupting_writer(after: int):
    """Writes `after` partitions, then stops as a killed driver would: no more partitions, no index."""

    def write(out_uri, partitions, settings, storage_options=None):
        write_partitions_serially(out_uri, partitions[:after], settings, storage_options)
        raise _Interrupted

    return write


def test_interrupted_build_resumes_to_the_same_pool(ray_local, folder: Path, serial_pool: Path, tmp_path: Path) -> None:
    source = ImageFolderSource(str(folder))
    out = tmp_path / "pool"
    with pytest.raises(_Interrupted):
        build_partitioned(source, str(out), _settings(source), write=_interrupting_writer(2))
    # Mid-way: shards of two partitions, a plan, no index, and readers refuse the prefix.
    assert not (out / INDEX_NAME).exists() and (out / "pool-000001.tar").exists()
    assert not (out / "pool-000002.tar").exists()
    with pytest.raises(UnfinishedPoolError, match="unfinished pool build"):
        resolve_pool(str(out))
    # A task killed half-way leaves a partial shard and no record: it is written again.
    (out / "pool-000003.tar").write_bytes(b"partial")
    kept_shard = (out / "pool-000000.tar").stat()

    writer = RayPartitionWriter(progress=False)
    report = build_partitioned(source, str(out), _settings(source), write=writer)
    assert (report.written, report.kept, writer.executor) == (3, 2, "ray")
    assert (out / "pool-000000.tar").stat().st_mtime_ns == kept_shard.st_mtime_ns  # kept, not rewritten
    _assert_same_pool(out, serial_pool)


def test_rerun_refuses_a_complete_pool_and_other_settings(folder: Path, serial_pool: Path, tmp_path: Path) -> None:
    source = ImageFolderSource(str(folder))
    with pytest.raises(PoolExistsError, match="already holds a pool"):
        build_partitioned(source, str(serial_pool), _settings(source))
    out = tmp_path / "pool"
    with pytest.raises(_Interrupted):
        build_partitioned(source, str(out), _settings(source), write=_interrupting_writer(1))
    other = build_settings(source, shard_samples=SHARD_SAMPLES + 1, shard_bytes=SHARD_BYTES)
    with pytest.raises(PoolExistsError, match=r"unfinished build .*shard_samples: 5 then, 6 now"):
        build_partitioned(source, str(out), other)


def test_a_changed_source_file_rewrites_its_partition(folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "imgs"
    for path in folder.rglob("*.*"):
        (copy / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(folder)).write_bytes(path.read_bytes())
    source = ImageFolderSource(str(copy))
    out = tmp_path / "pool"
    with pytest.raises(_Interrupted):
        build_partitioned(source, str(out), _settings(source), write=_interrupting_writer(3))
    (copy / "coat" / "01.png").write_bytes(_png(np.random.default_rng(99)))  # in partition 0, already written
    source = ImageFolderSource(str(copy))
    report = build_partitioned(source, str(out), _settings(source))
    assert (report.written, report.kept) == (3, 2)  # partitions 0, 3 and 4
    fresh = tmp_path / "fresh"
    build_partitioned(source, str(fresh), _settings(source))
    _assert_same_pool(out, fresh)


def test_corrupt_images_are_named_and_the_rest_is_kept(ray_local, folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "imgs"
    for path in folder.rglob("*.*"):
        (copy / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(folder)).write_bytes(path.read_bytes())
    good = (copy / "coat" / "02.png").read_bytes()
    (copy / "coat" / "02.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # partition 0
    (copy / "shirt" / "07.png").write_bytes(b"")  # partition 4
    source = ImageFolderSource(str(copy))
    out = tmp_path / "pool"
    with pytest.raises(PartialBuildError) as info:
        build_partitioned(source, str(out), _settings(source), write=RayPartitionWriter(progress=False))
    message = str(info.value)
    assert "2 of 5 partitions" in message and "coat/02.png is not a readable image" in message
    assert "shirt/07.png is not a readable image" in message and "run the same command again" in message
    assert sorted(i for i, _ in info.value.failures) == [0, 4]
    assert not (out / INDEX_NAME).exists() and not (out / "pool-000000.tar").exists()  # partial shards deleted
    (copy / "coat" / "02.png").write_bytes(good)
    (copy / "shirt" / "07.png").unlink()
    source = ImageFolderSource(str(copy))
    report = build_partitioned(source, str(out), _settings(source), write=RayPartitionWriter(progress=False))
    assert report.written == 2 and report.kept == 3 and report.index.num_samples == 23


def test_ray_build_from_and_to_s3(ray_local, s3_server, folder: Path, serial_pool: Path) -> None:
    images = s3_server.uri("pb-images")
    fs, root = filesystem_for(images, s3_server.storage_options)
    for path in folder.rglob("*.*"):
        fs.pipe_file(f"{root}/{path.relative_to(folder)}", path.read_bytes())
    source = ImageFolderSource(images, storage_options=s3_server.storage_options)
    out = s3_server.uri("pb-pool")
    writer = RayPartitionWriter(progress=False)
    report = build_partitioned(source, out, _settings(source), s3_server.storage_options, write=writer)
    assert writer.executor == "ray" and report.written == 5
    expected = _index(serial_pool)
    index = json.loads(fs.cat_file(f"{filesystem_for(out, s3_server.storage_options)[1]}/{INDEX_NAME}"))
    assert index["shards"] == expected["shards"] and index["classes"] == expected["classes"]
    assert _key_shards(out, s3_server.storage_options) == _key_shards(str(serial_pool))
