"""Tests for qcourse.int_matmul: units, Hypothesis properties and oracles.

Oracles:

* ONNX Runtime's CPU kernels ``QLinearMatMul``, ``MatMulInteger`` and ``QLinearConv`` (a 1 x 1
  convolution is a linear layer with an int32 bias), bit for bit, on random inputs and on inputs
  built to land exactly on the roundings that tell one implementation from another;
* the ONNX specification's own examples, read from the ``onnx`` package's backend test cases
  (``onnx/backend/test/case/node/qlinearmatmul.py`` and ``matmulinteger.py``) and also hard-coded;
* TensorFlow Lite's reference integer arithmetic (``MultiplyByQuantizedMultiplier`` in
  ``tensorflow/lite/kernels/internal/common.cc``, gemmlowp's ``SaturatingRoundingDoublingHighMul``
  and ``RoundingDivideByPOT`` in ``fixedpoint/fixedpoint.h``, the loop of
  ``reference/integer_ops/fully_connected.h``), re-implemented below with Python integers the way
  the C++ does it (masks, nudges, truncating division), independently of qcourse.fixed_point;
* PyTorch's quantized linear (``torch.ops.quantized.linear``) on its CPU engines.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcourse.affine import QParams, qparams_from_range, quantize
from qcourse.fixed_point import quantize_multiplier
from qcourse.int_matmul import (
    ACTIVATIONS,
    REQUANTIZATIONS,
    QuantizedLinear,
    activation_range,
    float_multiplier,
    fold_zero_points,
    linear_float,
    matmul_integer,
    matmul_integer_reference,
    qlinear_matmul,
    qlinear_matmul_reference,
    quantize_bias,
    requantization_disagreements,
    requantize_fixed_point,
    requantize_float,
    zero_point_terms,
)

F32 = np.float32
U8, S8 = np.uint8, np.int8


def _rand_q(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, size=shape).astype(dtype)


# ------------------------------------------------------------------------------------------------
# ONNX Runtime harness
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort_run():
    """Run one ONNX node on ONNX Runtime's CPU; inputs whose index is in ``const`` are constants."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (oracle tests)")
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (oracle tests)")
    from onnx import TensorProto, helper, numpy_helper

    types = {np.dtype(U8): TensorProto.UINT8, np.dtype(S8): TensorProto.INT8,
             np.dtype(F32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
             np.dtype(np.int32): TensorProto.INT32}
    assert onnx.__version__

    def run(op, inputs, out_dtype, *, opset=21, const=()):
        names = [f"in{i}" for i in range(len(inputs))]
        graph_inputs, inits, feed = [], [], {}
        for i, (name, value) in enumerate(zip(names, inputs, strict=True)):
            value = np.asarray(value)
            if i in const:
                inits.append(numpy_helper.from_array(value, name))
            else:
                graph_inputs.append(helper.make_tensor_value_info(name, types[value.dtype],
                                                                  list(value.shape)))
                feed[name] = value
        node = helper.make_node(op, names, ["y"])
        out = helper.make_tensor_value_info("y", types[np.dtype(out_dtype)], None)
        graph = helper.make_graph([node], op, graph_inputs, [out], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 10
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return session.run(None, feed)[0]

    return run


# The type combinations ONNX Runtime 1.32 implements for QLinearMatMul (a, b -> y); MatMulInteger
# takes all four.
ORT_QLINEAR_TYPES = [(U8, U8), (U8, S8), (S8, S8)]
ALL_TYPES = [(U8, U8), (U8, S8), (S8, U8), (S8, S8)]


def _qlinear_case(rng, ta, tb, *, shape_a, shape_b, per_column, f16=False):
    a = _rand_q(rng, ta, shape_a)
    b = _rand_q(rng, tb, shape_b)
    n = shape_b[-1] if len(shape_b) > 1 else 1
    sdt = np.float16 if f16 else F32
    a_scale = sdt(np.exp(rng.uniform(-6, 0)))
    y_scale = sdt(np.exp(rng.uniform(-3, 1)))
    if per_column:
        b_scale = np.exp(rng.uniform(-7, -2, n)).astype(sdt)
        b_zp = _rand_q(rng, tb, (n,))
        if len(shape_b) > 2:
            b_scale = np.broadcast_to(b_scale, shape_b[:-2] + (1, n)).copy()
            b_zp = np.broadcast_to(b_zp, shape_b[:-2] + (1, n)).copy()
    else:
        b_scale = sdt(np.exp(rng.uniform(-7, -2)))
        b_zp = _rand_q(rng, tb, ())[()]
    a_zp = _rand_q(rng, ta, ())[()]
    y_zp = _rand_q(rng, ta, ())[()]
    return [a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp]


# ------------------------------------------------------------------------------------------------
# QLinearMatMul and MatMulInteger against ONNX Runtime: random inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ta, tb", ORT_QLINEAR_TYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("per_column", [False, True], ids=["per_tensor", "per_column"])
def test_qlinear_matmul_matches_onnxruntime_random(ort_run, ta, tb, per_column):
    rng = np.random.default_rng(100 + 2 * ORT_QLINEAR_TYPES.index((ta, tb)) + per_column)
    shapes = [((5, 17), (17, 9)), ((1, 1), (1, 1)), ((3, 64), (64, 70)), ((2, 3, 40), (40, 6)),
              ((2, 4, 8), (2, 8, 5)), ((12,), (12, 7)), ((6, 12), (12,))]
    compared = 0
    for trial in range(24):
        shape_a, shape_b = shapes[trial % len(shapes)]
        if per_column and len(shape_b) == 1:
            continue
        inputs = _qlinear_case(rng, ta, tb, shape_a=shape_a, shape_b=shape_b,
                               per_column=per_column, f16=trial % 5 == 4)
        want = ort_run("QLinearMatMul", inputs, ta)
        got = qlinear_matmul(*inputs)
        ref = qlinear_matmul_reference(*inputs)
        assert got.dtype == want.dtype == ref.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ref, want)
        compared += want.size
    assert compared > 500


@pytest.mark.parametrize("ta, tb", ALL_TYPES, ids=lambda t: np.dtype(t).name)
def test_matmul_integer_matches_onnxruntime_random(ort_run, ta, tb):
    rng = np.random.default_rng(200 + ALL_TYPES.index((ta, tb)))
    for trial, (shape_a, shape_b) in enumerate([((4, 9), (9, 6)), ((2, 3, 33), (33, 8)),
                                                ((3, 2, 5), (3, 5, 4)), ((7,), (7, 3)),
                                                ((4, 7), (7,)), ((1, 300), (300, 2))]):
        a, b = _rand_q(rng, ta, shape_a), _rand_q(rng, tb, shape_b)
        variants = [(), (_rand_q(rng, ta, ())[()], _rand_q(rng, tb, ())[()])]
        if len(shape_b) == 2:
            variants.append((_rand_q(rng, ta, (1,)), _rand_q(rng, tb, (shape_b[1],))))
        for zps in variants:
            want = ort_run("MatMulInteger", [a, b, *zps], np.int32, opset=10)
            np.testing.assert_array_equal(matmul_integer(a, b, *zps), want, err_msg=str(trial))
            np.testing.assert_array_equal(matmul_integer_reference(a, b, *zps), want)


def test_matmul_integer_wraps_like_onnxruntime_when_asked(ort_run):
    k = 34_000  # 255 * 255 * 34000 > 2**31 - 1
    a = np.full((1, k), 255, U8)
    b = np.full((k, 2), 255, U8)
    want = ort_run("MatMulInteger", [a, b], np.int32, opset=10)
    expected = (255 * 255 * k + 2**31) % 2**32 - 2**31
    assert want.tolist() == [[expected, expected]]
    np.testing.assert_array_equal(matmul_integer(a, b, overflow="wrap"), want)
    np.testing.assert_array_equal(matmul_integer_reference(a, b, overflow="wrap"), want)
    with pytest.raises(ValueError, match="overflows the int32 accumulator"):
        matmul_integer(a, b)
    ins = [a, F32(1), U8(0), b, F32(1), U8(0), F32(2.0**40), U8(0)]
    want_q = ort_run("QLinearMatMul", ins, U8)
    np.testing.assert_array_equal(qlinear_matmul(*ins, overflow="wrap"), want_q)
    with pytest.raises(ValueError, match="overflows the int32 accumulator"):
        qlinear_matmul(*ins)


# ------------------------------------------------------------------------------------------------
# QLinearMatMul against ONNX Runtime: inputs built to decide each rounding
# ------------------------------------------------------------------------------------------------


def _columns_for(accs, *, big=False):
    """A (1, K) uint8 row and an int8 (K, N) matrix whose product is exactly ``accs``.

    With ``big``, the row holds 255s (and two 1s) so that sums beyond 2**24 are reachable.
    """
    accs = [int(v) for v in accs]
    cols = []
    for t in accs:
        if big:
            s, r = divmod(abs(t), 255)
            q, rem = divmod(s, 127)
            col = [127] * q + [rem]
            sign = 1 if t >= 0 else -1
            cols.append(([sign * c for c in col], [sign * min(r, 127), sign * (r - min(r, 127))]))
        else:
            q, rem = divmod(abs(t), 127)
            sign = 1 if t >= 0 else -1
            cols.append(([sign * c for c in [127] * q + [rem]], []))
    k_main = max(len(c[0]) for c in cols)
    tail = 2 if big else 0
    b = np.zeros((k_main + tail, len(accs)), np.int64)
    for j, (main, extra) in enumerate(cols):
        b[:len(main), j] = main
        if extra:
            b[k_main:, j] = extra
    row = np.array([[255 if big else 1] * k_main + [1] * tail], U8)
    assert (row.astype(np.int64) @ b)[0].tolist() == accs
    return row, b.astype(S8)


def _rne(v):
    return np.rint(v)


def _multiplier_order_cases(n_cases=60, seed=7):
    """Scales for which the three natural float32 orders give different multipliers, and for each
    an accumulator that the multipliers round to different outputs."""
    rng = np.random.default_rng(seed)
    sa, sy = F32(0.0123), F32(0.0777)
    accs = np.arange(-30_000, 30_001)
    accs = accs[accs != 0].astype(F32)
    out = []
    while len(out) < n_cases:
        sb = F32(np.exp(rng.uniform(-6, -1)))
        ms = {"(sa*sb)/sy": (sa * sb) / sy, "sa*(sb/sy)": sa * (sb / sy),
              "double": F32(np.float64(sa) * np.float64(sb) / np.float64(sy))}
        if len({float(m) for m in ms.values()}) == 1:
            continue
        preds = np.stack([_rne(accs * m) for m in ms.values()])
        ok = (np.abs(preds).max(axis=0) <= 127) & (preds.min(axis=0) != preds.max(axis=0))
        hits = np.flatnonzero(ok)
        if hits.size:
            i = hits[rng.integers(hits.size)]
            out.append((sb, int(accs[i]), {k: int(p[i]) for k, p in zip(ms, preds, strict=True)}))
    return sa, sy, out


def test_onnxruntime_multiplier_is_float32_product_then_division(ort_run):
    sa, sy, cases = _multiplier_order_cases()
    row, b = _columns_for([c[1] for c in cases])
    sb = np.array([c[0] for c in cases], F32)
    ins = [row, sa, U8(0), b, sb, np.zeros(len(cases), S8), sy, U8(128)]
    y_ort = ort_run("QLinearMatMul", ins, U8)[0].astype(int) - 128
    # the cases tell the three orders apart, and ONNX Runtime takes the first
    for order in ("(sa*sb)/sy", "sa*(sb/sy)", "double"):
        pred = np.array([c[2][order] for c in cases])
        mismatches = int(np.sum(pred != y_ort))
        if order == "(sa*sb)/sy":
            assert mismatches == 0
        else:
            assert mismatches > 0, f"the cases do not separate {order}"
    np.testing.assert_array_equal(qlinear_matmul(*ins), y_ort[None] + 128)
    np.testing.assert_array_equal(qlinear_matmul_reference(*ins), y_ort[None] + 128)
    assert float_multiplier(sa, sb, sy).tolist() == ((sa * sb) / sy).tolist()


def test_onnxruntime_rounds_ties_to_even(ort_run):
    # multiplier 0.5 exactly: odd accumulators land on ties
    a = np.array([[1]], U8)
    b = np.arange(256, dtype=np.int64).astype(U8)[None, :]
    ins = [a, F32(0.5), U8(0), b, F32(1.0), U8(128), F32(1.0), U8(128)]
    y = ort_run("QLinearMatMul", ins, U8)[0].astype(int)
    acc = np.arange(256) - 128
    np.testing.assert_array_equal(y, np.clip(np.rint(acc * 0.5) + 128, 0, 255))
    half_away = np.clip(np.sign(acc) * np.floor(np.abs(acc) * 0.5 + 0.5) + 128, 0, 255)
    assert np.any(y != half_away)  # ties do not go away from zero
    np.testing.assert_array_equal(qlinear_matmul(*ins)[0], y)
    np.testing.assert_array_equal(qlinear_matmul_reference(*ins)[0], y)


def test_onnxruntime_rounds_the_float32_product(ort_run):
    # accumulators whose exact product with m is just off a tie but whose float32 product is on it
    rng = np.random.default_rng(3)
    sa, sy = F32(0.0123), F32(0.0777)
    accs = np.arange(-60_000, 60_001)
    accs = accs[accs != 0]
    cases = []
    while len(cases) < 80:
        sb = F32(np.exp(rng.uniform(-6, -1)))
        m = (sa * sb) / sy
        p32 = _rne(accs.astype(F32) * m)
        p64 = _rne(accs * np.float64(m))
        hits = np.flatnonzero((p32 != p64) & (np.abs(p32) <= 127))
        if hits.size:
            i = hits[rng.integers(hits.size)]
            cases.append((sb, int(accs[i]), int(p32[i])))
    row, b = _columns_for([c[1] for c in cases])
    ins = [row, sa, U8(0), b, np.array([c[0] for c in cases], F32), np.zeros(len(cases), S8), sy,
           U8(128)]
    y = ort_run("QLinearMatMul", ins, U8)[0].astype(int) - 128
    np.testing.assert_array_equal(y, [c[2] for c in cases])
    np.testing.assert_array_equal(qlinear_matmul(*ins)[0].astype(int) - 128, y)


def test_onnxruntime_converts_large_accumulators_to_float32_first(ort_run):
    accs, mults, f32_first, exact = [], [], [], []
    for acc in (2**24 + 1, 2**24 + 3, -(2**24 + 1), 2**25 + 2, 2**25 + 6, 3 * 2**23 + 1):
        for n in (3, 50, 77, 121):
            m = F32((n + 0.5) / abs(float(F32(acc))))
            accs.append(acc)
            mults.append(m)
            f32_first.append(int(_rne(F32(acc) * m)))
            exact.append(int(_rne(acc * np.float64(m))))
    assert f32_first != exact
    row, b = _columns_for(accs, big=True)
    ins = [row, F32(1.0), U8(0), b, np.array(mults, F32), np.zeros(len(accs), S8), F32(1.0),
           U8(128)]
    y = ort_run("QLinearMatMul", ins, U8)[0].astype(int) - 128
    assert y.tolist() == f32_first
    np.testing.assert_array_equal(qlinear_matmul(*ins)[0].astype(int) - 128, y)
    np.testing.assert_array_equal(qlinear_matmul_reference(*ins)[0].astype(int) - 128, y)


@pytest.mark.parametrize("ta, tb", ORT_QLINEAR_TYPES, ids=lambda t: np.dtype(t).name)
def test_qlinear_matmul_ties_with_zero_points_and_saturation(ort_run, ta, tb):
    # exact ties everywhere: multiplier 0.25 or 0.5, all zero points nonzero, outputs saturating
    rng = np.random.default_rng(31)
    for sa, sb, sy in ((0.5, 0.5, 1.0), (1.0, 0.5, 1.0), (0.25, 1.0, 0.5)):
        a, b = _rand_q(rng, ta, (6, 3)), _rand_q(rng, tb, (3, 10))
        zb = _rand_q(rng, tb, (10,))
        ins = [a, F32(sa), _rand_q(rng, ta, ())[()], b, np.full(10, sb, F32), zb, F32(sy),
               _rand_q(rng, ta, ())[()]]
        want = ort_run("QLinearMatMul", ins, ta)
        np.testing.assert_array_equal(qlinear_matmul(*ins), want)
        np.testing.assert_array_equal(qlinear_matmul_reference(*ins), want)


# ------------------------------------------------------------------------------------------------
# The ONNX specification's examples
# ------------------------------------------------------------------------------------------------


def _spec_cases(monkeypatch):
    pytest.importorskip("onnx", reason="onnx is not installed: its backend cases are the oracle")
    import onnx.backend.test.case.node.matmulinteger as mmi_case
    import onnx.backend.test.case.node.qlinearmatmul as qlmm_case

    recorded = []

    def record(node, inputs, outputs, name, **kwargs):
        recorded.append((node.op_type, name, inputs, outputs))

    monkeypatch.setattr(qlmm_case, "expect", record)
    monkeypatch.setattr(mmi_case, "expect", record)
    qlmm_case.QLinearMatMul.export_int()
    mmi_case.MatMulInteger.export()
    return recorded


def test_onnx_specification_examples(monkeypatch):
    cases = _spec_cases(monkeypatch)
    names = {c[1] for c in cases}
    assert {"test_qlinearmatmul_2D_uint8_float32", "test_qlinearmatmul_3D_int8_float16",
            "test_matmulinteger"} <= names
    for op, name, inputs, outputs in cases:
        fns = ((qlinear_matmul, qlinear_matmul_reference) if op == "QLinearMatMul"
               else (matmul_integer, matmul_integer_reference))
        for fn in fns:
            got = fn(*inputs)
            assert got.dtype == outputs[0].dtype, name
            np.testing.assert_array_equal(got, outputs[0], err_msg=f"{name} ({fn.__name__})")
    assert len(cases) == 9


def test_onnx_specification_examples_hard_coded():
    # QLinearMatMul, 2-D uint8 example of the operator's documentation
    a = np.array([[208, 236, 0, 238], [3, 214, 255, 29]], U8)
    b = np.array([[152, 51, 244], [60, 26, 255], [0, 127, 246], [127, 254, 247]], U8)
    y = qlinear_matmul(a, np.array([0.0066], F32), np.array([113], U8), b,
                       np.array([0.00705], F32), np.array([114], U8), np.array([0.0107], F32),
                       np.array([118], U8))
    assert y.dtype == U8 and y.tolist() == [[168, 115, 255], [1, 66, 151]]
    # MatMulInteger example
    A = np.array([[11, 7, 3], [10, 6, 2], [9, 5, 1], [8, 4, 0]], U8)
    B = np.array([[1, 4], [2, 5], [3, 6]], U8)
    Y = matmul_integer(A, B, np.array([12], U8), np.array([0], U8))
    assert Y.dtype == np.int32
    assert Y.tolist() == [[-38, -83], [-44, -98], [-50, -113], [-56, -128]]


# ------------------------------------------------------------------------------------------------
# Kernel route == NumPy route (property tests)
# ------------------------------------------------------------------------------------------------


@st.composite
def _qlinear_inputs(draw):
    ta = draw(st.sampled_from([U8, S8]))
    tb = draw(st.sampled_from([U8, S8]))
    ty = draw(st.sampled_from([U8, S8]))
    m = draw(st.integers(1, 6))
    k = draw(st.integers(1, 80))
    n = draw(st.integers(1, 70))
    batch = draw(st.sampled_from([(), (2,)]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    per_column = draw(st.booleans())
    a = _rand_q(rng, ta, batch + (m, k))
    b = _rand_q(rng, tb, (k, n))
    sb = (np.exp(rng.uniform(-8, 0, n)).astype(F32) if per_column
          else F32(np.exp(rng.uniform(-8, 0))))
    zb = _rand_q(rng, tb, (n,)) if per_column else _rand_q(rng, tb, ())[()]
    return [a, F32(np.exp(rng.uniform(-6, 0))), _rand_q(rng, ta, ())[()], b, sb, zb,
            F32(np.exp(rng.uniform(-4, 2))), _rand_q(rng, ty, ())[()]]


@settings(max_examples=60)
@given(_qlinear_inputs())
def test_qlinear_matmul_kernel_equals_reference(inputs):
    np.testing.assert_array_equal(qlinear_matmul(*inputs), qlinear_matmul_reference(*inputs))


@settings(max_examples=60)
@given(st.sampled_from(ALL_TYPES), st.integers(1, 5), st.integers(1, 90), st.integers(1, 40),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_matmul_integer_kernel_equals_reference(types, m, k, n, per_column, seed):
    ta, tb = types
    rng = np.random.default_rng(seed)
    a, b = _rand_q(rng, ta, (m, k)), _rand_q(rng, tb, (k, n))
    za = _rand_q(rng, ta, (m,))  # per row: the specification allows it
    zb = _rand_q(rng, tb, (n,)) if per_column else _rand_q(rng, tb, ())[()]
    np.testing.assert_array_equal(matmul_integer(a, b, za, zb),
                                  matmul_integer_reference(a, b, za, zb))
    exact = (a.astype(np.int64) - za[:, None]) @ (b.astype(np.int64) - zb)
    np.testing.assert_array_equal(matmul_integer(a, b, za, zb), exact)


def test_per_row_a_parameters_follow_the_specification():
    rng = np.random.default_rng(4)
    a, b = _rand_q(rng, U8, (3, 5)), _rand_q(rng, S8, (5, 4))
    sa = np.array([0.01, 0.02, 0.03], F32)
    za = np.array([3, 100, 200], U8)
    y = qlinear_matmul(a, sa, za, b, F32(0.05), S8(0), F32(0.1), U8(7))
    for i in range(3):  # row by row, each row its own per-tensor problem
        yi = qlinear_matmul(a[i:i + 1], sa[i], za[i], b, F32(0.05), S8(0), F32(0.1), U8(7))
        np.testing.assert_array_equal(y[i:i + 1], yi)


# ------------------------------------------------------------------------------------------------
# Requantization: the float convention
# ------------------------------------------------------------------------------------------------


def test_requantize_float_rounds_half_to_even_in_float32():
    acc = np.arange(-9, 10)
    y = requantize_float(acc, 0.5, 0, -128, 127)
    assert y.dtype == np.int8
    assert y.tolist() == np.rint(acc / 2).astype(int).tolist()
    assert requantize_float([5, -5, 7], 0.5, 10, 0, 255).tolist() == [12, 8, 14]
    # zero point and clamp, fused ReLU (qmin = zero point)
    assert requantize_float([-300, -3, 3, 300], 1.0, 5, 5, 127).tolist() == [5, 5, 8, 127]
    # the multiplier is rounded to float32 before use
    m64 = 0.1 + 1e-12
    np.testing.assert_array_equal(requantize_float(np.arange(-999, 999), m64, 0, -128, 127),
                                  requantize_float(np.arange(-999, 999), F32(m64), 0, -128, 127))


@settings(max_examples=60)
@given(st.floats(1e-6, 4.0, allow_nan=False), st.integers(-128, 127), st.integers(0, 2**32 - 1))
def test_requantize_float_is_monotone_and_within_half_a_step(m, zp, seed):
    rng = np.random.default_rng(seed)
    acc = np.sort(rng.integers(-(2**20), 2**20, 200))
    y = requantize_float(acc, m, zp, -128, 127).astype(np.int64)
    assert np.all(np.diff(y) >= 0)
    mv = acc * np.float64(F32(m))
    exact = mv + zp
    inside = (exact > -127.5) & (exact < 126.5)
    # half a step, plus the float32 product's rounding (half a float32 ulp of m v)
    slack = np.abs(mv) * 2.0**-24
    assert np.all(np.abs(y[inside] - exact[inside]) <= 0.5 + slack[inside])


def test_float_multiplier_and_validation():
    m = float_multiplier(F32(0.02), np.array([0.01, 0.03], F32), F32(0.05))
    assert m.dtype == np.float32
    assert m.tolist() == ((F32(0.02) * np.array([0.01, 0.03], F32)) / F32(0.05)).tolist()
    with pytest.raises(ValueError, match="finite and > 0"):
        float_multiplier(0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="overflows or underflows"):
        float_multiplier(1e-30, 1e-30, 1.0)


# ------------------------------------------------------------------------------------------------
# Requantization: TFLite's fixed-point convention against a re-implementation of its C++
# ------------------------------------------------------------------------------------------------


def _tfl_srdhm(a: int, b: int) -> int:
    """gemmlowp SaturatingRoundingDoublingHighMul, literally (nudge, then C++ division)."""
    if a == b == -(2**31):
        return 2**31 - 1
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    num = ab + nudge
    q = abs(num) // (1 << 31)
    return q if num >= 0 else -q  # C++ integer division truncates toward zero


def _tfl_rdbpot(x: int, exponent: int) -> int:
    """gemmlowp RoundingDivideByPOT, literally (mask, remainder, threshold)."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def _tfl_mbqm(x: int, multiplier: int, shift: int, rounding: str) -> int:
    """TFLite MultiplyByQuantizedMultiplier (tensorflow/lite/kernels/internal/common.cc)."""
    if rounding == "double":
        left = shift if shift > 0 else 0
        right = 0 if shift > 0 else -shift
        return _tfl_rdbpot(_tfl_srdhm(x * (1 << left), multiplier), right)
    total = 31 - shift
    return (x * multiplier + (1 << (total - 1))) >> total


def _tfl_requant(acc, multiplier, shift, zp, lo, hi, rounding):
    out = []
    for v, m, s in np.broadcast(np.asarray(acc), np.asarray(multiplier), np.asarray(shift)):
        r = _tfl_mbqm(int(v), int(m), int(s), rounding) + zp
        out.append(min(max(r, lo), hi))
    return np.array(out).reshape(np.broadcast(np.asarray(acc), np.asarray(multiplier)).shape)


@pytest.mark.parametrize("rounding", ["double", "single"])
def test_requantize_fixed_point_matches_tflite_random(rounding):
    rng = np.random.default_rng(51 if rounding == "double" else 52)
    for _ in range(40):
        real = float(np.exp(rng.uniform(np.log(1e-6), np.log(0.9))))
        mult, shift = quantize_multiplier(real, rounding=rounding)
        acc = rng.integers(-(2**24), 2**24, 300)
        zp = int(rng.integers(-128, 128))
        got = requantize_fixed_point(acc, mult, shift, zp, -128, 127, rounding=rounding)
        np.testing.assert_array_equal(got, _tfl_requant(acc, mult, shift, zp, -128, 127, rounding))


@pytest.mark.parametrize("rounding", ["double", "single"])
def test_requantize_fixed_point_matches_tflite_on_ties(rounding):
    # M = 2**30 * 2**(shift - 31): every accumulator in the range is a tie or next to one
    for shift in (-1, -2, -3, -5):
        acc = np.arange(-200, 201)
        got = requantize_fixed_point(acc, 2**30, shift, 3, -128, 127, rounding=rounding)
        want = _tfl_requant(acc, 2**30, shift, 3, -128, 127, rounding)
        np.testing.assert_array_equal(got, want)
    # per channel, multipliers that put many products on halves
    acc = np.arange(-3000, 3001).reshape(-1, 1)
    mult = np.array([2**30, 2**30 + 2**20, 3 * 2**29, 2**31 - 2**21])
    shift = np.array([-4, -6, -7, -9])
    got = requantize_fixed_point(acc, mult, shift, -7, -128, 127, rounding=rounding)
    np.testing.assert_array_equal(got, _tfl_requant(acc, mult, shift, -7, -128, 127, rounding))


def test_tflite_builds_disagree_on_some_ties():
    acc = np.arange(-5000, 5001)
    mult, shift = 3 * 2**29, -6   # M = 0.75 * 2**-6
    d = requantize_fixed_point(acc, mult, shift, 0, -128, 127, rounding="double")
    s = requantize_fixed_point(acc, mult, shift, 0, -128, 127, rounding="single")
    diff = d.astype(int) - s.astype(int)
    assert np.any(diff != 0) and np.all(np.abs(diff) <= 1)


def test_seed_worked_example_m_001():
    # EE-508 slides: M = 0.01 = 0.64 * 2**-6, M0 * 2**31 stored as an integer, 1234 * M = 12.34
    mult, shift = quantize_multiplier(0.01)
    assert shift == -6 and mult == 1374389535   # round(0.64 * 2**31); the slides truncate (...534)
    for rounding in ("double", "single"):
        assert requantize_fixed_point([1234], mult, shift, 0, -128, 127,
                                      rounding=rounding).tolist() == [12]
    assert requantize_float([1234], 0.01, 0, -128, 127).tolist() == [12]


# ------------------------------------------------------------------------------------------------
# The derivation: zero-point terms, folding, bias
# ------------------------------------------------------------------------------------------------


@settings(max_examples=50)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 9), st.integers(-128, 255),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_zero_point_terms_add_up(batch, k, out, zx, per_channel, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (batch, k))
    w = rng.integers(-128, 128, (out, k))
    zw = rng.integers(-128, 128, out) if per_channel else int(rng.integers(-128, 128))
    bias = rng.integers(-(2**20), 2**20, out).astype(np.int32)
    terms = zero_point_terms(x, w, zx, zw)
    direct = (x - zx) @ (w - np.broadcast_to(zw, (out,))[:, None]).T
    np.testing.assert_array_equal(sum(terms.values()), direct)
    folded = fold_zero_points(w, zx, zw, bias)
    np.testing.assert_array_equal(terms["xw"] + terms["x_rowsum"] + folded, direct + bias)
    if not per_channel and zw == 0:
        assert not terms["x_rowsum"].any()


def test_quantize_bias():
    q = quantize_bias([0.5, -0.25, 1e-3], 0.1, np.array([0.01, 0.02, 0.001]))
    assert q.dtype == np.int32 and q.tolist() == [500, -125, 10]
    assert quantize_bias([0.0025, 0.0075], 0.1, 0.01).tolist() == [2, 8]   # ties to even
    with pytest.raises(ValueError, match="does not fit int32"):
        quantize_bias([1.0], 1e-6, 1e-6)
    with pytest.raises(ValueError, match="finite"):
        quantize_bias([np.nan], 0.1, 0.1)
    with pytest.raises(ValueError, match="input_scale must be finite and > 0"):
        quantize_bias([1.0], -0.1, 0.1)


def test_activation_range():
    qp = QParams(scale=6 / 255, zero_point=-128, qmin=-128, qmax=127)
    assert activation_range("none", qp) == (-128, 127)
    assert activation_range("relu", qp) == (-128, 127)
    assert activation_range("relu6", qp) == (-128, 127)
    qp = QParams(scale=0.05, zero_point=10, qmin=-128, qmax=127)
    assert activation_range("relu", qp) == (10, 127)
    assert activation_range("relu6", qp) == (10, 127)   # 10 + 120 saturates
    qp = QParams(scale=0.1, zero_point=3, qmin=0, qmax=255)
    assert activation_range("relu6", qp) == (3, 63)
    # 6 / 12 = 0.5 exactly: TFLite's TfLiteRound goes away from zero (half to even would give 0)
    assert activation_range("relu6", QParams(scale=12.0, zero_point=0, qmin=-128, qmax=127)) == (
        0, 1)
    with pytest.raises(ValueError, match="activation must be one of"):
        activation_range("gelu", qp)


# ------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------


def _layer(seed, *, in_f=37, out_f=11, per_channel=True, symmetric=True, activation="none",
           unsigned_input=False, bias=True):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.2, (out_f, in_f))
    b = rng.normal(0, 0.5, out_f) if bias else None
    x = rng.normal(0.3, 1.0, (64, in_f))
    xqp = qparams_from_range(x.min(), x.max(), signed=not unsigned_input)
    y = linear_float(x, w, b)
    yqp = qparams_from_range(y.min(), y.max(), signed=True)
    layer = QuantizedLinear.from_float(w, b, xqp, yqp, per_channel=per_channel,
                                       symmetric=symmetric, activation=activation)
    return layer, x, w, b


LAYER_VARIANTS = [
    dict(per_channel=True, symmetric=True),
    dict(per_channel=False, symmetric=True),
    dict(per_channel=True, symmetric=False),
    dict(per_channel=False, symmetric=False, unsigned_input=True),
    dict(per_channel=True, symmetric=True, activation="relu", unsigned_input=True),
    dict(per_channel=True, symmetric=False, activation="relu6"),
    dict(per_channel=False, symmetric=True, bias=False),
]


def _variant_id(v):
    return "-".join(f"{k}={v[k]}" for k in v)


@pytest.mark.parametrize("variant", LAYER_VARIANTS, ids=_variant_id)
def test_layer_kernel_equals_reference_and_accumulator_is_exact(variant):
    layer, x, w, b = _layer(61, **variant)
    x_q = quantize(x, layer.input_qparams)
    acc = layer.accumulate(x_q)
    zx = int(layer.input_qparams.zero_point)
    direct = (x_q.astype(np.int64) - zx) @ (layer.weight_q.astype(np.int64)
                                           - layer.weight_zero_point[:, None]).T + layer.bias_q
    np.testing.assert_array_equal(acc, direct)
    np.testing.assert_array_equal(layer(x_q), layer.reference(x_q))
    for req in REQUANTIZATIONS:
        y = layer(x_q, req)
        assert y.dtype == np.int8
        lo, hi = layer.output_range
        assert y.min() >= lo and y.max() <= hi


def test_layer_float_requant_is_requantize_float_of_the_accumulator():
    layer, x, _, _ = _layer(62)
    x_q = quantize(x, layer.input_qparams)
    m = float_multiplier(layer.input_qparams.scale, layer.weight_qparams.scale,
                         layer.output_qparams.scale)
    want = requantize_float(layer.accumulate(x_q), m, int(layer.output_qparams.zero_point),
                            -128, 127)
    np.testing.assert_array_equal(layer(x_q), want)


def _tflite_fully_connected(x_q, w_q, bias_q, zx, zw, zy, mult, shift, lo, hi, rounding):
    """reference_integer_ops::FullyConnected(PerChannel), loop for loop, in Python integers."""
    batch, depth = x_q.shape
    out = np.zeros((batch, w_q.shape[0]), np.int64)
    for i in range(batch):
        for j in range(w_q.shape[0]):
            acc = 0
            for d in range(depth):
                acc += (int(w_q[j, d]) - int(zw[j])) * (int(x_q[i, d]) - zx)
            acc += int(bias_q[j])
            acc = _tfl_mbqm(acc, int(mult[j]), int(shift[j]), rounding) + zy
            out[i, j] = min(max(acc, lo), hi)
    return out


@pytest.mark.parametrize("rounding", ["double", "single"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_layer_tflite_requantization_matches_tflite_loop(rounding, per_channel):
    layer, x, _, _ = _layer(63, in_f=20, out_f=6, per_channel=per_channel, activation="relu6")
    x_q = quantize(x[:12], layer.input_qparams)
    mult, shift = layer.fixed_point_params(rounding)
    lo, hi = layer.output_range
    want = _tflite_fully_connected(x_q, layer.weight_q, layer.bias_q,
                                   int(layer.input_qparams.zero_point), layer.weight_zero_point,
                                   int(layer.output_qparams.zero_point),
                                   np.broadcast_to(mult, (6,)), np.broadcast_to(shift, (6,)),
                                   lo, hi, rounding)
    np.testing.assert_array_equal(layer(x_q, f"tflite_{rounding}"), want)


def test_layer_fixed_point_multiplier_follows_tflite_preparation():
    layer, _, _, _ = _layer(64, per_channel=False)
    sx, sw, sy = (F32(q.scale) for q in (layer.input_qparams, layer.weight_qparams,
                                         layer.output_qparams))
    real = np.float64(sx * sw) / np.float64(sy)    # float product, double division
    mult, shift = layer.fixed_point_params("double")
    assert mult.shape == shift.shape == (11,)
    assert set(zip(mult.tolist(), shift.tolist(), strict=True)) == {quantize_multiplier(real)}
    layer, _, _, _ = _layer(64, per_channel=True)
    sw = layer.weight_qparams.scale.astype(F32).astype(np.float64)
    real = np.float64(F32(layer.input_qparams.scale)) * sw / np.float64(
        F32(layer.output_qparams.scale))
    np.testing.assert_array_equal(layer.fixed_point_params("single")[0],
                                  quantize_multiplier(real, rounding="single")[0])


def test_integer_layer_against_fake_quant_and_float():
    """The documented bounds: integer and fake-quant codes differ by at most one step, rarely;
    the float layer lies within the propagated rounding errors of the integer one."""
    counts = dict.fromkeys(REQUANTIZATIONS, 0)
    for seed, variant in enumerate(LAYER_VARIANTS):
        layer, x, w, b = _layer(70 + seed, in_f=64, out_f=32, **variant)
        rng = np.random.default_rng(seed)
        x_lo, x_hi = (float(v) for v in layer.input_qparams.representable_range())
        x = np.clip(rng.normal(0.3, 1.0, (400, 64)), x_lo, x_hi)  # no input clipping error
        x_q = quantize(x, layer.input_qparams)
        fq_codes = quantize(layer.fake_quant_forward(x), layer.output_qparams).astype(int)
        # where the integer layer may round differently: within eps of a tie of the exact M v
        sw64 = np.broadcast_to(layer.weight_qparams.scale, (32,))
        mv = layer.accumulate(x_q) * (layer.input_qparams.scale * sw64 / layer.output_qparams.scale)
        to_tie = np.abs(mv - np.floor(mv) - 0.5)
        right_shift = np.maximum(-layer.fixed_point_params("double")[1], 0)
        eps = {"float": 2.0**-22 * np.abs(mv),                      # float32 m and product
               "tflite_single": 2.0**-30 * np.abs(mv),              # 31-bit M0, one rounding
               "tflite_double": 2.0**-30 * np.abs(mv) + 2.0**-(right_shift + 1.0)}  # SRDHM
        for req in REQUANTIZATIONS:
            diff = layer(x_q, req).astype(int) - fq_codes
            assert np.abs(diff).max() <= 1
            assert np.all(to_tie[diff != 0] <= eps[req][diff != 0] + 1e-9), req
            assert np.count_nonzero(diff) <= 0.01 * diff.size
            counts[req] += np.count_nonzero(diff)
        # float reference: |y - yhat| <= S_y/2 + sum_k (|x| S_W/2 + |W| S_x/2 + S_x S_W/4)
        #                                + S_x S_W/2 (bias) wherever nothing is clipped
        sx = layer.input_qparams.scale
        sw = np.broadcast_to(layer.weight_qparams.scale, (32,))
        sy = layer.output_qparams.scale
        y_float = linear_float(x, w, b, layer.activation)
        y_int = layer.dequantize_output(layer(x_q)).astype(np.float64)
        bound = (sy / 2 + np.abs(x) @ np.broadcast_to(sw / 2, (64, 32))
                 + (np.abs(w) * sx / 2).sum(axis=1) + 64 * sx * sw / 4 + sx * sw / 2 + 1e-9)
        lo, hi = (float(v) for v in layer.output_qparams.representable_range())
        inside = (y_float > lo + bound) & (y_float < hi - bound)
        assert inside.mean() > 0.9
        assert np.all(np.abs(y_float - y_int)[inside] <= bound[inside])
        assert np.count_nonzero(np.abs(y_float - y_int) > sy / 2 + 1e-9) > 0  # they do differ
    # double rounding costs more agreements than the float multiplier or single rounding
    assert counts["tflite_double"] > max(counts["float"], counts["tflite_single"])


def test_layer_against_onnxruntime_qlinearconv(ort_run):
    """A 1 x 1 QLinearConv is a linear layer with an int32 bias: ONNX Runtime's own layer."""
    for seed, variant in enumerate(LAYER_VARIANTS):
        if variant.get("activation", "none") != "none":
            continue
        layer, x, _, _ = _layer(80 + seed, in_f=45, out_f=19, **variant)
        x_q = quantize(x, layer.input_qparams)
        xdt, wq = x_q.dtype, layer.weight_qparams
        per_channel = wq.axis is not None
        w_scale = wq.scale.astype(F32) if per_channel else F32(wq.scale)
        w_zp = wq.zero_point.astype(S8) if per_channel else S8(wq.zero_point)
        ins = [x_q.reshape(*x_q.shape, 1, 1), F32(layer.input_qparams.scale),
               xdt.type(layer.input_qparams.zero_point),
               layer.weight_q.reshape(*layer.weight_q.shape, 1, 1), w_scale, w_zp,
               F32(layer.output_qparams.scale), S8(layer.output_qparams.zero_point)]
        if xdt == U8:
            continue  # ONNX Runtime's QLinearConv wants the output type of the input
        ins.append(layer.bias_q)
        want = ort_run("QLinearConv", ins, S8, const=(3, 4, 5, 8)).reshape(x_q.shape[0], -1)
        np.testing.assert_array_equal(layer(x_q), want)


def test_layer_against_onnxruntime_qlinearconv_on_ties(ort_run):
    # scales whose multiplier is 0.5: every odd accumulator is a tie
    w_q = np.array([[1, 0, -1], [2, 1, 0], [-3, 1, 1]], S8)
    x_q = np.arange(-60, 60, dtype=np.int64).reshape(-1, 3).astype(S8)
    xqp = QParams(scale=0.5, zero_point=-3, qmin=-128, qmax=127)
    wqp = QParams(scale=np.array([0.5, 0.25, 1.0]), zero_point=0, qmin=-127, qmax=127, axis=0)
    yqp = QParams(scale=0.5, zero_point=4, qmin=-128, qmax=127)
    layer = QuantizedLinear(w_q, np.array([1, -3, 5], np.int32), xqp, wqp, yqp)
    assert np.any(layer.accumulate(x_q) % 2 != 0)
    ins = [x_q.reshape(-1, 3, 1, 1), F32(0.5), S8(-3), w_q.reshape(3, 3, 1, 1),
           np.array([0.5, 0.25, 1.0], F32), np.zeros(3, S8), F32(0.5), S8(4),
           np.array([1, -3, 5], np.int32)]
    want = ort_run("QLinearConv", ins, S8, const=(3, 4, 5, 8)).reshape(-1, 3)
    np.testing.assert_array_equal(layer(x_q), want)
    np.testing.assert_array_equal(layer.reference(x_q), want)


# ------------------------------------------------------------------------------------------------
# PyTorch's quantized linear (float-multiplier convention)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_linear():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (optional oracle)")

    def run(x_q, sx, zx, w_q, sw, zw, sy, zy, bias=None, *, engine="fbgemm", relu=False):
        if engine not in torch.backends.quantized.supported_engines:
            pytest.skip(f"PyTorch has no {engine} engine here")
        old = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized tensor constructors are deprecated
                x = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x_q), sx, zx)
                if np.ndim(sw):
                    w = torch._make_per_channel_quantized_tensor(
                        torch.from_numpy(w_q), torch.from_numpy(np.asarray(sw, np.float64)),
                        torch.from_numpy(np.broadcast_to(zw, np.shape(sw)).astype(np.int64)),
                        0)
                else:
                    w = torch._make_per_tensor_quantized_tensor(torch.from_numpy(w_q), sw, zw)
                b = None if bias is None else torch.from_numpy(np.asarray(bias, F32))
                packed = torch.ops.quantized.linear_prepack(w, b)
                op = torch.ops.quantized.linear_relu if relu else torch.ops.quantized.linear
                return op(x, packed, sy, zy).int_repr().numpy()
        finally:
            torch.backends.quantized.engine = old

    return run


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "onednn", "qnnpack"])
def test_layer_without_bias_matches_pytorch(torch_linear, engine):
    rng = np.random.default_rng(90)
    for trial in range(12):
        in_f, out_f = int(rng.integers(1, 70)), int(rng.integers(1, 40))
        per_channel, relu = trial % 2 == 1, trial % 3 == 0
        sx, sy = float(F32(np.exp(rng.uniform(-6, -1)))), float(F32(np.exp(rng.uniform(-3, 1))))
        zx, zy = int(rng.integers(0, 256)), int(rng.integers(0, 256))
        sw = (np.exp(rng.uniform(-7, -3, out_f)).astype(F32).astype(np.float64) if per_channel
              else float(F32(np.exp(rng.uniform(-7, -3)))))
        w_q = rng.integers(-127, 128, (out_f, in_f)).astype(S8)
        x_q = rng.integers(0, 256, (5, in_f)).astype(U8)
        y_torch = torch_linear(x_q, sx, zx, w_q, sw, 0, sy, zy, engine=engine, relu=relu)
        layer = QuantizedLinear(
            w_q, None, QParams(scale=sx, zero_point=zx, qmin=0, qmax=255),
            QParams(scale=sw, zero_point=0, qmin=-127, qmax=127,
                    axis=0 if per_channel else None),
            QParams(scale=sy, zero_point=zy, qmin=0, qmax=255), "relu" if relu else "none")
        np.testing.assert_array_equal(layer(x_q), y_torch, err_msg=f"trial {trial}")


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "onednn", "qnnpack"])
def test_pytorch_multiplier_on_near_ties(torch_linear, engine):
    """The tie-built cases of the ONNX Runtime test, through PyTorch's engines.

    FBGEMM and x86 compute ONNX Runtime's multiplier, fl(fl(S_x S_W) / S_y), and match
    QuantizedLinear bit for bit. QNNPACK multiplies by the reciprocal of the output scale,
    fl(fl(S_x S_W) * fl(1 / S_y)), so it differs from ONNX Runtime on some of these inputs;
    oneDNN differs too, by one step, in a way none of these orders reproduces.
    """
    sa, sy, cases = _multiplier_order_cases(n_cases=60, seed=17)
    row, b = _columns_for([c[1] for c in cases])
    sb = np.array([c[0] for c in cases], F32)
    acc = np.array([c[1] for c in cases], F32)
    y = torch_linear(row, float(sa), 0, np.ascontiguousarray(b.T), sb.astype(np.float64), 0,
                     float(sy), 128, engine=engine)[0].astype(int) - 128
    layer = QuantizedLinear(np.ascontiguousarray(b.T), None,
                            QParams(scale=float(sa), zero_point=0, qmin=0, qmax=255),
                            QParams(scale=sb.astype(np.float64), zero_point=0, qmin=-127,
                                    qmax=127, axis=0),
                            QParams(scale=float(sy), zero_point=128, qmin=0, qmax=255))
    ours = layer(row)[0].astype(int) - 128
    reciprocal = np.rint(acc * ((sa * sb) * (F32(1) / sy))).astype(int)
    assert np.abs(y - ours).max() <= 1
    if engine in ("fbgemm", "x86"):
        np.testing.assert_array_equal(y, ours)
        assert np.any(y != reciprocal)
    elif engine == "qnnpack":
        np.testing.assert_array_equal(y, reciprocal)
        assert np.any(y != ours)
    else:
        assert np.any(y != ours) and np.any(y != reciprocal)


