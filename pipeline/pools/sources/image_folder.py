"""A folder of image files, with or without one subfolder per class.

Layouts (``split`` picks ``root/<split>/`` when that subfolder exists):

- ``root/<class>/<name>.jpg``: every image one level down -> labeled, classes = sorted
  subfolder names (torchvision ``ImageFolder`` order);
- anything else (images at the top, or nested deeper): unlabeled.

Keys are the path relative to the (split) root without the extension, with ``.`` and
whitespace replaced by ``_`` (WebDataset keys cannot hold a ``.``): ``cat/img_001``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Mapping
from typing import Any

from PIL import Image, UnidentifiedImageError

from pipeline.pools.format import IMAGE_EXTENSIONS, validate_key
from pipeline.pools.sources.base import SourceSample
from pipeline.storage import display_uri, filesystem_for

__all__ = ["ImageFolderSource", "READABLE_EXTENSIONS"]

# Read from the folder; the ones outside IMAGE_EXTENSIONS are re-encoded when building.
READABLE_EXTENSIONS = (*IMAGE_EXTENSIONS, "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
_UNSAFE_KEY_CHARS = re.compile(r"[.\s]")


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
        files = sorted(p for p in self.fs.find(root) if p.rsplit(".", 1)[-1].lower() in READABLE_EXTENSIONS)
        if not files:
            raise ValueError(f"no images ({', '.join(READABLE_EXTENSIONS)}) under {folder}")
        relative = [p[len(root) + 1 :] for p in files]
        by_class = all(r.count("/") == 1 for r in relative)
        self._classes = tuple(sorted({r.split("/", 1)[0] for r in relative})) if by_class else None
        self._items: list[tuple[str, str, int | None]] = []
        owners: dict[str, str] = {}
        for path, rel in zip(files, relative):
            key = _UNSAFE_KEY_CHARS.sub("_", rel.rsplit(".", 1)[0])
            validate_key(key)
            if key in owners:
                raise ValueError(f"{owners[key]} and {display_uri(self.fs, path)} both map to key {key!r}; rename one")
            owners[key] = display_uri(self.fs, path)
            label = self._classes.index(rel.split("/", 1)[0]) if self._classes else None
            self._items.append((path, key, label))

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
        for path, key, label in self._items:
            data = self.fs.cat_file(path)
            ext = path.rsplit(".", 1)[-1].lower()
            _verify_image(data, display_uri(self.fs, path))
            yield SourceSample(key=key, image=data, image_ext=ext, label=label)


def _verify_image(data: bytes, where: str) -> None:
    # Fail the build on a corrupt source file instead of storing it for every later job to trip on.
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{where} is not a readable image ({err}); fix or remove it") from None
