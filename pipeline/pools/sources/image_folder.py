"""A folder of image files, with or without one subfolder per class.

Layouts (``split`` picks ``root/<split>/`` when that subfolder exists):

- ``root/<class>/<name>.jpg``: every image one level down -> labeled, classes = sorted
  subfolder names (torchvision ``ImageFolder`` order);
- anything else (images at the top, or nested deeper): unlabeled.

Keys are the path relative to the (split) root without the extension, with ``.`` and
whitespace replaced by ``_`` (WebDataset keys cannot hold a ``.``): ``cat/img_001``.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem
from PIL import Image, UnidentifiedImageError

from pipeline.pools.format import IMAGE_EXTENSIONS, validate_key
from pipeline.pools.sources.base import SourceSample
from pipeline.storage import display_uri, filesystem_for, is_local

__all__ = ["ImageFiles", "ImageFolderSource", "READABLE_EXTENSIONS"]

# Read from the folder; the ones outside IMAGE_EXTENSIONS are re-encoded when building.
READABLE_EXTENSIONS = (*IMAGE_EXTENSIONS, "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
_UNSAFE_KEY_CHARS = re.compile(r"[.\s]")
# Objects fetched per request batch from object stores: fsspec's cat() of a list runs them
# concurrently, which hides the per-object latency that dominates small images on S3.
_FETCH_BATCH = 64


@dataclass(frozen=True)
class _Item:
    path: str
    key: str
    label: int | None
    # Size and version (ETag on object stores, mtime on disks) from the listing: a partition's
    # fingerprint, so a resumed build notices a file that was replaced.
    size: int
    version: str


class ImageFolderSource:
    """Images under a folder, labeled by class subfolder when every image sits in one.

    Args:
        folder: Root URI (local or any fsspec storage).
        split: Optional subfolder to use (``train``/``test``); ``None`` uses the root.
        storage_options: fsspec options for ``folder``.

    Raises:
        FileNotFoundError: If the folder (or its ``split`` subfolder) does not exist.
        ValueError: If it holds no images, or two files map to the same key.
    """

    def __init__(self, folder: str, split: str | None = None, storage_options: Mapping[str, Any] | None = None) -> None:
        self.folder = folder
        self.split = split
        self.fs, root = filesystem_for(folder, storage_options)
        if not self.fs.isdir(root):
            raise FileNotFoundError(f"image folder {folder} does not exist")
        if split is not None:
            if not self.fs.isdir(f"{root}/{split}"):
                raise FileNotFoundError(f"image folder {folder} has no {split!r} subfolder for --split")
            root = f"{root}/{split}"
        self.root = root
        listing = self.fs.find(root, detail=True)
        files = sorted(p for p in listing if p.rsplit(".", 1)[-1].lower() in READABLE_EXTENSIONS)
        if not files:
            raise ValueError(f"no images ({', '.join(READABLE_EXTENSIONS)}) under {folder}")
        relative = [p[len(root) + 1 :] for p in files]
        by_class = all(r.count("/") == 1 for r in relative)
        self._classes = tuple(sorted({r.split("/", 1)[0] for r in relative})) if by_class else None
        self._items: list[_Item] = []
        owners: dict[str, str] = {}
        class_index = {name: i for i, name in enumerate(self._classes or ())}
        for path, rel in zip(files, relative):
            key = _UNSAFE_KEY_CHARS.sub("_", rel.rsplit(".", 1)[0])
            validate_key(key)
            if key in owners:
                raise ValueError(f"{owners[key]} and {display_uri(self.fs, path)} both map to key {key!r}; rename one")
            owners[key] = display_uri(self.fs, path)
            label = class_index[rel.split("/", 1)[0]] if self._classes else None
            info = listing[path]
            version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
            self._items.append(_Item(path, key, label, int(info.get("size") or 0), str(version)))

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Sorted class subfolder names, or ``None`` when the layout has no class folders."""
        return self._classes

    def provenance(self) -> dict[str, Any]:
        """Source kind, folder, split and sample count."""
        return {"kind": "image_folder", "folder": self.folder, "split": self.split, "samples": len(self._items)}

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[SourceSample]:
        return iter(ImageFiles(self.fs, self._items))

    def partition(self, start: int, stop: int) -> ImageFiles:
        """Files ``start .. stop-1`` (paths and labels only; the task reads the bytes)."""
        return ImageFiles(self.fs, self._items[start:stop])

    def fingerprint(self, start: int, stop: int) -> str:
        """Digest of the paths, keys, labels, sizes and versions of files ``start .. stop-1``."""
        h = hashlib.sha256()
        for item in self._items[start:stop]:
            h.update(f"{item.path}\t{item.key}\t{item.label}\t{item.size}\t{item.version}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class ImageFiles:
    """Image files to read, in order: a whole :class:`ImageFolderSource` or one partition of it.

    Each file is checked to decode (``Image.verify``) before it becomes a sample: a corrupt
    file stops the build with a ``ValueError`` naming it.
    """

    fs: AbstractFileSystem
    items: Sequence[_Item]

    @property
    def classes(self) -> None:
        """A partition does not know the folder's class names; its build does."""
        return None

    def provenance(self) -> dict[str, Any]:
        """A partition has no provenance of its own."""
        return {"kind": "image_files", "samples": len(self.items)}

    def __len__(self) -> int:
        return len(self.items)

    def _contents(self) -> Iterator[tuple[_Item, bytes]]:
        if is_local(self.fs):
            for item in self.items:
                with open(item.path, "rb") as f:  # fsspec's file object costs more than the read
                    yield item, f.read()
            return
        for i in range(0, len(self.items), _FETCH_BATCH):
            batch = self.items[i : i + _FETCH_BATCH]
            got = self.fs.cat([item.path for item in batch], on_error="return")
            for item in batch:
                data = got.get(item.path)
                if isinstance(data, BaseException):
                    raise data
                if data is None:
                    raise FileNotFoundError(f"{display_uri(self.fs, item.path)} vanished after the folder was listed")
                yield item, data

    def __iter__(self) -> Iterator[SourceSample]:
        for item, data in self._contents():
            ext = item.path.rsplit(".", 1)[-1].lower()
            _verify_image(data, display_uri(self.fs, item.path))
            yield SourceSample(key=item.key, image=data, image_ext=ext, label=item.label)


def _verify_image(data: bytes, where: str) -> None:
    # Fail the build on a corrupt source file instead of storing it for every later job to trip on.
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{where} is not a readable image ({err}); fix or remove it") from None