def test_pytorch_x86_engines_add_the_bias_in_float_qnnpack_in_int32(torch_linear):
    """With multiplier 1 and a bias of exactly half an accumulator step, int32 bias rounds the
    half away before the sum (0.5 -> 0); FBGEMM / x86 / oneDNN add 0.5 in float and round the
    sum half to even. Only qnnpack follows the int32-bias convention of ONNX and TFLite."""
    x_q = np.arange(40, dtype=U8)[None, :]
    w_q = np.eye(40, dtype=S8)
    bias = np.full(40, 0.125, F32)                 # bias / (S_x S_W) = 0.125 / 0.25 = 0.5
    layer = QuantizedLinear(w_q, quantize_bias(bias, 0.5, 0.5),
                            QParams(scale=0.5, zero_point=0, qmin=0, qmax=255),
                            QParams(scale=0.5, zero_point=0, qmin=-127, qmax=127),
                            QParams(scale=0.25, zero_point=10, qmin=0, qmax=255))
    assert layer.bias_q.tolist() == [0] * 40
    ours = layer(x_q)[0].astype(int)
    acc = np.arange(40)
    assert (ours - 10).tolist() == acc.tolist()
    for engine in ("fbgemm", "x86", "onednn"):
        y = torch_linear(x_q, 0.5, 0, w_q, 0.5, 0, 0.25, 10, bias, engine=engine)[0].astype(int)
        assert (y - 10).tolist() == np.rint(acc + 0.5).astype(int).tolist()
        assert np.count_nonzero(y != ours) == 20   # every odd accumulator
    y = torch_linear(x_q, 0.5, 0, w_q, 0.5, 0, 0.25, 10, bias, engine="qnnpack")[0]
    np.testing.assert_array_equal(y, ours)


