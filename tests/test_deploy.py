"""qcourse.deploy: export to ONNX and .tflite, and qcourse's prediction of every runtime's codes.

The oracles are the runtimes themselves: ONNX Runtime and LiteRT's interpreter under its three op
resolvers (default XNNPACK delegate, built-in optimized kernels, reference kernels).  Each test
that needs one skips with the reason when it is not installed.  Every "matches" test also shows
that a wrong convention does *not* match on the same data, so the comparison can fail.
"""

from __future__ import annotations

import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest

from qcourse import deploy as d
from qcourse.affine import QParams
from qcourse.fixed_point import (
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_half_up,
    quantize_multiplier,
    rounding_divide_by_pot,
    rounding_divide_by_pot_half_up,
    srdhm,
)
from qcourse.int_matmul import (
    activation_range,
    double_multiplier,
    requantize_double_half_away,
)

litert = pytest.importorskip("ai_edge_litert.interpreter",
                             reason="ai-edge-litert is not installed (LiteRT oracle tests)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (oracle tests)")
pytest.importorskip("onnx", reason="onnx is not installed (oracle tests)")

LITERT = ("tflite-xnnpack", "tflite-builtin", "tflite-reference")


def _run(model, X, runtime, form="qoperator"):
    float_input = X.dtype == np.float32
    if runtime == "onnx":
        return d.run_onnx(d.to_onnx(model, form, float_input=float_input), X)
    return d.run_tflite(d.to_tflite(model, float_input=float_input), X, runtime)


# --------------------------------------------------------------------------- fixed point


def test_rounding_divide_by_pot_half_up_differs_from_gemmlowp_only_on_negative_ties():
    x = np.arange(-40, 41, dtype=np.int64)
    for e in range(0, 5):
        up = rounding_divide_by_pot_half_up(x, e)
        np.testing.assert_array_equal(up, np.floor(x / 2**e + 0.5))
        away = rounding_divide_by_pot(x, e)
        differ = up != away
        tie = (x % 2**e == 2 ** (e - 1)) & (x < 0) if e else np.zeros_like(differ)
        np.testing.assert_array_equal(differ, tie)
    assert rounding_divide_by_pot_half_up(-5, 1) == -2 and rounding_divide_by_pot(-5, 1) == -3
    assert rounding_divide_by_pot_half_up(2**31 - 1, 31) == 1


def test_half_up_multiplier_is_srdhm_then_half_up_shift():
    rng = np.random.default_rng(0)
    x = rng.integers(-(2**20), 2**20, 2000)
    m = rng.integers(2**30, 2**31, 2000)
    s = rng.integers(-20, 1, 2000)
    got = multiply_by_quantized_multiplier_half_up(x, m, s)
    want = [rounding_divide_by_pot_half_up(srdhm(int(a), int(b)), -int(c))
            for a, b, c in zip(x, m, s, strict=True)]
    np.testing.assert_array_equal(got, want)
    # The example of the issue: -8750 * M with M*2**k just above -37.5: gemmlowp goes to -38.
    assert multiply_by_quantized_multiplier_half_up(-5, 2**30, -1) == -1
    assert multiply_by_quantized_multiplier(-5, 2**30, -1) == -1
    assert multiply_by_quantized_multiplier_half_up(-3, 2**30, -1) == 0   # -0.75 -> srdhm -1.5
    assert multiply_by_quantized_multiplier(-3, 2**30, -1) == -1          # -> -1 vs away -> -1
    with pytest.raises(ValueError, match="overflows int32"):
        multiply_by_quantized_multiplier_half_up(2**30, 2**30, 2)
    with pytest.raises(ValueError, match="shift"):
        multiply_by_quantized_multiplier_half_up(1, 2**30, 31)


def test_requantize_double_half_away_rounds_exact_ties_away():
    m = double_multiplier(np.float32(1.0), np.float32(0.5), np.float32(1.0))
    assert m.dtype == np.float64
    y = requantize_double_half_away(np.array([-5, -3, 3, 5, 1]), m, 0, -128, 127)
    np.testing.assert_array_equal(y, [-3, -2, 2, 3, 1])
    with pytest.raises(TypeError, match="float64"):
        requantize_double_half_away([1], np.float32(0.5), 0, -128, 127)
    with pytest.raises(ValueError, match="int32"):
        requantize_double_half_away([2**31 - 1], np.float64(4.0), 0, -(2**31), 2**31 - 1)


# --------------------------------------------------------------------------- one-layer FC models


