"""Pool shards as another tool would write them (plain tar of `KEY.png` members, no index, no class
list): shared by the query, incremental and proxy job tests (tests/conftest.py puts this folder on
the import path)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_png_shard(path: Path, samples: list[tuple[str, bytes]]) -> None:
    """One tar shard holding `KEY.png` with each payload as it is (corrupt payloads included)."""
    with tarfile.open(path, "w") as tar:
        for key, payload in samples:
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
