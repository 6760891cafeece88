"""qcourse.transformer: per-token quantization, W8A8 layers on the int8 kernel, LLM.int8(),
SmoothQuant and the integer transformer block.

The integer block is checked three ways: its integers and outputs equal its NumPy reference bit
for bit; with the float layers made to raise it still runs (no float matrix product is used);
and a kernel that returns wrong accumulators changes its output (the output comes from the
kernel).
"""

from __future__ import annotations

import numpy as np
import pytest

import qcourse.kernels as K
from qcourse.affine import QParams, choose_qparams, quantize, sqnr_db
from qcourse.datasets import load_pydoc_text
from qcourse.nn import (
    CausalSelfAttention,
    Linear,
    LMConfig,
    TransformerBlock,
    TransformerLM,
    evaluate_lm,
    generate,
    lm_windows,
    load_lm,
)
from qcourse.transformer import (
    IntegerBlock,
    LLMInt8Linear,
    W8A8Linear,
    activation_absmax,
    block_op_counts,
    dequantize_accumulators,
    integer_lm,
    llm_int8_lm,
    llm_int8_matmul,
    outlier_channels,
    quantize_per_tensor,
    quantize_per_token,
    smooth_lm,
    smoothquant_scales,
    w8a8_lm,
)

TINY = LMConfig(d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=12)
_ORIG_ATTEND = CausalSelfAttention.attend


@pytest.fixture(scope="module")
def trained():
    return load_lm().model


@pytest.fixture(scope="module")
def heldout():
    return lm_windows(load_pydoc_text("heldout")[:4097], 128)


def tiny_model(seed=0):
    model = TransformerLM(TINY, seed=seed)
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():  # weights of a trained size, not of an initialization
        p[...] = rng.normal(scale=0.3, size=p.shape)
    return model


# --------------------------------------------------------------------------- per-token codes


def test_per_token_codes_scales_and_ties():
    x = np.array([[0.5, 1.5, 2.5, -127.0], [0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.25]])
    q, s = quantize_per_token(x)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (3,)
    assert q[0].tolist() == [0, 2, 2, -127], "scale 1: ties go to even"
    assert q[1].tolist() == [0, 0, 0, 0] and s[1] == 1.0, "a zero row gets scale 1"
    assert s[2] == np.float32(2 / 127) and q[2, 1] == -127
    q4, s4 = quantize_per_token(x, bits=4)
    assert s4[0] == np.float32(127 / 7) and np.abs(q4).max() == 7


def test_per_token_is_affine_per_row_with_a_float32_scale():
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=(40, 64)) * rng.uniform(0.01, 100, size=(40, 1))
    for bits in (8, 6, 4, 2):
        q, s = quantize_per_token(x, bits)
        qp = choose_qparams(x, bits=bits, symmetric=True, narrow_range=True, axis=0)
        assert np.array_equal(s, qp.scale.astype(np.float32))
        ref = quantize(x, QParams(scale=s, zero_point=0, qmin=qp.qmin, qmax=qp.qmax, axis=0))
        assert np.array_equal(q, ref)
        err = np.abs(x - q * s[:, None].astype(np.float64))
        assert np.all(err <= s[:, None] / 2 * (1 + 1e-6)), "round to nearest: error <= step/2"
        assert np.all(np.abs(q).max(axis=1) == 2 ** (bits - 1) - 1), "each row's max is on the grid"


def test_per_token_beats_per_tensor_when_tokens_differ_in_size():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 128)) * np.exp(rng.normal(scale=1.5, size=(64, 1)))
    qt, st = quantize_per_token(x)
    qa, sa = quantize_per_tensor(x)
    assert len(set(sa.tolist())) == 1
    assert sqnr_db(x, qt * st[:, None]) > sqnr_db(x, qa * sa[:, None]) + 6