def _tie_scales(rng, n_channels):
    """Scales with few significant bits: S_x S_W / S_y is a short binary fraction, so v * M
    lands exactly on .5 for many accumulators."""
    sx = 2.0 ** -int(rng.integers(0, 6))
    sy = 2.0 ** -int(rng.integers(0, 4)) * (1 + int(rng.integers(0, 4)) / 4)
    sw = 2.0 ** -rng.integers(3, 9, n_channels) * (1 + rng.integers(0, 8, n_channels) / 8)
    return sx, sw, sy


@lru_cache(maxsize=1)
def _fc_results(n_models=300):
    """Run n_models one-layer FULLY_CONNECTED models (half of them tie-heavy) under every
    runtime; keep outputs, predictions and the exact ties."""
    rows = []
    for i in range(n_models):
        model, x = d.random_dense_model(2024 + i, tie_heavy=i % 2 == 0)
        layer = model.layers[0]
        acc = layer.accumulate(x, model.input_zero_point)
        real = double_multiplier(model.input_scale, np.broadcast_to(layer.weight_scale,
                                                                    (layer.out_channels,)),
                                 layer.output_scale)
        exact = acc * real  # for these scales exact in float64 whenever it is a tie
        ties = np.abs(exact - np.floor(exact) - 0.5) == 0
        tfl = d.to_tflite(model, float_input=False)
        got = {rt: d.run_tflite(tfl, x, rt) for rt in LITERT}
        got["onnx"] = d.run_onnx(d.to_onnx(model, float_input=False), x)
        pred = {rt: d.predict_codes(model, x, rt) for rt in d.RUNTIMES}
        rows.append((model, x, acc, ties, got, pred))
    return rows


def test_one_layer_fully_connected_every_runtime_predicted_bit_for_bit():
    rows = _fc_results()
    outputs = sum(r[2].size for r in rows)
    ties = sum(int(r[3].sum()) for r in rows)
    assert outputs > 20000 and ties > 2000, (outputs, ties)
    for rt in d.RUNTIMES:
        bad = sum(int(np.count_nonzero(r[4][rt] != r[5][rt])) for r in rows)
        assert bad == 0, f"{rt}: {bad} of {outputs} outputs differ from qcourse's prediction"
    print(f"{len(rows)} models, {outputs} outputs, {ties} exact ties: all predicted")


def test_the_three_litert_paths_really_differ_and_wrong_conventions_fail():
    """The comparison can fail: each LiteRT path disagrees with the other paths' arithmetic."""
    rows = _fc_results()

    def mismatches(rt, convention):
        n = 0
        for model, _, acc, _, got, _ in rows:
            y = d.requantize_layer(model.layers[0], acc, model.input_scale, convention)
            n += int(np.count_nonzero(got[rt] != y))
        return n

    right = {"onnx": "float32_rne", "tflite-builtin": "half_up_twice",
             "tflite-reference": "double_half_away"}
    for rt, conv in right.items():
        assert mismatches(rt, conv) == 0, (rt, conv)
        for wrong in d.CONVENTIONS:
            if wrong != conv:
                assert mismatches(rt, wrong) > 0, (rt, wrong)
    for wrong in ("gemmlowp_double", "single_half_up", "half_up_twice", "double_half_away"):
        assert mismatches("tflite-xnnpack", wrong) > 0, wrong


def test_the_issue_example_minus_8750():
    """acc = -8750 with M = 0.5 * 2**-(k) chosen so that acc * M = -37.5 exactly, and one
    multiplier step above it: the built-in kernels, gemmlowp and the reference all part ways."""
    m_real = 37.5 / 8750
    mult, shift = quantize_multiplier(m_real)
    acc = np.array([-8750])
    up = multiply_by_quantized_multiplier_half_up(acc, mult, shift)
    away = multiply_by_quantized_multiplier(acc, mult, shift)
    assert (int(up[0]), int(away[0])) in ((-37, -38), (-38, -38), (-37, -37))
    ref = requantize_double_half_away(acc, np.float64(m_real), 0, -128, 127)
    assert int(ref[0]) == -38


# --------------------------------------------------------------------------- convolutions


def _clamp(kind, scale, zero_point):
    """NONE / RELU / RELU6 (kind 0, 1, 2) as the clamp qcourse.int_matmul computes."""
    qp = QParams(scale=np.float64(scale), zero_point=np.int64(zero_point), qmin=-128, qmax=127)
    return activation_range(("none", "relu", "relu6")[int(kind)], qp)


