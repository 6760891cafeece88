"""qcourse.kernels: the compiled int8 matmul against its NumPy reference, and its input checks."""

import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import qcourse
from qcourse import _kernels, kernels
from qcourse.kernels import (
    LADDER,
    available_paths,
    best_path,
    matmul_int8,
    matmul_int8_reference,
    matmul_int8_requant,
    matmul_int8_requant_reference,
    matmul_int8_u8s8,
    max_k_s8s8,
    prepack,
)


def _with_path(f, path):
    def run(a, b):
        return f(a, b, path=path)

    run.__name__ = f"{f.__name__}[{path}]"
    return run


# Every rung of the ladder, every instruction-set path this CPU has, the prepacked form, and the
# reference: all must give the identical exact result.
KERNELS = [matmul_int8, matmul_int8_reference, *LADDER.values()]
KERNELS += [_with_path(f, p) for f in (matmul_int8_u8s8, matmul_int8)
            for p in available_paths()]
KERNELS += [lambda a, b: matmul_int8(a, prepack(b))]
FAST_KERNELS = [f for f in KERNELS if f is not LADDER["naive (i-j-k)"]]


def exact_product(a, b):
    """Independent oracle: Python integers, no NumPy arithmetic."""
    a_list, b_list = a.tolist(), b.tolist()
    n = b.shape[1]
    return np.array(
        [[sum(x * b_list[k][j] for k, x in enumerate(row)) for j in range(n)] for row in a_list],
        dtype=np.int64,
    )


def test_k_bound_is_derived_from_int32():
    k = max_k_s8s8()
    assert k == 131071 == 2**17 - 1
    assert 128 * 128 * k <= np.iinfo(np.int32).max < 128 * 128 * (k + 1)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 1), (3, 5, 2), (17, 33, 9), (64, 64, 64),
                                   (1, 300, 5), (5, 300, 1), (31, 1, 29), (7, 3, 65), (13, 129, 97),
                                   (6, 4, 64), (12, 8, 128), (1, 1000, 1)])
def test_random_shapes_match_reference_and_python_ints(shape):
    m, k, n = shape
    rng = np.random.default_rng(sum(shape))
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    b = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
    expected = exact_product(a, b)
    for f in KERNELS:
        out = f(a, b)
        assert out.dtype == np.int32 and out.shape == (m, n)
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("fill_a, fill_b", [(-128, -128), (127, 127), (-128, 127), (127, -128)])
def test_extremes(fill_a, fill_b):
    a = np.full((3, 257), fill_a, dtype=np.int8)
    b = np.full((257, 4), fill_b, dtype=np.int8)
    for f in KERNELS:
        np.testing.assert_array_equal(f(a, b), np.full((3, 4), fill_a * fill_b * 257))


