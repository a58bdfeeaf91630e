"""Per-key pseudo-random numbers from a seeded hash: the same key gets the same number everywhere.

Randomness in acquisition (the ``random`` strategy, Gumbel noise for stochastic batch
acquisition, the sample behind the manifest's quantiles) is drawn per sample key rather than from
a generator's stream, so a value never depends on which actor, batch or shard order saw the key:
streaming top-k over these values merges exactly, and a rerun reproduces the selection.
``hashlib.blake2b`` is used, not Python's ``hash()``, which is salted per process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

__all__ = ["key_uniforms"]

# 52 bits: (m + 0.5) / 2**52 is then exact in float64 and at most 1 - 2**-53, never 1.0
# (with 53 bits the largest m + 0.5 rounds up to 2**53 and gives exactly 1.0).
_MANTISSA_BITS = 52
_DIGEST_BYTES = 8


def key_uniforms(keys: Iterable[str], seed: int, domain: str) -> np.ndarray:
    """Map each key to a uniform number in the open interval (0, 1).

    Args:
        keys: Sample keys, [N]: any iterable of str, including numpy and pyarrow string arrays.
        seed: Any integer with ``|seed| < 2**127``; different seeds give independent streams.
        domain: Short tag (at most 16 bytes) separating uses, so the ``random`` strategy and the
            Gumbel noise drawn with the same seed are independent of each other.

    Returns:
        float64 array [N], strictly inside (0, 1) (never 0, so ``log`` is always finite).

    Raises:
        TypeError: If ``seed`` is not an integer or a key is not a string.
        ValueError: If ``domain`` is longer than 16 bytes or ``seed`` is out of range.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    person = domain.encode()
    if len(person) > 16:
        raise ValueError(f"hash domain {domain!r} is longer than 16 bytes")
    try:
        salt = int(seed).to_bytes(16, "little", signed=True)
    except OverflowError as err:
        raise ValueError(f"seed {seed} does not fit in 128 bits") from err
    # Copying a keyed hasher is cheaper than constructing one per key.
    base = hashlib.blake2b(digest_size=_DIGEST_BYTES, salt=salt, person=person)
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        keys = keys.to_pylist()
    digests = bytearray()
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"sample keys must be strings, got {type(key).__name__} {key!r}")
        hasher = base.copy()
        hasher.update(key.encode("utf-8"))
        digests += hasher.digest()
    words = np.frombuffer(bytes(digests), dtype="<u8") >> np.uint64(64 - _MANTISSA_BITS)
    # (m + 0.5) / 2**52 with m in [0, 2**52): the midpoints keep 0 and 1 out of reach.
    return (words.astype(np.float64) + 0.5) * 2.0**-_MANTISSA_BITS
