"""The course CNN and its post-training tools (qcourse.cnn), and the script that trains it.

Folding is checked against the unfolded network, CLE against the function it must preserve,
bias correction against the mean shift it must remove, AdaRound against nearest rounding on the
objective it minimizes, the integer network against its float simulation, and the shipped
weights against a re-run of ``python -m qcourse.data.make_cnn`` (the first epoch always, the
whole run with QCOURSE_FULL_RUN=1).  The quantization effects the chapters show are re-run on
several calibration draws.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from qcourse.cnn import (
    WeightFakeQuant,
    adaround,
    adaround_weight,
    bias_correction,
    convert_cnn,
    course_cnn,
    cross_layer_equalization,
    digits_images,
    equalization_pairs,
    fold_batch_norms,
    fold_conv_batch_norm,
    load_course_cnn,
    qat_cnn,
    quantize_conv_weight,
    simulate_quantized,
    train_cnn,
)
from qcourse.nn import (
    BatchNorm2d,
    Conv2d,
    ReLU,
    ReLU6,
    accuracy,
    predict,
    softmax_cross_entropy,
)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Small float32 products run best on one BLAS thread (and the machine is shared)."""
    with threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def data():
    Xtr, ytr = digits_images("train")
    Xte, yte = digits_images("test")
    return Xtr, ytr, Xte, yte


@pytest.fixture(scope="module")
def folded():
    return fold_batch_norms(load_course_cnn("relu6"))


def test_fold_conv_batch_norm_equals_conv_then_norm():
    rng = np.random.default_rng(0)
    conv = Conv2d(3, 4, 3, padding=1, seed=1, dtype=np.float64)
    conv.bias[...] = rng.normal(size=4)
    bn = BatchNorm2d(4, dtype=np.float64)
    bn.weight[...] = rng.uniform(0.5, 2, 4)
    bn.bias[...] = rng.normal(size=4)
    bn.running_mean[...] = rng.normal(size=4)
    bn.running_var[...] = rng.uniform(0.01, 2, 4)
    x = rng.normal(size=(2, 3, 5, 5))
    want = bn(conv(x))
    w, b = fold_conv_batch_norm(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                bn.running_var)
    conv.weight, conv.bias = w, b
    np.testing.assert_allclose(conv(x), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="running_var must have shape"):
        fold_conv_batch_norm(w, b, bn.weight, bn.bias, bn.running_mean, np.ones(3))


def test_fold_batch_norms_keeps_the_function(data, folded):
    model = load_course_cnn("relu6")
    _, _, Xte, _ = data
    assert not any(isinstance(m, BatchNorm2d) for m in folded)
    np.testing.assert_allclose(folded(Xte), model(Xte), rtol=1e-4, atol=1e-4)


def test_shipped_models_are_trained_and_show_the_dead_channel_outliers(data, folded):
    _, _, Xte, yte = data
    for act in ("relu6", "relu"):
        assert accuracy(load_course_cnn(act), Xte, yte) > 0.97
    # the folded depthwise layers have per-channel ranges far apart (Nagel et al. 2019, Fig. 2)
    ranges = np.abs(folded["dw3"].weight).reshape(64, -1).max(axis=1)
    assert ranges.max() / np.median(ranges) > 20


def test_quantize_conv_weight_grids():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 3, 3, 3))
    q, qp = quantize_conv_weight(w, 8, per_channel=True)
    np.testing.assert_array_equal(qp.scale, (np.abs(w).reshape(5, -1).max(1) / 127)
                                  .astype(np.float32))
    assert q.min() >= -127 and q.max() <= 127 and q.dtype == np.int8
    q4, qp4 = quantize_conv_weight(w, 4, per_channel=False)
    assert qp4.scale.shape == () and np.abs(q4).max() == 7


def test_simulation_without_quantization_is_the_float_network(data, folded):
    _, _, Xte, _ = data
    sim = simulate_quantized(folded, Xte[:64], weight_bits=None, act_bits=None)
    np.testing.assert_array_equal(sim.model(Xte), folded(Xte))
    with pytest.raises(ValueError, match="fold them first"):
        simulate_quantized(load_course_cnn(), Xte[:8])


