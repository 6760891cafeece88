"""The benchmark script: it runs, checks every kernel's result, and prints a table (no timings
are asserted: speed is reported, never tested)."""

import numpy as np
import pytest

from qcourse import bench


def test_small_run_covers_every_rung_and_checks_results():
    rows = bench.run_benchmark(sizes=[32, 48], repeat=1, outside=False)
    kernels = {r["kernel"] for r in rows}
    assert "NumPy float32 matmul" in kernels
    assert sum(k.startswith("qcourse ") for k in kernels) == len(bench.LADDER) + 1
    assert all(r["exact"] for r in rows if "float32" not in r["kernel"])
    assert all(r["gops"] > 0 and r["seconds"] > 0 for r in rows)
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 48 | qcourse u8 x s8 |" in table


def test_a_wrong_kernel_is_caught(monkeypatch):
    def broken(a, b):
        out = bench.matmul_int8(a, b)
        out[0, 0] += 1
        return out

    monkeypatch.setitem(bench.LADDER, "u8 x s8", broken)
    with pytest.raises(AssertionError, match="u8 x s8 gave a wrong result"):
        bench.run_benchmark(sizes=[16], repeat=1, outside=False)


def test_outside_systems_agree_exactly_where_installed():
    found = bench.competitors()
    if not found:
        pytest.skip("neither PyTorch nor ONNX Runtime is installed")
    rng = np.random.default_rng(1)
    a = rng.integers(-128, 128, size=(32, 64), dtype=np.int8)
    b = rng.integers(-128, 128, size=(64, 24), dtype=np.int8)
    for name, f in found.items():
        np.testing.assert_array_equal(f(a, b), bench.matmul_int8(a, b), err_msg=name)


def test_bad_arguments():
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        bench.run_benchmark(sizes=[8], repeat=0)
    with pytest.raises(ValueError, match="sizes must be positive integers"):
        bench.run_benchmark(sizes=[0], repeat=1)


def test_cli_prints_machine_and_table(capsys):
    bench.main(["--sizes", "16", "--repeat", "1", "--no-outside"])
    out = capsys.readouterr().out
    assert "qcourse paths:" in out and "| 16 | NumPy float32 matmul |" in out


def test_thread_limit_pins_and_restores():
    before = bench.get_num_threads()
    with bench.thread_limit(1):
        assert bench.get_num_threads() == 1
        rows = bench.run_benchmark(sizes=[16], repeat=1, outside=False)
        assert all(r["exact"] in (True, None) for r in rows)
    assert bench.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        bench.thread_limit(0)
