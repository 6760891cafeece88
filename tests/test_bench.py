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
    with pytest.raises(ValueError, match=r"repeat must be an int in \[1, 10000\]"):
        bench.run_benchmark(sizes=[8], repeat=0)
    with pytest.raises(ValueError, match=r"sizes\[0\] must be an int in \[1, 8192\]"):
        bench.run_benchmark(sizes=[0], repeat=1)
    with pytest.raises(ValueError, match=r"linear\[0\] must be an int in \[1, 8192\]"):
        bench.run_benchmark(sizes=[], linear=[0], repeat=1)


def test_cli_prints_machine_and_table(capsys):
    bench.main(["--sizes", "16", "--linear", "2", "--linear-kn", "8", "8", "--repeat", "1",
                "--no-outside", "--threads", "1", "2", "--int4", "no"])
    out = capsys.readouterr().out
    one, two = out.split("2 threads per contender")   # a table per thread count, headed by it
    assert "qcourse paths:" in one and "\n| 16×16×16 | NumPy float32 matmul |" in one
    assert "\n| 2×8×8 | qcourse matmul_int8_requant" in two and "| threads |" not in out


def test_thread_limit_pins_and_restores():
    before = bench.get_num_threads()
    with bench.thread_limit(1):
        assert bench.get_num_threads() == 1
        rows = bench.run_benchmark(sizes=[16], repeat=1, outside=False)
        assert all(r["exact"] in (True, None) for r in rows)
    assert bench.get_num_threads() == before
    with pytest.raises(ValueError, match=r"threads must be an int in \[1, 1024\]"):
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


def _row(threads, m, kernel, gops, peak):
    return {"threads": threads, "m": m, "k": m, "n": m, "shape": f"{m}×{m}×{m}", "size": m,
            "kernel": kernel, "seconds": 1.0, "gops": gops,
            "pct_peak": None if peak is None else 100 * gops / peak,
            "vs_numpy_f32": 1.0, "vs_best_outside": None, "exact": True}


def test_unquiet_signs_are_silent_on_a_quiet_run_and_name_each_sign():
    quiet = [_row(1, 1024, "qcourse matmul_int8", 80, 100),
             _row(2, 1024, "qcourse matmul_int8", 150, 200)]
    assert bench.unquiet_signs(quiet, {1: 100, 2: 200}, {1: 104, 2: 195}) == []
    busy = [_row(1, 1024, "qcourse matmul_int8", 120, 100),   # over the peak
            _row(2, 1024, "qcourse matmul_int8", 90, 200)]    # two threads slower than one
    signs = "\n".join(bench.unquiet_signs(busy, {1: 100, 2: 200}, {1: 100, 2: 120}))
    assert "the 2-thread peak moved from 200 to 120 GOP/s" in signs
    assert "1 measurement(s) exceeded the peak" in signs
    assert "ran slower on two threads than on one" in signs
    # an impossible share of the peak is never printed as a number
    table = bench.format_table(busy)
    assert "120%" not in table and "over the peak (busy)" in table


# --- int4 contenders ------------------------------------------------------------------------------

def test_read_bandwidth_is_measured():
    gbs = bench.read_bandwidth_gbs(1, mib=8, rounds=2)
    assert gbs > 0.1
    with pytest.raises(ValueError, match=r"threads must be an int in \[1, 1024\]"):
        bench.read_bandwidth_gbs(0)


def test_small_int4_run_checks_every_result():
    rows = bench.run_int4_benchmark(linear=(1, 3), kn=(64, 96), stack=(2, 64, 128),
                                    group_size=32, repeat=1, outside=False, bandwidth=10.0)
    shapes = {r["shape"] for r in rows}
    assert shapes == {"1×64×96", "3×64×96", "1×64×128 ×2 layers"}
    names = {r["kernel"] for r in rows}
    assert {"NumPy float32 matmul (dequantized weights)",
            "qcourse matmul_int8 (int8 weights, same shape)"} <= names
    assert any(n.startswith("qcourse matmul_w4a8") for n in names)
    for r in rows:
        assert r["seconds"] > 0
        assert r["gbs"] == pytest.approx(r["weight_bytes"] / r["seconds"] / 1e9)
        assert r["pct_bw"] == pytest.approx(10 * r["gbs"])
    stack = [r for r in rows if "layers" in r["shape"]]
    w4 = next(r for r in stack if r["kernel"].startswith("qcourse matmul_w4a8"))
    f32 = next(r for r in stack if r["kernel"].startswith("NumPy"))
    assert f32["weight_bytes"] == 2 * 64 * 128 * 4 and w4["weight_bytes"] < f32["weight_bytes"] / 6
    table = bench.format_int4_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| % of read GB/s |" in table