def test_cle_preserves_the_function_and_equalizes_ranges(data, folded):
    _, _, Xte, _ = data
    relu_folded = fold_batch_norms(load_course_cnn("relu"))
    eq = cross_layer_equalization(relu_folded, iterations=50)
    np.testing.assert_allclose(eq(Xte), relu_folded(Xte), rtol=1e-3, atol=1e-3)
    assert not any(isinstance(m, ReLU6) for m in cross_layer_equalization(folded))
    from qcourse.cnn import _in_ranges, _out_ranges
    for a, b in equalization_pairs(eq):
        r1, r2 = _out_ranges(eq[a]), _in_ranges(eq[b])
        ok = (r1 > 1e-6) & (r2 > 1e-6)
        np.testing.assert_allclose(r1[ok], r2[ok], rtol=1e-2)
    assert ("pw3", "fc") in equalization_pairs(eq)   # through the pool and the flatten


def test_bias_correction_removes_the_mean_shift(data, folded):
    from qcourse.cnn import _dequantized_weight, _layer_inputs
    Xtr, _, _, _ = data
    Xc = Xtr[:256]
    corrected = bias_correction(folded, Xc, weight_bits=4, per_channel=False)
    inputs = _layer_inputs(folded, Xc, ["pw2"])
    x = inputs["pw2"]
    qw = _dequantized_weight(folded["pw2"].weight, 4, False)
    probe = Conv2d(32, 64, 1, dtype=np.float32)
    probe.weight, probe.bias = qw, corrected["pw2"].bias
    float_mean = folded["pw2"](x).mean(axis=(0, 2, 3))
    probe_mean = probe(x).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(probe_mean, float_mean, atol=1e-4)
    probe.bias = folded["pw2"].bias
    assert np.abs(probe(x).mean(axis=(0, 2, 3)) - float_mean).max() > 1e-3   # it did shift


def test_adaround_beats_nearest_on_its_objective(data, folded):
    Xtr, _, _, _ = data
    res = adaround(folded, Xtr[:256], weight_bits=4, iterations=300, layers=["pw2", "fc"])
    for name, r in res.items():
        assert r.error_adaround < r.error_nearest, name
        assert 0 < r.up_fraction_changed < 0.5
        q, qp = quantize_conv_weight(folded[name].weight, 4)
        scale = qp.scale.reshape((-1,) + (1,) * (r.weight.ndim - 1))
        codes = r.weight / scale
        np.testing.assert_allclose(codes, np.rint(codes), atol=1e-3)   # on the grid
        assert np.all(np.abs(codes - q) <= 1 + 1e-3)                    # one step at most
    gram = np.eye(3)
    with pytest.raises(ValueError):
        adaround_weight(np.zeros(3), gram, 4)


def test_weight_fake_quant_is_straight_through():
    rng = np.random.default_rng(2)
    conv = Conv2d(2, 3, 3, padding=1, seed=0, dtype=np.float64)
    wrapped = WeightFakeQuant(conv, 3)
    x = rng.normal(size=(1, 2, 4, 4))
    y = wrapped(x)
    ref = Conv2d(2, 3, 3, padding=1, seed=0, dtype=np.float64)
    ref.weight = wrapped.quantized_weight()
    np.testing.assert_allclose(y, ref(x))
    g = rng.normal(size=y.shape)
    np.testing.assert_allclose(wrapped.backward(g), ref.backward(g))
    np.testing.assert_allclose(conv.grad_weight, ref.grad_weight)   # STE: same gradient
    assert np.unique(wrapped.quantized_weight()).size <= 3 * 7 + 1


