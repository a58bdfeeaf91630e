"""Pool sources: an image folder, IDX files, CIFAR python batches, a synthetic task."""

from __future__ import annotations

from pipeline.pools.sources.base import ArraySamples, ImageSource, PartitionedSource, SourceSample
from pipeline.pools.sources.cifar import CifarSource, RestrictedUnpickler, load_cifar_pickle
from pipeline.pools.sources.idx import IdxSource, parse_idx, write_idx
from pipeline.pools.sources.image_folder import ImageFolderSource
from pipeline.pools.sources.synthetic import MAX_SYNTHETIC_CLASSES, SyntheticSource, synthetic

__all__ = [
    "MAX_SYNTHETIC_CLASSES",
    "ArraySamples",
    "PartitionedSource",
    "CifarSource",
    "IdxSource",
    "ImageFolderSource",
    "ImageSource",
    "RestrictedUnpickler",
    "SourceSample",
    "SyntheticSource",
    "load_cifar_pickle",
    "parse_idx",
    "synthetic",
    "write_idx",
]
