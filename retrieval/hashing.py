"""PDQ perceptual hashes (Meta's 256-bit image hash, used by hash-sharing tools such as
ThreatExchange / HMA): computing them with the ``pdqhash`` package (the reference C++ code; the
optional extra ``pip install retrieval[pdq]``), and their hex, byte and Hamming forms.

A hash is stored as 32 bytes, most significant bit first: ``bytes.fromhex(hex)`` of the 64-hex-digit
form the hash-sharing tools exchange (the reference ``Hash256::toString``: word 15 first). The
Hamming distance of two hashes does not depend on the order, but the hex form does, so every
conversion goes through :func:`to_hex` / :func:`from_hex`.

Dihedral variants: the hashes of the image rotated by 90, 180 and 270 degrees and flipped on its
four axes, computed by ``pdqhash`` from the same DCT (:data:`DIHEDRAL`, in the reference order).
"""
from __future__ import annotations

import numpy as np

BITS = 256
BYTES = 32
# the 7 variants beside the original, in the order the reference code returns them
DIHEDRAL = ("rotate90", "rotate180", "rotate270", "flipx", "flipy", "flipplus1", "flipminus1")
# PDQ's own recommendation for a match (docs/lifecycle.md "PDQ hash lists")
DEFAULT_MAX_DISTANCE = 31

INSTALL_HINT = "the PDQ hashes need the optional package pdqhash: pip install 'retrieval[pdq]'"


def _pdqhash():
    try:
        import pdqhash
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return pdqhash


def available() -> bool:
    try:
        _pdqhash()
    except RuntimeError:
        return False
    return True


def _pack(vector: np.ndarray) -> bytes:
    return np.packbits(np.asarray(vector, dtype=np.uint8)).tobytes()


def pdq_of_rgb(rgb: np.ndarray) -> tuple[bytes, int, bytes]:
    """An H x W x 3 uint8 RGB array (the FULL decoded image) -> (hash, quality, the 7 dihedral
    variants' hashes concatenated: 224 bytes)."""
    vectors, quality = _pdqhash().compute_dihedral(np.ascontiguousarray(rgb, dtype=np.uint8))
    return _pack(vectors[0]), int(quality), b"".join(_pack(v) for v in vectors[1:])


def to_hex(h: bytes) -> str:
    """32 bytes -> 64 hex digits (lower case)."""
    if len(h) != BYTES:
        raise ValueError(f"a PDQ hash is {BYTES} bytes, got {len(h)}")
    return bytes(h).hex()


def from_hex(text: str) -> bytes:
    """64 hex digits -> 32 bytes; a clear ValueError otherwise."""
    s = str(text).strip().lower()
    if len(s) != 2 * BYTES or any(c not in "0123456789abcdef" for c in s):
        raise ValueError(f"not a PDQ hash (64 hex digits): {str(text)[:80]!r}")
    return bytes.fromhex(s)


def matrix(values: "list[bytes] | bytes | np.ndarray") -> np.ndarray:
    """Hashes (a list of 32-byte values, their concatenation, or an array) -> N x 32 uint8."""
    if isinstance(values, np.ndarray):
        return np.ascontiguousarray(values, dtype=np.uint8).reshape(-1, BYTES)
    data = bytes(values) if isinstance(values, (bytes, bytearray)) else b"".join(values)
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, BYTES).copy()


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances of hash rows: ``a`` N x 32, ``b`` M x 32 -> N x M int32 (brute force)."""
    return _POPCOUNT[np.bitwise_xor(a[:, None, :], b[None, :, :])].sum(axis=2, dtype=np.int32)


def similarity(distance: np.ndarray) -> np.ndarray:
    """The cosine of the two hashes as +-1 vectors, ``1 - 2 d / 256``: 1 = the same hash, 0.76 at
    the default threshold of 31 bits (the score column of a PDQ match row)."""
    return (1.0 - 2.0 * np.asarray(distance, dtype=np.float32) / BITS).astype(np.float32)