# ------------------------------------------------------------------------------------------------
# Two systems, one LSB apart
# ------------------------------------------------------------------------------------------------


def test_float_and_fixed_point_requantization_differ_by_at_most_one():
    rng = np.random.default_rng(95)
    total = differ = 0
    for _ in range(30):
        real = float(F32(np.exp(rng.uniform(np.log(1e-4), np.log(0.5)))))
        acc = np.arange(-(2**15), 2**15)
        y_f = requantize_float(acc, real, 0, -128, 127).astype(int)
        for rounding in ("double", "single"):
            mult, shift = quantize_multiplier(real, rounding=rounding)
            y_t = requantize_fixed_point(acc, mult, shift, 0, -128, 127,
                                         rounding=rounding).astype(int)
            assert np.abs(y_f - y_t).max() <= 1
            differ += np.count_nonzero(y_f != y_t)
            total += acc.size
    assert 0 < differ < 0.01 * total


def test_requantization_disagreements_sorts_every_case_by_its_cause():
    from fractions import Fraction

    acc = np.arange(-(2**21), 2**21)
    few_bits = requantization_disagreements(3 / 128, acc)
    typical = requantization_disagreements(float(F32(0.0123 * 0.0021 / 0.31)), acc)
    assert {("double", "exact tie"), ("single", "exact tie"),
            ("double", "double rounding")} <= set(few_bits)
    assert ("single", "multiplier rounding") in typical
    assert ("single", "double rounding") not in typical and ("single", "double rounding") not in (
        few_bits)
    for found, m in ((few_bits, 3 / 128), (typical, float(F32(0.0123 * 0.0021 / 0.31)))):
        for (build, cause), cases in found.items():
            mult, shift = quantize_multiplier(m, rounding=build)
            for v, mv, y_f, y_t in cases[:50]:
                assert abs(y_f - y_t) == 1 and mv == float(Fraction(v) * Fraction(m))
                assert requantize_float([v], m, 0, -128, 127)[0] == y_f
                assert requantize_fixed_point([v], mult, shift, 0, -128, 127,
                                              rounding=build)[0] == y_t
                exact = Fraction(v) * Fraction(m)
                assert (exact - exact.numerator // exact.denominator == Fraction(1, 2)) == (
                    cause == "exact tie")
    # and nothing else disagrees
    y_f = requantize_float(acc, 3 / 128, 0, -128, 127)
    y_d = requantize_fixed_point(acc, *quantize_multiplier(3 / 128), 0, -128, 127)
    assert np.count_nonzero(y_f != y_d) == sum(len(v) for (b_, _), v in few_bits.items()
                                               if b_ == "double")