def test_integer_network_matches_its_simulation(data):
    Xtr, _, Xte, yte = data
    model = load_course_cnn("relu6")
    ic = convert_cnn(model, Xtr[:512])
    sim = simulate_quantized(fold_batch_norms(model), Xtr[:512])
    p_int = predict(ic, Xte)
    p_sim = np.argmax(sim.model(Xte), axis=1)
    assert np.mean(p_int == p_sim) > 0.99
    assert abs(accuracy(ic, Xte, yte) - accuracy(model, Xte, yte)) < 0.01
    np.testing.assert_array_equal(ic.logits_codes(Xte), ic.logits_codes_reference(Xte))
    kinds = [row["kind"] for row in ic.summary()]
    assert kinds == ["conv"] + ["depthwise", "pointwise"] * 3 + ["pool", "linear"]
    for rq in ("tflite_double", "tflite_single"):
        ic.requantization = rq
        assert abs(accuracy(ic, Xte, yte) - accuracy(model, Xte, yte)) < 0.01


def test_convert_rejects_layers_without_an_integer_twin(data):
    from qcourse.nn import Linear, Sequential
    Xtr, _, _, _ = data
    model = Sequential(("c", Conv2d(1, 2, 3)), ("x", ReLU()), ("bad", BatchNorm2d(2)),
                       ("f", Linear(2, 2)))
    with pytest.raises(ValueError, match="does not follow a Conv2d"):
        convert_cnn(model, Xtr[:8])


# --------------------------------------------------------------------------- the effects


def _calibration(Xtr, seed):
    return Xtr[np.random.default_rng(seed).choice(len(Xtr), 512, replace=False)]


SEEDS = range(4)


def test_per_tensor_loses_to_per_channel_and_cle_with_bias_correction_repairs_it(data, folded):
    # the ptq chapter asserts each ordering on draw 0; here every draw, counted
    Xtr, _, Xte, yte = data
    held = {"per-tensor more than 1 point below per-channel": 0,
            "per-channel within 1 point of float": 0,
            "CLE+BC within 1 point of per-channel": 0,
            "ReLU6 and ReLU within 1 point at 7 bits": 0}
    float_acc = accuracy(folded, Xte, yte)
    twin = fold_batch_norms(load_course_cnn("relu"))
    for seed in SEEDS:
        Xc = _calibration(Xtr, seed)
        pt = simulate_quantized(folded, Xc, per_channel=False).accuracy(Xte, yte)
        pc = simulate_quantized(folded, Xc, per_channel=True).accuracy(Xte, yte)
        eq = bias_correction(cross_layer_equalization(folded), Xc, per_channel=False)
        cle = simulate_quantized(eq, Xc, per_channel=False).accuracy(Xte, yte)
        relu6, relu = (simulate_quantized(m, Xc, weight_bits=7, act_bits=7).accuracy(Xte, yte)
                       for m in (folded, twin))
        held["per-tensor more than 1 point below per-channel"] += pt < pc - 0.01
        held["per-channel within 1 point of float"] += pc >= float_acc - 0.01
        held["CLE+BC within 1 point of per-channel"] += cle >= pc - 0.01
        held["ReLU6 and ReLU within 1 point at 7 bits"] += abs(relu6 - relu) <= 0.01
    print(f"held on {len(SEEDS)} calibration draws:", held)
    assert all(v == len(SEEDS) for v in held.values()), held


def test_adaround_beats_nearest_at_4_bits_and_qat_recovers(data, folded):
    Xtr, ytr, Xte, yte = data
    float_acc = accuracy(folded, Xte, yte)
    held = {"nearest more than 1 point below float": 0, "AdaRound above nearest": 0,
            "QAT within 1 point of float": 0}
    for seed in SEEDS[:2]:   # the two cost about 10 s each (QAT trains for 3 epochs)
        Xc = _calibration(Xtr, seed)
        near = simulate_quantized(folded, Xc, weight_bits=4).accuracy(Xte, yte)
        res = adaround(folded, Xc, weight_bits=4, iterations=1000)
        ada = simulate_quantized(folded, Xc, weight_bits=4,
                                 weights={n: r.weight for n, r in res.items()}
                                 ).accuracy(Xte, yte)
        held["nearest more than 1 point below float"] += near < float_acc - 0.01
        held["AdaRound above nearest"] += ada > near
        qat = qat_cnn(folded, Xtr, ytr, Xc, weight_bits=4, epochs=3, seed=seed)
        ok = qat.accuracy(Xte, yte) >= float_acc - 0.01
        held["QAT within 1 point of float"] += ok
        if seed == 0:
            assert ok, "QAT on draw 0 (the qat chapter's) no longer recovers"
    print("held on 2 calibration draws:", held)
    assert held["AdaRound above nearest"] == 2, held
    assert held["nearest more than 1 point below float"] == 2, held



