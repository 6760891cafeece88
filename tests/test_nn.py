"""The shared data set and the tiny NumPy network (qcourse.datasets, qcourse.nn).

Gradients are checked against central finite differences in float64; training is checked for
determinism and for reaching a real accuracy on the digits; every entry point rejects bad input.
"""

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support import numeric_gradient

from qcourse import datasets
from qcourse.datasets import load_digits, load_digits_raw
from qcourse.nn import (
    SGD,
    Adam,
    Classifier,
    Linear,
    ReLU,
    ReLU6,
    Sequential,
    accuracy,
    capture_activations,
    copy_model,
    evaluate,
    feed_activations,
    layer_info,
    linear_layers,
    make_mlp,
    predict,
    softmax,
    softmax_cross_entropy,
    swapped_weights,
    train,
)

# --------------------------------------------------------------------------- datasets


def test_digits_shapes_dtypes_and_range():
    X, y = load_digits("all")
    assert X.shape == (1797, 64) and X.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    images, labels = load_digits_raw()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    # x = p / 16, row-major flattening of each 8x8 image
    np.testing.assert_array_equal(X[5], images[5].reshape(-1) / 16.0)
    np.testing.assert_array_equal(y, labels)


def test_raw_copies_are_independent():
    images, _ = load_digits_raw()
    images[0, 0, 0] = 99
    assert load_digits_raw()[0][0, 0, 0] != 99


def _sorted_rows(X, y):
    rows = np.concatenate([X, y[:, None].astype(np.float32)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("seed, fraction", [(0, 0.25), (3, 0.1), (7, 0.5)])
def test_split_is_a_stratified_partition(seed, fraction):
    Xtr, ytr = load_digits("train", seed=seed, test_fraction=fraction)
    Xte, yte = load_digits("test", seed=seed, test_fraction=fraction)
    Xall, yall = load_digits("all")
    assert len(ytr) + len(yte) == len(yall)
    np.testing.assert_array_equal(
        _sorted_rows(np.concatenate([Xtr, Xte]), np.concatenate([ytr, yte])),
        _sorted_rows(Xall, yall),
    )
    counts = np.bincount(yall, minlength=10)
    expected_test = np.array([round(fraction * c) for c in counts])
    np.testing.assert_array_equal(np.bincount(yte, minlength=10), expected_test)


def test_split_is_deterministic_and_depends_on_seed():
    a = load_digits("test", seed=1)
    b = load_digits("test", seed=1)
    c = load_digits("test", seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_digits_load_from_the_package_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    datasets._read_npz.cache_clear()
    X, y = load_digits("test")
    assert X.shape == (450, 64) and y.shape == (450,)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"split": "val"}, ValueError, "split"),
        ({"split": 0}, ValueError, "split"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": True}, TypeError, "seed"),
        ({"test_fraction": 0.0}, ValueError, "test_fraction"),
        ({"test_fraction": 1.0}, ValueError, "test_fraction"),
        ({"test_fraction": "0.2"}, TypeError, "test_fraction"),
    ],
)
def test_load_digits_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_digits(**kwargs)


# --------------------------------------------------------------------------- gradients


def _assert_close(analytic, numeric, tol=1e-6):
    scale = max(1.0, np.abs(numeric).max())
    err = np.abs(analytic - numeric).max() / scale
    assert err < tol, f"relative gradient error {err:.3g}"


def test_softmax_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 4))
    y = np.array([0, 3, 1, 1, 2])
    loss, grad = softmax_cross_entropy(z, y)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(5), y])), rel=1e-12)
    numeric = numeric_gradient(lambda: softmax_cross_entropy(z, y)[0], z)
    _assert_close(grad, numeric)


