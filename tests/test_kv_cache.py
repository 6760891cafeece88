"""qcourse.kv_cache: fp8 rounding, group quantization of keys and values, the quantized cache,
its sizes, and the fast held-out evaluation checked against token-by-token decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcourse.datasets import load_pydoc_text
from qcourse.floats import FP8_E4M3FN, decode, encode
from qcourse.kv_cache import (
    KV_DTYPES,
    KVGroup,
    QuantizedKVCache,
    dequantize_kv_group,
    e4m3_round,
    evaluate_kv_cache,
    kv_bytes_per_token,
    kv_cache_bytes,
    quantize_kv_group,
)
from qcourse.nn import KVCache, LMConfig, TransformerLM, evaluate_lm, generate, lm_windows, load_lm

TINY = LMConfig(d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=20)


def tiny_model(seed=0):
    model = TransformerLM(TINY, seed=seed)
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        p[...] = rng.normal(scale=0.3, size=p.shape)
    return model


# --------------------------------------------------------------------------- fp8


def fp8_inputs():
    rng = np.random.default_rng(0)
    table = decode(np.arange(127, dtype=np.uint8), FP8_E4M3FN)
    mids = (table[1:] + table[:-1]) / 2          # every tie between neighbours
    return np.concatenate([
        rng.normal(size=20000) * 10.0 ** rng.uniform(-4, 3, size=20000),
        table, -table, mids, -mids, np.nextafter(mids, 0), np.nextafter(mids, 1000),
        [0.0, -0.0, 448.0, 449.0, 464.0, 1e6, -1e6, 2.0**-9, 2.0**-10, 3 * 2.0**-11],
    ])


def test_e4m3_round_matches_qcourse_floats_on_random_and_tie_values():
    x = fp8_inputs()
    ref = decode(encode(np.clip(x, -448, 448), FP8_E4M3FN), FP8_E4M3FN)
    got = e4m3_round(x)
    assert np.array_equal(got, ref)
    assert np.array_equal(np.signbit(got), np.signbit(ref))


def test_e4m3_round_matches_ml_dtypes_on_float32_input():
    """ml_dtypes casts float64 through float32 (rounding twice: a float64 just below a tie
    becomes the tie), so the oracle comparison uses float32 inputs, which the cache stores."""
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the fp8 oracle")
    x = np.clip(fp8_inputs(), -448, 448).astype(np.float32)
    want = x.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    assert np.array_equal(e4m3_round(x), want)
    assert np.array_equal(np.signbit(e4m3_round(x)), np.signbit(want))


def test_e4m3_group_codes_are_the_bit_patterns():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 8, 4)).astype(np.float32)
    g = quantize_kv_group(x, "e4m3", "token")
    s = g.scale.astype(np.float64)
    assert np.array_equal(g.codes, encode(e4m3_round(x.astype(np.float64) / s), FP8_E4M3FN))
    assert np.array_equal(dequantize_kv_group(g),
                          (decode(g.codes, FP8_E4M3FN) * s).astype(np.float32))


# --------------------------------------------------------------------------- groups


@pytest.mark.parametrize("dtype", ["int8", "int4", "int2"])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_int_group_round_trip_and_error_bound(dtype, axis):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(2, 3, 16, 8)) * 3 + 5).astype(np.float32)
    g = quantize_kv_group(x, dtype, axis)
    want = (2, 3, 16, 1) if axis == "token" else (2, 3, 1, 8)
    assert g.scale.shape == want and g.scale.dtype == np.float16 and g.offset.shape == want
    bits = KV_DTYPES[dtype]
    assert g.codes.nbytes == x.size * bits // 8
    back = dequantize_kv_group(g)
    s = g.scale.astype(np.float64)
    # round to nearest on the grid s*q + m; m is the float16 minimum (may sit a little above the
    # true minimum, which then rounds to code 0)
    m = g.offset.astype(np.float64)
    lo = x.min(axis=-1 if axis == "token" else -2, keepdims=True)
    slack = np.maximum(m - lo, 0)
    hi = x.max(axis=-1 if axis == "token" else -2, keepdims=True)
    top = m + s * (2**bits - 1)
    slack_hi = np.maximum(hi - top, 0)
    assert np.all(np.abs(back - x) <= s / 2 + slack + slack_hi + 1e-5)


def test_constant_group_and_packing_layout():
    x = np.full((1, 1, 4, 2), 3.25, dtype=np.float32)
    for dtype in ("int8", "int4", "int2"):
        g = quantize_kv_group(x, dtype, "channel")
        assert np.all(g.scale == 1) and np.array_equal(dequantize_kv_group(g), x)
    g = quantize_kv_group(np.array([[[[0.0, 3.0], [1.0, 2.0]]]], dtype=np.float32), "int2", "token")
    # codes 0, 3, 0, 3 (each token's min and max) packed low bits first: 0b11001100
    assert g.codes.tolist() == [0b11001100]


def test_per_channel_keys_and_per_token_values_where_each_fits():
    rng = np.random.default_rng(3)
    t, d = 32, 16
    # keys: a few channels carry large, steady offsets (what KIVI saw in keys)
    keys = rng.normal(size=(1, 1, t, d)) + np.where(np.arange(d) < 3, 12.0, 0.0)
    # values: tokens differ in size, channels do not
    values = rng.normal(size=(1, 1, t, d)) * np.exp(rng.normal(scale=1.0, size=(1, 1, t, 1)))

    def err(x, axis):
        return float(np.mean((dequantize_kv_group(quantize_kv_group(x.astype(np.float32), "int2",
                                                                      axis)) - x) ** 2))

    assert err(keys, "channel") < err(keys, "token") / 2
    assert err(values, "token") < err(values, "channel")


@pytest.mark.parametrize("args, kwargs, err, match", [
    ((np.ones((4, 2)), "int3"), {}, ValueError, "dtype must be one of"),
    ((np.ones((4, 2)), "fp16"), {}, ValueError, "stored as it is"),
    ((np.ones((4, 2)), "int4", "head"), {}, ValueError, "axis must be one of 'token', 'channel'"),
    ((np.ones(4),), {}, ValueError, "x must have at least 2 dimension"),
    ((np.ones((4, 2), dtype=np.int8),), {}, TypeError, "floating"),
    ((np.array([[1.0, np.nan]]),), {}, ValueError, "x must be finite"),
    ((np.array([[1.0, 1e6]]),), {}, ValueError, "float16"),
])
def test_quantize_kv_group_rejects_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        quantize_kv_group(*args, **kwargs)


# --------------------------------------------------------------------------- the cache


def test_cache_groups_residual_and_bytes():
    rng = np.random.default_rng(4)
    c = QuantizedKVCache(1, "int4", group_size=4)
    chunks = [rng.normal(size=(2, 3, n, 8)).astype(np.float32) for n in (3, 1, 6, 1)]
    for i, k in enumerate(chunks):
        c.append(0, k, -k)
        t = sum(ch.shape[2] for ch in chunks[:i + 1])
        assert c.length(0) == t and c.keys(0).shape == (2, 3, t, 8)
        assert c.nbytes == kv_cache_bytes(t, 1, 3, 8, "int4", group_size=4, batch=2)
    allk = np.concatenate(chunks, axis=2)
    assert len(c._groups[0]) == 2
    # the residual (tokens 8..10) is float16; the groups are within their steps
    assert np.array_equal(c.keys(0)[:, :, 8:], allk[:, :, 8:].astype(np.float16).astype(np.float32))
    assert np.abs(c.keys(0) - allk).max() < 0.5
    f16 = QuantizedKVCache(1, "fp16")
    f16.append(0, allk, allk)
    assert f16.nbytes == kv_cache_bytes(11, 1, 3, 8, "fp16", batch=2) == 2 * 2 * 3 * 11 * 8 * 2


@pytest.mark.parametrize("dtype", ["int8", "e4m3", "int4", "int2"])
@pytest.mark.parametrize("key_axis, value_axis", [("channel", "token"), ("token", "token"),
                                                   ("token", "channel")])
def test_kv_cache_bytes_counts_what_the_cache_stores(dtype, key_axis, value_axis):
    rng = np.random.default_rng(5)
    c = QuantizedKVCache(2, dtype, key_axis=key_axis, value_axis=value_axis, group_size=8)
    for layer in range(2):
        k = rng.normal(size=(1, 2, 21, 4)).astype(np.float32)
        c.append(layer, k, k)
    assert c.nbytes == kv_cache_bytes(21, 2, 2, 4, dtype, key_axis=key_axis,
                                      value_axis=value_axis, group_size=8)


def test_bytes_per_token():
    assert kv_bytes_per_token(32, 32, 128, 16) == 524288  # a 7B-class model in float16
    assert kv_bytes_per_token(2, 4, 32, 4) == 256
    with pytest.raises(ValueError, match="bits"):
        kv_bytes_per_token(2, 4, 32, 0)
    with pytest.raises(TypeError, match="n_heads"):
        kv_bytes_per_token(2, 4.0, 32)


def test_cache_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dtype must be one of"):
        QuantizedKVCache(2, "int3")
    with pytest.raises(ValueError, match="key_axis"):
        QuantizedKVCache(2, key_axis="row")
    with pytest.raises(ValueError, match="group_size"):
        QuantizedKVCache(2, group_size=0)
    c = QuantizedKVCache(2)
    with pytest.raises(ValueError, match="layer must be < 2"):
        c.append(2, np.ones((1, 1, 1, 2)), np.ones((1, 1, 1, 2)))
    with pytest.raises(ValueError, match="same shape"):
        c.append(0, np.ones((1, 1, 1, 2)), np.ones((1, 1, 2, 2)))
    c.append(0, np.ones((1, 1, 1, 2)), np.ones((1, 1, 1, 2)))
    with pytest.raises(ValueError, match="but the cache holds"):
        c.append(0, np.ones((1, 2, 1, 2)), np.ones((1, 2, 1, 2)))
    with pytest.raises(ValueError, match="is empty"):
        c.keys(1)


# --------------------------------------------------------------------------- evaluation


def decode_loss(model, windows, cache_factory) -> float:
    """Bits per byte, decoding each window token by token through a cache (the slow truth)."""
    total = 0.0
    b, t = windows.shape
    cache = cache_factory()
    for i in range(t - 1):
        z = model.forward_cached(windows[:, i:i + 1], cache)[:, 0].astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        total += float(np.sum(np.log(np.exp(z).sum(-1)) - z[np.arange(b), windows[:, i + 1]]))
    return total / (b * (t - 1)) / math.log(2)


@pytest.mark.parametrize("dtype, key_axis, value_axis", [
    ("int4", "channel", "token"), ("int2", "token", "channel"), ("e4m3", "channel", "channel"),
    ("int8", "token", "token"), ("fp16", "token", "token")])
def test_fast_evaluation_equals_token_by_token_decoding(dtype, key_axis, value_axis):
    model = tiny_model(1)
    windows = np.random.default_rng(6).integers(0, 256, size=(3, 20))
    fast = evaluate_kv_cache(model, windows, dtype, key_axis=key_axis, value_axis=value_axis,
                             group_size=4).bits_per_byte
    slow = decode_loss(model, windows, lambda: QuantizedKVCache(
        2, dtype, key_axis=key_axis, value_axis=value_axis, group_size=4))
    assert math.isclose(fast, slow, rel_tol=1e-6)
    exact = decode_loss(model, windows, lambda: KVCache(2))
    assert math.isclose(exact, evaluate_lm(model, windows).bits_per_byte, rel_tol=1e-6)
    if dtype in ("int4", "int2"):
        assert not math.isclose(fast, exact, rel_tol=1e-6), "quantization must show"


def test_fast_evaluation_notices_a_wrong_group_boundary():
    """The equality above is a real check: quantizing one token too early changes the loss."""
    model = tiny_model(2)
    windows = np.random.default_rng(7).integers(0, 256, size=(2, 20))
    right = evaluate_kv_cache(model, windows, "int2", group_size=4).bits_per_byte
    slow_shifted = decode_loss(model, windows, lambda: QuantizedKVCache(2, "int2", group_size=5))
    assert not math.isclose(right, slow_shifted, rel_tol=1e-6)


def test_on_the_trained_model_int8_is_close_and_two_bits_costs_more():
    model = load_lm().model
    w = lm_windows(load_pydoc_text("heldout")[:4097], 128)
    f = evaluate_lm(model, w).bits_per_byte
    i8 = evaluate_kv_cache(model, w, "int8").bits_per_byte
    i2 = evaluate_kv_cache(model, w, "int2").bits_per_byte
    assert abs(i8 - f) < 0.01 < i2 - f
    text = generate(model, b"The ", 30, cache=QuantizedKVCache(2, "int8"))
    assert len(text) == 30


def test_evaluate_kv_cache_rejects_bad_arguments():
    model = tiny_model()
    w = np.zeros((1, 5), dtype=np.int64)
    with pytest.raises(ValueError, match="dtype must be one of"):
        evaluate_kv_cache(model, w, "int5")
    with pytest.raises(ValueError, match="value_axis"):
        evaluate_kv_cache(model, w, value_axis="both")
    with pytest.raises(TypeError, match="TransformerLM"):
        evaluate_kv_cache(None, w)
    with pytest.raises(TypeError, match="group must be a qcourse.kv_cache.KVGroup"):
        dequantize_kv_group(np.zeros(3))
    assert isinstance(quantize_kv_group(np.ones((2, 2), dtype=np.float32)), KVGroup)
