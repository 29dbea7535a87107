"""Order-independent digests of the records a window counted, to recognise a replayed input.

Each record hashes to 64 bits; a window part's digest is the sum of its records' hashes modulo
2**64. The sum does not depend on batching or order, so the same input fed again (a file replayed
after a restart) gives the same digest and counts, whatever the batch boundaries were; any record
more, less or different changes it. A scored record hashes its float32 features and its own
timestamp (not one filled in from the clock, which a replay would not repeat); a rejected one
hashes its raw bytes.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

MASK = (1 << 64) - 1
_PRIME = np.uint64(0x100000001B3)
_SEED = np.uint64(0xCBF29CE484222325)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


@lru_cache(maxsize=16)
def _multipliers(n: int) -> np.ndarray:
    """Fixed odd 64-bit multipliers, one per feature (the same on every device and every run)."""
    rng = np.random.default_rng(0x65646765)
    return rng.integers(0, 1 << 63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def rows_digest(values: np.ndarray, ts: np.ndarray) -> int:
    """Sum of the rows' hashes: the features' float32 bits times per-column odd multipliers, the
    timestamp's float64 bits folded in, mixed."""
    if not len(values):
        return 0
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    stamp = np.where(np.isnan(ts), np.nan, ts).astype(np.float64).view(np.uint64)  # one NaN pattern
    with np.errstate(over="ignore"):
        h = bits.astype(np.uint64) @ _multipliers(bits.shape[1])
        h = _mix((h ^ _mix(stamp + _SEED)) * _PRIME)
    return int(h.sum(dtype=np.uint64))


def bytes_digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def hexdigest(total: int) -> str:
    return f"{total & MASK:016x}"