def test_cross_entropy_is_stable_for_huge_logits():
    z = np.array([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 0.0]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grad = softmax_cross_entropy(z, np.array([0, 0]))
    assert np.isfinite(loss) and loss == pytest.approx(500.0)
    assert grad.dtype == np.float32 and np.all(np.isfinite(grad))


@pytest.mark.parametrize("layer_cls", [Linear, ReLU, ReLU6])
def test_layer_input_gradient(layer_cls):
    rng = np.random.default_rng(1)
    layer = Linear(6, 4, seed=3, dtype=np.float64) if layer_cls is Linear else layer_cls()
    width = 6 if layer_cls is Linear else 5
    x = rng.normal(scale=4.0, size=(3, width))
    # keep away from the kinks at 0 and 6, where the derivative is undefined
    x[np.abs(x) < 1e-3] = 0.5
    x[np.abs(x - 6) < 1e-3] = 5.5
    w = rng.normal(size=layer(x).shape)  # loss = sum(w * layer(x)), so dL/dy = w
    layer(x)
    analytic = layer.backward(w)
    numeric = numeric_gradient(lambda: float(np.sum(w * layer.forward(x))), x)
    _assert_close(analytic, numeric)


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_mlp_parameter_and_input_gradients(activation):
    rng = np.random.default_rng(2)
    model = make_mlp((7, 6, 5, 3), activation=activation, seed=4, dtype=np.float64)
    # scale the weights so that some pre-activations exceed 6 (exercises the ReLU6 upper clamp)
    for layer in model:
        if isinstance(layer, Linear):
            layer.weight *= 3.0
    x = rng.normal(size=(4, 7))
    y = np.array([0, 2, 1, 2])

    def loss():
        return softmax_cross_entropy(model(x), y)[0]

    _, g = softmax_cross_entropy(model(x), y)
    grad_x = model.backward(g)
    for (p, grad), (name, _) in zip(model.parameters(), model.named_parameters(), strict=True):
        numeric = numeric_gradient(loss, p)
        scale = max(1.0, np.abs(numeric).max())
        err = np.abs(grad - numeric).max() / scale
        assert err < 1e-6, f"{name}: relative gradient error {err:.3g}"
    _assert_close(grad_x, numeric_gradient(loss, x))
    if activation == "relu6":
        pre = model["fc1"](x)
        assert (pre > 6).any(), "test setup: the upper clamp of ReLU6 was never active"


def test_relu6_clamps_and_relu_does_not():
    x = np.array([[-2.0, 0.5, 6.0, 9.0]], dtype=np.float32)
    np.testing.assert_array_equal(ReLU6()(x), [[0.0, 0.5, 6.0, 6.0]])
    np.testing.assert_array_equal(ReLU()(x), [[0.0, 0.5, 6.0, 9.0]])
    assert ReLU6()(x).dtype == np.float32


@settings(max_examples=50)
@given(
    hnp.arrays(np.float64, (3, 4), elements=st.floats(-50, 50)),
    st.floats(-100, 100),
)
def test_softmax_rows_sum_to_one_and_ignore_shifts(z, c):
    p = softmax(z)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(softmax(z + c), p, rtol=1e-9, atol=1e-15)
    _, g = softmax_cross_entropy(z, np.array([0, 1, 3]))
    np.testing.assert_allclose(g.sum(axis=1), 0.0, atol=1e-12)


# --------------------------------------------------------------------------- optimizers


def test_sgd_momentum_matches_the_recursion():
    p = np.array([1.0, -2.0])
    g = np.zeros(2)
    opt = SGD([(p, g)], lr=0.1, momentum=0.5)
    v = np.zeros(2)
    ref = p.copy()
    for grad in ([1.0, 2.0], [0.5, -1.0], [-3.0, 0.25]):
        g[...] = grad
        opt.step()
        v = 0.5 * v + np.array(grad)
        ref = ref - 0.1 * v
        np.testing.assert_allclose(p, ref, rtol=1e-15)


def test_adam_matches_the_recursion():
    p = np.array([0.3, -0.7, 2.0])
    g = np.zeros(3)
    opt = Adam([(p, g)], lr=0.01, betas=(0.8, 0.9), eps=1e-8)
    m = np.zeros(3)
    v = np.zeros(3)
    ref = p.copy()
    for t, grad in enumerate(([1.0, -2.0, 0.1], [0.5, 0.5, -0.3], [2.0, 0.0, 1.0]), start=1):
        g[...] = grad
        opt.step()
        grad = np.array(grad)
        m = 0.8 * m + 0.2 * grad
        v = 0.9 * v + 0.1 * grad**2
        ref = ref - 0.01 * (m / (1 - 0.8**t)) / (np.sqrt(v / (1 - 0.9**t)) + 1e-8)
        np.testing.assert_allclose(p, ref, rtol=1e-14)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(trained_mlp):
    return trained_mlp((64, 128, 64, 10), epochs=10)


def test_training_reaches_a_real_accuracy(trained, digits):
    model, history = trained
    _, (Xte, yte) = digits
    assert history["loss"][-1] < history["loss"][0] / 5
    assert len(history["loss"]) == 10 and len(history["train_accuracy"]) == 10
    acc = accuracy(model, Xte, yte)
    assert acc > 0.93, f"test accuracy {acc:.3f}"
    assert all(p.dtype == np.float32 for p, _ in model.parameters())
    assert model(Xte).dtype == np.float32


def test_sgd_training_also_learns(digits):
    (Xtr, ytr), (Xte, yte) = digits
    model = make_mlp(seed=1)
    train(model, Xtr, ytr, epochs=8, lr=0.05, seed=1, progress=False, optimizer="sgd")
    assert accuracy(model, Xte, yte) > 0.9


def test_training_is_deterministic(digits, trained):
    (Xtr, ytr), _ = digits
    again = make_mlp(seed=0)
    train(again, Xtr, ytr, epochs=10, batch_size=32, lr=1e-2, seed=0, progress=False)
    for (a, _), (b, _) in zip(trained[0].parameters(), again.parameters(), strict=True):
        np.testing.assert_array_equal(a, b)
    other = make_mlp(seed=0)
    train(other, Xtr, ytr, epochs=1, batch_size=32, lr=1e-2, seed=1, progress=False)
    once = make_mlp(seed=0)
    train(once, Xtr, ytr, epochs=1, batch_size=32, lr=1e-2, seed=0, progress=False)
    assert not np.array_equal(other["fc1"].weight, once["fc1"].weight)


def test_initialization_depends_on_seed_only():
    a, b, c = make_mlp(seed=5), make_mlp(seed=5), make_mlp(seed=6)
    np.testing.assert_array_equal(a["fc2"].weight, b["fc2"].weight)
    assert not np.array_equal(a["fc2"].weight, c["fc2"].weight)
    bound = np.sqrt(6 / 64)
    assert np.abs(a["fc1"].weight).max() <= bound
    assert a["fc1"].weight.shape == (128, 64) and a["fc3"].weight.shape == (10, 64)
    assert a.names == ["fc1", "act1", "fc2", "act2", "fc3"]


def test_progress_bar_runs(digits, capsys):
    (Xtr, ytr), _ = digits
    train(make_mlp(seed=0), Xtr[:64], ytr[:64], epochs=2, progress=True)
    assert "training" in capsys.readouterr().err


def test_predict_and_accuracy_agree(trained, digits):
    model, _ = trained
    _, (Xte, yte) = digits
    pred = predict(model, Xte, batch_size=7)
    np.testing.assert_array_equal(pred, np.argmax(model(Xte), axis=1))
    assert accuracy(model, Xte, yte) == pytest.approx(np.mean(pred == yte))


# --------------------------------------------------------------------------- hooks


def test_forward_hook_replaces_output_and_is_removed(trained, digits):
    model, _ = trained
    _, (Xte, _) = digits
    base = model(Xte[:20])
    with model["act1"].register_forward_hook(lambda m, x, out: np.zeros_like(out)):
        zeroed = model(Xte[:20])
    # with act1's output forced to zero, the logits are a function of the biases only
    expected = np.maximum(model["fc2"].bias, 0) @ model["fc3"].weight.T + model["fc3"].bias
    np.testing.assert_allclose(zeroed, np.broadcast_to(expected, zeroed.shape), atol=1e-5)
    np.testing.assert_array_equal(model(Xte[:20]), base)


def test_pre_hook_replaces_input(trained, digits):
    model, _ = trained
    _, (Xte, _) = digits
    handle = model["fc1"].register_forward_pre_hook(lambda m, x: x * 0)
    out = model["fc1"](Xte[:3])
    handle.remove()
    np.testing.assert_array_equal(out, np.broadcast_to(model["fc1"].bias, out.shape))


def test_capture_activations_records_what_each_layer_saw(trained, digits):
    model, _ = trained
    _, (Xte, _) = digits
    acts = capture_activations(model, Xte, batch_size=100)
    assert list(acts) == model.names
    np.testing.assert_array_equal(acts["fc1"].input, Xte)
    h1 = Xte @ model["fc1"].weight.T + model["fc1"].bias
    np.testing.assert_allclose(acts["fc1"].output, h1, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(acts["act1"].input, acts["fc1"].output)
    np.testing.assert_array_equal(acts["act1"].output, np.maximum(acts["fc1"].output, 0))
    np.testing.assert_allclose(acts["fc3"].output, model(Xte), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(capture_activations(model, Xte)["fc3"].output, model(Xte))
    assert all(not layer._forward_hooks for layer in model), "capture left hooks behind"
    only = capture_activations(model, Xte[:5], layers=["act2"])
    assert list(only) == ["act2"] and only["act2"].output.shape == (5, 64)


# --------------------------------------------------------------------------- whole-model tools


def test_copy_model_has_its_own_parameters_and_no_hooks(trained, digits):
    model, _ = trained
    _, (Xte, _) = digits
    seen = []
    observer = type("Recorder", (), {"calls": seen})()

    def hook(module, inp, out, observer=observer):
        observer.calls.append(out.shape)

    with model["act1"].register_forward_hook(hook), model.register_forward_pre_hook(
            lambda m, x: x * 0):
        twin = copy_model(model)
        model(Xte[:3])
    assert seen == [(3, 128)], "the original keeps its hooks"
    assert type(twin) is type(model) and twin.names == model.names
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in [twin, *twin])
    np.testing.assert_array_equal(twin(Xte[:50]), model(Xte[:50]))
    twin["fc1"].weight[...] = 0
    assert np.any(model["fc1"].weight != 0), "the copy's parameters are its own"
    layer = copy_model(model["fc2"])
    assert isinstance(layer, Linear) and layer.weight is not model["fc2"].weight
    with pytest.raises(TypeError, match="model must be a qcourse.nn.Module"):
        copy_model([model])


def test_swapped_weights_restores_bit_for_bit_even_on_error(trained, digits):
    model, _ = trained
    _, (Xte, _) = digits
    before = model.state_dict()
    zeros = np.zeros_like(model["fc3"].weight)
    with swapped_weights(model, {"fc3": zeros}) as m:
        assert m is model and not np.any(model["fc3"].weight)
        np.testing.assert_array_equal(model(Xte[:4]), np.tile(model["fc3"].bias, (4, 1)))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])
    with pytest.raises(RuntimeError, match="inside"):
        with swapped_weights(model, {"fc1": model["fc1"].weight * 2}):
            raise RuntimeError("inside the block")
    np.testing.assert_array_equal(model["fc1"].weight, before["fc1.weight"])
    with pytest.raises(ValueError, match="shape"):   # checked before any weight is swapped
        with swapped_weights(model, {"fc1": model["fc1"].weight * 2, "fc2": zeros}):
            pass
    np.testing.assert_array_equal(model["fc1"].weight, before["fc1.weight"])
    with pytest.raises(ValueError, match="no weight"):
        with swapped_weights(model, {"act1": zeros}):
            pass


