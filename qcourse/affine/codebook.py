"""Non-uniform quantization: a k-means codebook against the uniform grid at the same bits.

Re-exported by :mod:`qcourse.affine`; see the affine chapter.
"""

from __future__ import annotations

import numpy as np

from qcourse._checks import (
    MAX_SQUARABLE,
    check_int,
    real_array,
)
from qcourse.affine.quantizer import MAX_BITS

__all__ = [
    "codebook_dequantize",
    "codebook_effective_bits",
    "codebook_quantize",
    "kmeans_codebook",
]


# --- non-uniform quantization: a codebook ------------------------------------------------------


def _check_codebook(codebook) -> np.ndarray:
    cb = real_array(codebook, "codebook")
    if cb.ndim != 1:
        raise ValueError(f"codebook must be 1-D, got shape {cb.shape}")
    if np.any(np.diff(cb) < 0):
        raise ValueError("codebook must be sorted in increasing order")
    return cb


def codebook_quantize(x, codebook) -> np.ndarray:
    r"""Index of the nearest codebook entry for every value: :math:`q_i = \arg\min_k |x_i - c_k|`.

    The codebook (the lookup table) must be sorted; a value exactly halfway between two entries
    takes the lower index.  Indices are uint8 for up to 256 entries, uint16 beyond.  See the
    affine chapter.
    """
    cb = _check_codebook(codebook)
    x = real_array(x, "x", nonempty=False)
    mids = (cb[:-1] + cb[1:]) / 2
    idx = np.searchsorted(mids, x, side="left")
    return idx.astype(np.uint8 if cb.size <= 256 else np.uint16)


def codebook_dequantize(indices, codebook) -> np.ndarray:
    """Look the indices up in the table: ``codebook[indices]`` (dtype of the codebook).

    See the affine chapter.
    """
    cb = np.asarray(codebook)
    _check_codebook(cb)
    idx = np.asarray(indices)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= cb.size):
        raise ValueError(f"indices must lie in [0, {cb.size - 1}] for a codebook of {cb.size}")
    return cb[idx]


def kmeans_codebook(x, bits: int, *, seed: int, max_iter: int = 300) -> np.ndarray:
    r"""A :math:`2^b`-entry codebook fitted to ``x`` by k-means (Lloyd's algorithm).

    Minimizes :math:`\sum_i \min_k (x_i - c_k)^2`: starting from k-means++ seeding drawn with
    ``np.random.default_rng(seed)``, it alternates assigning each value to its nearest entry and
    moving each entry to the mean of its values, until the assignment stops changing (or
    ``max_iter``).  An entry left with no values keeps its place.  If ``x`` has fewer distinct
    values than :math:`2^b` entries, the codebook is those values, padded with the largest.
    Entries are returned sorted (float64).  Unlike a uniform grid, the entries crowd where the
    values are dense.  See the affine chapter.

    Bounds: ``bits`` in [1, 16], ``max_iter`` in [1, 10**6], ``|x|`` at most 1e150.
    """
    bits = check_int(bits, "bits", 1, MAX_BITS)
    seed = check_int(seed, "seed", 0)
    max_iter = check_int(max_iter, "max_iter", 1, 10**6)
    x = real_array(x, "x", max_abs=MAX_SQUARABLE).ravel()
    k = 2**bits
    uniq = np.unique(x)
    if uniq.size <= k:
        return np.concatenate([uniq, np.full(k - uniq.size, uniq[-1])])
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(x.size)]]
    d2 = (x - centers[0]) ** 2
    for _ in range(1, k):
        total = d2.sum()
        nxt = x[rng.integers(x.size)] if total == 0 else x[rng.choice(x.size, p=d2 / total)]
        centers.append(nxt)
        d2 = np.minimum(d2, (x - nxt) ** 2)
    cb = np.sort(np.array(centers))
    assign = None
    for _ in range(max_iter):
        new_assign = codebook_quantize(x, cb).astype(np.int64)
        if assign is not None and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        counts = np.bincount(assign, minlength=k)
        sums = np.bincount(assign, weights=x, minlength=k)
        filled = counts > 0
        cb = cb.copy()
        cb[filled] = sums[filled] / counts[filled]
        cb = np.sort(cb)
    return cb


def codebook_effective_bits(bits, n_values, *, entry_bits=32, n_codebooks=1) -> float:
    r"""Storage per value of codebook quantization: :math:`b + n_{cb} 2^b b_e / N`.

    ``bits``-bit indices plus ``n_codebooks`` tables of :math:`2^b` entries of ``entry_bits``
    bits each (32: the float32 lookup table), spread over ``n_values`` values.  See the affine
    chapter.

    Bounds: ``bits`` in [1, 16], ``entry_bits`` in [0, 1024], ``n_codebooks`` in [1, 2**40].
    """
    bits = check_int(bits, "bits", 1, MAX_BITS)
    n_values = check_int(n_values, "n_values", 1)
    entry_bits = check_int(entry_bits, "entry_bits", 0, 1024)
    n_codebooks = check_int(n_codebooks, "n_codebooks", 1, 2**40)
    return bits + n_codebooks * 2**bits * entry_bits / n_values