#: Seeds of the ReLU6-against-ReLU experiment beyond the qat chapter's seed 0: each costs about
#: 14 s (two networks trained twice for 10 epochs, in float and at 7 bits); QCOURSE_FULL_RUN=1
#: runs nine.
RELU_SEEDS = tuple(range(1, 10)) if os.environ.get("QCOURSE_FULL_RUN") == "1" else (1,)


def _relu_twins_at_7_bits(data, seed):
    """The qat chapter's experiment: the BN-free course CNN with each activation, trained from
    the same initial weights in float and with 7-bit simulated quantization from the start
    (weights per tensor, moving-average activation ranges); per activation, the float and 7-bit
    test accuracy, the 7-bit test cross-entropy and the widest hidden range."""
    Xtr, ytr, Xte, yte = data
    out = {}
    for act in ("relu6", "relu"):
        net = course_cnn(act, seed=seed, widths=(8, 16, 32, 32), batch_norm=False)
        train_cnn(net, Xtr, ytr, epochs=10, lr=1e-2, weight_decay=0.0, seed=seed,
                  progress=False)
        q = qat_cnn(course_cnn(act, seed=seed, widths=(8, 16, 32, 32), batch_norm=False),
                    Xtr, ytr, _calibration(Xtr, seed), weight_bits=7, act_bits=7,
                    per_channel=False, epochs=10, lr=1e-2, seed=seed, act_ranges="ema")
        widest = max(float(qp.scale) * (qp.qmax - qp.qmin)
                     for n, qp in q.activation_qparams.items() if n != "fc")
        out[act] = (accuracy(net, Xte, yte), q.accuracy(Xte, yte),
                    softmax_cross_entropy(q(Xte), yte)[0], widest)
    return out


def test_the_cnn_without_batch_norms_has_biases_and_the_same_filters():
    with_bn, without = course_cnn("relu", seed=3), course_cnn("relu", seed=3, batch_norm=False)
    assert not any(isinstance(m, BatchNorm2d) for m in without)
    convs = [(n, m) for n, m in without.named_modules() if isinstance(m, Conv2d)]
    assert len(convs) == 7 and all(m.bias is not None for _, m in convs)
    for name, conv in convs:       # the same draws from the seed: only the norms differ
        np.testing.assert_array_equal(conv.weight, with_bn[name].weight)
    with pytest.raises(TypeError, match="batch_norm"):
        course_cnn("relu", batch_norm="no")


def test_relu6_loses_less_than_relu_when_trained_at_7_bits(data):
    # the qat chapter asserts seed 0; here the other seeds, each ordering counted
    held = {"ReLU ranges over 5x ReLU6's": 0, "ReLU6 smaller accuracy drop": 0,
            "ReLU6 more accurate at 7 bits": 0, "ReLU6 lower 7-bit test loss": 0}
    for seed in RELU_SEEDS:
        (f6, q6, ce6, w6), (f, q, ce, w) = _relu_twins_at_7_bits(data, seed).values()
        print(f"seed {seed}: float ReLU6 {100 * f6:.1f}% ReLU {100 * f:.1f}%, 7 bits ReLU6 "
              f"{100 * q6:.1f}% ReLU {100 * q:.1f}%, 7-bit test loss {ce6:.3f} / {ce:.3f}, "
              f"widest range {w6:.1f} / {w:.1f}")
        held["ReLU ranges over 5x ReLU6's"] += w > 5 * w6
        held["ReLU6 smaller accuracy drop"] += f6 - q6 < f - q
        held["ReLU6 more accurate at 7 bits"] += q6 > q
        held["ReLU6 lower 7-bit test loss"] += ce6 < ce
    print(f"held on {len(RELU_SEEDS)} seeds:", held)
    # asserted on every seed: what held on seeds 0-8 when the experiment was written; the other
    # two are counted (on seed 4 the ReLU network was 0.2 points ahead at 7 bits, one image)
    for key in ("ReLU ranges over 5x ReLU6's", "ReLU6 smaller accuracy drop"):
        assert held[key] == len(RELU_SEEDS), held