# ------------------------------------------------------------------------------------------------
# Bad inputs give clear errors
# ------------------------------------------------------------------------------------------------


def _good():
    a = np.zeros((2, 3), U8)
    b = np.zeros((3, 4), S8)
    return [a, F32(0.1), U8(0), b, F32(0.1), S8(0), F32(0.1), U8(0)]


@pytest.mark.parametrize("fn", [qlinear_matmul, qlinear_matmul_reference])
def test_qlinear_matmul_bad_inputs(fn):
    def call(i, v):
        args = _good()
        args[i] = v
        return fn(*args)

    with pytest.raises(TypeError, match="a must have dtype uint8 or int8"):
        call(0, np.zeros((2, 3), np.int16))
    with pytest.raises(TypeError, match="a must be a numpy.ndarray"):
        call(0, [[1, 2, 3]])
    with pytest.raises(ValueError, match="inner dimensions differ"):
        call(3, np.zeros((4, 4), S8))
    with pytest.raises(ValueError, match="must not be empty"):
        call(0, np.zeros((0, 3), U8))
    with pytest.raises(ValueError, match=r"a_zero_point must be integers in \[0, 255\]"):
        call(2, 300)
    with pytest.raises(ValueError, match=r"b_zero_point must be integers in \[-128, 127\]"):
        call(5, -129)
    with pytest.raises(TypeError, match="a_zero_point has dtype int8 but a is uint8"):
        call(2, S8(0))
    with pytest.raises(TypeError, match="zero_point must be integers"):
        call(2, 1.5)
    for bad in (F32(0), F32(-0.1), F32(np.nan), F32(np.inf)):
        with pytest.raises(ValueError, match="a_scale must be finite and > 0"):
            call(1, bad)
    with pytest.raises(TypeError, match="y_scale must have dtype float32 or float16"):
        call(6, np.float64(0.1))
    with pytest.raises(TypeError, match="b_scale must be a float32"):
        call(4, 0.1)
    with pytest.raises(TypeError, match="y_zero_point must be a uint8 or int8"):
        call(7, 0)
    with pytest.raises(ValueError, match="per column of B"):
        call(4, np.full(3, 0.1, F32))
    with pytest.raises(ValueError, match="same shape"):
        call(4, np.full(4, 0.1, F32))
    with pytest.raises(ValueError, match="overflows or underflows"):
        call(6, F32(1e-45))
    with pytest.raises(ValueError, match="overflow must be one of"):
        fn(*_good(), overflow="saturate")


