"""Pools: sharded WebDataset on any fsspec storage. Build, label, list, check and decode.

No Ray here: the Ray Data reader lives in ``ray_jobs/_shared/pool_data.py`` and calls into this
package. See ``docs/pools.md`` for the format and the commands.
"""

from __future__ import annotations

from pipeline.pools.build import build_pool, sample_files
from pipeline.pools.decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OUTPUT_COLUMNS,
    DecodedSample,
    DecodeError,
    DecodeSpec,
    decode_batch,
    decode_image,
    decode_sample,
    spec_for_model,
)
from pipeline.pools.encode import ENCODINGS, encode_image
from pipeline.pools.errors import (
    DuplicateKeyError,
    EmptyPoolError,
    LabelError,
    PoolError,
    PoolExistsError,
    PoolNotFoundError,
    ShardFormatError,
    ShardReadError,
)
from pipeline.pools.format import (
    IMAGE_EXTENSIONS,
    INDEX_NAME,
    PoolIndex,
    ShardEntry,
    brace_pattern,
    shard_name,
    validate_key,
)
from pipeline.pools.labeling import LabelReport, label_pool, read_labels, read_labels_table, resolve_label
from pipeline.pools.listing import ResolvedPool, ShardRef, read_index, resolve_pool
from pipeline.pools.scan import (
    CheckMode,
    PoolCheck,
    RawSample,
    check_pool,
    iter_pool_samples,
    iter_shard_samples,
)
from pipeline.pools.sources import (
    CifarSource,
    IdxSource,
    ImageFolderSource,
    ImageSource,
    SourceSample,
    SyntheticSource,
    synthetic,
)
from pipeline.pools.writer import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SAMPLES, PoolWriter

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "DEFAULT_SHARD_SAMPLES",
    "ENCODINGS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "INDEX_NAME",
    "OUTPUT_COLUMNS",
    "CheckMode",
    "CifarSource",
    "DecodeError",
    "DecodeSpec",
    "DecodedSample",
    "DuplicateKeyError",
    "EmptyPoolError",
    "IdxSource",
    "ImageFolderSource",
    "ImageSource",
    "LabelError",
    "LabelReport",
    "PoolCheck",
    "PoolError",
    "PoolExistsError",
    "PoolIndex",
    "PoolNotFoundError",
    "PoolWriter",
    "RawSample",
    "ResolvedPool",
    "ShardEntry",
    "ShardFormatError",
    "ShardReadError",
    "ShardRef",
    "SourceSample",
    "SyntheticSource",
    "brace_pattern",
    "build_pool",
    "check_pool",
    "decode_batch",
    "decode_image",
    "decode_sample",
    "encode_image",
    "iter_pool_samples",
    "iter_shard_samples",
    "label_pool",
    "read_index",
    "read_labels",
    "read_labels_table",
    "resolve_label",
    "resolve_pool",
    "sample_files",
    "shard_name",
    "spec_for_model",
    "synthetic",
    "validate_key",
]