def test_k_at_the_overflow_bound_is_exact():
    k = max_k_s8s8()
    a = np.full((2, k), -128, dtype=np.int8)
    b = np.full((k, 3), -128, dtype=np.int8)
    b[:, 1] = 127
    b[::2, 2] = 127  # alternating column
    expected = np.array([16384 * k, -16256 * k, -16256 * ((k + 1) // 2) + 16384 * (k // 2)])
    for f in FAST_KERNELS:
        out = f(a, b)
        np.testing.assert_array_equal(out, np.tile(expected, (2, 1)))
    assert out.max() == 16384 * k == np.iinfo(np.int32).max - 16383


def test_k_past_the_bound_is_refused_not_wrapped():
    k = max_k_s8s8() + 1
    a = np.full((1, k), -128, dtype=np.int8)
    b = np.full((k, 1), -128, dtype=np.int8)
    for f in KERNELS:
        with pytest.raises(ValueError, match=r"K=131072 is too large.*131071"):
            f(a, b)


# The kernels' blocking, read from the extension: row tiles of TILE_ROWS (6 on the VNNI path, 2
# on AVX2), chunks of CHUNK_ROWS rows (16 tiles), blocks of K_BLOCK values of k (1024 quads: 4096),
# a k % 4 tail read from scratch, groups of GROUP_WIDTH (64) columns, threads over groups.
TILE, CHUNK = _kernels.TILE_ROWS, _kernels.CHUNK_ROWS
KB, GW = _kernels.K_BLOCK, _kernels.GROUP_WIDTH


def _exact(a, b):
    """The exact product through float64 BLAS (every partial sum is an integer below 2**53)."""
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int32)


def _check_every_path(a, b, expected, *, heights=range(1, 7), threads=(1, 2, 3)):
    packed = prepack(b)
    m = a.shape[0]
    for path in available_paths():
        for rows in heights:  # every tile height, at the start and at the end of A
            np.testing.assert_array_equal(matmul_int8(a[:rows], packed, path=path),
                                          expected[:rows], err_msg=f"{path} {rows}")
            np.testing.assert_array_equal(matmul_int8(a[m - rows:], packed, path=path),
                                          expected[m - rows:], err_msg=f"{path} last {rows}")
        for t in threads:
            np.testing.assert_array_equal(matmul_int8(a, packed, path=path, threads=t),
                                          expected, err_msg=f"{path} threads={t}")


# Each shape straddles one or more of those edges (one short, exact, one past): rows around a
# chunk and two chunks, columns around one and two groups (threads then get unequal shares),
# k around the 4-value quad.
@pytest.mark.parametrize("shape", [(CHUNK - 1, 257, GW - 1), (CHUNK, 256, GW),
                                   (CHUNK + 1, 255, GW + 1), (2 * CHUNK + 1, 513, 2 * GW + 1),
                                   (101, 1027, 70),
                                   (2, 259, 200), (11, 4, 1), (190, 1, 3)])
def test_vnni_blocking_edges(shape):
    m, k, n = shape
    rng = np.random.default_rng(m * k + n)
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    b = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
    expected = matmul_int8_reference(a, b)
    _check_every_path(a, b, expected)
    packed = prepack(b)
    mult = rng.uniform(1e-4, 1e-3, n)
    zb = rng.integers(-128, 128, n)
    for path in available_paths():
        np.testing.assert_array_equal(
            matmul_int8_requant(a, packed, mult, 3, a_zero_point=-5, b_zero_point=zb, path=path),
            matmul_int8_requant_reference(a, b, mult, 3, a_zero_point=-5, b_zero_point=zb),
            err_msg=path)


# The k blocks: K one short of a block, exactly one, one past (the second block is a single
# value: all tail), one quad past, and past two blocks with a tail; each with rows that fill
# and straddle a chunk, and columns that straddle a group.
@pytest.mark.parametrize("k", [KB - 1, KB, KB + 1, KB + 4, 2 * KB + 3])
def test_k_blocks_are_crossed_exactly(k):
    rng = np.random.default_rng(k)
    m, n = CHUNK + TILE + 1, GW + 3
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    b = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
    expected = _exact(a, b)
    _check_every_path(a, b, expected, heights=(1, TILE - 1, TILE), threads=(1, 2))
    mult = rng.uniform(1e-5, 1e-4, n)
    expected_q = matmul_int8_requant_reference(a, b, mult, -2, a_zero_point=7, b_zero_point=-3)
    for path in available_paths():
        np.testing.assert_array_equal(
            matmul_int8_requant(a, b, mult, -2, a_zero_point=7, b_zero_point=-3, path=path),
            expected_q, err_msg=path)


def test_extremes_across_k_blocks():
    # all -128 (the largest products) over two blocks plus a tail: a wrong block boundary moves
    # the result by a multiple of 16384 that random inputs could mask.
    k = 2 * KB + 1
    a = np.full((TILE + 1, k), -128, np.int8)
    b = np.full((k, GW + 1), -128, np.int8)
    b[:, 1] = 127
    for path in available_paths():
        out = matmul_int8(a, b, path=path)
        assert (out[:, 0] == 16384 * k).all() and (out[:, 1] == -16256 * k).all(), path


ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "qcourse" / "csrc"


def test_every_c_file_is_built_packaged_and_watched():
    # A new component in qcourse/csrc/ must be compiled (ext-modules sources / depends), shipped
    # in the sdist and the wheel (Binder runs a non-editable `pip install .`), and rebuilt by
    # `make` when it changes.
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    (ext,) = setuptools["ext-modules"]
    c_files = sorted(f"qcourse/csrc/{p.name}" for p in CSRC.glob("*.c"))
    headers = sorted(f"qcourse/csrc/{p.name}" for p in CSRC.glob("*.h"))
    assert len(c_files) >= 5 and "qcourse/csrc/qgemm.h" in headers
    assert sorted(s for s in ext["sources"] if s.endswith(".c")) == c_files
    assert sorted(ext["depends"]) == headers
    assert "qcourse.csrc" in setuptools["packages"]
    assert set(setuptools["package-data"]["qcourse.csrc"]) == {"*.c", "*.h"}
    assert not any("march" in flag for flag in ext["extra-compile-args"])
    sources = next(line for line in (ROOT / "Makefile").read_text().splitlines()
                   if line.startswith("KERNEL_SOURCES :="))
    assert "qcourse/csrc/*.c" in sources and "qcourse/csrc/*.h" in sources
    assert "$(KERNEL_SOURCES)" in next(line for line in (ROOT / "Makefile").read_text()
                                       .splitlines() if line.startswith("$(KERNEL_STAMP):"))
    for path in c_files:  # every source states its contract through a header of csrc/
        text = (ROOT / path).read_text()
        assert any(f'#include "{Path(h).name}"' in text for h in headers), path


def _csource_module():
    spec = importlib.util.spec_from_file_location("qcourse_c", ROOT / "book/_ext/qcourse_c.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_book_shows_c_by_name_and_every_name_exists():
    csource = _csource_module()
    listings = []
    for page in sorted((ROOT / "book").glob("*.md")):
        text = page.read_text()
        # C is shown only by name (csource), never by literalinclude's matched lines of text
        assert not re.search(r"\{literalinclude\} \S+\.(c|h)\n", text), page.name
        for found in re.finditer(r"```\{csource\} \.\./(\S+)\n:(function|region): (\S+)\n", text):
            listings.append(found.groups())
    assert len(listings) >= 8
    for path, kind, name in listings:
        source = (ROOT / path).read_text()
        find = csource.find_function if kind == "function" else csource.find_region
        first, last = find(source, name)
        shown = "\n".join(source.splitlines()[first - 1:last])
        assert 0 < first <= last and (kind == "region" or f"{name}(" in shown), (path, name)
        assert "region:" not in shown, (path, name)  # no marker inside, none cut in half
    # a name that is not there, or a declaration without a body, is an error, not an empty listing
    header = (CSRC / "qgemm.h").read_text()
    with pytest.raises(ValueError, match="function 'qc_pack_b': expected one definition"):
        csource.find_function(header, "qc_pack_b")
    with pytest.raises(ValueError, match="region 'nowhere'"):
        csource.find_region(header, "nowhere")
    # braces inside strings and comments do not end a function early
    text = 'int f(void) {\n    g("}{");  /* } */\n    return 1;\n}\nint h(void) { return 2; }\n'
    assert csource.find_function(text, "f") == (1, 4)


def test_large_outputs_stored_non_temporally_are_exact():
    # C of 4 MiB or more with 64-byte aligned rows is written with streaming stores; 1000 columns
    # (not a multiple of 16) is not. Both against the float64 product (exact for these sizes).
    rng = np.random.default_rng(12)
    for m, k, n in ((1030, 40, 1024), (1100, 37, 1000)):
        a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
        b = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
        expected = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int32)
        for threads in (1, 2):
            np.testing.assert_array_equal(matmul_int8(a, b, threads=threads), expected)


def test_a_is_read_in_place_up_to_its_last_byte():
    # The VNNI kernel broadcasts A straight from the caller's memory. A is placed at the very end
    # of a buffer whose following bytes differ: a read past any row's end (or of the last row)
    # would change the result or fault.
    rng = np.random.default_rng(11)
    for k in (1, 2, 3, 4, 5, 7, 8, 63, 65):
        buf = rng.integers(-128, 128, size=7 * k + 64, dtype=np.int8)
        a = buf[:7 * k].reshape(7, k)
        b = rng.integers(-128, 128, size=(k, 70), dtype=np.int8)
        expected = matmul_int8_reference(a, b)
        for path in available_paths():
            np.testing.assert_array_equal(matmul_int8(a, b, path=path), expected)
            buf[7 * k:] = -buf[7 * k:] - 1  # flip everything after A
            np.testing.assert_array_equal(matmul_int8(a, b, path=path), expected)


def test_packed_b_holds_b_plus_128_unsigned():
    b = np.array([[-128, -1, 0, 127]], np.int8)
    packed = prepack(b)
    assert packed.data.dtype == np.uint8 and packed.data.size == 256  # one quad, one group
    np.testing.assert_array_equal(packed.data[[0, 4, 8, 12]], [0, 127, 128, 255])
    assert not packed.data[np.setdiff1d(np.arange(256), [0, 4, 8, 12])].any()  # padding is 0


def test_non_contiguous_and_fortran_inputs():
    rng = np.random.default_rng(7)
    big = rng.integers(-128, 128, size=(40, 60), dtype=np.int8)
    a = big[::2, ::3]            # strided view
    b = np.asfortranarray(rng.integers(-128, 128, size=(20, 11), dtype=np.int8))
    expected = exact_product(a, b)
    for f in KERNELS:
        np.testing.assert_array_equal(f(a, b), expected)
        np.testing.assert_array_equal(f(a, b.T.T), expected)


def Z(shape, dtype=np.int8):
    return np.zeros(shape, dtype)


@pytest.mark.parametrize(
    "a, b, exc, pattern",
    [
        (Z((2, 3), np.int16), Z((3, 2)), TypeError, r"a must have dtype int8, got int16"),
        (Z((2, 3)), Z((3, 2), np.uint8), TypeError, r"b must have dtype int8, got uint8"),
        (Z((2, 3)), Z((3, 2), np.float32), TypeError, r"b must have dtype int8"),
        ([[1, 2]], Z((2, 1)), TypeError, r"a must be a numpy.ndarray.*list"),
        (Z(3), Z((3, 2)), ValueError, r"a must be 2-D.*1-D"),
        (Z((2, 3)), Z((1, 3, 2)), ValueError, r"b must be 2-D.*3-D"),
        (Z((2, 3)), Z((4, 2)), ValueError, r"inner dimensions differ"),
        (Z((0, 3)), Z((3, 2)), ValueError, r"a must not be empty"),
        (Z((2, 0)), Z((0, 2)), ValueError, r"[ab] must not be empty"),  # prepack(b) checks b
    ],
)
def test_bad_inputs_get_clear_errors(a, b, exc, pattern):
    for f in KERNELS:
        with pytest.raises(exc, match=pattern):
            f(a, b)


def test_the_compiled_extension_is_what_runs(monkeypatch):
    # The module is a compiled extension, not a Python file ...
    assert isinstance(_kernels.__loader__, importlib.machinery.ExtensionFileLoader)
    assert _kernels.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    # ... and matmul_int8 computes its result by calling it: swap the loop out, the answer changes.
    calls = []

    def fake_loop(path, a, scratch, packed, colsum, out, threads):
        calls.append(path)
        out[...] = 42

    monkeypatch.setattr(kernels._kernels, "gemm_packed", fake_loop)
    a = np.ones((2, 3), np.int8)
    assert (matmul_int8(a, a.T) == 42).all()
    assert len(calls) == 1


def test_the_kernel_releases_the_gil(monkeypatch):
    # With a long switch interval the interpreter does not preempt a thread that runs bytecode, so
    # the main thread's counter can move while the compiled loop runs only if the loop has given
    # the GIL up.  Holding the GIL gives exactly 0 here.  Counts progress, not time.  One OpenMP
    # thread, so that a core is free for the main thread; the slow portable path, so that the loop
    # lasts long enough (tens of ms) for the main thread to be scheduled on a busy machine.
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, size=(256, 2048), dtype=np.int8)
    b = rng.integers(-128, 128, size=(2048, 256), dtype=np.int8)
    real_loop, ticks, seen, result = _kernels.gemm_packed, [0], [], {}

    def observed_loop(*args):
        before = ticks[0]
        real_loop(*args)
        seen.append(ticks[0] - before)

    monkeypatch.setattr(kernels._kernels, "gemm_packed", observed_loop)
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.5)
    try:
        t = threading.Thread(target=lambda: result.setdefault(
            "c", matmul_int8(a, b, path="portable", threads=1)))
        t.start()
        while t.is_alive():
            ticks[0] += 1
        t.join()
    finally:
        sys.setswitchinterval(old)
    assert len(seen) == 1 and seen[0] > 1000, f"main thread advanced {seen} times during the loop"
    np.testing.assert_array_equal(result["c"], matmul_int8_reference(a, b))