@pytest.mark.parametrize("x, bits, err, match", [
    ([[1.0, 2.0]], 8, TypeError, "x must be a numpy.ndarray"),
    (np.ones((2, 2), dtype=np.int32), 8, TypeError, "float dtype"),
    (np.ones(3), 8, ValueError, "2-D"),
    (np.zeros((0, 3)), 8, ValueError, "empty"),
    (np.array([[1.0, np.nan]]), 8, ValueError, "x must be finite"),
    (np.array([[1.0, np.inf]]), 8, ValueError, "x must be finite"),
    (np.array([[1.0, 1e300]]), 8, ValueError, "x must have magnitudes that float32 holds"),
    (np.ones((2, 2)), 9, ValueError, r"bits must be an int in \[2, 8\]"),
    (np.ones((2, 2)), 1, ValueError, "bits"),
    (np.ones((2, 2)), True, TypeError, "bits"),
    (np.ones((2, 2)), 8.0, TypeError, "bits"),
])
def test_per_token_rejects_bad_input(x, bits, err, match):
    with pytest.raises(err, match=match):
        quantize_per_token(x, bits)


# --------------------------------------------------------------------------- W8A8 layers


def make_linear(k=48, n=24, seed=0):
    lin = Linear(k, n, seed=seed)
    lin.bias[...] = np.random.default_rng(seed).normal(size=n)
    return lin


def test_w8a8_linear_is_the_quantized_product_and_matches_its_reference():
    lin = make_linear()
    x = np.random.default_rng(2).normal(size=(30, 48)).astype(np.float32)
    fast, ref = W8A8Linear(lin), W8A8Linear(lin, reference=True)
    y, y_ref = fast(x), ref(x)
    assert y.dtype == np.float32 and np.array_equal(y, y_ref)
    qx, sx = quantize_per_token(x)
    acc = qx.astype(np.int64) @ fast.weight_codes.T.astype(np.int64)
    expect = acc * sx[:, None].astype(np.float64) * fast.weight_scale.astype(np.float64) + lin.bias
    assert np.allclose(y, expect, rtol=1e-5, atol=1e-5)
    assert sqnr_db(lin(x), y) > 30
    # per-channel weights: each row of the weight has its own scale
    assert fast.weight_scale.shape == (24,) and np.all(np.abs(fast.weight_codes).max(axis=1) == 127)


def test_epilogue_applies_both_scales_after_the_integer_sum():
    acc = np.array([[100, -3], [7, 0]], dtype=np.int32)
    y = dequantize_accumulators(acc, np.array([0.5, 2.0]), np.array([0.1, 4.0]), np.array([1, 1]))
    assert y.dtype == np.float32
    assert np.allclose(y, [[100 * 0.05 + 1, -3 * 2 + 1], [7 * 0.2 + 1, 1]])
    with pytest.raises(TypeError, match="int32"):
        dequantize_accumulators(acc.astype(np.int64), np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="x_scales must have shape"):
        dequantize_accumulators(acc, np.ones(3), np.ones(2))


def guard_float_path(monkeypatch, allowed=()):
    """Make every float Linear (except ``allowed``) and the float attention raise."""
    orig = Linear.forward

    def guarded(self, x):
        if not any(self is a for a in allowed):
            raise AssertionError("a float Linear ran")
        return orig(self, x)

    def no_attention(self, *args, **kwargs):
        raise AssertionError("the float attention ran")

    monkeypatch.setattr(Linear, "forward", guarded)
    monkeypatch.setattr(CausalSelfAttention, "attend", no_attention)


