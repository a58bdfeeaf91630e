"""Sources: IDX, image folders, CIFAR batches (restricted unpickling), the synthetic task."""

from __future__ import annotations

import gzip
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models import create_model
from pipeline.pools import (
    CifarSource,
    DecodeSpec,
    IdxSource,
    ImageFolderSource,
    build_pool,
    decode_image,
    iter_pool_samples,
    resolve_pool,
    sample_files,
    synthetic,
)
from pipeline.pools.sources import load_cifar_pickle, parse_idx, write_idx

RAW = DecodeSpec(channels=1, height=28, width=28, mean=(0.0,), std=(1 / 255,))  # pixels back as 0..255


def _write_idx_folder(folder: Path, images: np.ndarray, labels: np.ndarray, gz: bool, prefix: str = "train") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, idx, array in (("images", "idx3", images), ("labels", "idx1", labels)):
        data = write_idx(array)
        name = f"{prefix}-{kind}-{idx}-ubyte"
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / name).write_bytes(data)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_folder_builds_a_pool_with_the_exact_pixels(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 3, 1, 9, 2, 3, 0], dtype=np.uint8)
    _write_idx_folder(tmp_path / "idx", images, labels, gz)
    source = IdxSource(str(tmp_path / "idx"), split="train")
    assert source.classes == tuple(str(i) for i in range(10))
    build_pool(source, str(tmp_path / "pool"), shard_samples=3)
    samples = list(iter_pool_samples(resolve_pool(str(tmp_path / "pool"))))
    assert [s.key for s in samples] == [f"train_{i:06d}" for i in range(7)]
    assert [int(s.files["cls"]) for s in samples] == labels.tolist()
    for sample, image in zip(samples, images):
        assert np.array_equal(np.rint(decode_image(sample.files["png"], RAW)[0]), image)


def test_idx_test_split_and_missing_files(tmp_path: Path) -> None:
    images = np.zeros((2, 4, 4), dtype=np.uint8)
    _write_idx_folder(tmp_path / "idx", images, np.array([1, 0], dtype=np.uint8), gz=True, prefix="t10k")
    assert [s.key for s in IdxSource(str(tmp_path / "idx"), split="test")] == ["test_000000", "test_000001"]
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        IdxSource(str(tmp_path / "idx"), split="train")