def test_feed_activations_hands_every_batch_to_its_sink_and_cleans_up(trained, digits):
    model, _ = trained
    _, (Xte, _) = digits
    got = {"in": [], "out": [], "logits": []}
    feed_activations(model, Xte, {("fc2", "input"): got["in"].append,
                                  ("fc2", "output"): got["out"].append,
                                  ("fc3", "output"): got["logits"].append}, batch_size=64)
    assert [len(b) for b in got["in"]] == [len(r) for r in np.array_split(
        Xte, range(64, len(Xte), 64))]
    acts = capture_activations(model, Xte, batch_size=64)
    np.testing.assert_array_equal(np.concatenate(got["in"]), acts["fc2"].input)
    np.testing.assert_array_equal(np.concatenate(got["out"]), acts["fc2"].output)
    np.testing.assert_array_equal(np.concatenate(got["logits"]), acts["fc3"].output)

    def broken(a):
        raise RuntimeError("sink failed")

    with pytest.raises(RuntimeError, match="sink failed"):
        feed_activations(model, Xte, {("act1", "output"): broken})
    assert all(not layer._forward_hooks for layer in model), "a hook was left behind"
    for sinks, exc, match in [({("nope", "output"): print}, ValueError, "must be one of"),
                              ({("fc1", "weights"): print}, ValueError, "where"),
                              ({"fc1": print}, TypeError, "pair"),
                              ({("fc1", "input"): 3}, TypeError, "callable")]:
        with pytest.raises(exc, match=match):
            feed_activations(model, Xte, sinks)


