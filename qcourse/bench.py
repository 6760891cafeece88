"""Benchmark the int8 kernel ladder against NumPy, PyTorch and ONNX Runtime, in one run.

Run ``python -m qcourse.bench`` (``--help`` for options).  Every result is checked before it is
timed (integer results exactly against the reference, 8-bit outputs against qcourse's fused
kernel); the time of a kernel is the median of ``repeat`` runs, and the table reports GOP/s
(2 * M * N * K operations: one multiply and one add per MAC), the share of the CPU's measured
int8 peak, and ratios to NumPy float32 matmul and to the fastest outside int8 kernel measured in
the same run.  See the kernels chapter.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np

from qcourse import _checks, _kernels
from qcourse.kernels import (
    LADDER,
    available_paths,
    best_path,
    get_num_threads,
    matmul_int8,
    matmul_int8_requant,
    prepack,
    set_num_threads,
)

__all__ = ["INT4_TOLERANCE", "Result", "cnn_benchmark", "cnn_onnx_model", "competitors",
           "format_cnn_table", "format_int4_table", "format_table", "int4_competitors",
           "machine_description", "peak_gops", "read_bandwidth_gbs", "run_benchmark",
           "run_int4_benchmark", "thread_limit", "unquiet_signs"]

Result = dict  # one row: {"threads", "m", "k", "n", "shape", "size", "kernel", "seconds", "gops",
#                          "pct_peak", "vs_numpy_f32", "vs_best_outside", "exact"}

# The multiplier of the fused (int8-output) contenders: small enough that most outputs are not
# saturated for random int8 inputs with K up to 4096.
_REQUANT_MULTIPLIER = 2.0**-14


def machine_description() -> str:
    """CPU model, core count and the kernel paths this CPU supports, for the table's caption."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} logical cores, Python {platform.python_version()}, "
            f"NumPy {np.__version__}; qcourse paths: {', '.join(available_paths())} "
            f"(default {best_path()})")


def peak_gops(threads: int = 1, seconds: float = 0.02, rounds: int = 5) -> float | None:
    """The int8 peak of ``threads`` cores, measured: GOP/s of register-only ``vpdpbusd``.

    Runs 16 independent ``vpdpbusd`` per loop iteration (64 multiply-adds each, no memory
    traffic) on every thread for about ``seconds``, ``rounds`` times, and returns the best rate
    (each thread times its own loop; the rates are summed).
    This is the ceiling of an int8 GEMM on this CPU at the clock it actually runs (a virtual
    machine's /proc/cpuinfo may report a nominal clock far from it).  ``None`` without VNNI.
    ``threads`` in [1, 1024], ``seconds`` in (0, 60], ``rounds`` in [1, 1000].
    """
    threads = _checks.check_threads(threads)
    seconds = _checks.check_real(seconds, "seconds", 0.0, 60.0, lo_open=True)
    rounds = _checks.check_int(rounds, "rounds", 1, 1000)
    if "vnni512" not in available_paths():
        return None
    iters = 1 << 16
    while True:  # calibrate: grow until one round lasts about `seconds`
        t0 = time.perf_counter()
        _kernels.vnni_peak_loop(iters, threads)
        if time.perf_counter() - t0 >= seconds / 4 or iters >= 1 << 30:
            break
        iters *= 4
    best = 0.0
    for _ in range(rounds):
        _, macs_per_second = _kernels.vnni_peak_loop(iters, threads)
        best = max(best, 2 * macs_per_second / 1e9)
    return best


class thread_limit:
    """Context manager: every contender (qcourse, NumPy's BLAS, PyTorch) uses ``threads`` threads.

    NumPy's BLAS is limited through ``threadpoolctl`` when it is installed (otherwise it keeps its
    own default, and the caption says so); ONNX Runtime sessions read :func:`get_num_threads`.
    """

    def __init__(self, threads: int):
        self.threads = _checks.check_threads(threads)

    def __enter__(self):
        self._saved = [get_num_threads()]
        set_num_threads(self.threads)
        self._blas = None
        try:
            from threadpoolctl import threadpool_limits
            self._blas = threadpool_limits(limits=self.threads, user_api="blas")
        except ImportError:
            pass
        try:
            import torch
            self._saved.append(torch.get_num_threads())
            torch.set_num_threads(self.threads)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        set_num_threads(self._saved[0])
        if self._blas is not None:
            self._blas.unregister()
        if len(self._saved) > 1:
            import torch
            torch.set_num_threads(self._saved[1])


# Outside systems.  Each factory returns None when the system is missing, else a function
# prepare(a, b) -> thunk: everything a real program does once (converting inputs, packing the
# weights, building a session) happens in prepare; the thunk is what is timed.  A thunk returns
# int32 (the exact product) or, for the int8-output kernels, an int8 array.

def _torch_int_mm():
    try:
        import torch
    except ImportError:
        return None

    def prepare(a, b):
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        return lambda: torch._int_mm(ta, tb).numpy()

    prepare.__name__ = f"torch._int_mm (torch {torch.__version__})"
    return prepare


def _torch_quantized_linear(engine: str):
    """PyTorch's quantized Linear on one of its CPU engines: int8 in, int8 out (requantized)."""
    try:
        import torch
    except ImportError:
        return None
    if engine not in torch.backends.quantized.supported_engines:
        return None

    def on_engine(f):
        """Run f() with the engine selected and PyTorch's deprecation warning silenced."""
        previous = torch.backends.quantized.engine
        with warnings.catch_warnings():
            # PyTorch 2.13 deprecates its quantized tensor types (it still runs them)
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            torch.backends.quantized.engine = engine
            try:
                return f()
            finally:
                torch.backends.quantized.engine = previous

    def prepare(a, b):
        # activations as quint8 with zero point 128 (= a + 128), weights qint8 (N, K)
        x = on_engine(lambda: torch._make_per_tensor_quantized_tensor(
            torch.from_numpy((a.astype(np.int16) + 128).astype(np.uint8)), 1.0, 128))
        w = on_engine(lambda: torch._make_per_tensor_quantized_tensor(
            torch.from_numpy(b.T.copy()), 1.0, 0))
        packed = on_engine(lambda: torch.ops.quantized.linear_prepack(w, None))

        def run():
            y = on_engine(lambda: torch.ops.quantized.linear(x, packed, 1 / _REQUANT_MULTIPLIER,
                                                              128))
            return (y.int_repr().numpy().astype(np.int16) - 128).astype(np.int8)

        return run

    prepare.__name__ = f"torch quantized linear, {engine} (int8 out)"
    return prepare