def test_idx_rejects_malformed_files(tmp_path: Path) -> None:
    good = write_idx(np.zeros((3, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="truncated"):
        parse_idx(good[:-5], "x")
    with pytest.raises(ValueError, match="not an IDX file"):
        parse_idx(b"PK\x03\x04" + good, "x")
    _write_idx_folder(tmp_path / "idx", np.zeros((3, 4, 4), np.uint8), np.zeros(2, np.uint8), gz=False)
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        IdxSource(str(tmp_path / "idx"))


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_folder_with_class_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for cls, colour in (("dog", (0, 0, 200)), ("cat", (200, 0, 0))):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            (root / cls / f"img.{i}.png").write_bytes(_png(colour))
    jpeg = io.BytesIO()
    Image.new("RGB", (9, 9), (0, 200, 0)).save(jpeg, format="JPEG")
    (root / "cat" / "photo one.jpg").write_bytes(jpeg.getvalue())
    source = ImageFolderSource(str(root))
    assert source.classes == ("cat", "dog")
    build_pool(source, str(tmp_path / "pool"))
    samples = {s.key: s for s in iter_pool_samples(resolve_pool(str(tmp_path / "pool")))}
    assert sorted(samples) == ["cat/img_0", "cat/img_1", "cat/photo_one", "dog/img_0", "dog/img_1"]
    assert samples["dog/img_1"].files["cls"] == b"1" and samples["cat/img_0"].files["cls"] == b"0"
    # Files already in a pool format pass through byte for byte (no lossy re-encoding).
    assert samples["cat/photo_one"].files["jpg"] == (root / "cat" / "photo one.jpg").read_bytes()


def test_image_folder_without_classes_and_reencoding(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("L", (5, 5), 77).save(root / "a.bmp")
    (root / "b.png").write_bytes(_png((1, 2, 3)))
    source = ImageFolderSource(str(root))
    assert source.classes is None
    files = {s.key: sample_files(s) for s in source}
    assert set(files["a"]) == {"png"} and "cls" not in files["a"]  # bmp is not a pool format: re-encoded
    assert set(sample_files(next(iter(source)), "webp")) == {"webp"}


def test_image_folder_rejects_a_corrupt_image_by_name(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="broken.png"):
        build_pool(ImageFolderSource(str(tmp_path / "imgs")), str(tmp_path / "pool"))


def test_image_folder_split_subfolder(tmp_path: Path) -> None:
    (tmp_path / "ds" / "test" / "x").mkdir(parents=True)
    (tmp_path / "ds" / "test" / "x" / "1.png").write_bytes(_png((9, 9, 9)))
    assert [s.key for s in ImageFolderSource(str(tmp_path / "ds"), split="test")] == ["x/1"]
    with pytest.raises(FileNotFoundError, match="'train'"):
        ImageFolderSource(str(tmp_path / "ds"), split="train")


def _cifar10(folder: Path, per_batch: int = 3) -> np.ndarray:
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = [f"class{i}".encode() for i in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, f, protocol=2)
    all_data = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        all_data.append(data)
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(x) for x in rng.integers(0, 10, per_batch)],
            b"data": data,
            b"filenames": [f"{name}_{j}.png".encode() for j in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return np.concatenate(all_data[:5])


def test_cifar10_batches_build_a_pool(tmp_path: Path) -> None:
    train = _cifar10(tmp_path / "cifar-10-batches-py")
    source = CifarSource(tmp_path / "cifar-10-batches-py", split="train")
    assert source.classes[:2] == ("class0", "class1")
    build_pool(source, str(tmp_path / "pool"))
    samples = list(iter_pool_samples(resolve_pool(str(tmp_path / "pool"))))
    assert len(samples) == 15 and samples[-1].key == "train_000014"
    rgb = DecodeSpec(channels=3, height=32, width=32, mean=(0.0,), std=(1 / 255,))
    pixels = decode_image(samples[4].files["png"], rgb)  # [3, 32, 32]
    assert np.array_equal(np.rint(pixels.reshape(-1)), train[4])  # R plane, G plane, B plane
    assert b'"filename":"data_batch_2_1.png"' in samples[4].files["json"]
    assert len(list(CifarSource(tmp_path / "cifar-10-batches-py", split="test"))) == 3


def test_cifar100_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"apple", b"bee"], b"coarse_label_names": [b"food", b"insect"]}, f)
    with open(folder / "test", "wb") as f:
        pickle.dump(
            {
                b"data": np.zeros((2, 3072), np.uint8),
                b"fine_labels": [1, 0],
                b"coarse_labels": [1, 0],
                b"filenames": [b"a.png", b"b.png"],
            },
            f,
        )
    samples = list(CifarSource(folder, split="test"))
    assert [s.label for s in samples] == [1, 0] and samples[0].meta == {"filename": "a.png", "coarse_label": 1}


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "batches.meta"
    with open(path, "wb") as f:
        pickle.dump({b"label_names": [_Exploit(marker)]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        load_cifar_pickle(path)
    assert not marker.exists()


def test_synthetic_is_deterministic_and_prefix_stable() -> None:
    a = [sample_files(s) for s in synthetic(12, seed=5)]
    b = [sample_files(s) for s in synthetic(30, seed=5)][:12]
    assert a == b
    c = [sample_files(s) for s in synthetic(12, seed=6)]
    assert a != c
    train = {sample_files(s)["png"] for s in synthetic(20, seed=5, split="train")}
    test = {sample_files(s)["png"] for s in synthetic(20, seed=5, split="test")}
    assert not train & test
    labels = [s.label for s in synthetic(500, seed=0)]
    assert set(labels) == set(range(10))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be positive"),
        ({"n": 5, "num_classes": 1}, "num_classes"),
        ({"n": 5, "channels": 2}, "channels"),
        ({"n": 5, "split": "val"}, "split"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthetic(**kwargs)


def _tensors(n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    spec = DecodeSpec(1, 28, 28)
    samples = list(synthetic(n, seed=0, image_size=28, channels=1, split=split))
    x = np.stack([decode_image(sample_files(s)["png"], spec) for s in samples])
    return torch.from_numpy(x), torch.tensor([s.label for s in samples])


def test_synthetic_task_is_learnable_by_the_small_cnn() -> None:
    torch.manual_seed(0)
    x_train, y_train = _tensors(800, "train")
    x_test, y_test = _tensors(400, "test")
    model = create_model("small_cnn", 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        model.train()
        order = torch.randperm(len(x_train))
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.6, f"held-out accuracy {accuracy:.2f}; chance is 0.10"
