"""Benchmark the int8 kernel ladder against NumPy, PyTorch and ONNX Runtime, in one run.

Run ``python -m qcourse.bench`` (``--help`` for options).  Every result is checked against the
exact reference before it is timed; the time of a kernel is the median of ``repeat`` runs, and the
table reports GOP/s (2 * M * N * K operations: one multiply and one add per MAC) and the ratio to
NumPy float32 matmul measured in the same run.  See the kernels chapter.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from qcourse.kernels import (
    LADDER,
    available_paths,
    best_path,
    get_num_threads,
    matmul_int8,
    prepack,
    set_num_threads,
)

__all__ = ["Result", "competitors", "format_table", "machine_description", "run_benchmark",
           "thread_limit"]

Result = dict  # one row: {"size", "kernel", "seconds", "gops", "vs_numpy_f32", "exact"}


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


class thread_limit:
    """Context manager: every contender (qcourse, NumPy's BLAS, PyTorch) uses ``threads`` threads.

    NumPy's BLAS is limited through ``threadpoolctl`` when it is installed (otherwise it keeps its
    own default, and the caption says so); ONNX Runtime sessions read :func:`get_num_threads`.
    """

    def __init__(self, threads: int):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads

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


def _torch_int_mm():
    try:
        import torch
    except ImportError:
        return None

    def run(a, b):
        return torch._int_mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()

    run.__name__ = f"torch._int_mm (torch {torch.__version__})"
    return run


def _ort_matmul_integer():
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    cache: dict[tuple[int, int, int], object] = {}

    def session(k, n):
        if (k, n, get_num_threads()) not in cache:
            graph = helper.make_graph(
                [helper.make_node("MatMulInteger", ["A", "B", "a_zp"], ["Y"])], "mmi",
                [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, k]),
                 helper.make_tensor_value_info("B", TensorProto.INT8, [k, n])],
                [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, n])],
                initializer=[helper.make_tensor("a_zp", TensorProto.UINT8, [], [128])])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = get_num_threads()
            cache[(k, n, get_num_threads())] = ort.InferenceSession(
                model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return cache[(k, n, get_num_threads())]

    def run(a, b):
        # u8 x s8 with a zero point of 128: (a + 128) - 128 = a, the form ORT's kernels want.
        au = (a.astype(np.int16) + 128).astype(np.uint8)
        return session(*b.shape).run(None, {"A": au, "B": b})[0]

    run.__name__ = f"ONNX Runtime MatMulInteger u8s8 ({ort.__version__})"
    return run


def competitors() -> dict[str, Callable]:
    """Outside systems to compare with, where installed: name -> f(a, b) returning int32."""
    found = {}
    for factory in (_torch_int_mm, _ort_matmul_integer):
        f = factory()
        if f is not None:
            found[f.__name__] = f
    return found


def _median_seconds(f: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _contenders(a: np.ndarray, b: np.ndarray, include_slow: bool,
                outside: bool) -> dict[str, Callable[[], np.ndarray]]:
    n = a.shape[0]
    af, bf = a.astype(np.float32), b.astype(np.float32)
    ai, bi = a.astype(np.int32), b.astype(np.int32)
    packed = prepack(b)
    kernels: dict[str, Callable[[], np.ndarray]] = {"NumPy float32 matmul": lambda: af @ bf}
    if n <= 512:
        kernels["NumPy int32 matmul"] = lambda: ai @ bi
    for name, f in LADDER.items():
        if name.startswith("naive") and n > 256 and not include_slow:
            continue
        kernels[f"qcourse {name}"] = lambda f=f: f(a, b)
    kernels[f"qcourse matmul_int8 (prepacked B, {best_path()})"] = lambda: matmul_int8(a, packed)
    if outside:
        for name, f in competitors().items():
            kernels[name] = lambda f=f: f(a, b)
    return kernels


def run_benchmark(sizes=(256, 512), repeat: int = 5, seed: int = 0,
                  include_slow: bool = False, outside: bool = True) -> list[Result]:
    """Time every kernel on square int8 matrices of each size; return one row per (size, kernel).

    Parameters
    ----------
    sizes : iterable of int
        Square sizes M = N = K.
    repeat : int
        Timed runs per kernel (after one untimed warm-up that also checks the result).
    include_slow : bool
        Also time the naive rung at sizes above 256 (it is two orders of magnitude slower).
    outside : bool
        Include PyTorch and ONNX Runtime when they are installed.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    rows: list[Result] = []
    rng = np.random.default_rng(seed)
    for n in sizes:
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"sizes must be positive integers, got {n!r}")
        n = int(n)
        a = rng.integers(-128, 128, size=(n, n), dtype=np.int8)
        b = rng.integers(-128, 128, size=(n, n), dtype=np.int8)
        expected = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)
        kernels = _contenders(a, b, include_slow, outside)
        base = None
        for name, f in kernels.items():
            result = f()
            exact = None if "float32" in name else bool(np.array_equal(result, expected))
            if exact is False:
                raise AssertionError(f"{name} gave a wrong result at size {n}")
            seconds = _median_seconds(f, repeat)
            gops = 2.0 * n**3 / seconds / 1e9
            if base is None:
                base = gops
            rows.append({"size": n, "kernel": name, "seconds": seconds, "gops": gops,
                         "vs_numpy_f32": gops / base, "exact": exact})
    return rows


def format_table(rows: list[Result]) -> str:
    """A Markdown table of :func:`run_benchmark`'s rows."""
    lines = ["| size | kernel | GOP/s | vs NumPy float32 | exact |", "|---:|:---|---:|---:|:---:|"]
    for r in rows:
        exact = {None: "(float)", True: "yes", False: "NO"}[r["exact"]]
        lines.append(f"| {r['size']} | {r['kernel']} | {r['gops']:.1f} | "
                     f"{r['vs_numpy_f32']:.2f}x | {exact} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qcourse.bench", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--include-slow", action="store_true", help="time the naive rung too")
    parser.add_argument("--no-outside", action="store_true", help="skip PyTorch / ONNX Runtime")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="thread counts to run, every contender pinned to each in turn")
    args = parser.parse_args(argv)
    print(machine_description())
    for threads in args.threads:
        with thread_limit(threads):
            rows = run_benchmark(args.sizes, args.repeat, include_slow=args.include_slow,
                                 outside=not args.no_outside)
        print(f"\n{threads} thread{'s' if threads > 1 else ''} per contender:\n")
        print(format_table(rows))


if __name__ == "__main__":
    main()
