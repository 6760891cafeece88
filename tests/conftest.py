"""What the test files share: the Hypothesis settings, the digits data, trained models, a browser.

Hypothesis runs every property test under the ``qcourse`` profile, loaded here before any test
module is imported: no deadline (a machine shared with other builds makes single examples slow
now and then, and a deadline turns that into a flaky failure). Each test still chooses its own
``max_examples`` with ``@settings(max_examples=N)``, which inherits the rest from this profile.

The finite-difference helpers are in ``support.py``; the headless browser and the guarded page in
``browser_support.py`` (the ``browser`` fixture below opens one per test module).
"""

from __future__ import annotations

import functools
import os
import time

import pytest
from browser_support import chromium_browser
from hypothesis import settings

settings.register_profile("qcourse", deadline=None)
settings.load_profile("qcourse")


# --------------------------------------------------------------------------- data and models


@pytest.fixture(scope="module")
def digits():
    """The 8x8 digits, ``((X_train, y_train), (X_test, y_test))``, the default split (seed 0)."""
    from qcourse.datasets import load_digits

    return load_digits("train"), load_digits("test")


@functools.cache
def _trained_mlp(sizes: tuple[int, ...], epochs: int, lr: float, seed: int):
    from qcourse.datasets import load_digits
    from qcourse.nn import make_mlp, train

    X, y = load_digits("train")
    model = make_mlp(sizes, seed=seed)
    history = train(model, X, y, epochs=epochs, lr=lr, seed=seed, progress=False)
    return model.state_dict(), history


@pytest.fixture(scope="session")
def trained_mlp():
    """``trained_mlp(sizes, epochs, lr=1e-2, seed=0)``: an MLP trained on the digits' training
    split (cached per worker; each call returns a fresh model, which the test may change) and
    its training history."""
    from qcourse.nn import make_mlp

    def make(sizes, epochs: int, lr: float = 1e-2, seed: int = 0):
        state, history = _trained_mlp(tuple(sizes), epochs, lr, seed)
        model = make_mlp(tuple(sizes), seed=seed)
        model.load_state_dict(state)
        return model, {k: list(v) for k, v in history.items()}

    return make


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (``browser_support.chromium_browser``), one per test module."""
    with chromium_browser() as chromium:
        yield chromium


# --------------------------------------------------------------------------- the order of files

#: ``make test`` runs ``pytest -n 2 --dist loadfile --no-loadscope-reorder``: each test file goes
#: whole to one of two workers, in the order below, and a worker that finishes a file takes the
#: next.  The book build (``test_book.py``, minutes in one process) starts first, so the other
#: worker spends those minutes on the heaviest files; the files that read the built book
#: (BOOK_READERS) come after them, when the book is there, instead of holding a worker while they
#: wait for it; the many small files come last and fill the gaps, so that neither core idles at
#: the end.  (By default pytest-xdist sorts files by their number of tests, which started the
#: build late and left one core idle for minutes.)
FIRST_FILES = ("test_book.py", "test_chapters.py", "test_grading.py", "test_binder.py",
               "test_lab.py", "test_book_execution.py", "test_sandbox.py", "test_conv.py",
               "test_cnn.py", "test_mixed_precision.py", "test_bad_input.py", "test_deploy.py")
BOOK_READERS = ("test_reader_view.py", "test_browser.py")


def file_rank(filename: str) -> tuple[int, int]:
    """Where a test file goes in the run: FIRST_FILES in order, then BOOK_READERS, then the rest
    as collected (alphabetically)."""
    if filename in FIRST_FILES:
        return (0, FIRST_FILES.index(filename))
    if filename in BOOK_READERS:
        return (1, BOOK_READERS.index(filename))
    return (2, 0)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: file_rank(item.path.name))  # stable: tests keep their order


# --------------------------------------------------------------------------- a run's timeline

#: ``QCOURSE_TIMELINE=file make test`` appends one line per test phase to ``file``: worker,
#: start and end (seconds since the epoch), phase and test id; for finding where a core idles.
_TIMELINE = os.environ.get("QCOURSE_TIMELINE")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    start = time.time()
    yield
    _log_phase(item, "setup", start)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    start = time.time()
    yield
    _log_phase(item, "call", start)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    start = time.time()
    yield
    _log_phase(item, "teardown", start)


def _log_phase(item, phase: str, start: float) -> None:
    if _TIMELINE:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(_TIMELINE, "a") as log:
            log.write(f"{worker}\t{start:.2f}\t{time.time():.2f}\t{phase}\t{item.nodeid}\n")
