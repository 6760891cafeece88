"""The benchmark script: it runs, checks every kernel's result, and prints a table (no timings
are asserted: speed is reported, never tested)."""

import numpy as np
import pytest

from qcourse import bench
from qcourse.kernels import matmul_int8_requant_reference


def test_small_run_covers_every_rung_and_checks_results():
    rows = bench.run_benchmark(sizes=[32, 48], repeat=1, outside=False, linear=[1, 3],
                               linear_kn=(40, 24))
    kernels = {r["kernel"] for r in rows}
    assert "NumPy float32 matmul" in kernels
    assert sum(k.startswith("qcourse ") for k in kernels) == len(bench.LADDER) + 2
    assert all(r["exact"] is True for r in rows if "float32" not in r["kernel"])
    assert all(r["gops"] > 0 and r["seconds"] > 0 for r in rows)
    assert {r["shape"] for r in rows} == {"32×32×32", "48×48×48", "1×40×24", "3×40×24"}
    assert {r["size"] for r in rows} == {32, 48, None}
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 48×48×48 | qcourse u8 x s8 |" in table


def test_peak_and_ratios():
    peak = bench.peak_gops(1, seconds=0.005, rounds=2)
    if "vnni512" in bench.available_paths():
        assert peak > 0
    else:
        assert peak is None
    rows = bench.run_benchmark(sizes=[24], repeat=1, outside=False, peak=100.0)
    f32 = next(r for r in rows if r["kernel"] == "NumPy float32 matmul")
    assert f32["vs_numpy_f32"] == 1.0 and f32["vs_best_outside"] is None
    for r in rows:
        assert r["pct_peak"] == pytest.approx(r["gops"])  # a peak of 100 GOP/s
        assert r["vs_numpy_f32"] == pytest.approx(r["gops"] / f32["gops"])
    assert "% of peak" in bench.format_table(rows)
    top = bench.run_benchmark(sizes=[24], repeat=1, outside=False, peak=100.0, rungs=False)
    assert {r["kernel"] for r in top} == {"NumPy float32 matmul",
                                          f"qcourse matmul_int8 (prepacked B, {bench.best_path()})",
                                          "qcourse matmul_int8_requant (prepacked, int8 out)"}
    # the fused kernel's expected codes are the reference's
    a = np.random.default_rng(0).integers(-128, 128, size=(24, 24), dtype=np.int8)
    assert np.array_equal(bench.matmul_int8_requant(a, a, bench._REQUANT_MULTIPLIER),
                          matmul_int8_requant_reference(a, a, bench._REQUANT_MULTIPLIER))


def test_a_wrong_int8_output_is_caught(monkeypatch):
    real = bench.matmul_int8_requant

    def off_by_two(a, b, multiplier, *args, **kw):
        y = real(a, b, multiplier, *args, **kw)
        y[0, 0] = y[0, 0] - 2 if y[0, 0] > -126 else y[0, 0] + 2
        return y

    monkeypatch.setattr(bench, "matmul_int8_requant", off_by_two)
    with pytest.raises(AssertionError, match="requant.*gave a wrong result"):
        bench.run_benchmark(sizes=[16], repeat=1, outside=False)


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
    for name, prepare in found.items():
        got = prepare(a, b)()
        if name.endswith("(int8 out)"):  # requantized: within one step of qcourse's fused kernel
            expected = bench.matmul_int8_requant(a, b, bench._REQUANT_MULTIPLIER)
            assert np.abs(got.astype(int) - expected).max() <= 1, name
        else:
            np.testing.assert_array_equal(got, bench.matmul_int8(a, b), err_msg=name)


def test_bad_arguments():
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        bench.run_benchmark(sizes=[8], repeat=0)
    with pytest.raises(ValueError, match="sizes must be positive integers"):
        bench.run_benchmark(sizes=[0], repeat=1)
    with pytest.raises(ValueError, match="linear must be positive integers"):
        bench.run_benchmark(sizes=[], linear=[0], repeat=1)


def test_cli_prints_machine_and_table(capsys):
    bench.main(["--sizes", "16", "--linear", "2", "--linear-kn", "8", "8", "--repeat", "1",
                "--no-outside", "--threads", "1", "2"])
    out = capsys.readouterr().out
    assert "qcourse paths:" in out and "| 1 | 16×16×16 | NumPy float32 matmul |" in out
    assert "| 2 | 2×8×8 | qcourse matmul_int8_requant" in out and "2 threads per contender" in out


def test_thread_limit_pins_and_restores():
    before = bench.get_num_threads()
    with bench.thread_limit(1):
        assert bench.get_num_threads() == 1
        rows = bench.run_benchmark(sizes=[16], repeat=1, outside=False)
        assert all(r["exact"] in (True, None) for r in rows)
    assert bench.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        bench.thread_limit(0)


def test_cnn_benchmark_checks_and_compares_with_onnx_runtime(monkeypatch):
    from qcourse.cnn import convert_cnn, digits_images, load_course_cnn

    X, _ = digits_images("test")
    model = convert_cnn(load_course_cnn("relu6"), digits_images("train")[0][:256])
    rows = bench.cnn_benchmark(model, X[:40], batches=(1, 7), repeat=1)
    ours = [r for r in rows if r["contender"] == "qcourse IntegerCNN"]
    assert [r["batch"] for r in ours] == [1, 7]
    assert all(r["seconds"] > 0 and r["compared"] == 10 * r["batch"] for r in rows)
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed")
    assert len(rows) == 4
    assert all(r["agree"] == r["compared"] for r in rows)   # every code equal to ORT's
    table = bench.format_cnn_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| 7 | qcourse IntegerCNN |" in table
    # a wrong code is caught before anything is timed
    real = type(model).logits_codes

    def off_by_one(self, X, **kw):
        y = real(self, X, **kw)
        y[0, 0] += 1 if y[0, 0] < 127 else -1
        return y

    monkeypatch.setattr(type(model), "logits_codes", off_by_one)
    with pytest.raises(AssertionError, match="IntegerCNN gave a wrong result"):
        bench.cnn_benchmark(model, X[:4], batches=(2,), repeat=1)
