"""CIFAR-10 / CIFAR-100 "python version" batch folders, read with a restricted unpickler.

The official batches are Python pickles. Pickle can run arbitrary code, so these files
are only read from a local path the user names (a file they downloaded and trust), and
even then through :class:`RestrictedUnpickler`, which resolves no global except what
numpy needs to rebuild an array (``_reconstruct``, ``ndarray``, ``dtype``, plus
``_codecs.encode`` for bytes written by Python 3): dicts, lists,
ints and bytes are pickle opcodes and need no globals. Anything else in the file is a
``pickle.UnpicklingError`` instead of a function call. Pool bytes are never unpickled.

CIFAR-10: ``data_batch_1..5`` (train), ``test_batch`` (test), ``batches.meta``.
CIFAR-100: ``train``, ``test``, ``meta`` (fine and coarse label names).
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.pools.sources.base import ArraySamples, SourceSample

__all__ = ["CifarSource", "RestrictedUnpickler", "load_cifar_pickle"]

# The exact callables numpy arrays pickle with, taken from a live array so the module
# path (numpy.core vs numpy._core) is right for the installed numpy.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); a
    # codec transforms data and runs nothing (torch's weights_only unpickler allows it too).
    ("_codecs", "encode"): codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy array reconstruction globals.

    Raises:
        pickle.UnpicklingError: When the pickle references any other global.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` only if it is on the allow-list."""
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: CIFAR batches only hold numpy "
                "arrays, lists and bytes (is this really a CIFAR python batch?)"
            ) from None


def load_cifar_pickle(path: str | Path) -> dict[str, Any]:
    """Load one CIFAR batch or meta file from a local, user-trusted path.

    Args:
        path: Local file path.

    Returns:
        The dict with ``str`` keys (the files store ``bytes`` keys).

    Raises:
        pickle.UnpicklingError: If the file references anything but numpy arrays.
        ValueError: If it does not hold a dict.
    """
    with open(path, "rb") as f:
        # encoding="bytes": the batches were written by Python 2; str fields arrive as bytes.
        obj = RestrictedUnpickler(f, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _names(values: list[Any]) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)


class CifarSource:
    """Images and labels from a CIFAR-10 or CIFAR-100 python batch folder.

    Keys are ``<split>_<index>`` over the split's batches in order (``train_000000`` ..
    ``train_049999``); metadata carries the original file name (and CIFAR-100's coarse label).

    Args:
        folder: Local folder (``cifar-10-batches-py`` or ``cifar-100-python``).
        split: ``"train"`` or ``"test"``.

    Raises:
        FileNotFoundError: If the folder holds neither layout.
        ValueError: On a batch whose shapes do not match.
    """

    def __init__(self, folder: str | Path, split: str = "train") -> None:
        if split not in ("train", "test"):
            raise ValueError(f"CIFAR split must be 'train' or 'test', got {split!r}")
        root = Path(folder)
        self.folder = str(folder)
        self.split = split
        if (root / "batches.meta").is_file():
            self.variant = "cifar10"
            meta = load_cifar_pickle(root / "batches.meta")
            self._classes = _names(meta["label_names"])
            self._coarse: tuple[str, ...] | None = None
            files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        elif (root / "meta").is_file():
            self.variant = "cifar100"
            meta = load_cifar_pickle(root / "meta")
            self._classes = _names(meta["fine_label_names"])
            self._coarse = _names(meta["coarse_label_names"])
            files = [split]
        else:
            raise FileNotFoundError(
                f"{folder} is not a CIFAR python folder: no batches.meta (CIFAR-10) or meta (CIFAR-100)"
            )
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing CIFAR batch file(s) {', '.join(missing)}")
        self._paths = [root / f for f in files]
        self._loaded: ArraySamples | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names from the meta file (fine labels for CIFAR-100)."""
        return self._classes

    def provenance(self) -> dict[str, Any]:
        """Source kind, variant, folder and split."""
        return {"kind": "cifar", "variant": self.variant, "folder": self.folder, "split": self.split}

    def _batches(self) -> Iterator[tuple[np.ndarray, list[int], list[dict[str, Any]]]]:
        label_field = "labels" if self.variant == "cifar10" else "fine_labels"
        for path in self._paths:
            batch = load_cifar_pickle(path)
            data = np.asarray(batch["data"], dtype=np.uint8)
            labels = [int(v) for v in batch[label_field]]
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
                raise ValueError(
                    f"{path}: expected data [N, 3072] and N labels, got {list(data.shape)} and {len(labels)}"
                )
            # Rows are R(1024) G(1024) B(1024), each 32x32 row-major -> [N, 32, 32, 3].
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            filenames = _names(batch.get("filenames", [])) or ("",) * len(data)
            coarse = batch.get("coarse_labels")
            metas: list[dict[str, Any]] = []
            for j in range(len(data)):
                meta: dict[str, Any] = {"filename": filenames[j]}
                if coarse is not None and self._coarse is not None:
                    meta["coarse_label"] = int(coarse[j])
                metas.append(meta)
            yield images, labels, metas

    def _all(self) -> ArraySamples:
        # A parallel build cuts the split into ranges; the batches (150 MB for CIFAR's train
        # split) are read once on the driver and each range ships with its pixels.
        if self._loaded is None:
            parts = list(self._batches())
            images = np.concatenate([p[0] for p in parts])
            labels = np.asarray([v for p in parts for v in p[1]], dtype=np.int64)
            metas = [m for p in parts for m in p[2]]
            keys = [f"{self.split}_{i:06d}" for i in range(len(labels))]
            self._loaded = ArraySamples(keys=keys, images=images, labels=labels, metas=metas)
        return self._loaded

    def __len__(self) -> int:
        return len(self._all())

    def partition(self, start: int, stop: int) -> ArraySamples:
        """Samples ``start .. stop-1`` with their pixels and metadata."""
        whole = self._all()
        assert whole.labels is not None and whole.metas is not None
        return ArraySamples(
            keys=list(whole.keys[start:stop]),
            images=np.ascontiguousarray(whole.images[start:stop]),
            labels=whole.labels[start:stop],
            metas=list(whole.metas[start:stop]),
        )

    def fingerprint(self, start: int, stop: int) -> str:
        """Digest of the keys, pixels, labels and metadata of samples ``start .. stop-1``."""
        return self.partition(start, stop).digest()

    def __iter__(self) -> Iterator[SourceSample]:
        index = 0
        for images, labels, metas in self._batches():
            for j, image in enumerate(images):
                yield SourceSample(
                    key=f"{self.split}_{index:06d}",
                    image=np.ascontiguousarray(image),
                    label=labels[j],
                    meta=metas[j],
                )
                index += 1