def test_qat_moving_average_ranges_follow_the_batches(data, folded):
    Xtr, ytr, _, _ = data
    Xc = _calibration(Xtr, 0)
    fixed = qat_cnn(folded, Xtr[:64], ytr[:64], Xc, weight_bits=8, epochs=1)
    ema = qat_cnn(folded, Xtr[:64], ytr[:64], Xc, weight_bits=8, epochs=1, act_ranges="ema",
                  averaging_constant=0.5)
    calibrated = simulate_quantized(folded, Xc, weight_bits=None).activation_qparams
    assert set(ema.activation_qparams) == set(calibrated)
    for name, qp in fixed.activation_qparams.items():     # "fixed": the calibrated grids
        assert qp.scale == calibrated[name].scale and qp.zero_point == calibrated[name].zero_point
    # two batches of 32 with constant 0.5 move each range most of the way to the batches'
    moved = [n for n, qp in ema.activation_qparams.items() if qp.scale != calibrated[n].scale]
    assert len(moved) == len(calibrated), moved
    # after training the ranges stay put: the same images give the same logits twice
    np.testing.assert_array_equal(ema(Xtr[:64]), ema(Xtr[:64]))
    with pytest.raises(ValueError, match="act_ranges"):
        qat_cnn(folded, Xtr[:8], ytr[:8], Xc, act_ranges="batch")
    with pytest.raises(ValueError, match="averaging_constant"):
        qat_cnn(folded, Xtr[:8], ytr[:8], Xc, act_ranges="ema", averaging_constant=0.0)


# --------------------------------------------------------------------------- the script


def _make_cnn(*args):
    return subprocess.run([sys.executable, "-m", "qcourse.data.make_cnn", *args],
                          capture_output=True, text=True, timeout=3000)


def test_make_cnn_reproduces_the_first_epoch():
    proc = _make_cnn("--epochs-run", "1", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reproduced exactly" in proc.stdout


def test_make_cnn_check_fails_on_different_weights(tmp_path):
    shipped = np.load(os.path.join(os.path.dirname(__import__("qcourse").__file__), "data",
                                   "cnn_digits.npz"))
    arrays = {k: shipped[k] for k in shipped.files}
    arrays["check/relu/epoch1"] = np.array("0" * 64)
    np.savez(tmp_path / "bad.npz", **arrays)
    proc = _make_cnn("--epochs-run", "1", "--check", "--out", str(tmp_path / "bad.npz"))
    assert proc.returncode == 1 and "NOT reproduced" in proc.stdout


@pytest.mark.skipif(os.environ.get("QCOURSE_FULL_RUN") != "1",
                    reason="the full training run takes minutes: set QCOURSE_FULL_RUN=1")
def test_make_cnn_reproduces_the_shipped_weights_exactly():
    proc = _make_cnn("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_course_cnn_shapes_and_errors(data):
    _, _, Xte, _ = data
    model = course_cnn("relu")
    assert model(Xte[:2]).shape == (2, 10)
    assert isinstance(model["act0"], ReLU) and not isinstance(model["act0"], ReLU6)
    with pytest.raises(ValueError, match="activation"):
        course_cnn("gelu")
    with pytest.raises(ValueError, match="activation"):
        load_course_cnn("tanh")