def _random_conv(rng, depthwise, tie):
    c = int(rng.integers(1, 20))
    h = int(rng.integers(3, 9))
    c_out = c if depthwise else int(rng.integers(1, 20))
    k = int(rng.choice([1, 3])) if not depthwise else 3
    if tie:
        sx, sw, sy = _tie_scales(rng, c_out)
    else:
        sx, sy, sw = rng.uniform(0.01, 0.1), rng.uniform(0.02, 0.3), rng.uniform(0.002, 0.02,
                                                                                    c_out)
    zy = int(rng.integers(-30, 30))
    clamp = _clamp(rng.integers(0, 3), sy, zy)
    padding = [(0, 0, 0, 0), (1, 1, 1, 1), (0, 0, 1, 1), (1, 0, 1, 0)][int(rng.integers(0, 4))]
    w = rng.integers(-127, 128, (c_out, 1 if depthwise else c, k, k))
    layer = d.Conv2D(w, rng.integers(-5000, 5000, c_out), sw, sy, zy, clamp,
                     stride=int(rng.integers(1, 3)), padding=padding,
                     groups=c if depthwise else 1)
    model = d.DeployModel((c, h, h), sx, int(rng.integers(-20, 20)), (layer,))
    return model, rng.integers(-128, 128, (3, c, h, h)).astype(np.int8)


@pytest.mark.parametrize("depthwise", [False, True], ids=["conv", "depthwise"])
def test_one_conv_layer_every_runtime_predicted(depthwise):
    rng = np.random.default_rng(7 + depthwise)
    total = 0
    for i in range(30):
        model, x = _random_conv(rng, depthwise, tie=i % 2 == 0)
        for rt in d.RUNTIMES:
            got = _run(model, x, rt)
            pred = d.predict_codes(model, x, rt)
            assert got.shape == pred.shape
            bad = np.argwhere(got != pred)
            assert bad.size == 0, f"{rt}, model {i}: {len(bad)} codes differ, e.g. {bad[:3]}"
            total += got.size
    assert total > 5000


def test_depthwise_builtin_rounds_whole_blocks_of_eight_channels_differently():
    """The built-in depthwise kernel: channels 0..7 (a whole block) round both steps half up,
    channel 8 (the remainder) as gemmlowp -- a tie-heavy layer shows both."""
    rng = np.random.default_rng(3)
    c = 9
    layer = d.Conv2D(rng.integers(-1, 2, (c, 1, 3, 3)) * 64, np.zeros(c, np.int32),
                     np.full(c, 2.0**-7), 1.0, 0, padding=1, groups=c)  # v * M = k / 4
    model = d.DeployModel((c, 6, 6), 0.5, 0, (layer,))
    x = rng.integers(-128, 128, (4, c, 6, 6)).astype(np.int8)
    got = _run(model, x, "tflite-builtin").transpose(0, 2, 3, 1).astype(np.int64)
    acc = layer.accumulate(x, 0).transpose(0, 2, 3, 1)
    mult, shift = quantize_multiplier(d._tflite_multiplier(layer, model.input_scale))
    up = np.clip(multiply_by_quantized_multiplier_half_up(acc, mult, shift), -128, 127)
    away = np.clip(multiply_by_quantized_multiplier(acc, mult, shift), -128, 127)
    assert np.array_equal(got[..., :8], up[..., :8])
    assert np.array_equal(got[..., 8], away[..., 8])
    assert np.any(up[..., 8] != away[..., 8]) and np.any(up[..., :8] != away[..., :8])


# --------------------------------------------------------------------------- whole networks


def _cnn(rng):
    """A small MobileNet-style integer CNN: conv 3x3 s2 (ReLU6), depthwise 3x3 (ReLU6),
    pointwise 1x1 (ReLU6), max pool, flatten, dense."""
    def relu6(zy, sy):
        return _clamp(2, sy, zy)

    s = [np.float32(v) for v in (6 / 255, 6 / 255, 6 / 255, 0.08)]
    layers = (
        d.Conv2D(rng.integers(-127, 128, (8, 1, 3, 3)), rng.integers(-2000, 2000, 8),
                 rng.uniform(0.002, 0.01, 8), s[0], -128, relu6(-128, s[0]), stride=2,
                 padding=(0, 0, 1, 1)),
        d.Conv2D(rng.integers(-127, 128, (8, 1, 3, 3)), rng.integers(-2000, 2000, 8),
                 rng.uniform(0.002, 0.01, 8), s[1], -128, relu6(-128, s[1]), padding=1,
                 groups=8),
        d.Conv2D(rng.integers(-127, 128, (12, 8, 1, 1)), rng.integers(-2000, 2000, 12),
                 rng.uniform(0.002, 0.01, 12), s[2], -128, relu6(-128, s[2])),
        d.MaxPool2D(2),
        d.Flatten(),
        d.Dense(rng.integers(-127, 128, (10, 48)), rng.integers(-2000, 2000, 10),
                rng.uniform(0.002, 0.01, 10), s[3], 3),
    )
    return d.DeployModel((1, 8, 8), 16 / 255, -128, layers, name="test_cnn")