def count_kernel_calls(monkeypatch) -> list:
    calls = []
    real = K._kernels.gemm_packed

    def counting(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(K._kernels, "gemm_packed", counting)
    return calls


def test_w8a8_layers_call_the_compiled_kernel_and_no_float_product(monkeypatch):
    """Swap the float path out: a W8A8 model still runs, and the compiled kernel runs once per
    linear layer of each block."""
    model = tiny_model()
    ids = np.random.default_rng(3).integers(0, 256, size=(2, 12))
    q = w8a8_lm(model)
    before = q(ids)
    calls = count_kernel_calls(monkeypatch)
    guard_float_path(monkeypatch, allowed=(q.head,))
    monkeypatch.setattr(CausalSelfAttention, "attend", _ORIG_ATTEND)  # W8A8: attention is float
    after = q(ids)
    assert np.array_equal(before, after)
    assert len(calls) == 4 * TINY.n_layers, "one kernel call per linear layer of each block"
    assert all(shape == (24, TINY.d_model) or shape[0] == 24 for shape in calls)
    with pytest.raises(AssertionError, match="a float Linear ran"):
        model(ids)  # the guard does catch a float layer


def test_the_output_comes_from_the_kernel(monkeypatch):
    """A kernel returning accumulators one too large moves every output by s_x * s_w: the
    equality checks above would catch a broken kernel."""
    lin = make_linear()
    layer = W8A8Linear(lin)
    x = np.random.default_rng(4).normal(size=(5, 48)).astype(np.float32)
    good = layer(x)
    real = K._kernels.gemm_packed

    def off_by_one(path, a, scratch, data, colsum, out, threads):
        ran = real(path, a, scratch, data, colsum, out, threads)
        out += 1
        return ran

    monkeypatch.setattr(K._kernels, "gemm_packed", off_by_one)
    bad = layer(x)
    qx, sx = quantize_per_token(x)
    acc = K.matmul_int8_reference(qx, np.ascontiguousarray(layer.weight_codes.T))
    assert np.array_equal(bad, dequantize_accumulators(acc + 1, sx, layer.weight_scale, lin.bias))
    assert np.array_equal(good, dequantize_accumulators(acc, sx, layer.weight_scale, lin.bias))
    assert not np.array_equal(bad, W8A8Linear(lin, reference=True)(x))


def test_integer_block_matches_its_numpy_reference_exactly():
    model = tiny_model(1)
    block = model.blocks[0]
    x = np.random.default_rng(5).normal(size=(3, 12, 16)).astype(np.float32)
    fast, ref = IntegerBlock(block), IntegerBlock(block, reference=True)
    fast.accumulators, ref.accumulators = [], []
    y, y_ref = fast(x), ref(x)
    assert np.array_equal(y, y_ref)
    assert [lab for lab, _ in fast.accumulators] == [lab for lab, _ in ref.accumulators]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(fast.accumulators,
                                                             ref.accumulators, strict=True))
    labels = [lab for lab, _ in fast.accumulators]
    assert labels.count("scores") == labels.count("pv") == 3 * 2
    assert sum(labels.count(n) for n in ("qkv", "proj", "fc1", "fc2")) == 4
    # close to the float block
    y_float = block(x.astype(np.float32))
    assert sqnr_db(y_float, y) > 25


def test_integer_block_runs_every_product_on_the_kernel(monkeypatch):
    model = tiny_model(2)
    blk = IntegerBlock(model.blocks[1])
    x = np.random.default_rng(6).normal(size=(2, 12, 16)).astype(np.float32)
    good = blk(x)
    calls = count_kernel_calls(monkeypatch)
    guard_float_path(monkeypatch)
    assert np.array_equal(blk(x), good)
    assert len(calls) == 4 + 2 * 2 * 2, "4 linear layers + (QK^T, PV) per sequence and head"
    with pytest.raises(AssertionError, match="float"):
        model.blocks[1](x)


def test_integer_block_op_counts_match_the_products_it_runs():
    model = tiny_model(3)
    blk = IntegerBlock(model.blocks[0])
    blk.accumulators = []
    x = np.random.default_rng(7).normal(size=(1, 12, 16)).astype(np.float32)
    blk(x)
    macs = 0
    shapes = {"qkv": 16, "proj": 16, "fc1": 16, "fc2": 32, "scores": 8, "pv": 12}
    for label, acc in blk.accumulators:
        macs += acc.shape[0] * acc.shape[1] * shapes[label]
    assert macs == block_op_counts(TINY, 12)["int8 MACs"]