def test_evaluate_and_classifier_use_one_pass(trained, digits):
    model, _ = trained
    _, (Xte, yte) = digits
    ev = evaluate(model, Xte, yte)
    logits = model(Xte)
    loss, _ = softmax_cross_entropy(logits.astype(np.float64), yte)
    assert ev == (loss, float(np.mean(np.argmax(logits, axis=1) == yte)))
    assert ev.accuracy == accuracy(model, Xte, yte)

    class Halves(Classifier):
        """Logits that depend on the whole batch: predicting in pieces would change them."""

        def __call__(self, X):
            return X[:, :10] - X[:, :10].mean(axis=0)

    h = Halves()
    np.testing.assert_array_equal(h.predict(Xte), np.argmax(h(Xte), axis=1))
    assert not np.array_equal(predict(h, Xte, batch_size=5), h.predict(Xte))
    assert h.accuracy(Xte, yte) == float(np.mean(h.predict(Xte) == yte))
    with pytest.raises(ValueError, match="features"):
        evaluate(model, Xte[:, :10], yte)


def test_layer_counts(trained):
    model, _ = trained
    assert linear_layers(model) == ["fc1", "fc2", "fc3"]
    assert [tuple(i) for i in layer_info(model)] == [
        ("fc1", 64, 128, 8192, 128, 8192), ("fc2", 128, 64, 8192, 64, 8192),
        ("fc3", 64, 10, 640, 10, 640)]