@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_small_cnn_every_runtime_float_images(form):
    rng = np.random.default_rng(11)
    model = _cnn(rng)
    X = d.adversarial_images(model, 21, 11)
    for rt in d.RUNTIMES if form == "qoperator" else ("onnx",):
        got = _run(model, X, rt, form)
        pred = d.predict_codes(model, X, rt)
        assert np.array_equal(got, pred), f"{rt}: {np.count_nonzero(got != pred)} codes differ"


def test_qdq_graph_is_fused_into_integer_kernels(tmp_path):
    """ONNX Runtime must run the QDQ form on integer kernels: no float Conv/Gemm survives."""
    onnx = pytest.importorskip("onnx")
    model = _cnn(np.random.default_rng(11))
    X = d.adversarial_images(model, 4, 1)
    path = tmp_path / "optimized.onnx"
    d.run_onnx(d.to_onnx(model, "qdq"), X, optimized_model_path=path)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Conv", "Gemm", "MatMul"}, ops
    assert ops & {"QLinearConv", "QGemm", "QLinearMatMul"}, ops


def test_course_model_test_set_random_and_adversarial_all_runtimes():
    model, X_test, _ = d.course_model()
    X = np.concatenate([X_test, d.adversarial_images(model, 200, 5)])
    for rt in d.RUNTIMES:
        got = d.run_runtime(model, X, rt)
        pred = d.predict_codes(model, X, rt)
        assert np.array_equal(got, pred), f"{rt}: {np.count_nonzero(got != pred)} codes differ"
    got = d.run_runtime(model, X, "onnx", form="qdq")
    assert np.array_equal(got, d.predict_codes(model, X, "onnx"))


def test_input_quantizers_match_litert_and_differ_from_each_other():
    """QUANTIZE alone: the three LiteRT paths round float32 inputs three ways."""
    rng = np.random.default_rng(9)
    layer = d.Dense(np.eye(16, dtype=np.int8) * 127, None, np.float32(1 / 127), 1.0, 0)
    differ = {rt: 0 for rt in d.RUNTIMES}
    for _ in range(40):
        s = np.float32(rng.uniform(0.001, 0.2))
        model = d.DeployModel((16,), s, int(rng.integers(-100, 100)), (layer,))
        X = ((rng.integers(-150, 150, (3, 16)) + 0.5) * np.float64(s)).astype(np.float32)
        X[0, :4] = [1e12, -1e12, 3e9, -3e9]
        for rt in d.RUNTIMES:
            got = _run(model, X, rt)
            assert np.array_equal(got, d.predict_codes(model, X, rt)), rt
        q = {rt: d.quantize_input(model, X, rt) for rt in d.RUNTIMES}
        for rt in d.RUNTIMES:
            differ[rt] += sum(int(np.count_nonzero(q[rt] != q[o])) for o in d.RUNTIMES
                              if o != rt)
    assert all(v > 0 for v in differ.values()), differ


# --------------------------------------------------------------------------- bad input