def test_paths_are_detected_and_can_be_forced():
    paths = available_paths()
    assert paths[0] == "portable" and best_path() == paths[-1]
    simulated = os.environ.get("QCOURSE_MAX_PATH")
    if simulated:  # run by test_a_cpu_without_the_faster_paths_simulated: the cap holds
        assert best_path() == simulated and paths == list(kernels._PATHS)[: len(paths)]
    a = np.ones((2, 3), np.int8)
    with pytest.raises(ValueError, match=r"path must be one of .*'sse9'"):
        matmul_int8(a, a.T, path="sse9")
    for path in set(kernels._PATHS) - set(paths):  # only on CPUs without them
        with pytest.raises(ValueError, match="needs instructions this CPU lacks"):
            matmul_int8(a, a.T, path=path)


def test_packed_b_is_reusable_and_checked():
    rng = np.random.default_rng(3)
    b = rng.integers(-128, 128, size=(37, 21), dtype=np.int8)
    packed = prepack(b)
    np.testing.assert_array_equal(packed.colsum[:21], b.sum(axis=0))
    assert not packed.colsum[21:].any() and len(packed.colsum) % 64 == 0
    for m in (1, 5, 6, 7, 40):
        a = rng.integers(-128, 128, size=(m, 37), dtype=np.int8)
        np.testing.assert_array_equal(matmul_int8(a, packed), exact_product(a, b))
    with pytest.raises(ValueError, match="inner dimensions differ"):
        matmul_int8(np.ones((2, 36), np.int8), packed)
    with pytest.raises(TypeError, match="b must have dtype int8"):
        prepack(b.astype(np.int32))
    with pytest.raises(ValueError, match="b must be 2-D"):
        prepack(b[0])


def test_top_level_exports():
    """The kernels every chapter calls are in the package's core; the rest through the module."""
    assert qcourse.kernels is kernels
    for name in ("matmul_int8", "matmul_int8_requant", "prepack"):
        assert name in qcourse.__all__ and getattr(qcourse, name) is getattr(kernels, name)


# --- Rung 6: GEMM with requantization fused ------------------------------------------------------

def _requant_case(seed):
    rng = np.random.default_rng(seed)
    m, k, n = (int(x) for x in rng.integers(1, 90, 3))
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    b = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
    per_column = seed % 2 == 0
    mult = rng.uniform(1e-4, 2e-2, n) if per_column else float(rng.uniform(1e-4, 2e-2))
    out_dtype = np.int8 if seed % 3 else np.uint8
    zp = int(rng.integers(-20, 20)) if out_dtype == np.int8 else int(rng.integers(0, 256))
    kw = dict(bias=rng.integers(-20000, 20000, n).astype(np.int32),
              a_zero_point=int(rng.integers(-128, 128)),
              b_zero_point=rng.integers(-128, 128, n) if seed % 4 == 0 else 0,
              out_dtype=out_dtype)
    return a, b, mult, zp, kw


def _python_requant(a, b, mult, zp, bias, a_zero_point, b_zero_point, out_dtype):
    """Independent oracle: exact integers, then the float32 product with Python's round()."""
    info = np.iinfo(out_dtype)
    n = b.shape[1]
    mult32 = np.broadcast_to(np.float32(mult) if np.isscalar(mult) else
                             np.asarray(mult, np.float32), (n,))
    zb = np.broadcast_to(np.asarray(b_zero_point), (n,))
    out = np.empty((a.shape[0], n), np.int64)
    for i in range(a.shape[0]):
        for j in range(n):
            v = sum((int(x) - a_zero_point) * (int(y) - int(zb[j])) for x, y in
                    zip(a[i], b[:, j], strict=True)) + int(bias[j])
            f = float(np.float32(np.float32(v) * mult32[j]))   # one float32 rounding
            out[i, j] = min(max(round(f) + zp, info.min), info.max)  # round(): half to even
    return out.astype(out_dtype)


