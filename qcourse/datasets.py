"""The small real data sets the course trains on: the UCI 8x8 handwritten digits, and the text
of the Python reference documentation.

The file ``qcourse/data/digits.npz`` ships inside the package (its source, citation and licence
are in ``qcourse/data/README.md``), so every chapter runs offline and sees the same numbers.
The calibration, ptq, qat and mixed_precision chapters all start from :func:`load_digits`.

The language-model chapters (transformer, kv_cache, weight_only) read English prose that every
Python installation carries: the topics of the language reference in the standard library's
``pydoc_data.topics`` (what ``help("return")`` prints), split by topic (:func:`load_pydoc_text`).
"""

from __future__ import annotations

import functools
import hashlib
import numbers
from importlib import resources

import numpy as np

__all__ = [
    "DIGITS_CLASSES",
    "DIGITS_FEATURES",
    "PYDOC_HELDOUT_EVERY",
    "load_digits",
    "load_digits_raw",
    "load_pydoc_text",
    "pydoc_text_digest",
    "pydoc_topics",
]

#: Number of classes (the digits 0..9).
DIGITS_CLASSES = 10
#: Number of input features (8 x 8 pixels, flattened).
DIGITS_FEATURES = 64
#: Largest pixel value in the file: each pixel counts set cells in a 4 x 4 block, 0..16.
_PIXEL_MAX = 16

_SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _read_npz() -> tuple[np.ndarray, np.ndarray]:
    ref = resources.files("qcourse").joinpath("data").joinpath("digits.npz")
    with ref.open("rb") as fh, np.load(fh) as data:
        images = np.array(data["images"])
        labels = np.array(data["labels"])
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """The file as stored: ``images`` uint8 (1797, 8, 8) in 0..16 and ``labels`` uint8 (1797,).

    Returns fresh, writable copies, so callers may modify them.
    """
    images, labels = _read_npz()
    return images.copy(), labels.copy()


def _check_args(split, seed, test_fraction) -> None:
    if not isinstance(split, str) or split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be a non-negative integer, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise TypeError(
            f"test_fraction must be a real number in (0, 1), got {type(test_fraction).__name__}"
        )
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")


def _stratified_split(labels: np.ndarray, seed: int, test_fraction: float):
    """Stratified split of ``range(len(labels))``: each class keeps the same share in both parts.

    For each class ``c`` with ``n_c`` examples, ``round(test_fraction * n_c)`` of them, drawn
    with ``np.random.default_rng(seed)``, go to the test part; the rest to the train part.
    Both index arrays are then shuffled (same generator), so classes are interleaved.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = rng.permutation(idx)
        n_test = int(round(float(test_fraction) * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_digits(split: str = "train", seed: int = 0, test_fraction: float = 0.25):
    r"""Load the 8x8 digits as a float32 design matrix and int64 labels.

    Each image is flattened row by row into 64 features and scaled to :math:`[0, 1]` by
    :math:`x = p / 16` (the pixel counts ``p`` lie in 0..16, so every feature is exactly
    representable in float32).  The split is stratified and deterministic: for each digit
    class, ``round(test_fraction * n_class)`` examples chosen with
    ``np.random.default_rng(seed)`` form the test part.

    Parameters
    ----------
    split : {"train", "test", "all"}
        Which part to return.  ``"all"`` returns the 1797 examples in file order (``seed``
        and ``test_fraction`` are then checked but not used).
    seed : int
        Seed of the split (non-negative).
    test_fraction : float
        Share of each class that goes to the test part, strictly between 0 and 1.

    Returns
    -------
    X : numpy.ndarray, float32, shape (n, 64)
    y : numpy.ndarray, int64, shape (n,)

    Examples
    --------
    >>> X, y = load_digits("train")
    >>> X.shape, X.dtype, y.dtype
    ((1347, 64), dtype('float32'), dtype('int64'))
    """
    _check_args(split, seed, test_fraction)
    images, labels = _read_npz()
    X = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(_PIXEL_MAX)
    y = labels.astype(np.int64)
    if split == "all":
        return X, y
    train, test = _stratified_split(y, int(seed), float(test_fraction))
    idx = train if split == "train" else test
    return X[idx], y[idx]


# --------------------------------------------------------------------------- the Python reference

#: Every this-many-th topic of ``pydoc_data.topics``, in alphabetical order starting with the first,
#: is held out from training.
PYDOC_HELDOUT_EVERY = 8

_TEXT_SPLITS = ("train", "heldout", "all")


def pydoc_topics(split: str = "all") -> list[str]:
    """The names of the reference topics in ``split``, in alphabetical order.

    ``"heldout"`` is every :data:`PYDOC_HELDOUT_EVERY`-th name (``names[0::8]``: "assert",
    "await", "break", ...), ``"train"`` the others, ``"all"`` every topic.
    """
    if not isinstance(split, str) or split not in _TEXT_SPLITS:
        raise ValueError(f"split must be one of {_TEXT_SPLITS}, got {split!r}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    if split == "all":
        return names
    held = set(names[0::PYDOC_HELDOUT_EVERY])
    return [n for n in names if (n in held) == (split == "heldout")]


def load_pydoc_text(split: str = "train") -> bytes:
    """The Python language reference's help topics as UTF-8 bytes, split by topic.

    The text is ``pydoc_data.topics.topics`` from the running Python's standard library (about
    465 KB of English technical prose under the PSF licence; see ``qcourse/data/README.md``).
    The topics of ``split`` (:func:`pydoc_topics`) are concatenated in alphabetical order, each
    followed by a newline.  Held-out topics never appear in the training text, so the held-out
    loss measures prose the model has not seen.  The text differs a little between Python
    versions; :func:`pydoc_text_digest` identifies it.
    """
    if not isinstance(split, str) or split not in _TEXT_SPLITS:   # before the cache hashes it
        raise ValueError(f"split must be one of {_TEXT_SPLITS}, got {split!r}")
    return _pydoc_text(split)


@functools.lru_cache(maxsize=3)
def _pydoc_text(split: str) -> bytes:
    from pydoc_data.topics import topics

    return b"".join(topics[name].encode("utf-8") + b"\n" for name in pydoc_topics(split))


def pydoc_text_digest() -> str:
    """SHA-256 (hex) of the whole text, ``load_pydoc_text("all")``; with the Python version, it
    says which text a model was trained on."""
    return hashlib.sha256(load_pydoc_text("all")).hexdigest()