def test_matmul_integer_bad_inputs():
    a, b = np.zeros((2, 3), U8), np.zeros((3, 4), U8)
    with pytest.raises(TypeError, match="A must have dtype"):
        matmul_integer(a.astype(np.int32), b)
    with pytest.raises(ValueError, match="at least one axis"):
        matmul_integer(np.array(3, U8), b)
    with pytest.raises(ValueError, match="per row of A"):
        matmul_integer(a, b, np.zeros(3, U8))
    with pytest.raises(ValueError, match="do not broadcast"):
        matmul_integer(np.zeros((2, 2, 3), U8), np.zeros((3, 3, 4), U8))
    with pytest.raises(TypeError, match="b_zero_point must be integers"):
        matmul_integer_reference(a, b, None, True)


def test_requantize_and_layer_bad_inputs():
    with pytest.raises(ValueError, match=r"output_zero_point must lie in \[qmin, qmax\]"):
        requantize_float([1], 0.5, 300, -128, 127)
    with pytest.raises(ValueError, match="multiplier must be finite and > 0"):
        requantize_float([1], -0.5, 0, -128, 127)
    with pytest.raises(TypeError, match="multiplier must be a float"):
        requantize_float([1], 1, 0, -128, 127)
    with pytest.raises(ValueError, match=r"acc must be integers in .* \(int32\)"):
        requantize_float([2**31], 0.5, 0, -128, 127)
    with pytest.raises(ValueError, match="qmin < qmax"):
        requantize_fixed_point([1], 2**30, -1, 0, 5, 5)
    layer, x, _, _ = _layer(99)
    x_q = quantize(x, layer.input_qparams)
    with pytest.raises(TypeError, match="x_q must have dtype int8"):
        layer(x_q.astype(np.int16))
    with pytest.raises(ValueError, match=r"x_q must have shape \(batch, 37\)"):
        layer(x_q[:, :5])
    with pytest.raises(ValueError, match="requantization must be one of"):
        layer(x_q, "exact")
    with pytest.raises(ValueError, match="weight_q has codes outside"):
        QuantizedLinear(np.full((2, 3), 100, np.int64), None, layer.input_qparams,
                        QParams(scale=0.1, zero_point=0, qmin=-8, qmax=7), layer.output_qparams)
    with pytest.raises(TypeError, match="bias_q must be int32"):
        QuantizedLinear(np.zeros((2, 3), S8), np.zeros(2), layer.input_qparams,
                        QParams(scale=0.1, zero_point=0, qmin=-127, qmax=127),
                        layer.output_qparams)
    with pytest.raises(ValueError, match="activation must be one of"):
        QuantizedLinear(np.zeros((2, 3), S8), None, layer.input_qparams,
                        QParams(scale=0.1, zero_point=0, qmin=-127, qmax=127),
                        layer.output_qparams, "tanh")
    assert set(ACTIVATIONS) == {"none", "relu", "relu6"}


def test_layer_refuses_an_accumulator_overflow():
    k = 2000
    layer = QuantizedLinear(np.full((1, k), 127, S8), np.array([2**31 - 1], np.int32),
                            QParams(scale=1.0, zero_point=0, qmin=-128, qmax=127),
                            QParams(scale=1.0, zero_point=0, qmin=-127, qmax=127),
                            QParams(scale=1.0, zero_point=0, qmin=-128, qmax=127))
    x_q = np.full((1, k), 127, S8)
    with pytest.raises(ValueError, match="overflows the int32 accumulator"):
        layer(x_q)
    with pytest.raises(ValueError, match="overflows the int32 accumulator"):
        layer.reference(x_q)
    assert layer(np.zeros((1, k), S8)).tolist() == [[127]]
