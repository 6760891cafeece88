"""The convolutional layers of qcourse.nn (qcourse/nn/cnn.py).

Every backward pass is checked against central finite differences in float64 (inputs and
parameters), the forward passes against direct loops and against PyTorch where it is installed,
batch norm's two modes against their definitions, and training for determinism.
"""

import numpy as np
import pytest
from support import numeric_gradient

from qcourse.conv import im2col
from qcourse.nn import (
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    ReLU6,
    Sequential,
    accuracy,
    train,
)


def _assert_close(analytic, numeric, tol=1e-6):
    scale = max(1.0, np.abs(numeric).max())
    err = np.abs(analytic - numeric).max() / scale
    assert err < tol, f"relative gradient error {err:.2e}"


def _conv_loops(x, w, b, stride, padding, groups):
    """The definition, one output at a time."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (wd + 2 * padding - kw) // stride + 1
    y = np.zeros((n, o, oh, ow))
    og = o // groups
    for oc in range(o):
        g = oc // og
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, g * cg:(g + 1) * cg, i * stride:i * stride + kh,
                           j * stride:j * stride + kw]
                y[:, oc, i, j] = (patch * w[oc]).sum(axis=(1, 2, 3)) + (b[oc] if b is not None
                                                                         else 0)
    return y


CONV_CASES = [
    # in, out, k, stride, padding, groups, h, w
    (3, 4, 3, 1, 1, 1, 5, 6),
    (4, 4, 3, 2, 1, 4, 7, 7),     # depthwise, stride 2
    (4, 6, 1, 1, 0, 1, 4, 3),     # pointwise
    (6, 4, 3, 2, 0, 2, 8, 7),     # two groups, no padding
    (2, 2, (2, 3), 1, 2, 1, 3, 3),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_forward_matches_the_definition(case):
    cin, cout, k, s, p, g, h, w = case
    rng = np.random.default_rng(1)
    layer = Conv2d(cin, cout, k, stride=s, padding=p, groups=g, seed=3, dtype=np.float64)
    layer.bias[...] = rng.normal(size=cout)
    x = rng.normal(size=(2, cin, h, w))
    np.testing.assert_allclose(layer(x), _conv_loops(x, layer.weight, layer.bias, s, p, g),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_gradients_match_finite_differences(case):
    cin, cout, k, s, p, g, h, w = case
    rng = np.random.default_rng(2)
    layer = Conv2d(cin, cout, k, stride=s, padding=p, groups=g, seed=4, dtype=np.float64)
    layer.bias[...] = rng.normal(size=cout)
    x = rng.normal(size=(2, cin, h, w))
    r = rng.normal(size=layer(x).shape)

    def loss():
        return float(np.sum(r * layer.forward(x)))

    loss()
    grad_x = layer.backward(r.copy())
    _assert_close(grad_x, numeric_gradient(loss, x))
    loss()
    layer.backward(r.copy())
    gw, gb = layer.grad_weight.copy(), layer.grad_bias.copy()
    _assert_close(gw, numeric_gradient(loss, layer.weight))
    _assert_close(gb, numeric_gradient(loss, layer.bias))


def test_a_broken_backward_is_caught():
    """The check above fails when the col2im scatter is wrong (here: the stride is ignored)."""
    layer = Conv2d(2, 2, 3, stride=2, padding=1, seed=0, dtype=np.float64)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 2, 5, 5))
    r = rng.normal(size=layer(x).shape)
    layer.stride = 1
    try:
        bad = layer.backward(r)
    except (ValueError, IndexError):
        return  # shapes no longer fit: also caught
    finally:
        layer.stride = 2
    numeric = numeric_gradient(lambda: float(np.sum(r * layer.forward(x))), x)
    with pytest.raises(AssertionError):
        _assert_close(bad, numeric)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_gradients(training):
    rng = np.random.default_rng(5)
    bn = BatchNorm2d(3, dtype=np.float64)
    bn.weight[...] = rng.uniform(0.5, 2, 3)
    bn.bias[...] = rng.normal(size=3)
    bn.running_mean[...] = rng.normal(size=3)
    bn.running_var[...] = rng.uniform(0.5, 2, 3)
    bn.set_training(training)
    x = rng.normal(size=(4, 3, 3, 2))
    r = rng.normal(size=x.shape)
    state = (bn.running_mean.copy(), bn.running_var.copy())

    def loss():
        out = float(np.sum(r * bn.forward(x)))
        bn.running_mean[...], bn.running_var[...] = state  # keep the statistics fixed
        return out

    loss()
    gx = bn.backward(r)
    gg, gb = bn.grad_weight.copy(), bn.grad_bias.copy()
    _assert_close(gx, numeric_gradient(loss, x))
    _assert_close(gg, numeric_gradient(loss, bn.weight))
    _assert_close(gb, numeric_gradient(loss, bn.bias))


def test_batch_norm_statistics_in_both_modes():
    rng = np.random.default_rng(6)
    bn = BatchNorm2d(2, momentum=0.25, dtype=np.float64)
    x = rng.normal(3.0, 2.0, size=(5, 2, 4, 4))
    bn.set_training(True)
    y = bn(x)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1 / (1 + 1e-5 / x.var(axis=(0, 2, 3))),
                               rtol=1e-12)
    m = x.size // 2
    np.testing.assert_allclose(bn.running_mean, 0.25 * x.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(bn.running_var,
                               0.75 + 0.25 * x.var(axis=(0, 2, 3)) * m / (m - 1))
    bn.set_training(False)
    before = (bn.running_mean.copy(), bn.running_var.copy())
    y = bn(x)
    expected = (x - before[0][None, :, None, None]) / np.sqrt(
        before[1][None, :, None, None] + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    np.testing.assert_array_equal(bn.running_mean, before[0])  # inference does not update


@pytest.mark.parametrize("layer", [AvgPool2d(2), GlobalAvgPool2d(), Flatten()])
def test_pool_and_flatten_gradients(layer):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 3, 4, 6))
    r = rng.normal(size=layer(x).shape)
    layer(x)
    g = layer.backward(r)
    _assert_close(g, numeric_gradient(lambda: float(np.sum(r * layer.forward(x))), x))


def test_pooling_values():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.float64).reshape(2, 1, 4, 4)
    np.testing.assert_array_equal(AvgPool2d(2)(x)[0, 0], [[2.5, 4.5], [10.5, 12.5]])
    np.testing.assert_array_equal(GlobalAvgPool2d()(x).ravel(), [7.5, 23.5])
    assert Flatten()(x).shape == (2, 16)


def test_im2col_layouts_agree_and_pad_with_the_given_value():
    rng = np.random.default_rng(8)
    x = rng.integers(-128, 128, size=(2, 3, 5, 4)).astype(np.int8)
    a = im2col(x, 3, 2, 1, layout="NCHW", pad_value=-7)
    b = im2col(x.transpose(0, 2, 3, 1), 3, 2, 1, layout="NHWC", pad_value=-7)
    np.testing.assert_array_equal(a, b.transpose(0, 1, 2, 5, 3, 4))
    assert a.shape == (2, 3, 2, 3, 3, 3)
    assert a[0, 0, 0, :, 0, 0].tolist() == [-7, -7, -7]  # the top-left corner is padding
    np.testing.assert_array_equal(a[:, 1, 1, :, 1, 1], x[:, :, 2, 2])


def _small_cnn(seed=0, dtype=np.float64):
    return Sequential(
        ("conv", Conv2d(1, 4, 3, padding=1, seed=seed, dtype=dtype)),
        ("bn", BatchNorm2d(4, dtype=dtype)),
        ("act", ReLU6()),
        ("dw", Conv2d(4, 4, 3, stride=2, padding=1, groups=4, seed=seed + 1, dtype=dtype)),
        ("pool", GlobalAvgPool2d()),
        ("flat", Flatten()),
        ("fc", Linear(4, 3, seed=seed + 2, dtype=dtype)),
    )


def test_whole_cnn_gradient_in_training_mode():
    from qcourse.nn import softmax_cross_entropy
    rng = np.random.default_rng(9)
    model = _small_cnn()
    model.set_training(True)
    x = rng.normal(size=(3, 1, 6, 6))
    y = np.array([0, 2, 1])
    bn = model["bn"]
    state = (bn.running_mean.copy(), bn.running_var.copy())

    def loss():
        out = softmax_cross_entropy(model.forward(x), y)[0]
        bn.running_mean[...], bn.running_var[...] = state
        return out

    loss()
    model.backward(softmax_cross_entropy(model.forward(x), y)[1])
    bn.running_mean[...], bn.running_var[...] = state
    for p, g in model.parameters():
        g = g.copy()
        _assert_close(g, numeric_gradient(loss, p))


def test_training_a_cnn_is_deterministic_and_learns():
    rng = np.random.default_rng(10)
    X = rng.normal(size=(96, 1, 6, 6)).astype(np.float32)
    y = (X[:, 0, :3].sum(axis=(1, 2)) > X[:, 0, 3:].sum(axis=(1, 2))).astype(np.int64)
    runs = []
    for _ in range(2):
        model = _small_cnn(dtype=np.float32)
        train(model, X, y, epochs=30, batch_size=16, lr=1e-2, progress=False)
        runs.append(model)
    for (_, a), (_, b) in zip(runs[0].named_parameters(), runs[1].named_parameters(),
                              strict=True):
        np.testing.assert_array_equal(a, b)
    assert not runs[0]["bn"].training  # train() leaves the model in inference mode
    assert accuracy(runs[0], X, y) > 0.75  # chance is about 0.5


@pytest.mark.parametrize("make, x, match", [
    (lambda: Conv2d(3, 4, 3), np.zeros((1, 2, 5, 5)), "3 channels"),
    (lambda: Conv2d(3, 4, 3), np.zeros((3, 5, 5)), "4-D"),
    (lambda: Conv2d(3, 4, 5), np.zeros((1, 3, 4, 4)), "does not fit"),
    (lambda: AvgPool2d(2), np.zeros((1, 3, 5, 4)), "multiples"),
    (lambda: BatchNorm2d(2), np.zeros((1, 3, 2, 2)), "2 channels"),
])
def test_bad_inputs_are_named(make, x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


def test_bad_construction():
    with pytest.raises(ValueError, match="groups=3 must divide"):
        Conv2d(4, 6, 3, groups=3)
    with pytest.raises(TypeError, match="dtype"):
        Conv2d(1, 1, 3, dtype=np.int8)
    with pytest.raises(ValueError, match="momentum"):
        BatchNorm2d(3, momentum=0)


def test_conv_matches_pytorch():
    torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install torch==2.13.0)")
    rng = np.random.default_rng(11)
    for cin, cout, k, s, p, g, h, w in CONV_CASES:
        layer = Conv2d(cin, cout, k, stride=s, padding=p, groups=g, seed=5, dtype=np.float64)
        layer.bias[...] = rng.normal(size=cout)
        x = rng.normal(size=(2, cin, h, w))
        ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(layer.weight),
                                         torch.from_numpy(layer.bias), stride=s, padding=p,
                                         groups=g).numpy()
        np.testing.assert_allclose(layer(x), ref, rtol=1e-10, atol=1e-12)