def _ort_matmul_integer():
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None

    def prepare(a, b):
        k, n = b.shape
        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["A", "B", "a_zp"], ["Y"])], "mmi",
            [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, k])],
            [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, n])],
            initializer=[helper.make_tensor("a_zp", TensorProto.UINT8, [], [128]),
                         helper.make_tensor("B", TensorProto.INT8, [k, n], b.tobytes(),
                                            raw=True)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = get_num_threads()
        session = ort.InferenceSession(model.SerializeToString(), opts,
                                       providers=["CPUExecutionProvider"])
        # u8 x s8 with a zero point of 128: (a + 128) - 128 = a, the form ORT's kernels want;
        # B is a constant of the model, so ORT packs it once, like prepack.
        au = (a.astype(np.int16) + 128).astype(np.uint8)
        return lambda: session.run(None, {"A": au})[0]

    prepare.__name__ = f"ONNX Runtime MatMulInteger u8s8 ({ort.__version__})"
    return prepare


def competitors() -> dict[str, Callable]:
    """Outside systems to compare with, where installed: name -> prepare(a, b) -> thunk.

    The thunk returns the int32 product, or int8 outputs for the quantized-linear kernels (their
    names end in "(int8 out)"), requantized with multiplier ``_REQUANT_MULTIPLIER``.
    """
    found = {}
    for factory in (_torch_int_mm, lambda: _torch_quantized_linear("onednn"),
                    lambda: _torch_quantized_linear("x86"), _ort_matmul_integer):
        f = factory()
        if f is not None:
            found[f.__name__] = f
    return found


def _wait_for_idle_threads(window: float = 0.01, quiet: int = 3, limit: float = 0.5) -> None:
    """Sleep until no thread of this process burns CPU (``quiet`` windows in a row, at most
    ``limit`` seconds): a library's pool spins for a while after its call (OpenBLAS's workers
    about 0.1 s), and a contender timed meanwhile shares a core with the spinner (two threads
    then ran slower than one)."""
    end, calm = time.perf_counter() + limit, 0
    while calm < quiet and time.perf_counter() < end:
        cpu0, t0 = time.process_time(), time.perf_counter()
        time.sleep(window)
        busy = time.process_time() - cpu0 > 0.1 * (time.perf_counter() - t0)
        calm = 0 if busy else calm + 1


def _median_seconds(f: Callable[[], object], repeat: int, warmup: float = 0.0,
                    before: Callable[[], object] | None = None) -> float:
    """Median of ``repeat`` timed calls of ``f`` after the idle wait, then ``before()`` if
    given, and, when ``warmup`` > 0, untimed calls for about that many seconds (at least one,
    at most 50)."""
    _wait_for_idle_threads()
    if before is not None:
        before()
    end, calls = time.perf_counter() + warmup, 0
    while warmup > 0 and (calls < 1 or (calls < 50 and time.perf_counter() < end)):
        f()
        calls += 1
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _contenders(a: np.ndarray, b: np.ndarray, include_slow: bool, outside: bool,
                rungs: bool) -> dict[str, Callable[[], np.ndarray]]:
    (m, k), n = a.shape, b.shape[1]
    ops = 2 * m * n * k
    af, bf = a.astype(np.float32), b.astype(np.float32)
    packed = prepack(b)
    kernels: dict[str, Callable[[], np.ndarray]] = {"NumPy float32 matmul": lambda: af @ bf}
    if rungs and ops <= 2 * 512**3:
        ai, bi = a.astype(np.int32), b.astype(np.int32)
        kernels["NumPy int32 matmul"] = lambda: ai @ bi
    for name, f in LADDER.items() if rungs else ():
        slow = name.startswith("naive") and ops > 2 * 256**3
        slow = slow or (not name.startswith("packed") and ops > 2 * 1024**3)
        if slow and not include_slow:
            continue
        kernels[f"qcourse {name}"] = lambda f=f: f(a, b)
    kernels[f"qcourse matmul_int8 (prepacked B, {best_path()})"] = lambda: matmul_int8(a, packed)
    kernels["qcourse matmul_int8_requant (prepacked, int8 out)"] = (
        lambda: matmul_int8_requant(a, packed, _REQUANT_MULTIPLIER))
    if outside:
        for name, prepare in competitors().items():
            try:
                kernels[name] = prepare(a, b)
            except RuntimeError as err:  # e.g. a shape an engine does not take
                print(f"skipping {name} at {m}x{k}x{n}: {err}")
    return kernels


#: Largest side the benchmark accepts (an 8192^3 product is 1.1e12 operations: seconds to
#: minutes per kernel, and the slow rungs are skipped there).
_MAX_SIDE = 8192


def _shapes(sizes, linear, linear_kn) -> list[tuple[int, int, int]]:
    shapes = [(n, n, n) for n in _checks.check_int_sequence(sizes, "sizes", 1, _MAX_SIDE,
                                                             min_len=0)]
    k, n = _checks.check_int_sequence(linear_kn, "linear_kn", 1, _MAX_SIDE, min_len=2,
                                      max_len=2)
    rows = _checks.check_int_sequence(linear, "linear", 1, _MAX_SIDE, min_len=0)
    return shapes + [(m, k, n) for m in rows]


def run_benchmark(sizes=(256, 512), repeat: int = 5, seed: int = 0,
                  include_slow: bool = False, outside: bool = True, linear=(),
                  linear_kn=(4096, 4096), peak: float | None = None,
                  rungs: bool = True) -> list[Result]:
    """Time every kernel on random int8 matrices of each shape; one row per (shape, kernel).

    Runs with the thread counts in force (see :class:`thread_limit`).

    Parameters
    ----------
    sizes : iterable of int
        Square shapes M = N = K, each in [1, 8192] (as are ``linear`` and ``linear_kn``).
    repeat : int
        Timed runs per kernel (after one untimed warm-up that also checks the result), in
        [1, 10000].
    include_slow : bool
        Also time the naive rung above 256 and the rungs below "packed" above 1024 (they are one
        to two orders of magnitude slower).
    outside : bool
        Include PyTorch and ONNX Runtime when they are installed.
    linear : iterable of int
        Rows M of linear-layer shapes M x K x N, with (K, N) = ``linear_kn``: a batch of M
        activations times a K x N weight matrix (M = 1 is a matrix-vector product).
    peak : float, optional
        The CPU's int8 peak in GOP/s for these threads (default: :func:`peak_gops`, measured).
    rungs : bool
        Include the ladder's rungs and NumPy's int32 product (else only NumPy float32, the
        prepacked and fused qcourse kernels, and the outside systems).
    """
    repeat = _checks.check_int(repeat, "repeat", 1, 10_000)
    seed = _checks.check_int(seed, "seed", 0)
    include_slow = _checks.check_bool(include_slow, "include_slow")
    outside = _checks.check_bool(outside, "outside")
    rungs = _checks.check_bool(rungs, "rungs")
    if peak is not None:
        peak = _checks.check_real(peak, "peak", 0.0, lo_open=True)
    shapes = _shapes(sizes, linear, linear_kn)
    threads = get_num_threads()
    if peak is None:
        peak = peak_gops(threads)
    rows: list[Result] = []
    rng = np.random.default_rng(seed)
    for m, k, n in shapes:
        a = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
        b = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
        # float64 BLAS is exact here: every partial sum is an integer below 2**31 < 2**53
        expected = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int32)
        # what the fused kernels must return: the requantization of matmul_int8_requant_reference
        expected_q = np.clip(np.rint(expected.astype(np.float32)
                                     * np.float32(_REQUANT_MULTIPLIER)), -128, 127).astype(np.int8)
        kernels = _contenders(a, b, include_slow, outside, rungs)
        shape_rows = []
        for name, f in kernels.items():
            result = f()
            if "float32" in name:
                exact = None
            elif result.dtype == np.int8:  # an int8-output (requantized) kernel
                diff = np.abs(result.astype(np.int16) - expected_q)
                exact = True if not diff.any() else ("±1" if diff.max() <= 1 else False)
            else:
                exact = bool(np.array_equal(result, expected))
            if exact is False:
                raise AssertionError(f"{name} gave a wrong result at {m}x{k}x{n}")
            seconds = _median_seconds(f, repeat)
            gops = 2.0 * m * n * k / seconds / 1e9
            shape_rows.append({
                "threads": threads, "m": m, "k": k, "n": n, "shape": f"{m}×{k}×{n}",
                "size": n if m == k == n else None, "kernel": name, "seconds": seconds,
                "gops": gops, "pct_peak": 100 * gops / peak if peak else None, "exact": exact})
        rows += _with_ratios(shape_rows)
    return rows