def test_bad_models_and_inputs_get_named_errors():
    rng = np.random.default_rng(0)
    dense = d.Dense(rng.integers(-127, 128, (4, 6)), None, 0.01, 0.1, 0)
    with pytest.raises(d.ExportError, match="supports Dense, Conv2D"):
        d.DeployModel((6,), 0.1, 0, (dense, "softmax"))
    with pytest.raises(d.ExportError, match="Flatten"):
        d.DeployModel((1, 2, 3), 0.1, 0, (dense,))
    with pytest.raises(d.ExportError, match="groups"):
        d.Conv2D(np.zeros((4, 2, 3, 3), np.int8), None, 0.1, 0.1, 0, groups=2)
    with pytest.raises(ValueError, match="input channels"):
        d.DeployModel((3, 8, 8), 0.1, 0,
                      (d.Conv2D(np.zeros((4, 2, 3, 3), np.int8), None, 0.1, 0.1, 0),))
    with pytest.raises(ValueError, match="outside int8"):
        d.Dense(np.full((2, 2), 200), None, 0.1, 0.1, 0)
    with pytest.raises(ValueError, match="weight_scale"):
        d.Dense(np.zeros((2, 2), np.int8), None, [0.1, 0.1, 0.1], 0.1, 0)
    with pytest.raises(d.ExportError, match="fused activation"):
        d.tflite_fused_activation(d.Dense(np.zeros((2, 2), np.int8), None, 0.1, 0.1, 0,
                                          (0, 50)))
    cnn = _cnn(rng)
    X = np.zeros((2, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="NHWC"):
        d.predict_codes(cnn, X, "onnx")
    with pytest.raises(TypeError, match="float32"):
        d.predict_codes(cnn, np.zeros((2, 1, 8, 8)), "onnx")
    with pytest.raises(ValueError, match="NaN"):
        d.predict_codes(cnn, np.full((2, 1, 8, 8), np.nan, np.float32), "onnx")
    with pytest.raises(ValueError, match="runtime must be one of"):
        d.predict_codes(cnn, np.zeros((2, 1, 8, 8), np.float32), "tflite")
    with pytest.raises(ValueError, match="form"):
        d.to_onnx(cnn, "qlinear")
    with pytest.raises(TypeError, match="DeployModel"):
        d.to_tflite("model")
    with pytest.raises(TypeError, match="IntegerModel"):
        d.from_integer_model(cnn)


# --------------------------------------------------------------------------- the command


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qcourse.deploy", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_command_export_and_run_predict_the_runtimes(tmp_path):
    proc = _cli("export", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    onnx_bytes = (tmp_path / "out" / "model.onnx").read_bytes()
    tfl_bytes = (tmp_path / "out" / "model.tflite").read_bytes()
    model, X_test, _ = d.course_model()
    X = np.concatenate([X_test[:50], d.adversarial_images(model, 20, 2)])
    np.save(tmp_path / "X.npy", X)
    for rt in d.RUNTIMES:
        out = tmp_path / f"{rt}.npy"
        proc = _cli("run", "--runtime", rt, "--inputs", str(tmp_path / "X.npy"), "--out",
                    str(out))
        assert proc.returncode == 0, proc.stderr
        Y = np.load(out)
        assert Y.dtype == np.int8 and Y.shape == (X.shape[0],) + model.output_shape
        actual = (d.run_onnx(onnx_bytes, X) if rt == "onnx"
                  else d.run_tflite(tfl_bytes, X, rt))
        assert np.array_equal(Y, actual), rt


def test_command_help_states_the_layouts_and_rejects_bad_inputs(tmp_path, capsys):
    proc = _cli("--help")
    assert proc.returncode == 0
    assert "model.onnx" in proc.stdout and "model.tflite" in proc.stdout
    assert "float32" in proc.stdout and "(N, " in proc.stdout
    for rt in d.RUNTIMES:
        assert rt in proc.stdout
    assert "(N, 1, 8, 8)" in proc.stdout and "NHWC" in proc.stdout   # the CNN's layouts
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), np.float32))
    (tmp_path / "junk.npy").write_text("not numpy")
    for runtime, inputs, message in [("onnx", "bad.npy", "must have shape"),
                                     ("tvm", "bad.npy", "invalid choice"),
                                     ("onnx", "junk.npy", "cannot read")]:
        with pytest.raises(SystemExit) as exit_info:   # in process: the same parser
            d.main(["run", "--runtime", runtime, "--inputs", str(tmp_path / inputs), "--out",
                    str(tmp_path / "y.npy")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "y.npy").exists()


def test_xnnpack_relu6_clamp_rounds_a_tie_to_even():
    """6 / S = 2.5 exactly in float32: LiteRT's kernels clamp ReLU6 at code 3 (round half away),
    XNNPACK at 2 (lrintf) -- and qcourse predicts both."""
    s = np.float32(6 / 2.5)
    assert np.float32(6.0) / s == np.float32(2.5)
    layer = d.Dense(np.array([[1]]), None, 1.0, s, 0, (0, 3))
    assert d.tflite_fused_activation(layer) == "RELU6" and d.xnnpack_clamp(layer) == (0, 2)
    model = d.DeployModel((1,), 1.0, 0, (layer,))
    x = np.array([[100], [5], [7], [-9]], np.int8)
    got = {rt: _run(model, x, rt).ravel().tolist() for rt in d.RUNTIMES}
    assert got["tflite-xnnpack"] == [2, 2, 2, 0] and got["tflite-builtin"] == [3, 2, 3, 0]
    for rt in d.RUNTIMES:
        assert got[rt] == d.predict_codes(model, x, rt).ravel().tolist(), rt


# --------------------------------------------------------------------------- the course CNN


def _pool_model(channels: int, zero_point: int, scale: float = 0.0625):
    """GlobalAvgPool, then a Dense that copies its input (identity weights, M = 1 exactly), so
    the model's output codes are the pool's."""
    copy = d.Dense(np.eye(channels, dtype=np.int8), None, 1.0, scale, zero_point)
    return d.DeployModel((channels, 4, 4), scale, zero_point, (d.GlobalAvgPool(), copy),
                         name="pool")


def test_global_average_pool_every_runtime_on_ties():
    # 16 pixels per channel, every sum 8 modulo 16 (an exact tie of the mean), odd and even
    # zero points: ONNX Runtime's QLinearGlobalAveragePool and LiteRT's AVERAGE_POOL_2D (which
    # XNNPACK leaves to the built-in kernel) round them differently, and qcourse predicts both
    rng = np.random.default_rng(21)
    differ = compared = 0
    for zp in (-128, -127, -3, 0, 5, 126):
        model = _pool_model(24, zp)
        x = rng.integers(-128, 128, (6, 24, 4, 4))
        x[:, :, 0, 0] -= (x.sum(axis=(2, 3)) - 8) % 16          # sum % 16 == 8
        x[:, :, 0, 0] = np.where(x[:, :, 0, 0] < -128, x[:, :, 0, 0] + 16, x[:, :, 0, 0])
        x = x.astype(np.int8)
        assert np.all(x.astype(int).sum(axis=(2, 3)) % 16 == 8)
        for rt in d.RUNTIMES:
            got = _run(model, x, rt)
            np.testing.assert_array_equal(got, d.predict_codes(model, x, rt), err_msg=rt)
        ours = {rt: d.predict_codes(model, x, rt) for rt in ("onnx", "tflite-builtin")}
        differ += int(np.count_nonzero(ours["onnx"] != ours["tflite-builtin"]))
        compared += x.shape[0] * x.shape[1]
    assert differ > compared // 4, (differ, compared)   # the two roundings really differ


def test_course_model_is_the_integer_cnn_and_predicts_its_codes():
    from qcourse.cnn import convert_cnn, digits_images, load_course_cnn

    model, X_test, y_test = d.course_model()
    kinds = [layer.kind for layer in model.layers]
    assert kinds == ["conv"] + ["depthwise", "conv"] * 3 + ["pool", "dense"]
    assert model.input_shape == (1, 8, 8) and model.output_shape == (10,)
    integer = convert_cnn(load_course_cnn("relu6"),
                          digits_images("train")[0][:d.COURSE_CALIBRATION_IMAGES])
    # ONNX Runtime's prediction is the IntegerCNN's own float-requantized codes
    np.testing.assert_array_equal(d.predict_codes(model, X_test, "onnx"),
                                  integer.logits_codes(X_test))
    assert np.mean(d.predict_codes(model, X_test, "onnx").argmax(1) == y_test) > 0.95


def test_from_integer_model_names_what_it_cannot_export():
    from dataclasses import replace

    from qcourse.cnn import convert_cnn, digits_images, load_course_cnn

    X, _ = digits_images("train")
    integer = convert_cnn(load_course_cnn("relu6"), X[:64])
    with pytest.raises(ValueError, match="input_shape"):
        d.from_integer_model(integer)
    odd = replace(integer, layers=integer.layers[:1] + [("act", object())] + integer.layers[1:])
    with pytest.raises(d.ExportError, match="'act' is a object"):
        d.from_integer_model(odd, input_shape=(1, 8, 8))


def test_xnnpack_check_names_operators_left_outside_the_delegate(monkeypatch):
    model, X_test, _ = d.course_model()
    tfl = d.to_tflite(model)
    it = d._interpreter(tfl, "tflite-xnnpack", (2, 8, 8, 1))
    assert d.ops_outside_delegates(it) == ["AVERAGE_POOL_2D"]
    d.run_tflite(tfl, X_test[:2], "tflite-xnnpack")           # allowed: the pool only
    monkeypatch.setattr(d.litert, "_BUILTIN_UNDER_XNNPACK", frozenset())
    with pytest.raises(RuntimeError, match="did not take the model's operators AVERAGE_POOL_2D"):
        d.run_tflite(tfl, X_test[:2], "tflite-xnnpack")
