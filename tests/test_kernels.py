"""qcourse.kernels: the compiled int8 matmul against its NumPy reference, and its input checks."""

import importlib.machinery
import os
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
    matmul_int8_packed,
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
KERNELS += [_with_path(f, p) for f in (matmul_int8_u8s8, matmul_int8_packed)
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


# The VNNI kernel's blocking: row tiles of 6, chunks of QC_MCT tiles (16 x 6 = 96 rows), blocks of
# QC_KCQ quads (64 x 4 = 256 values of k), a k % 4 tail read from scratch, 64-column groups. Each
# shape straddles one or more of those edges (one past, one short), with every tile height 1..6.
@pytest.mark.parametrize("shape", [(95, 257, 63), (96, 256, 64), (97, 255, 65), (193, 513, 129),
                                   (101, 1027, 70), (2, 259, 200), (11, 4, 1), (190, 1, 3)])
def test_vnni_blocking_edges(shape):
    m, k, n = shape
    rng = np.random.default_rng(m * k + n)
    a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    b = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
    expected = matmul_int8_reference(a, b)
    packed = prepack(b)
    for path in available_paths():
        for rows in range(1, 7):  # every tile height, at the start and at the end of A
            np.testing.assert_array_equal(matmul_int8(a[:rows], packed, path=path),
                                          expected[:rows], err_msg=f"{path} {rows}")
            np.testing.assert_array_equal(matmul_int8(a[m - rows:], packed, path=path),
                                          expected[m - rows:], err_msg=f"{path} last {rows}")
        for threads in (1, 2, 3):
            np.testing.assert_array_equal(matmul_int8(a, packed, path=path, threads=threads),
                                          expected, err_msg=f"{path} threads={threads}")
        mult = rng.uniform(1e-4, 1e-3, n)
        zb = rng.integers(-128, 128, n)
        np.testing.assert_array_equal(
            matmul_int8_requant(a, packed, mult, 3, a_zero_point=-5, b_zero_point=zb, path=path),
            matmul_int8_requant_reference(a, b, mult, 3, a_zero_point=-5, b_zero_point=zb),
            err_msg=path)


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


@pytest.mark.skipif("vnni512" not in available_paths(), reason="this CPU has no AVX-512 VNNI")
def test_vnni_peak_loop_counts_its_work():
    macs, rate = _kernels.vnni_peak_loop(100000, 1)
    assert macs == 100000 * 16 * 64 and rate > 0
    macs2, rate2 = _kernels.vnni_peak_loop(100000, 2)
    assert macs2 == 2 * macs and rate2 > 0


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
    for name in kernels.__all__:
        assert getattr(qcourse, name) is getattr(kernels, name)


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
    # whole kernel and integer-matmul suites then run on the default path of such a CPU.
    if max_path not in available_paths():
        pytest.skip(f"this CPU has no {max_path} path to cap at")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, QCOURSE_MAX_PATH=max_path)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
         "tests/test_kernels.py", "tests/test_int_matmul.py", "-k", "not simulated"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]
    probe = subprocess.run(
        [sys.executable, "-c", "import qcourse; print(qcourse.best_path())"],
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
from qcourse.kernels import (available_paths, matmul_int8, matmul_int8_requant, prepack)
from qcourse.lowbit import int4_linear_int8, quantize_int4_groupwise
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
            assert copied == packed and copied.data.ctypes.data % 64 == 0, how
            for path in available_paths():
                assert np.array_equal(matmul_int8(a, copied, path=path), want), (how, path)
                got = matmul_int8_requant(a, copied, mult, 3, a_zero_point=-5, path=path)
                assert np.array_equal(got, want_q), (how, path)
                checked += 1

model = nn.MLP((20, 16, 5), seed=1)
X = rng.normal(0, 1, (9, 20)).astype(np.float32)
models = [convert_to_integer(static_ptq(model, X), requantization=r)
          for r in ("float", "tflite_double", "tflite_single")]
models.append(convert_to_integer(dynamic_ptq(model)))
for m in models:
    want = m(X)
    for how, copied in round_trips(m):
        assert np.array_equal(copied(X), want), (type(m).__name__, how)
        checked += 1

w4 = quantize_int4_groupwise(rng.normal(0, 1, (6, 40)), 16)
x40 = rng.normal(0, 1, (3, 40))
want = int4_linear_int8(x40, w4)
for how, copied in round_trips(w4):
    assert np.array_equal(int4_linear_int8(x40, copied), want), ("Int4Weight", how)
    checked += 1
print("round trips checked:", checked, "default path:", available_paths()[-1])
'''


@pytest.mark.parametrize("max_path", [None, "avx2", "portable"])
def test_packed_objects_survive_copy_and_pickle_on_every_path(max_path):
    if os.environ.get("QCOURSE_MAX_PATH"):
        pytest.skip("run once, from the unsimulated suite: it sets QCOURSE_MAX_PATH itself")
    if max_path is not None and max_path not in available_paths():
        pytest.skip(f"this CPU has no {max_path} path to cap at")
    env = {key: value for key, value in os.environ.items() if key != "QCOURSE_MAX_PATH"}
    if max_path is not None:
        env["QCOURSE_MAX_PATH"] = max_path
    proc = subprocess.run([sys.executable, "-c", _ROUND_TRIP_CHILD], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"child exited with {proc.returncode} (negative: killed by "
                                  f"that signal)\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    assert f"default path: {max_path or best_path()}" in proc.stdout


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