def test_integer_lm_generates_through_the_cache():
    model = tiny_model(4)
    ilm = integer_lm(model)
    assert isinstance(ilm.blocks[0], IntegerBlock) and not isinstance(model.blocks[0],
                                                                      IntegerBlock)
    out = generate(ilm, b"ab", 6)
    ids = np.frombuffer(b"ab" + out, np.uint8).astype(np.int64)[None, :]
    assert bytes(np.argmax(ilm(ids[:, :-1])[0, 1:], axis=-1).astype(np.uint8)) == out
    with pytest.raises(ValueError, match=r"blocks\[0\] must be an int in \[0, 1\], got 5"):
        integer_lm(model, blocks=[5])


# --------------------------------------------------------------------------- outliers, LLM.int8()


def test_outlier_channels():
    x = np.zeros((4, 6))
    x[2, 1], x[0, 4], x[3, 5] = 6.5, -7.0, 6.0
    assert outlier_channels(x).tolist() == [1, 4], "strictly above the threshold"
    assert outlier_channels(x, threshold=5.5).tolist() == [1, 4, 5]
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold must be a finite real number > 0"):
            outlier_channels(x, bad)
    with pytest.raises(TypeError, match="threshold"):
        outlier_channels(x, "6")


def test_llm_int8_decomposition():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(32, 64)).astype(np.float32)
    x[:, [3, 40]] *= 30.0          # two outlier feature channels
    w = rng.normal(size=(64, 16)).astype(np.float32)
    exact = x.astype(np.float64) @ w
    y = llm_int8_matmul(x, w)
    assert np.array_equal(y, llm_int8_matmul(x, w, reference=True))
    # without the float part (a threshold nothing exceeds) the error is far larger
    y_int = llm_int8_matmul(x, w, threshold=1e6)
    qx, sx = quantize_per_token(x)
    qw, sw = quantize_per_token(np.ascontiguousarray(w.T))
    plain = dequantize_accumulators(K.matmul_int8(qx, np.ascontiguousarray(qw.T)), sx, sw)
    assert np.array_equal(y_int, plain), "no outlier column: plain vector-wise int8"
    assert sqnr_db(exact, y) > sqnr_db(exact, y_int) + 10
    # every column an outlier: the float product
    y_float = llm_int8_matmul(x, w, threshold=1e-9)
    assert np.allclose(y_float, x @ w, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("args, err, match", [
    ((np.ones((2, 3)), np.ones((4, 2))), ValueError, "x has 3 columns but w has 4 rows"),
    ((np.ones((2, 3)), np.ones((3, 2)), 0.0), ValueError, "threshold"),
    ((np.ones((2, 3)), np.ones((3, 2)), -6.0), ValueError, "threshold"),
    ((np.array([[np.nan, 1, 1]]), np.ones((3, 2))), ValueError, "x must be finite"),
    ((np.ones((2, 3)), np.full((3, 2), np.inf)), ValueError, "w must be finite"),
    ((np.full((2, 3), 1e20), np.full((3, 2), 1e20)), ValueError, "x and w are too large"),
    ((np.ones((2, 3)), [[1, 2]] * 3), TypeError, "w must be a numpy.ndarray"),
])
def test_llm_int8_rejects_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        llm_int8_matmul(*args)


def test_llm_int8_layer_counts_outlier_columns():
    lin = make_linear(8, 4)
    layer = LLMInt8Linear(lin, threshold=2.0)
    x = np.ones((3, 8), dtype=np.float32)
    x[1, 5] = 9.0
    y = layer(x)
    assert layer.outlier_counts == [1]
    assert np.allclose(y, lin(x), rtol=0.02, atol=0.05)


# --------------------------------------------------------------------------- SmoothQuant


def test_smoothquant_scales_formula_and_limits():
    a = np.array([8.0, 1.0, 0.0, 4.0])
    w = np.array([0.5, 2.0, 1.0, 0.0])
    s = smoothquant_scales(a, w, 0.5)
    assert np.allclose(s, [4.0, np.sqrt(0.5), 1.0, 1.0]), "zero maxima leave the channel alone"
    assert np.allclose(smoothquant_scales(a[:2], w[:2], 1.0), [8.0, 1.0])
    assert np.allclose(smoothquant_scales(a[:2], w[:2], 0.0), [2.0, 0.5])
    # alpha = 0.5: smoothed activation and weight column peak at the same value
    a2, w2 = np.array([20.0, 0.3]), np.array([0.1, 0.7])
    s2 = smoothquant_scales(a2, w2, 0.5)
    assert np.allclose(a2 / s2, w2 * s2)


@pytest.mark.parametrize("args, err, match", [
    (([1.0, 2.0], [1.0], 0.5), ValueError, "same length"),
    (([1.0], [1.0], 1.5), ValueError, r"alpha must be a finite real number in \[0.0, 1.0\]"),
    (([1.0], [1.0], -0.1), ValueError, "alpha"),
    (([1.0], [1.0], float("nan")), ValueError, "alpha"),
    (([1.0], [1.0], "0.5"), TypeError, "alpha"),
    (([np.nan], [1.0], 0.5), ValueError, "act_absmax must be finite"),
    (([1e300], [1e-320], 0.5), ValueError, "too far apart"),
    (([1.0], [-1.0], 0.5), ValueError, "weight_absmax must be >= 0"),
    (([[1.0]], [1.0], 0.5), ValueError, "1-D"),
    (([], [], 0.5), ValueError, "act_absmax must be 1-D|must not be empty"),
])
def test_smoothquant_scales_reject_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        smoothquant_scales(*args)


def test_smooth_lm_keeps_the_float_function_and_flattens_activations():
    model = tiny_model(5)
    ids = np.random.default_rng(9).integers(0, 256, size=(4, 12))
    amax = activation_absmax(model, ids)
    smoothed = smooth_lm(model, amax, alpha=0.5)
    np.testing.assert_allclose(smoothed(ids), model(ids), rtol=1e-4, atol=1e-4)
    after = activation_absmax(smoothed, ids)
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.fc1"):
        blk = int(name.split(".")[1])
        lin = smoothed.blocks[blk].attn.qkv if "qkv" in name else smoothed.blocks[blk].mlp.fc1
        wmax = np.abs(lin.weight).max(axis=0)
        np.testing.assert_allclose(after[name], wmax, rtol=1e-3)  # both peak at sqrt(a w)
        assert after[name].max() / after[name].min() < amax[name].max() / amax[name].min()
    assert np.array_equal(model(ids), tiny_model(5)(ids)), "the original is unchanged"
    with pytest.raises(ValueError, match="act_absmax has no entry"):
        smooth_lm(model, {}, 0.5)


# --------------------------------------------------------------------------- on the trained model


def test_trained_model_per_token_beats_per_tensor_and_stays_near_float(trained, heldout):
    f = evaluate_lm(trained, heldout).bits_per_byte
    tok = evaluate_lm(w8a8_lm(trained, activation="per_token"), heldout).bits_per_byte
    ten = evaluate_lm(w8a8_lm(trained, activation="per_tensor"), heldout).bits_per_byte
    assert abs(tok - f) < 0.02 and tok < ten
    i8 = evaluate_lm(llm_int8_lm(trained), heldout).bits_per_byte
    assert abs(i8 - f) < 0.02


def test_w8a8_lm_rejects_bad_arguments(trained):
    with pytest.raises(ValueError, match="activation must be one of"):
        w8a8_lm(trained, activation="per_channel")
    with pytest.raises(TypeError, match="TransformerLM"):
        w8a8_lm(TransformerBlock(8, 2, 16))
    with pytest.raises(TypeError, match="linear must be a qcourse.nn.Linear"):
        W8A8Linear(W8A8Linear(make_linear()))
    with pytest.raises(ValueError, match="x must have 48 columns"):
        W8A8Linear(make_linear())(np.ones((2, 5), dtype=np.float32))
    with pytest.raises(NotImplementedError):
        W8A8Linear(make_linear()).backward(np.ones((2, 24)))


# --------------------------------------------------------------------------- copies and pickles

# Every object of the language-model chapters that holds packed data, copied the ways a model is
# copied, sent to a worker or saved: deepcopy, every pickle protocol, an object array through
# np.save.  Each copy must compute what the original does, bit for bit, on the kernel path the
# child runs (QCOURSE_MAX_PATH caps it).  Run in a child: an unaligned packed weight used to
# crash the interpreter instead of failing a test.  With "break" in argv, PackedB's pickling
# is replaced by one that re-packs the weight with its rows rotated (a copy that loses where each
# packed row belongs): the check must fail.
_LM_ROUND_TRIPS = r'''
import copy, io, pickle, sys
import numpy as np
from qcourse import kernels
from qcourse.kv_cache import QuantizedKVCache, quantize_kv_group
from qcourse.nn import LMConfig, TransformerLM
from qcourse.transformer import IntegerBlock, integer_lm, llm_int8_lm, w8a8_lm

if "break" in sys.argv:
    kernels.PackedB.__reduce__ = lambda self: (kernels.prepack, (np.roll(self.unpack(), 1, 0),))

def round_trips(obj):
    yield "deepcopy", copy.deepcopy(obj)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        yield f"pickle{protocol}", pickle.loads(pickle.dumps(obj, protocol))
    f = io.BytesIO()
    np.save(f, np.array([obj], dtype=object), allow_pickle=True)
    f.seek(0)
    yield "np.save", np.load(f, allow_pickle=True)[0]

model = TransformerLM(LMConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=16), seed=3)
ids = np.random.default_rng(4).integers(0, 256, (2, 11))
h = np.random.default_rng(5).normal(0, 1, (2, 11, 32)).astype(np.float32)
checked = 0
objects = {"integer_lm": integer_lm(model), "IntegerBlock": IntegerBlock(model.blocks[1]),
           "w8a8_lm per tensor": w8a8_lm(model, activation="per_tensor", bits=6),
           "llm_int8_lm": llm_int8_lm(model, 0.05)}
for name, obj in objects.items():
    x = h if name == "IntegerBlock" else ids
    want = obj(x)
    for how, copied in round_trips(obj):
        assert np.array_equal(copied(x), want), (name, how)
        checked += 1
k = np.random.default_rng(6).normal(0, 1, (2, 2, 37, 16)).astype(np.float32)
for dtype in ("int8", "int4", "int2", "e4m3"):
    group = quantize_kv_group(k[:, :, :8], dtype, "channel")
    cache = QuantizedKVCache(1, dtype, group_size=8)
    cache.append(0, k, -k)
    for how, copied in round_trips((group, cache)):
        g, c = copied
        assert all(np.array_equal(getattr(g, f), getattr(group, f)) for f in ("codes", "scale",
                                                                              "offset")), how
        assert np.array_equal(c.keys(0), cache.keys(0)), (dtype, how)
        assert np.array_equal(c.values(0), cache.values(0)) and c.nbytes == cache.nbytes, how
        checked += 1
print("round trips checked:", checked, "default path:", kernels.best_path())
'''


def _lm_round_trip_child(max_path, *flags):
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "QCOURSE_MAX_PATH"}
    if max_path is not None:
        env["QCOURSE_MAX_PATH"] = max_path
    return subprocess.run([sys.executable, "-c", _LM_ROUND_TRIPS, *flags], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("max_path", [None, "avx2", "portable"])
def test_language_model_objects_survive_copy_and_pickle_on_every_path(max_path):
    import os

    if os.environ.get("QCOURSE_MAX_PATH"):
        pytest.skip("run once, from the unsimulated suite: it sets QCOURSE_MAX_PATH itself")
    if max_path is not None and max_path not in K.available_paths():
        pytest.skip(f"this CPU has no {max_path} path to cap at")
    proc = _lm_round_trip_child(max_path)
    assert proc.returncode == 0, (f"child exited with {proc.returncode} (negative: killed by "
                                  f"that signal)\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    assert f"default path: {max_path or K.best_path()}" in proc.stdout


def test_the_language_model_round_trip_check_fails_on_a_bad_copy():
    import os

    if os.environ.get("QCOURSE_MAX_PATH"):
        pytest.skip("run once, from the unsimulated suite")
    proc = _lm_round_trip_child(None, "break")
    assert proc.returncode == 1
    assert "AssertionError: ('integer_lm', 'deepcopy')" in proc.stderr, proc.stderr[-3000:]