@pytest.mark.parametrize("seed", range(12))
def test_fused_requant_matches_reference_on_every_path(seed):
    a, b, mult, zp, kw = _requant_case(seed)
    expected = matmul_int8_requant_reference(a, b, mult, zp, **kw)
    if a.size * b.shape[1] < 40000:
        np.testing.assert_array_equal(expected, _python_requant(a, b, mult, zp, **kw))
    for path in available_paths():
        got = matmul_int8_requant(a, b, mult, zp, path=path, **kw)
        assert got.dtype == kw["out_dtype"]
        np.testing.assert_array_equal(got, expected, err_msg=path)
    np.testing.assert_array_equal(matmul_int8_requant(a, prepack(b), mult, zp, threads=1, **kw),
                                  expected)


def test_fused_requant_ties_round_half_to_even_and_clamps():
    # Every int8 value times 0.5: each odd one lands exactly on a tie.
    v = np.arange(-128, 128)
    a = v.astype(np.int8)[:, None]
    b = np.ones((1, 1), np.int8)
    for path in available_paths():
        y = matmul_int8_requant(a, b, 0.5, 0, path=path)[:, 0].astype(int)
        np.testing.assert_array_equal(y, np.rint(v * 0.5))  # np.rint: half to even
        assert y[v == 3] == 2 and y[v == 5] == 2 and y[v == -3] == -2 and y[v == 1] == 0
    # saturation at the int8 ends, and a fused clamp (ReLU-like: qmin at the zero point)
    y = matmul_int8_requant(np.array([[-100], [5], [100]], np.int8), b, 2.0, 3)
    np.testing.assert_array_equal(y[:, 0], [-128, 13, 127])
    y = matmul_int8_requant(np.array([[-100], [5], [100]], np.int8), b, 1.0, 3, qmin=3, qmax=9)
    np.testing.assert_array_equal(y[:, 0], [3, 8, 9])


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(multiplier=0.0), ValueError, "multiplier must be a finite real number > 0"),
        (dict(multiplier=float("nan")), ValueError, "multiplier must be a finite real number > 0"),
        (dict(multiplier=1e-50), ValueError, "which rounds to 0.0"),
        (dict(multiplier=1e300), ValueError, "which rounds to inf"),
        (dict(multiplier=True), TypeError, "multiplier must be a finite real number"),
        (dict(multiplier=np.ones(2)), ValueError, r"multiplier must be a scalar or have shape"),
        (dict(output_zero_point=200), ValueError, r"output_zero_point must be an int in \[-128,"),
        (dict(output_zero_point=3.7), TypeError, r"output_zero_point must be an int"),
        (dict(out_dtype=np.int16), TypeError, "out_dtype must be int8 or uint8"),
        (dict(out_dtype="bogus"), TypeError, "out_dtype must be int8 or uint8"),
        (dict(qmin=10, qmax=5), ValueError, "qmin must be <= qmax"),
        (dict(a_zero_point=128), ValueError, r"a_zero_point must be an int in \[-128, 127\]"),
        (dict(a_zero_point=3.7), TypeError, "a_zero_point must be an int"),   # was truncated to 3
        (dict(a_zero_point=10**30), ValueError, "a_zero_point must be an int"),
        (dict(b_zero_point=-129), ValueError, r"b_zero_point must be integers in \[-128, 127\]"),
        (dict(b_zero_point=np.zeros(2, int)), ValueError, "b_zero_point must be a scalar or"),
        (dict(bias=np.zeros(3, np.int64)), TypeError, "bias must have dtype int32"),
        (dict(bias=np.zeros(2, np.int32)), ValueError, r"bias must have shape \(3,\)"),
    ],
)
def test_fused_requant_bad_arguments(kwargs, exc, pattern):
    args = dict(multiplier=0.01)
    args.update(kwargs)
    a = np.ones((2, 4), np.int8)
    b = np.ones((4, 3), np.int8)
    with pytest.raises(exc, match=pattern):
        matmul_int8_requant(a, b, **args)


def test_threads_argument():
    rng = np.random.default_rng(5)
    a = rng.integers(-128, 128, size=(70, 90), dtype=np.int8)
    b = rng.integers(-128, 128, size=(90, 200), dtype=np.int8)
    expected = exact_product(a, b)
    for threads in (1, 2, 3, 8):
        for path in available_paths():
            np.testing.assert_array_equal(matmul_int8(a, b, threads=threads, path=path), expected)
    for bad in (0, -1, 1.5, True, "2", 2**31):
        error = ValueError if isinstance(bad, int) and not isinstance(bad, bool) else TypeError
        with pytest.raises(error, match=r"threads must be an int in \[1, 1024\]"):
            matmul_int8(a, b, threads=bad)
        with pytest.raises(error, match=r"threads must be an int in \[1, 1024\]"):
            kernels.set_num_threads(bad)
    # small products stay on one thread by default; large ones may use every allowed thread
    assert kernels._default_threads(8, 8, 8) == 1
    assert kernels._default_threads(4096, 4096, 4096) == kernels.get_num_threads()