def test_each_int4_row_is_compared_with_the_bandwidth_measured_just_before_it(monkeypatch):
    calls = []

    def fake_read(buf, threads, rounds):
        assert buf.nbytes == 256 * 2**20
        calls.append((threads, rounds))
        return 4.0 + len(calls)          # a different bandwidth at each call

    monkeypatch.setattr(bench, "_read_gbs", fake_read)
    rows = bench.run_int4_benchmark(linear=(1,), kn=(64, 64), stack=(2, 64, 64), repeat=1,
                                    outside=False)
    assert len(calls) == len(rows) and all(rounds == 3 for _, rounds in calls)
    assert [r["read_gbs"] for r in rows] == [5.0 + i for i in range(len(rows))]
    for r in rows:
        assert r["pct_bw"] == pytest.approx(100 * r["gbs"] / r["read_gbs"])
    assert "| 5.0 | " in bench.format_int4_table(rows)


def test_a_wrong_int4_kernel_is_caught(monkeypatch):
    import qcourse.kernels as kernels
    real = kernels.matmul_w4a8

    def off(x, packed, **kw):
        y = real(x, packed, **kw)
        y[0, 0] += 0.1 * np.abs(y).max() + 1
        return y

    monkeypatch.setattr(kernels, "matmul_w4a8", off)
    with pytest.raises(AssertionError, match="matmul_w4a8.*gave a wrong result"):
        bench.run_int4_benchmark(linear=(2,), kn=(64, 64), stack=None, repeat=1, outside=False,
                                 bandwidth=1.0)


def test_outside_int4_kernels_agree_where_installed():
    found = bench.int4_competitors()
    if not found:
        pytest.skip("neither PyTorch nor ONNX Runtime is installed")
    rows = bench.run_int4_benchmark(linear=(1, 5), kn=(256, 128), stack=None, repeat=1,
                                    bandwidth=1.0)  # raises if any of them is wrong
    names = {r["kernel"] for r in rows}
    assert set(found) <= names
    assert all(r["vs_best_outside"] is not None for r in rows)


def test_cli_prints_the_int4_table(capsys):
    bench.main(["--linear", "1", "2", "--linear-kn", "64", "64", "--repeat", "1", "--no-outside",
                "--threads", "1", "--int4", "only", "--int4-group", "16", "--int4-stack", "2",
                "64", "128"])
    out = capsys.readouterr().out
    assert ("int4 weights, groups of 16, 1 thread per contender; read bandwidth measured just "
            "before each row: ") in out
    assert "\n| 1×64×128 ×2 layers | qcourse matmul_w4a8" in out   # one thread count: no column
    assert "\n| 2×64×64 | NumPy float32" in out and "NumPy float32 matmul |" not in out
    assert "| threads |" not in out


def test_a_table_has_a_threads_column_only_when_its_rows_mix_thread_counts():
    row = {"threads": 1, "shape": "2×8×8", "kernel": "k", "seconds": 1e-3, "gops": 1.0,
           "gbs": 2.0, "read_gbs": 4.0, "pct_bw": 50.0, "vs_numpy_f32": 1.0,
           "vs_best_outside": None, "exact": True, "pct_peak": 10.0}
    for fmt in (bench.format_table, bench.format_int4_table):
        one = fmt([row, row]).splitlines()
        both = fmt([row, {**row, "threads": 2}]).splitlines()
        assert not one[0].startswith("| threads |") and one[2].startswith("| 2×8×8 | k |")
        assert both[0].startswith("| threads |") and both[3].startswith("| 2 | 2×8×8 | k |")
        for table in (one, both):   # every line has the header's number of cells
            assert len({line.count("|") for line in table}) == 1