def test_state_dict_round_trip(trained):
    model, _ = trained
    state = model.state_dict()
    fresh = make_mlp(seed=9)
    fresh.load_state_dict(state)
    for (a, _), (b, _) in zip(model.parameters(), fresh.parameters(), strict=True):
        np.testing.assert_array_equal(a, b)
    state["fc1.weight"][...] = 0  # a copy: the model is unchanged
    assert np.abs(model["fc1"].weight).sum() > 0
    with pytest.raises(ValueError, match="keys"):
        fresh.load_state_dict({"fc1.weight": state["fc1.weight"]})
    bad = copy.deepcopy(model.state_dict())
    bad["fc2.bias"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict(bad)


# --------------------------------------------------------------------------- bad input


def _xy(n=8):
    X = np.zeros((n, 64), dtype=np.float32)
    y = np.zeros(n, dtype=np.int64)
    return X, y


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda X, y: (X.astype(np.int32), y), TypeError, "float dtype"),
        (lambda X, y: (X.tolist(), y), TypeError, "numpy.ndarray"),
        (lambda X, y: (X[0], y), ValueError, "2-D"),
        (lambda X, y: (X[:0], y[:0]), ValueError, "empty"),
        (lambda X, y: (np.where(X == 0, np.nan, X), y), ValueError, "NaN"),
        (lambda X, y: (X, y[:-1]), ValueError, "shape"),
        (lambda X, y: (X, y.astype(np.float32)), TypeError, "integer"),
        (lambda X, y: (X, y + 10), ValueError, "labels < 10"),
        (lambda X, y: (X, y - 1), ValueError, ">= 0"),
        (lambda X, y: (X[:, :10], y), ValueError, "64 features"),
    ],
)
def test_train_rejects_bad_data(change, exc, match):
    X, y = change(*_xy())
    with pytest.raises(exc, match=match):
        train(make_mlp(seed=0), X, y, epochs=1, progress=False)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"epochs": 0}, ValueError, "epochs"),
        ({"epochs": 1.0}, TypeError, "epochs"),
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"lr": float("nan")}, ValueError, "lr"),
        ({"seed": -3}, ValueError, "seed"),
        ({"optimizer": "rmsprop"}, ValueError, "optimizer"),
    ],
)
def test_train_rejects_bad_settings(kwargs, exc, match):
    X, y = _xy()
    with pytest.raises(exc, match=match):
        train(make_mlp(seed=0), X, y, **{"epochs": 1, "progress": False, **kwargs})


def test_construction_rejects_bad_arguments():
    with pytest.raises(TypeError, match="Module"):
        Sequential(ReLU(), "not a layer")
    with pytest.raises(ValueError, match="unique"):
        Sequential(("a", ReLU()), ("a", ReLU()))
    with pytest.raises(ValueError, match="at least one"):
        Sequential()
    with pytest.raises(ValueError, match="activation"):
        make_mlp(activation="tanh")
    with pytest.raises(ValueError, match="sizes"):
        make_mlp(sizes=(64,))
    with pytest.raises(ValueError, match="sizes"):
        make_mlp(sizes=(64, 0, 10))
    with pytest.raises(TypeError, match="dtype"):
        Linear(3, 2, dtype=np.int8)
    with pytest.raises(ValueError, match="in_features"):
        Linear(0, 2)
    with pytest.raises(TypeError, match="callable"):
        ReLU().register_forward_hook(3)
    with pytest.raises(KeyError, match="no layer"):
        make_mlp()["fc9"]
    with pytest.raises(ValueError, match="not in the model"):
        capture_activations(make_mlp(), np.zeros((2, 64), dtype=np.float32), layers=["fc9"])
    with pytest.raises(TypeError, match="Sequential"):
        capture_activations(ReLU(), np.zeros((2, 64), dtype=np.float32))


def test_backward_before_forward_is_an_error():
    with pytest.raises(RuntimeError, match="before forward"):
        Linear(3, 2).backward(np.zeros((1, 2), dtype=np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        ReLU6().backward(np.zeros((1, 2), dtype=np.float32))
    layer = Linear(3, 2)
    layer(np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="grad_out"):
        layer.backward(np.zeros((4, 3), dtype=np.float32))


def test_loss_rejects_bad_labels():
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match="labels < 3"):
        softmax_cross_entropy(z, np.array([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        softmax_cross_entropy(np.full((2, 3), np.inf), np.array([0, 1]))