# --- A CPU without VNNI (or without AVX2), simulated ------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("max_path", ["avx2", "portable"])
def test_a_cpu_without_the_faster_paths_simulated(max_path):
    # QCOURSE_MAX_PATH hides the paths above the one it names, as if the CPU lacked them: the
    # whole kernel, integer-matmul and convolution suites then run on the default path of such a
    # CPU (test_conv compares QLinearConv with ONNX Runtime itself, on random and tie inputs).
    if max_path not in available_paths():
        pytest.skip(f"this CPU has no {max_path} path to cap at")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, QCOURSE_MAX_PATH=max_path)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
         "tests/test_kernels.py", "tests/test_int_matmul.py", "tests/test_conv.py",
         "-k", "not simulated"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]
    probe = subprocess.run(
        [sys.executable, "-c", "import qcourse; print(qcourse.kernels.best_path())"],
        env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == max_path


def test_an_unknown_simulated_path_is_refused():
    env = dict(os.environ, QCOURSE_MAX_PATH="sse9")
    proc = subprocess.run([sys.executable, "-c", "import qcourse"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "QCOURSE_MAX_PATH must be one of ['portable', 'avx2', 'vnni512'], got 'sse9'" in (
        proc.stderr)


# --- Objects holding packed data survive copy, deepcopy and pickle on every path ----------------

# Run in a child process: before PackedB re-packed itself on copy, an unaligned copy crashed the
# interpreter (aligned AVX-512 loads), which would kill the test run instead of failing a test.
_ROUND_TRIP_CHILD = r'''
import copy, io, pickle
import numpy as np
from qcourse import nn
from qcourse.kernels import (available_paths, matmul_int8, matmul_int8_requant, matmul_w4a8,
                             prepack, prepack_int4, quantize_rows_int8, w4a8_group_sums)
from qcourse.lowbit import int4_linear_int8, int4_packed, quantize_int4_groupwise
BREAK_REDUCE
from qcourse.ptq import convert_to_integer, dynamic_ptq, static_ptq

def round_trips(obj):
    yield "copy", copy.copy(obj)
    yield "deepcopy", copy.deepcopy(obj)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        yield f"pickle{protocol}", pickle.loads(pickle.dumps(obj, protocol))
    f = io.BytesIO()
    np.save(f, np.array([obj], dtype=object), allow_pickle=True)   # a saved model file
    f.seek(0)
    yield "np.save", np.load(f, allow_pickle=True)[0]

rng = np.random.default_rng(0)
checked = 0
for k, n in ((512, 512), (1, 1), (5, 70), (259, 129), (1027, 3)):
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    a = rng.integers(-128, 128, (7, k), dtype=np.int8)
    packed = prepack(b)
    assert np.array_equal(packed.unpack(), b)
    mult = rng.uniform(1e-4, 1e-3, n)
    want = matmul_int8(a, packed)
    want_q = matmul_int8_requant(a, packed, mult, 3, a_zero_point=-5)
    for _ in range(20 if k == 512 else 1):           # 20 fresh copies: addresses vary
        for how, copied in round_trips(packed):
            for path in available_paths():
                assert np.array_equal(matmul_int8(a, copied, path=path), want), (how, path)
                got = matmul_int8_requant(a, copied, mult, 3, a_zero_point=-5, path=path)
                assert np.array_equal(got, want_q), (how, path)
                checked += 1
            assert copied == packed and copied.data.ctypes.data % 64 == 0, how

model = nn.make_mlp((20, 16, 5), seed=1)
X = rng.normal(0, 1, (9, 20)).astype(np.float32)
models = [convert_to_integer(static_ptq(model, X), requantization=r)
          for r in ("float", "tflite_double", "tflite_single")]
models.append(convert_to_integer(dynamic_ptq(model)))
for m in models:
    want = m(X)
    for how, copied in round_trips(m):
        assert np.array_equal(copied(X), want), (type(m).__name__, how)
        checked += 1

for n, k, g, with_zp in ((70, 64, 32, False), (5, 128, 64, True), (130, 8, 8, True)):
    codes = rng.integers(-8, 8, (n, k), dtype=np.int8)
    scales = rng.uniform(0.01, 0.1, (n, k // g)).astype(np.float32)
    zp = rng.integers(-8, 8, (n, k // g)).astype(np.int8) if with_zp else None
    packed = prepack_int4(codes, scales, group_size=g, zero_points=zp)
    x = rng.normal(0, 1, (7, k)).astype(np.float32)
    xq, _ = quantize_rows_int8(x)
    want, want_sums = matmul_w4a8(x, packed), w4a8_group_sums(xq, packed)
    for _ in range(10 if n == 70 else 1):
        for how, copied in round_trips(packed):
            for path in available_paths():
                assert np.array_equal(matmul_w4a8(x, copied, path=path), want), (how, path)
                got = w4a8_group_sums(xq, copied, path=path)
                assert np.array_equal(got, want_sums), (how, path)
                checked += 1
            assert copied == packed and copied.data.ctypes.data % 64 == 0, how

for k, g in ((40, 16), (64, 16)):                  # the per-group fallback and the W4A8 kernel
    w4 = quantize_int4_groupwise(rng.normal(0, 1, (6, k)), g)
    xk = rng.normal(0, 1, (3, k))
    want = int4_linear_int8(xk, w4)
    for how, copied in round_trips(w4):
        assert np.array_equal(int4_linear_int8(xk, copied), want), ("Int4Weight", how)
        checked += 1
    packed = int4_packed(w4)
    if packed is not None:
        for how, copied in round_trips(packed):
            assert np.array_equal(int4_linear_int8(xk, w4, packed=copied), want), how
            checked += 1
from qcourse.nn.lm import LMConfig, TransformerLM          # W8A8 layers hold a PackedB too
from qcourse.transformer import W8A8Linear, w8a8_lm

lin = nn.Linear(70, 130, seed=2)
w8 = W8A8Linear(lin)
x70 = rng.normal(0, 1, (5, 70)).astype(np.float32)
want = w8(x70)
lm = w8a8_lm(TransformerLM(LMConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=16)))
ids = rng.integers(0, 256, (2, 9))
want_lm = lm(ids)
for how, copied in round_trips(w8):
    assert np.array_equal(copied(x70), want), ("W8A8Linear", how)
    checked += 1
for how, copied in round_trips(lm):
    assert np.array_equal(copied(ids), want_lm), ("w8a8_lm", how)
    checked += 1
print("round trips checked:", checked, "default path:", available_paths()[-1])
'''


# What a naive copy does: the same bytes in a fresh buffer, wherever the allocator puts it (here
# deliberately 1 byte past a 64-byte boundary, which a plain copy hits 63 times in 64).
_NAIVE_REDUCE = r'''
from qcourse import kernels as _k

def _unaligned(data):
    buf = _k._aligned_empty(data.size + 1, data.dtype)[1:]
    buf[:] = data
    return buf

if "PackedB" in BROKEN:
    _k.PackedB.__reduce__ = lambda self: (_k.PackedB._from_packing, (
        self.k, self.n, _unaligned(self.data), self.colsum.copy()))
if "PackedInt4" in BROKEN:
    _k.PackedInt4.__reduce__ = lambda self: (_k.PackedInt4._from_packing, (
        self.n, self.k, self.group_size, self.has_zero_points, _unaligned(self.data)))
'''


def _round_trip_child(max_path, broken=()):
    env = {key: value for key, value in os.environ.items() if key != "QCOURSE_MAX_PATH"}
    if max_path is not None:
        env["QCOURSE_MAX_PATH"] = max_path
    code = _ROUND_TRIP_CHILD.replace(
        "BREAK_REDUCE", _NAIVE_REDUCE.replace("BROKEN", repr(broken)) if broken else "")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("max_path", [None, "avx2", "portable"])
def test_packed_objects_survive_copy_and_pickle_on_every_path(max_path):
    if os.environ.get("QCOURSE_MAX_PATH"):
        pytest.skip("run once, from the unsimulated suite: it sets QCOURSE_MAX_PATH itself")
    if max_path is not None and max_path not in available_paths():
        pytest.skip(f"this CPU has no {max_path} path to cap at")
    proc = _round_trip_child(max_path)
    assert proc.returncode == 0, (f"child exited with {proc.returncode} (negative: killed by "
                                  f"that signal)\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    assert f"default path: {max_path or best_path()}" in proc.stdout


@pytest.mark.parametrize("broken, message", [
    ("PackedB", "packed B must start on a 64-byte boundary"),
    ("PackedInt4", "packed int4 weights must start on a 64-byte boundary")])
def test_the_round_trip_check_fails_on_a_naive_copy(broken, message):
    # The same child with one class's __reduce__ (which copy, deepcopy and pickle all use)
    # replaced by a plain copy of the bytes: the check must fail, and the compiled boundary must
    # refuse the unaligned buffer (without that check the aligned loads crashed the interpreter).
    if os.environ.get("QCOURSE_MAX_PATH"):
        pytest.skip("run once, from the unsimulated suite")
    proc = _round_trip_child(None, broken=(broken,))
    assert proc.returncode != 0
    assert f"ValueError: {message}" in proc.stderr, (proc.returncode, proc.stderr[-3000:])


def test_packed_b_is_built_only_by_prepack_and_is_immutable():
    b = np.arange(12, dtype=np.int8).reshape(3, 4)
    packed = prepack(b)
    with pytest.raises(TypeError, match=r"built by qcourse\.kernels\.prepack"):
        kernels.PackedB(3, 4, packed.data, packed.colsum)
    with pytest.raises(AttributeError, match="immutable"):
        packed.n = 4096
    with pytest.raises(ValueError, match="read-only"):
        packed.data[0] = 1
    np.testing.assert_array_equal(packed.unpack(), b)
    assert repr(packed) == "PackedB(k=3, n=4, 256 bytes)"


def test_packed_int4_is_built_only_by_prepack_int4_and_is_immutable():
    codes = np.arange(-8, 8, dtype=np.int8).reshape(2, 8)
    packed = kernels.prepack_int4(codes, np.ones((2, 1), np.float32), group_size=8)
    with pytest.raises(TypeError, match=r"built by qcourse\.kernels\.prepack_int4"):
        kernels.PackedInt4(n=2, k=8, group_size=8, has_zero_points=False, data=packed.data)
    with pytest.raises(AttributeError, match="immutable"):
        packed.n = 4096
    with pytest.raises(ValueError, match="read-only"):
        packed.data[0] = 1
    np.testing.assert_array_equal(packed.unpack()[0], codes)
    assert repr(packed) == ("PackedInt4(n=2, k=8, group_size=8, has_zero_points=False, "
                            "512 bytes)")


def test_the_compiled_w4a8_boundary_checks_the_packed_weights():
    # n larger than the packed width, a group size that does not fit, None and an unaligned
    # buffer: refused by the compiled functions themselves (each read outside the buffer, divided
    # by zero or crashed before).
    codes = np.ones((4, 64), np.int8)
    packed = kernels.prepack_int4(codes, np.ones((4, 2), np.float32), group_size=32)
    code = kernels._PATHS[best_path()]
    x = np.ones((2, 64), np.float32)

    def run(data=packed.data, n=4, g=32, y=None):
        return _kernels.w4a8(code, x, data, n, g, False, np.empty((2, 64), np.int8),
                             np.empty((2, 64 // g if g else 1), np.int32),
                             np.empty(2, np.float32),
                             np.empty((2, n), np.float32) if y is None else y, 1)

    with pytest.raises(TypeError, match="must not be None"):
        run(data=None)
    with pytest.raises(ValueError, match=r"too few for K=64, N=4096"):
        run(n=4096)
    with pytest.raises(ValueError, match=r"g=0"):
        run(g=0)
    with pytest.raises(ValueError, match=r"g=12"):
        run(g=12)
    with pytest.raises(ValueError, match=r"sx and y must fit m=2, n=4"):
        run(y=np.empty((2, 3), np.float32))
    unaligned = kernels._aligned_empty(packed.data.size + 1, np.uint8)[1:]
    unaligned[:] = packed.data
    with pytest.raises(ValueError, match="64-byte boundary"):
        run(data=unaligned)
    run()


def test_the_compiled_boundary_checks_the_packed_operand():
    # The loops themselves refuse None, a packed buffer too short for K x N, and an unaligned one,
    # whatever the Python wrapper passes (before, each of these crashed or read past the buffer).
    b = np.ones((8, 4), np.int8)
    packed = prepack(b)
    a = np.ones((2, 8), np.int8)
    out = np.empty((2, 4), np.int32)
    scratch = kernels._scratch(2, 4)
    code = kernels._PATHS[best_path()]
    with pytest.raises(TypeError, match="must not be None"):
        _kernels.gemm_packed(code, a, scratch, None, packed.colsum, out, 1)
    with pytest.raises(ValueError, match=r"too few for K=8, N=4096"):
        _kernels.gemm_packed(code, a, kernels._scratch(2, 4096), packed.data, packed.colsum,
                             np.empty((2, 4096), np.int32), 1)
    unaligned = kernels._aligned_empty(packed.data.size + 1, np.uint8)[1:]
    unaligned[:] = packed.data
    with pytest.raises(ValueError, match="64-byte boundary"):
        _kernels.gemm_packed(code, a, scratch, unaligned, packed.colsum, out, 1)
    with pytest.raises(ValueError, match="64-byte boundary"):
        _kernels.gemm_packed_requant(code, a, scratch, unaligned, packed.colsum,
                                     kernels._NO_INT32, 0, kernels._NO_INT32,
                                     np.ones(1, np.float32), 0, -128, 127,
                                     np.empty((2, 4), np.uint8), 1)
    _kernels.gemm_packed(code, a, scratch, packed.data, packed.colsum, out, 1)
    np.testing.assert_array_equal(out, np.full((2, 4), 8))


def test_messages_name_the_argument_that_is_bad():
    # Both operands are checked in argument order and each message names its own operand (an
    # empty b used to be reported as "a must not be empty").
    a = np.ones((2, 4), np.int8)
    with pytest.raises(ValueError, match=r"^b must not be empty, got shape \(4, 0\)"):
        matmul_int8_requant(a, np.zeros((4, 0), np.int8), 0.01)
    with pytest.raises(ValueError, match=r"^b must not be empty"):
        prepack(np.zeros((0, 3), np.int8))
    with pytest.raises(ValueError, match=r"^a must not be empty"):
        matmul_int8_requant(np.zeros((0, 4), np.int8), np.ones((4, 3), np.int8), 0.01)


# --- W4A8: int4 weights in groups, int8 activations ---------------------------------------------

def _w4_case(seed, m, n, k, g, zero_points=False):
    rng = np.random.default_rng(seed)
    codes = rng.integers(-8, 8, size=(n, k), dtype=np.int8)
    scales = rng.uniform(0.01, 0.1, size=(n, k // g)).astype(np.float32)
    zp = rng.integers(-8, 8, size=(n, k // g)).astype(np.int8) if zero_points else None
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10, (m, 1))).astype(np.float32)
    return x, codes, scales, zp


# Rows: every tile height 1..6 and past one tile; columns: short of, at and past a 64-column
# group; groups of 8 (the smallest), 32, 64, 128 and one group per row; with and without zero
# points; threads splitting the column groups unevenly.
_W4_CASES = [
    (1, 64, 64, 32, False), (2, 63, 128, 32, True), (3, 65, 256, 64, False),
    (4, 130, 128, 128, True), (5, 7, 16, 8, False), (6, 200, 96, 96, True), (7, 129, 64, 8, False),
    (13, 70, 512, 32, True), (32, 64, 256, 64, False)]


@pytest.mark.parametrize("m, n, k, g, zp", _W4_CASES)
def test_w4a8_is_the_reference_bit_for_bit_on_every_path(m, n, k, g, zp):
    x, codes, scales, z = _w4_case(m * n + k, m, n, k, g, zp)
    packed = kernels.prepack_int4(codes, scales, group_size=g, zero_points=z)
    back = packed.unpack()
    assert np.array_equal(back[0], codes) and np.array_equal(back[1], scales)
    assert (back[2] is None) if z is None else np.array_equal(back[2], z)
    expected = kernels.matmul_w4a8_reference(x, packed)
    x_q, _ = kernels.quantize_rows_int8(x)
    sums = kernels.w4a8_group_sums_reference(x_q, packed)
    # the integer sums against an independent int64 computation from the codes themselves
    w = codes.astype(np.int64) - (0 if z is None else np.repeat(z.astype(np.int64), g, axis=1))
    for j in range(k // g):
        part = x_q[:, j * g:(j + 1) * g].astype(np.int64) @ w[:, j * g:(j + 1) * g].T
        np.testing.assert_array_equal(sums[:, :, j], part)
    for path in available_paths():
        for threads in (1, 2, 3):
            y = kernels.matmul_w4a8(x, packed, path=path, threads=threads)
            assert y.dtype == np.float32 and y.shape == (m, n)
            np.testing.assert_array_equal(y, expected, err_msg=f"{path} threads={threads}")
        np.testing.assert_array_equal(kernels.w4a8_group_sums(x_q, packed, path=path), sums,
                                      err_msg=path)


def test_w4a8_activations_are_the_reference_quantization():
    # ties, a zero row, a row too small for 127 / max|x| to stay below 2**100, huge rows
    x = np.array([[0.5, -1.5, 2.5, 127.0] + [0.0] * 4,
                  [0.0] * 8,
                  [1e-35, -3e-36] + [0.0] * 6,
                  [3e38, -1e38, 2.5e37] + [0.0] * 5], np.float32)
    x_q, sx = kernels.quantize_rows_int8(x)
    assert x_q[0, :4].tolist() == [0, -2, 2, 127] and sx[0] == np.float32(1.0)  # half to even
    assert not x_q[1].any() and sx[1] == 0
    assert sx[2] == np.float32(2.0**-100) and x_q[2, 0] == round(1e-35 * 2**100)
    assert x_q[3, 0] == 127 and sx[3] == np.float32(3e38) / np.float32(127)
    codes = np.ones((64, 8), np.int8)
    packed = kernels.prepack_int4(codes, np.ones((64, 1), np.float32), group_size=8)
    expected = kernels.matmul_w4a8_reference(x, packed)
    assert np.all(expected[1] == 0)
    for path in available_paths():
        np.testing.assert_array_equal(kernels.matmul_w4a8(x, packed, path=path), expected)


@pytest.mark.parametrize("code, zero_point", [(-8, None), (7, None), (-8, 7), (7, -8)])
def test_w4a8_extremes_at_the_group_bound(code, zero_point):
    # One group as long as the int32 bound allows: activations -128 and 127 against the extreme
    # codes (and zero points), each partial sum exactly its closed form, on every path.
    g = kernels.max_group_w4a8() // 8 * 8
    codes = np.full((2, g), code, np.int8)
    zp = None if zero_point is None else np.full((2, 1), zero_point, np.int8)
    packed = kernels.prepack_int4(codes, np.ones((2, 1), np.float32), group_size=g,
                                  zero_points=zp)
    x_q = np.full((2, g), -128, np.int8)
    x_q[1] = 127
    w = code - (zero_point or 0)
    for path in available_paths():
        sums = kernels.w4a8_group_sums(x_q, packed, path=path)
        assert sums[:, :, 0].tolist() == [[-128 * w * g] * 2, [127 * w * g] * 2], path
        for row, xv in enumerate((-128, 127)):  # one row: the M = 1 kernel (16 x its high sums)
            one = kernels.w4a8_group_sums(x_q[row:row + 1], packed, path=path)
            assert one[0, :, 0].tolist() == [xv * w * g] * 2, path
    assert abs(128 * 15 * kernels.max_group_w4a8()) <= np.iinfo(np.int32).max
    assert 128 * 15 * (kernels.max_group_w4a8() + 1) > np.iinfo(np.int32).max


def test_w4a8_float_output_within_its_derived_bound():
    # Against the float64 product with the dequantized weights: the int8 activations move an
    # output by at most (s_x / 2) sum_k |W_nk|; the float32 steps (one conversion, product and
    # sum per group, one final product) add at most (G + 3) 2**-24 s_x sum_j |s_nj P_nj|.
    for m, n, k, g, zp in ((3, 70, 512, 32, False), (8, 65, 1024, 128, True)):
        x, codes, scales, z = _w4_case(k + g, m, n, k, g, zp)
        packed = kernels.prepack_int4(codes, scales, group_size=g, zero_points=z)
        w = (codes.astype(np.float64) - (0 if z is None else np.repeat(z, g, axis=1))) * \
            np.repeat(scales.astype(np.float64), g, axis=1)
        exact = x.astype(np.float64) @ w.T
        x_q, sx = kernels.quantize_rows_int8(x)
        sums = kernels.w4a8_group_sums_reference(x_q, packed).astype(np.float64)
        rounding = (k // g + 3) * 2.0**-24 * sx[:, None] * np.einsum(
            "mnj,nj->mn", np.abs(sums), scales.astype(np.float64))
        bound = sx[:, None] / 2 * np.abs(w).sum(axis=1)[None, :] + rounding
        for path in available_paths():
            err = np.abs(kernels.matmul_w4a8(x, packed, path=path) - exact)
            assert np.all(err <= bound), path
            assert err.max() > 0.02 * bound.max()  # within 50x of what happens: not vacuous


def test_w4a8_prefetch_distance_changes_no_result():
    # The VNNI kernel's prefetch distance is a tuning knob (bench sweeps): none, the default and
    # far ahead give the identical output; a distance outside [0, 1 MiB] is refused by name.
    x, codes, scales, z = _w4_case(3, 7, 200, 1024, 32, True)
    packed = kernels.prepack_int4(codes, scales, group_size=32, zero_points=z)
    expected = kernels.matmul_w4a8_reference(x, packed)
    default = _kernels.w4_set_prefetch(0)
    try:
        for nbytes in (0, 64, 8192, default):
            assert _kernels.w4_set_prefetch(nbytes) in (0, 64, 8192, default)
            np.testing.assert_array_equal(kernels.matmul_w4a8(x, packed), expected, str(nbytes))
    finally:
        _kernels.w4_set_prefetch(default)
    for bad in (-1, 2**20 + 1):
        with pytest.raises(ValueError, match=r"nbytes must be in \[0, 1048576\]"):
            _kernels.w4_set_prefetch(bad)


def test_the_w4a8_exactness_tests_fail_on_a_broken_kernel(monkeypatch):
    # The checks above prove themselves. path | W4_BROKEN runs that path with the nibble mask
    # 0x0E for 0x0F: every odd stored code q + 8 comes out one too small. Broken one path at a
    # time, the bit-for-bit, extreme and bound tests must each fail on it, as they pass unbroken.
    real_path_code = kernels._path_code
    monkeypatch.setattr(kernels.w4a8, "_path_code",  # where matmul_w4a8 looks it up
                        lambda path: real_path_code(path) | _kernels.W4_BROKEN)
    here = sys.modules[__name__]
    for path in available_paths():
        monkeypatch.setattr(here, "available_paths", lambda path=path: [path])
        for case in _W4_CASES:
            with pytest.raises(AssertionError, match="not equal"):
                test_w4a8_is_the_reference_bit_for_bit_on_every_path(*case)
        with pytest.raises(AssertionError, match="not equal"):
            test_w4a8_activations_are_the_reference_quantization()
        for code, zero_point in ((7, None), (7, -8)):
            with pytest.raises(AssertionError, match=path):
                test_w4a8_extremes_at_the_group_bound(code, zero_point)
        test_w4a8_extremes_at_the_group_bound(-8, None)  # stored 0: no mask can change it
        with pytest.raises(AssertionError, match=path):
            test_w4a8_float_output_within_its_derived_bound()


def _w4_bad(**kw):
    args = dict(codes=np.zeros((4, 64), np.int8), scales=np.ones((4, 2), np.float32),
                group_size=32)
    args.update(kw)
    codes, scales = args.pop("codes"), args.pop("scales")
    return kernels.prepack_int4(codes, scales, **args)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(codes=np.zeros((4, 63), np.int8)), ValueError, r"even number of columns K.*K=63"),
    (dict(group_size=48), ValueError, r"group_size=48 does not divide K=64"),
    (dict(group_size=12, scales=np.ones((4, 5), np.float32)), ValueError, r"multiple of 8"),
    (dict(group_size=32.0), TypeError, r"group_size must be an int"),
    (dict(scales=np.ones((4, 3), np.float32)), ValueError, r"scales must have shape.*\(4, 2\)"),
    (dict(scales=np.ones((2, 4), np.float32)), ValueError, r"scales must have shape"),
    (dict(scales=np.array([[1, np.nan]] * 4, np.float32)), ValueError, r"scales must be finite"),
    (dict(scales=np.array([[1, 0]] * 4, np.float32)), ValueError, r"scales must be finite and > 0"),
    (dict(scales=np.array([[1, -2]] * 4, np.float32)), ValueError, r"> 0"),
    (dict(scales=np.ones((4, 2), np.int32)), TypeError, r"scales must be a float array"),
    (dict(scales=np.full((4, 2), 1e-50)), ValueError, r"under- or\s+overflowed|in float32"),
    (dict(codes=np.full((4, 64), 8, np.int8)), ValueError, r"codes must lie in \[-8, 7\]"),
    (dict(codes=np.full((4, 64), -9, np.int8)), ValueError, r"codes must lie in \[-8, 7\]"),
    (dict(codes=np.zeros((4, 64), np.int16)), TypeError, r"codes must have dtype int8"),
    (dict(codes=np.zeros(64, np.int8)), ValueError, r"codes must be 2-D"),
    (dict(zero_points=np.full((4, 2), 9)), ValueError,
     r"zero_points must be integers in \[-8, 7\]"),
    (dict(zero_points=np.zeros((4, 3), np.int8)), ValueError, r"zero_points must have shape"),
    (dict(zero_points=np.zeros((4, 2), np.float32)), TypeError, r"zero_points must be integers"),
])
def test_prepack_int4_bad_arguments_are_named(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _w4_bad(**kwargs)


def test_matmul_w4a8_bad_arguments_are_named():
    packed = _w4_bad()
    x = np.ones((2, 64), np.float32)
    cases = [
        ((x[:, :32], packed), ValueError, r"x has K=32 columns but the weights have K=64"),
        ((x.astype(np.int32), packed), TypeError, r"x must have a float dtype"),
        ((x.tolist(), packed), TypeError, r"x must be a numpy.ndarray"),
        ((x[0], packed), ValueError, r"x must be 2-D"),
        ((np.full((2, 64), np.nan, np.float32), packed), ValueError, r"x must be finite"),
        ((np.full((2, 64), 1e300), packed), ValueError, r"x must fit float32"),
        ((x, np.zeros((4, 64), np.int8)), TypeError, r"packed must be a PackedInt4"),
    ]
    for f in (kernels.matmul_w4a8, kernels.matmul_w4a8_reference):
        for args, exc, pattern in cases:
            with pytest.raises(exc, match=pattern):
                f(*args)
    with pytest.raises(ValueError, match="path must be one of"):
        kernels.matmul_w4a8(x, packed, path="sse9")
    with pytest.raises(ValueError, match=r"threads must be an int in \[1, 1024\]"):
        kernels.matmul_w4a8(x, packed, threads=0)
    with pytest.raises(ValueError, match="x_q has K=32"):
        kernels.w4a8_group_sums(np.zeros((1, 32), np.int8), packed)


def _vma_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (Linux)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= address < int(m.group(2), 16)
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_large_packed_weights_get_memory_of_their_own_in_huge_pages():
    # the M = 1 kernels stream their weights from memory: 2 MiB pages, asked for before the
    # first touch, keep the hardware prefetcher and the TLB out of the way (see _weight_buffer)
    import copy
    import pickle

    from qcourse.kernels.matmul import HUGE_PAGE_MIN_BYTES, _weight_buffer

    rng = np.random.default_rng(11)
    codes = rng.integers(-8, 8, (2048, 4096), dtype=np.int8)
    scales = rng.uniform(0.01, 0.1, (2048, 4096 // 32)).astype(np.float32)
    w4 = kernels.prepack_int4(codes, scales, group_size=32)
    b = rng.integers(-128, 128, (2048, 2048), dtype=np.int8)
    w8 = prepack(b)
    x = rng.normal(0, 1, (3, 4096)).astype(np.float32)
    a = rng.integers(-128, 128, (3, 2048), dtype=np.int8)
    small = _weight_buffer(4096)
    assert small.nbytes == 4096 and small.ctypes.data % 64 == 0
    for packed in (w4, w8):
        data = packed.data
        assert data.nbytes >= HUGE_PAGE_MIN_BYTES and data.ctypes.data % 2**21 == 0
        assert not data.flags.writeable
        if sys.platform.startswith("linux") and "[never]" not in Path(
                "/sys/kernel/mm/transparent_hugepage/enabled").read_text():
            assert "hg" in _vma_flags(data.ctypes.data)       # madvise(MADV_HUGEPAGE) took
    want4 = kernels.matmul_w4a8(x, w4)
    assert np.array_equal(want4, kernels.matmul_w4a8_reference(x, w4))
    want8 = matmul_int8(a, w8)
    assert np.array_equal(want8, a.astype(np.int64) @ b.astype(np.int64))
    for twin4, twin8 in ((copy.deepcopy(w4), copy.deepcopy(w8)),
                         (pickle.loads(pickle.dumps(w4)), pickle.loads(pickle.dumps(w8)))):
        assert twin4.data.ctypes.data % 2**21 == 0 and twin8.data.ctypes.data % 2**21 == 0
        assert np.array_equal(kernels.matmul_w4a8(x, twin4), want4)
        assert np.array_equal(matmul_int8(a, twin8), want8)