def _with_ratios(shape_rows: list[Result]) -> list[Result]:
    """One shape's rows with their speed-ups: ``vs_numpy_f32`` (the first row is NumPy float32)
    and ``vs_best_outside`` (the fastest PyTorch or ONNX Runtime row, None without one)."""
    base = shape_rows[0]["gops"]
    best_outside = max((r["gops"] for r in shape_rows
                        if r["kernel"].startswith(("torch", "ONNX"))), default=None)
    for r in shape_rows:
        r["vs_numpy_f32"] = r["gops"] / base
        r["vs_best_outside"] = r["gops"] / best_outside if best_outside else None
    return shape_rows
_RESULT_KEYS = frozenset(("threads", "shape", "kernel", "gops", "pct_peak", "vs_numpy_f32",
                          "vs_best_outside", "exact"))


def _check_rows(rows, keys: frozenset, source: str) -> list:
    """``rows`` as a list of result dicts of ``source``, each with at least ``keys``."""
    rows = _checks.check_sequence(rows, "rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not keys <= r.keys():
            raise TypeError(f"rows[{i}] must be a row of {source} (a dict with the keys "
                            f"{sorted(keys)}), got {_checks.describe(r)}")
    return rows


def _with_threads_column(rows: list[Result], header: str, align: str,
                         cells: list[str]) -> list[str]:
    """The Markdown lines of a table of ``rows``, whose header, alignment row and per-row cells
    are given without the threads column; the column is added only when the rows were measured
    at more than one thread count (a table of one count says it in its heading)."""
    if len({r["threads"] for r in rows}) <= 1:
        return [header, align, *cells]
    return [f"| threads {header}", f"|---:{align}",
            *(f"| {r['threads']} {cell}" for r, cell in zip(rows, cells, strict=True))]


def format_table(rows: list[Result]) -> str:
    """A Markdown table of :func:`run_benchmark`'s rows (a threads column when they mix
    thread counts)."""
    rows = _check_rows(rows, _RESULT_KEYS, "run_benchmark")
    cells = []
    for r in rows:
        exact = {None: "(float)", True: "yes", "±1": "±1 step"}.get(r["exact"], "NO")
        if r["pct_peak"] is None:
            pct = "–"
        elif r["pct_peak"] > 100:  # impossible: the peak was measured at another clock
            pct = "over the peak (busy)"
        else:
            pct = f"{r['pct_peak']:.0f}%"
        vs_out = "–" if r["vs_best_outside"] is None else f"{r['vs_best_outside']:.2f}x"
        cells.append(f"| {r['shape']} | {r['kernel']} | {r['gops']:.1f} | "
                     f"{pct} | {r['vs_numpy_f32']:.2f}x | {vs_out} | {exact} |")
    return "\n".join(_with_threads_column(
        rows, "| M×K×N | kernel | GOP/s | % of peak | vs NumPy float32 | vs best outside | exact |",
        "|:---|:---|---:|---:|---:|---:|:---:|", cells))


# --- the integer CNN against ONNX Runtime ---------------------------------------------------------


def cnn_onnx_model(model, input_shape=(1, 8, 8)):
    """The ONNX model of an :class:`qcourse.conv.IntegerCNN` that ``python -m qcourse.deploy
    export`` writes (QOperator form: ``QuantizeLinear``, one ``QLinearConv`` per convolution,
    ``QLinearGlobalAveragePool``, the classifier as a 1x1 ``QLinearConv``; float32 NCHW images
    of ``input_shape`` in, int8 logits codes (n, 10) out): :func:`qcourse.deploy.to_onnx` of
    :func:`qcourse.deploy.from_integer_model`, so the benchmark times the deployed file.
    ``input_shape`` is three ints, each in [1, 8192]."""
    from qcourse import deploy

    _check_integer_cnn(model)
    shape = _checks.check_int_sequence(input_shape, "input_shape", 1, _MAX_SIDE, min_len=3,
                                       max_len=3)
    return deploy.to_onnx(deploy.from_integer_model(model, input_shape=shape))


def _check_integer_cnn(model):
    from qcourse.conv import IntegerCNN

    return _checks.check_instance(model, "model", IntegerCNN, "a qcourse.conv.IntegerCNN")


#: Most images in one batch of :func:`cnn_benchmark`, and most timed runs per batch.
_MAX_CNN_BATCH = 4096
_MAX_CNN_REPEAT = 10_000


def cnn_benchmark(model, X, batches=(1, 256), repeat: int = 20, threads: int = 1):
    """Integer CNN inference through qcourse's kernels against ONNX Runtime on the same graph.

    For each batch size: the median seconds per batch of :meth:`IntegerCNN.logits_codes` and of
    an ONNX Runtime session on :func:`cnn_onnx_model` (``intra_op_num_threads=threads``, all
    graph optimizations), both pinned to ``threads``; images per second; and how many output
    codes agree (every code is compared).  qcourse's codes are first checked against the
    layers' NumPy references (``AssertionError`` if any differs).  Rows: ``{"batch",
    "contender", "seconds", "images_per_s", "vs_onnxruntime", "agree", "compared"}``.  ONNX
    Runtime rows are omitted when it is not installed.  ``X``: finite float32 NCHW images (or
    float64 within float32's range); ``batches`` ints in [1, 4096], ``repeat`` in [1, 10000],
    ``threads`` in [1, 1024].
    """
    _check_integer_cnn(model)
    X = _checks.check_float_matrix(X, "X", images=True)
    if X.ndim != 4:
        raise ValueError(f"X must be 4-D images (n, c, h, w), got shape {X.shape}")
    if X.dtype != np.float32:
        _checks.real_array(X, "X", dtype=np.float32)       # refuses values beyond float32
    batches = _checks.check_int_sequence(batches, "batches", 1, _MAX_CNN_BATCH)
    repeat = _checks.check_int(repeat, "repeat", 1, _MAX_CNN_REPEAT)
    threads = _checks.check_threads(threads)
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    rows = []
    with thread_limit(threads):
        session = None
        if ort is not None:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            session = ort.InferenceSession(
                cnn_onnx_model(model, X.shape[1:]).SerializeToString(), opts,
                providers=["CPUExecutionProvider"])
        for batch in batches:
            xb = np.ascontiguousarray(np.resize(X, (batch,) + X.shape[1:]), dtype=np.float32)
            ours = model.logits_codes(xb)
            if not np.array_equal(ours, model.logits_codes_reference(xb)):
                raise AssertionError("qcourse IntegerCNN gave a wrong result (its codes differ "
                                     "from the layers' NumPy references)")
            row = {"batch": batch, "contender": "qcourse IntegerCNN", "agree": None,
                   "compared": ours.size}
            t = _median_seconds(lambda xb=xb: model.logits_codes(xb), repeat)
            rows.append(dict(row, seconds=t, images_per_s=batch / t))
            if session is not None:
                theirs = session.run(None, {"images": xb})[0].reshape(ours.shape)
                agree = int(np.count_nonzero(theirs == ours))
                t_ort = _median_seconds(lambda xb=xb: session.run(None, {"images": xb}),
                                        repeat)
                rows[-1]["agree"] = agree
                rows.append({"batch": batch, "contender": f"ONNX Runtime {ort.__version__}",
                             "seconds": t_ort, "images_per_s": batch / t_ort, "agree": agree,
                             "compared": ours.size})
                for r in rows[-2:]:
                    r["vs_onnxruntime"] = t_ort / r["seconds"]
            else:
                rows[-1]["vs_onnxruntime"] = None
    return rows


def format_cnn_table(rows) -> str:
    """A Markdown table of :func:`cnn_benchmark`'s rows."""
    rows = _check_rows(rows, _CNN_KEYS, "cnn_benchmark")
    lines = ["| batch | contender | ms per batch | images/s | vs ONNX Runtime | codes equal |",
             "|---:|:---|---:|---:|---:|---:|"]
    for r in rows:
        vs = "–" if r["vs_onnxruntime"] is None else f"{r['vs_onnxruntime']:.2f}x"
        eq = "–" if r["agree"] is None else f"{r['agree']}/{r['compared']}"
        lines.append(f"| {r['batch']} | {r['contender']} | {1e3 * r['seconds']:.3f} | "
                     f"{r['images_per_s']:.0f} | {vs} | {eq} |")
    return "\n".join(lines)


_CNN_KEYS = frozenset(("batch", "contender", "seconds", "images_per_s", "vs_onnxruntime",
                       "agree", "compared"))


def _cnn_section(repeat: int) -> None:
    from qcourse.cnn import convert_cnn, digits_images, load_course_cnn

    X, _ = digits_images("test")
    model = convert_cnn(load_course_cnn("relu6"), digits_images("train")[0][:512])
    print("\nThe course CNN in integers (qcourse.conv.IntegerCNN) against ONNX Runtime on the "
          "exported model (python -m qcourse.deploy export), 1 thread each:\n")
    print(format_cnn_table(cnn_benchmark(model, X, repeat=repeat)))


def _check_peaks(peaks, name: str) -> dict:
    if not isinstance(peaks, dict):
        raise TypeError(f"{name} must be a dict from thread counts to GOP/s, got "
                        f"{_checks.describe(peaks)}")
    for threads, gops in peaks.items():
        _checks.check_threads(threads, f"{name}'s thread count")
        if gops is not None:
            _checks.check_real(gops, f"{name}[{threads}]", 0.0)
    return peaks


def unquiet_signs(rows: list[Result], peaks_before: dict[int, float | None],
                  peaks_after: dict[int, float | None], moved: float = 0.15,
                  slower: float = 0.9) -> list[str]:
    """Signs that the machine was busy while ``rows`` were measured, as sentences (or none).

    A benchmark measured on a machine that other work is using says more about that work than
    about the kernels. Three signs give it away, each impossible on an idle machine:

    - the peak (``peak_gops``, per thread count) measured again after the benchmark moved by
      more than ``moved`` (15 %) from the peak measured before it: the clock or the share of the
      core changed in between;
    - a row reached more than 100 % of the peak measured for its thread count;
    - a qcourse kernel ran slower with two threads than with one (below ``slower`` = 0.9 times
      the one-thread speed) on a square product of at least 512: its threads share nothing but
      the read-only inputs, so only a core taken by other work can do that.

    ``rows`` from :func:`run_benchmark`; ``peaks_before`` and ``peaks_after`` map thread
    counts to GOP/s (or None where not measured); ``moved`` and ``slower`` are fractions in
    (0, 1].
    """
    rows = _check_rows(rows, _RESULT_KEYS | {"m", "k", "n"}, "run_benchmark")
    peaks_before = _check_peaks(peaks_before, "peaks_before")
    peaks_after = _check_peaks(peaks_after, "peaks_after")
    moved = _checks.check_real(moved, "moved", 0.0, 1.0, lo_open=True)
    slower = _checks.check_real(slower, "slower", 0.0, 1.0, lo_open=True)
    signs = []
    for threads, before in sorted(peaks_before.items()):
        after = peaks_after.get(threads)
        if before and after and abs(after - before) > moved * before:
            signs.append(f"the {threads}-thread peak moved from {before:.0f} to {after:.0f} "
                         f"GOP/s between the start and the end of the benchmark")
    over = [r for r in rows if r.get("pct_peak") is not None and r["pct_peak"] > 100]
    if over:
        signs.append(f"{len(over)} measurement(s) exceeded the peak measured for their thread "
                     f"count (e.g. {over[0]['kernel']} at {over[0]['shape']}, "
                     f"{over[0]['threads']} thread(s))")
    one = {(r["shape"], r["kernel"]): r["gops"] for r in rows if r["threads"] == 1}
    slow2 = [r for r in rows if r["threads"] == 2 and r["kernel"].startswith("qcourse")
             and r["m"] == r["k"] == r["n"] and r["m"] >= 512
             and (r["shape"], r["kernel"]) in one
             and r["gops"] < slower * one[r["shape"], r["kernel"]]]
    if slow2:
        first = slow2[0]
        signs.append(f"{len(slow2)} qcourse kernel(s) ran slower on two threads than on one "
                     f"(e.g. {first['kernel']} at {first['shape']}: {first['gops']:.0f} against "
                     f"{one[first['shape'], first['kernel']]:.0f} GOP/s)")
    return signs


# --- int4 weights: the W4A8 kernel against the outside int4 kernels ------------------------------

def read_bandwidth_gbs(threads: int = 1, mib: int = 256, rounds: int = 5) -> float:
    """The memory read bandwidth of ``threads`` cores, measured: GB/s of a plain read loop.

    Each thread sums its share of a ``mib`` MiB buffer (far larger than the last-level cache, so
    it comes from DRAM) with the widest loads of the default path, ``rounds`` times after a
    barrier, timing its own loop; the best round of each thread is summed.  The bandwidth wall
    of the roofline, as :func:`peak_gops` is the arithmetic one.

    Bounds: ``threads`` an int in [1, 1024], ``mib`` in [1, 4096], ``rounds`` in [1, 1000].
    """
    threads = _checks.check_threads(threads)
    mib = _checks.check_int(mib, "mib", 1, 4096)
    rounds = _checks.check_int(rounds, "rounds", 1, 1000)
    return _read_gbs(_read_buffer(mib), threads, rounds)


def _read_buffer(mib: int) -> np.ndarray:
    return np.ones(mib * 2**20, dtype=np.uint8)  # written once, so every page is really there


def _read_gbs(buf: np.ndarray, threads: int, rounds: int) -> float:
    return _kernels.read_bandwidth(_PATH_CODES[best_path()], buf, threads, rounds) / 1e9


_PATH_CODES = {"portable": _kernels.PATH_PORTABLE, "avx2": _kernels.PATH_AVX2,
               "vnni512": _kernels.PATH_VNNI512}


def _ort_matmul_nbits(accuracy_level: int):
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None

    def prepare(x, codes, scales, group_size):
        n, k = codes.shape
        blocks = k // group_size
        u = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(n, blocks, group_size)
        packed = (u[:, :, 0::2] | (u[:, :, 1::2] << 4)).astype(np.uint8)  # first k: low nibble
        node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"],
                                domain="com.microsoft", K=k, N=n, bits=4, block_size=group_size,
                                accuracy_level=accuracy_level)
        graph = helper.make_graph(
            [node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
            initializer=[helper.make_tensor("B", TensorProto.UINT8, list(packed.shape),
                                            packed.tobytes(), raw=True),
                         helper.make_tensor("scales", TensorProto.FLOAT, [n * blocks],
                                            scales.astype(np.float32).tobytes(), raw=True)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = get_num_threads()
        session = ort.InferenceSession(model.SerializeToString(), opts,
                                       providers=["CPUExecutionProvider"])
        return (lambda: session.run(None, {"A": x})[0]), packed.nbytes + 4 * n * blocks

    compute = "int8" if accuracy_level == 4 else "float"
    prepare.__name__ = (f"ONNX Runtime MatMulNBits accuracy_level={accuracy_level} "
                        f"({compute} compute, {ort.__version__})")
    return prepare


def _torch_int4(kind: str):
    try:
        import torch
    except ImportError:
        return None
    aten = torch.ops.aten
    if kind.startswith("int4pack") and not hasattr(aten, "_weight_int4pack_mm_for_cpu"):
        return None
    if kind == "dyn" and not hasattr(aten, "_dyn_quant_matmul_4bit"):
        return None

    def prepare(x, codes, scales, group_size):
        n, k = codes.shape
        u = (codes.astype(np.int32) + 8)  # torch's int4 codes are unsigned, zero point 8
        tx = torch.from_numpy(x)
        if kind.startswith("int4pack"):
            # activations and (scale, zero) pairs in float32 or bfloat16, PyTorch's fast case
            dtype = torch.bfloat16 if kind == "int4pack_bf16" else torch.float32
            w = aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(u), 2)
            sz = torch.stack([torch.from_numpy(np.ascontiguousarray(scales.T)),
                              torch.zeros(k // group_size, n)], dim=-1).to(dtype).contiguous()
            tx = tx.to(dtype)
            return ((lambda: aten._weight_int4pack_mm_for_cpu(tx, w, group_size, sz).float()
                     .numpy()), w.numel() * w.element_size() + sz.numel() * sz.element_size())
        nib = u.astype(np.uint8)
        two = torch.from_numpy(nib[:, 0::2] | (nib[:, 1::2] << 4))  # first k: low nibble
        w = aten._dyn_quant_pack_4bit_weight(two, torch.from_numpy(scales.astype(np.float32)),
                                             None, group_size, k, n)
        return ((lambda: aten._dyn_quant_matmul_4bit(tx, w, group_size, k, n).numpy()),
                w.numel() * w.element_size())

    op = "_dyn_quant_matmul_4bit" if kind == "dyn" else "_weight_int4pack_mm_for_cpu"
    dtype = "bfloat16" if kind == "int4pack_bf16" else "float32"
    prepare.__name__ = f"torch {op} ({dtype}, torch {torch.__version__})"
    return prepare


def int4_competitors() -> dict[str, Callable]:
    """Outside int4-weight kernels, where installed: name -> prepare(x, codes, scales, g) ->
    (thunk, weight bytes).  Weights are codes in [-8, 7] with float32 scales per group."""
    found = {}
    for factory in (lambda: _ort_matmul_nbits(4), lambda: _ort_matmul_nbits(0),
                    lambda: _torch_int4("int4pack"), lambda: _torch_int4("int4pack_bf16"),
                    lambda: _torch_int4("dyn")):
        f = factory()
        if f is not None:
            found[f.__name__] = f
    return found


# Every int4 contender's output must lie this close to the float64 product of x and the
# dequantized weights, relative to the largest output: int8 activations move an output by at most
# (s_x / 2) sum_k |W_nk|, which for random data stays near 1 % of the largest output.
INT4_TOLERANCE = 0.03


def _int4_layers(rng, k: int, n: int, count: int, group_size: int):
    layers = []
    for _ in range(count):
        codes = rng.integers(-8, 8, size=(n, k), dtype=np.int8)
        scales = rng.uniform(0.5, 1.5, size=(n, k // group_size)).astype(np.float32) / 64
        layers.append((codes, scales))
    return layers


_MAX_INT4_SIDE = 32768
# Untimed calls before each int4 row is timed, for about this long (at least one, at most 50),
# after the idle wait: the calls that follow a pause are not the steady state of a decoding loop.
# An M = 1 layer of 4096 x 4096 takes well under a millisecond, and its first calls find its
# weights gone from the caches (here qcourse's first of five took 3-4 x its steady time, ONNX
# Runtime's 3-5 x over its first ten); over the DRAM-sized stack, whose weights never stay in the
# cache, the first calls after a 30 ms sleep still ran at 70-90 % of the steady bandwidth for
# about five calls (25 ms) on this VM, so a median of five calls straight away measured the
# memory system waking up. Every contender gets the same warm-up, the slow ones a single call.
INT4_WARMUP_SECONDS = 0.05


def _check_int4_shapes(linear, kn, stack, group_size):
    from qcourse.kernels import max_group_w4a8

    linear = _checks.check_int_sequence(linear, "linear", 1, _MAX_SIDE, min_len=0)
    kn = _checks.check_int_sequence(kn, "kn", 1, _MAX_INT4_SIDE, min_len=2, max_len=2)
    stack = () if stack is None else _checks.check_int_sequence(stack, "stack", 1,
                                                                _MAX_INT4_SIDE, min_len=0,
                                                                max_len=3)
    if len(stack) not in (0, 3):
        raise ValueError(f"stack must be empty or (layers, K, N), got {stack}")
    if stack and stack[0] * stack[1] * stack[2] > _checks.MAX_ELEMENTS:
        raise ValueError(f"stack must hold at most {_checks.MAX_ELEMENTS} weights in all, got "
                         f"{stack}")
    g = _checks.check_int(group_size, "group_size", 8, max_group_w4a8())
    for name, k in (("kn", kn[0]), ("stack", stack[1] if stack else g)):
        if g % 8 or k % g:
            raise ValueError(f"group_size must be a multiple of 8 dividing K={k} of {name}, "
                             f"got {g}")
    return linear, kn, stack, g


def _check_int4_outputs(name: str, shape: str, thunks: list, layers: list,
                        expected: list, xq: np.ndarray) -> None:
    """Check one contender's outputs before it is timed: the int8 GEMM exactly against the
    int64 product of its codes, every int4 kernel within :data:`INT4_TOLERANCE` of the largest
    float64 output."""
    for i, (thunk, (codes, _)) in enumerate(zip(thunks, layers, strict=True)):
        out = np.asarray(thunk(), dtype=np.float64)
        if "matmul_int8" in name:
            ok = np.array_equal(out, xq.astype(np.int64) @ codes.T.astype(np.int64))
        else:
            ok = np.abs(out - expected[i]).max() <= INT4_TOLERANCE * np.abs(expected[i]).max()
        if not ok:
            raise AssertionError(f"{name} gave a wrong result at {shape} (layer {i})")


def run_int4_benchmark(linear=(1, 32, 128), kn=(4096, 4096), stack=(4, 4096, 11008),
                       group_size: int = 32, repeat: int = 5, seed: int = 0,
                       outside: bool = True, bandwidth: float | None = None,
                       skip: tuple[str, ...] = ()) -> list[Result]:
    """Time int4-weight layers: qcourse's :func:`~qcourse.kernels.matmul_w4a8` against ONNX
    Runtime's MatMulNBits and PyTorch's int4 CPU kernels (where installed), NumPy float32 on the
    dequantized weights and qcourse's int8 GEMM on the same shape.

    Shapes: M x K x N for each M in ``linear`` with (K, N) = ``kn``; and ``stack`` = (layers,
    K, N) at M = 1, a pass through several layers whose weights together exceed the last-level
    cache, so that they come from memory.  Every output is first checked against the float64
    product (within :data:`INT4_TOLERANCE` of the largest output; our int8 GEMM exactly).  Rows
    add ``gbs`` (weight bytes read per second), ``read_gbs`` (the read bandwidth it is compared
    with) and ``pct_bw`` (``gbs`` as a percentage of it); ``vs_best_outside`` is relative to
    the fastest outside int4 kernel.  ``bandwidth`` None (the default) measures the read
    bandwidth (:func:`read_bandwidth_gbs`, the threads in force, best of 3 rounds) just before
    each row is timed, after the idle wait and before the warm-up: on a machine shared with
    others the memory's speed changes from one second to the next (here 17-27 GB/s on one
    core), and a row is compared with what memory delivered at the time it ran, not half a
    minute earlier.  A number uses that bandwidth for every row.  ``skip``: outside kernels
    whose names contain any of these strings are left out (e.g. ``("float32, torch",)`` for
    PyTorch's slow float32 variants).

    Bounds: the rows M in [1, 8192]; K and N in [1, 32768] with K a multiple of ``group_size``;
    ``stack`` None, empty or (layers, K, N) with at most 2**28 weights in all; ``group_size`` a
    multiple of 8 up to :func:`~qcourse.kernels.max_group_w4a8`; ``repeat`` in [1, 10000].
    """
    from qcourse.kernels import matmul_w4a8, prepack_int4, quantize_rows_int8

    linear, kn, stack, group_size = _check_int4_shapes(linear, kn, stack, group_size)
    repeat = _checks.check_int(repeat, "repeat", 1, 10_000)
    seed = _checks.check_int(seed, "seed", 0)
    outside = _checks.check_bool(outside, "outside")
    if bandwidth is not None:
        bandwidth = _checks.check_real(bandwidth, "bandwidth", 0.0, lo_open=True)
    skip = _checks.check_sequence(skip, "skip")
    for i, part in enumerate(skip):
        _checks.check_instance(part, f"skip[{i}]", str, "a string")
    threads = get_num_threads()
    # one buffer for every measurement of the read bandwidth (256 MiB, as read_bandwidth_gbs)
    read_buf = _read_buffer(256) if bandwidth is None else None
    rng = np.random.default_rng(seed)
    k, n = kn
    square = _int4_layers(rng, k, n, 1, group_size) if linear else []  # one layer for every M
    cases = [(f"{m}×{k}×{n}", m, square) for m in linear]
    if stack:
        count, sk, sn = stack
        cases.append((f"1×{sk}×{sn} ×{count} layers", 1,
                      _int4_layers(rng, sk, sn, count, group_size)))
    rows: list[Result] = []
    prepared: dict[int, tuple] = {}  # the layers' own forms, made once for every M that uses them
    for shape, m, layers in cases:
        k = layers[0][0].shape[1]
        x = rng.standard_normal((m, k)).astype(np.float32)
        if id(layers) not in prepared:
            prepared.clear()     # the stack's forms replace the square layer's
            prepared[id(layers)] = (
                [(c.reshape(c.shape[0], -1, group_size) * s[:, :, None]).reshape(c.shape)
                 for c, s in layers],
                [prepack_int4(c, s, group_size=group_size) for c, s in layers],
                [prepack(np.ascontiguousarray(c.T)) for c, _ in layers])
        dequant, packed, int8_packed = prepared[id(layers)]
        # w.T as a view: BLAS takes the transpose as a flag (a transposed copy of the stack's
        # 180 MB layers cost seconds of the kernels page)
        expected = [x.astype(np.float64) @ w.astype(np.float64).T for w in dequant]
        runs: dict[str, tuple[list, int]] = {}
        runs["NumPy float32 matmul (dequantized weights)"] = (
            [lambda w=w, x=x: x @ w.T for w in dequant], sum(w.nbytes for w in dequant))
        runs[f"qcourse matmul_w4a8 ({best_path()})"] = (
            [lambda p=p, x=x: matmul_w4a8(x, p) for p in packed],
            sum(p.data.nbytes for p in packed))
        xq, _ = quantize_rows_int8(x)
        runs["qcourse matmul_int8 (int8 weights, same shape)"] = (
            [lambda p=p, xq=xq: matmul_int8(xq, p) for p in int8_packed],
            sum(p.data.nbytes for p in int8_packed))
        if outside:
            for name, prepare in int4_competitors().items():
                if any(part in name for part in skip):
                    continue
                try:
                    made = [prepare(x, c, s, group_size) for c, s in layers]
                except RuntimeError as err:
                    print(f"skipping {name} at {shape}: {err}")
                    continue
                runs[name] = ([t for t, _ in made], sum(b for _, b in made))
        shape_rows = []
        for name, (thunks, nbytes) in runs.items():
            _check_int4_outputs(name, shape, thunks, layers, expected, xq)

            def run_all(thunks=thunks):
                for thunk in thunks:
                    thunk()

            read = {"gbs": bandwidth}

            def measure_read(read=read):
                if bandwidth is None:
                    read["gbs"] = _read_gbs(read_buf, threads, 3)

            seconds = _median_seconds(run_all, repeat, warmup=INT4_WARMUP_SECONDS,
                                      before=measure_read)
            ops = 2.0 * m * k * layers[0][0].shape[0] * len(layers)
            gbs = nbytes / seconds / 1e9
            shape_rows.append({
                "threads": threads, "shape": shape, "m": m, "kernel": name, "seconds": seconds,
                "gops": ops / seconds / 1e9, "gbs": gbs, "weight_bytes": nbytes,
                "read_gbs": read["gbs"], "pct_bw": 100 * gbs / read["gbs"]})
        rows += _with_ratios(shape_rows)
    return rows


def format_int4_table(rows: list[Result]) -> str:
    """A Markdown table of :func:`run_int4_benchmark`'s rows (a threads column when they mix
    thread counts)."""
    rows = _check_rows(rows, frozenset(("threads", "shape", "kernel", "seconds", "gops", "gbs",
                                        "read_gbs", "pct_bw", "vs_numpy_f32",
                                        "vs_best_outside")),
                       "run_int4_benchmark")
    cells = []
    for r in rows:
        vs_out = "–" if r["vs_best_outside"] is None else f"{r['vs_best_outside']:.2f}x"
        cells.append(f"| {r['shape']} | {r['kernel']} | "
                     f"{1e3 * r['seconds']:.3f} | {r['gops']:.1f} | {r['gbs']:.1f} | "
                     f"{r['read_gbs']:.1f} | {r['pct_bw']:.0f}% | "
                     f"{r['vs_numpy_f32']:.2f}x | {vs_out} |")
    return "\n".join(_with_threads_column(
        rows, "| shape | kernel | ms | GOP/s | weight GB/s | read GB/s | % of read GB/s | "
        "vs NumPy float32 | vs best outside int4 |",
        "|:---|:---|" + "---:|" * 7, cells))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qcourse.bench", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024, 2048],
                        help="square sizes M = K = N")
    parser.add_argument("--linear", type=int, nargs="*", default=[1, 32, 128],
                        help="rows M of linear-layer shapes M x K x N (see --linear-kn)")
    parser.add_argument("--linear-kn", type=int, nargs=2, default=[4096, 4096],
                        metavar=("K", "N"), help="the weight matrix of the linear shapes")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--include-slow", action="store_true", help="time the slow rungs too")
    parser.add_argument("--no-outside", action="store_true", help="skip PyTorch / ONNX Runtime")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts to run, every contender pinned to each in turn")
    parser.add_argument("--no-cnn", action="store_true",
                        help="skip the integer CNN against ONNX Runtime (batch 1 and 256)")
    parser.add_argument("--cnn-only", action="store_true", help="run only the CNN comparison")
    parser.add_argument("--int4", choices=["also", "only", "no"], default="also",
                        help="the int4-weight table (W4A8 against MatMulNBits and PyTorch's int4 "
                             "kernels) after the int8 one, instead of it, or not")
    parser.add_argument("--int4-group", type=int, default=32, help="group size of the int4 "
                        "weights")
    parser.add_argument("--int4-stack", type=int, nargs=3, default=[4, 4096, 11008],
                        metavar=("LAYERS", "K", "N"), help="layers of a DRAM-sized stack at M = 1")
    args = parser.parse_args(argv)
    if args.cnn_only:
        print(machine_description())
        _cnn_section(max(args.repeat, 20))
        return
    print(machine_description())
    for threads in args.threads if args.int4 != "no" else ():
        with thread_limit(threads):
            rows = run_int4_benchmark(args.linear, tuple(args.linear_kn), tuple(args.int4_stack),
                                      args.int4_group, args.repeat, outside=not args.no_outside)
        reads = [r["read_gbs"] for r in rows]
        print(f"\nint4 weights, groups of {args.int4_group}, {threads} thread"
              f"{'s' if threads > 1 else ''} per contender; read bandwidth measured just before "
              f"each row: {min(reads):.1f}-{max(reads):.1f} GB/s:\n")
        print(format_int4_table(rows))
    all_rows, before, after = [], {}, {}
    for threads in args.threads if args.int4 != "only" else ():
        with thread_limit(threads):
            before[threads] = peak = peak_gops(threads)
            rows = run_benchmark(args.sizes, args.repeat, include_slow=args.include_slow,
                                 outside=not args.no_outside, linear=args.linear,
                                 linear_kn=tuple(args.linear_kn), peak=peak)
            after[threads] = peak_gops(threads)
        all_rows += rows
        peak_text = (f"measured int8 peak {peak:.0f} GOP/s (register-only vpdpbusd)" if peak
                     else "no VNNI: no peak measured")
        print(f"\n{threads} thread{'s' if threads > 1 else ''} per contender; {peak_text}:\n")
        print(format_table(rows))
    signs = unquiet_signs(all_rows, before, after)
    if signs:
        print("\nThe machine was not quiet during this run; measure again when it is idle:")
        print("\n".join(f"- {sign}" for sign in signs))
    if not args.no_cnn:
        _cnn_section(max(args.repeat, 20))


if __name__ == "__main__":
    main()

