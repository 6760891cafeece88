"""Every public callable, called as a hostile user would: one argument at a time made bad.

The promise (DESIGN.md, issue 19): bad input gets a ``TypeError`` or ``ValueError`` that names
the argument; never a crash, a hang, a memory blow-up, another exception type, or a silent NaN
or wrong answer.  This file checks it mechanically:

* :data:`VALID` holds one valid call of every public callable of every module's ``__all__``
  (a test fails when a callable has none; result records that only carry values are listed in
  :data:`RECORDS` with the reason);
* :func:`bad_values` derives, from each argument of that call, the bad values of its kind:
  None, a string, empty and 0-d arrays, a wrong rank, wrong dtypes (float for int and back,
  bool, complex, object), NaN, +-Inf and 1e300, huge and negative integers, floats and bools
  where ints or flags belong, and the same array as a non-contiguous or Fortran-ordered view
  (which must give the same answer);
* the calls run in child processes (a segfault fails a call, not the test run) under a memory
  limit, a per-call time limit and warnings as errors; a child that dies is restarted after the
  call it died in, which names the culprit;
* each outcome is classified: refused with a named ``TypeError``/``ValueError`` (good), refused
  without naming the argument, another exception type, a crash, a hang, a NaN/Inf in the result
  of a bad input whose valid twin had none, or a view that changed the answer.

``test_the_harness_catches_each_kind_of_failure`` feeds deliberately broken functions to the
same machinery and shows that each kind of failure is caught.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import re
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent

#: Limits of one child call: a bad argument may be refused or computed, never run longer or use
#: more memory than this (a size-like argument past its documented bound must be refused).
CALL_SECONDS = 30.0
MEMORY_BYTES = 4 * 2**30

# --------------------------------------------------------------------------- the public callables


def public_modules() -> list[str]:
    """Every qcourse module with an ``__all__`` (grading: tools, not the library's boundary)."""
    import qcourse

    names = ["qcourse"] + [m.name for m in pkgutil.walk_packages(qcourse.__path__, "qcourse.")]
    return [n for n in names if not any(part.startswith("_") for part in n.split("."))
            and "grading" not in n]


def public_callables() -> dict[str, object]:
    """Bare name -> object, over every module's ``__all__`` (one object may have many homes)."""
    found: dict[str, object] = {}
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if not callable(obj):
                continue
            if any(other is obj for other in found.values()):
                continue                      # the same object re-exported by a package
            if name in found:
                name = f"{module_name.removeprefix('qcourse.')}.{name}"
            found[name] = obj
    return found


# --------------------------------------------------------------------------- valid calls


def c(*args, **kwargs):
    return args, kwargs


class _Fixtures:
    """Small, deterministic inputs, built once per process (mutable ones fresh each time)."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.x = rng.normal(0, 1, (4, 6))
        self.x32 = rng.normal(0, 1, (12, 8)).astype(np.float32)
        self.y = rng.integers(0, 3, 12)
        self.w = rng.normal(0, 0.5, (3, 8)).astype(np.float32)
        self.a8 = rng.integers(-128, 128, (3, 5), dtype=np.int8)
        self.b8 = rng.integers(-128, 128, (5, 4), dtype=np.int8)
        self.u8 = rng.integers(0, 256, (3, 5), dtype=np.uint8)
        self.acc = rng.integers(-5000, 5000, (3, 4)).astype(np.int32)
        self.edges = np.linspace(0.0, 4.0, 9)
        self.counts = np.array([5.0, 3, 0, 2, 1, 0, 0, 1])
        self.bitsu16 = np.array([0x3C00, 0x0001, 0x7BFF], np.uint16)
        cnn = np.random.default_rng(5)     # its own generator: the draws above stay as they were
        self.img = cnn.uniform(0, 1, (6, 1, 8, 8)).astype(np.float32)    # six 1x8x8 images
        self.img_y = np.arange(6) % 10
        self.x_nhwc = cnn.integers(-128, 128, (1, 4, 4, 2), dtype=np.int8)
        self.w_conv = cnn.integers(-127, 128, (3, 2, 3, 3), dtype=np.int8)
        self.wf_conv = cnn.normal(0, 0.5, (2, 1, 3, 3)).astype(np.float32)

    def qp(self, **kw):
        from qcourse.affine import QParams

        return QParams(**{**dict(scale=0.05, zero_point=3, qmin=-128, qmax=127), **kw})

    def model(self):
        from qcourse.nn import make_mlp

        return make_mlp((8, 6, 3), seed=0)

    def packed(self):
        from qcourse.kernels import prepack

        return prepack(self.b8)

    def w4(self):
        from qcourse.lowbit import quantize_int4_groupwise

        return quantize_int4_groupwise(self.w, 4)

    def w4_kernel(self):
        """An Int4Weight whose groups fit the W4A8 kernel (K = 8, groups of 8)."""
        from qcourse.lowbit import quantize_int4_groupwise

        return quantize_int4_groupwise(self.w, 8)

    def packed4(self, zero_points=False):
        from qcourse.kernels import prepack_int4

        rng = np.random.default_rng(1)
        zp = rng.integers(-8, 8, (5, 2)).astype(np.int8) if zero_points else None
        return prepack_int4(rng.integers(-8, 8, (5, 64), dtype=np.int8),
                            rng.uniform(0.01, 0.1, (5, 2)).astype(np.float32), group_size=32,
                            zero_points=zp)

    def deploy(self):
        """A one-layer deploy model, its float32 images and the layer."""
        from qcourse.deploy import random_dense_model

        model, _ = random_dense_model(3)
        X = np.random.default_rng(2).uniform(-2, 2, (4,) + model.input_shape)
        return model, X.astype(np.float32), model.layers[0]

    def deploy_inputs(self) -> str:
        """X.npy for ``python -m qcourse.deploy run``: images of the course model, in a directory
        of this process."""
        if not hasattr(self, "_deploy_dir"):
            self._deploy_dir = tempfile.mkdtemp(prefix="qcourse-fuzz-")
            np.save(os.path.join(self._deploy_dir, "X.npy"),  # (N, 1, 8, 8) images of the CNN
                    self.x32[:, :1].repeat(64, axis=1).reshape(-1, 1, 8, 8))
        return os.path.join(self._deploy_dir, "X.npy")

    def lm(self):
        """A tiny transformer LM (one block) and byte ids for it."""
        from qcourse.nn.lm import LMConfig, TransformerLM

        model = TransformerLM(LMConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=16),
                              seed=0)
        ids = np.random.default_rng(3).integers(0, 256, (2, 9))
        return model, ids

    def lm_training(self):
        from qcourse.nn import LMConfig, LMTraining

        return LMTraining(config=LMConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32,
                                          max_len=16), seed=0, steps=2, batch_size=2,
                          lr=0.003, warmup=1, clip=1.0, probe_every=1, probe_bytes=64)

    def cnn(self):
        """A tiny course CNN (widths 2, 4, 4, 4 instead of 16, 32, 64, 64), fresh batch norms."""
        from qcourse.cnn import course_cnn

        return course_cnn("relu6", seed=0, widths=(2, 4, 4, 4))

    def folded_cnn(self):
        from qcourse.cnn import fold_batch_norms

        return fold_batch_norms(self.cnn())

    def integer_cnn(self):
        from qcourse.cnn import convert_cnn

        return convert_cnn(self.cnn(), self.img)

    def hessian(self):
        from qcourse.weight_only import hessian

        return hessian(self.x32)

    def qlinear(self):
        from qcourse.int_matmul import QuantizedLinear

        return QuantizedLinear.from_float(self.w, np.zeros(3, np.float32), self.qp(scale=0.02),
                                          self.qp(scale=0.1, zero_point=0))

    def ptq(self, mode="static"):
        from qcourse import ptq

        if mode == "static":
            return ptq.static_ptq(self.model(), self.x32)
        return ptq.dynamic_ptq(self.model()) if mode == "dynamic" else ptq.weight_only_ptq(
            self.model())

    def qat_model(self):
        from qcourse.qat import prepare_qat

        return prepare_qat(self.model(), 4, calib_X=self.x32)

    def fq_layer(self):
        from qcourse.qat import FakeQuantLinear

        layer = FakeQuantLinear(8, 3, lsq=True)
        layer(self.x32)
        layer.backward(np.ones((12, 3), np.float32))
        return layer

    def infos(self):
        from qcourse.nn import layer_info

        return layer_info(self.model())

    def observer(self):
        from qcourse.calibration import MinMaxObserver

        obs = MinMaxObserver()
        obs.update(self.x)
        return obs


FX = None


def fx() -> _Fixtures:
    global FX
    if FX is None:
        FX = _Fixtures()
    return FX


def _valid_calls():
    """Name -> zero-argument function returning ``(args, kwargs)`` of one valid call."""
    F = fx()
    from qcourse import floats, kernels, nn, ptq
    from qcourse.calibration import MinMaxObserver as MinMax

    def int_matmul_linear_float():
        return c(F.x32, F.w, np.zeros(3, np.float32), "relu")

    return {
        # affine
        "QParams": lambda: c(0.05, 3, -128, 127, axis=None, group_size=None),
        "choose_qparams": lambda: c(F.x, bits=8, signed=True, symmetric=False,
                                    narrow_range=False, axis=None, group_size=None),
        "clip_sweep": lambda: c(F.x, np.array([0.5, 1.0]), bits=8, signed=True, symmetric=True),
        "codebook_dequantize": lambda: c(np.array([0, 2, 1]), np.array([-1.0, 0.0, 1.0])),
        "codebook_effective_bits": lambda: c(2, 100, entry_bits=32, n_codebooks=1),
        "codebook_quantize": lambda: c(F.x, np.array([-1.0, 0.0, 1.0])),
        "dequantize": lambda: c(np.array([[1, -3], [7, 0]]), F.qp()),
        "dequantize_linear": lambda: c(F.a8, np.float32(0.1), np.int8(2), axis=1,
                                       block_size=0, output_dtype=None),
        "dynamic_quantize_linear": lambda: c(F.x32),
        "effective_bits": lambda: c(4, (8, 64), axis=1, group_size=16, scale_bits=16,
                                    zero_point_bits=16),
        "error_breakdown": lambda: c(F.x, F.qp()),
        "error_explorer": lambda: c(F.x, bits=4),
        "explorer_qparams": lambda: c(F.x, bits=4, clip=0.8, zero_point=3),
        "fake_quantize": lambda: c(F.x, F.qp()),
        "grid_occupancy": lambda: c(F.x, F.qp()),
        "kmeans_codebook": lambda: c(F.x, 2, seed=0, max_iter=20),
        "pack_int": lambda: c(np.array([1, -2, 3, -4, 5]), 4, signed=True),
        "plot_quantization": lambda: c(F.x, F.qp()),
        "qparams_from_range": lambda: c(-1.0, 2.0, bits=8, signed=True, symmetric=False,
                                        narrow_range=False),
        "qrange": lambda: c(8, True, False),
        "quantize": lambda: c(F.x, F.qp()),
        "quantize_linear": lambda: c(F.x.astype(np.float32), np.float32(0.05), np.int8(3),
                                     axis=1, saturate=True, block_size=0, output_dtype=None),
        "sqnr_db": lambda: c(F.x, F.x + 0.01),
        "storage_dtype": lambda: c(-128, 127),
        "unpack_int": lambda: c(np.array([0x21, 0x43], np.uint8), 4, 3, False),
        # bench (tiny: the harness calls each many times)
        "competitors": lambda: c(),
        "format_table": lambda: c([]),
        "machine_description": lambda: c(),
        "peak_gops": lambda: c(1, 0.001, 1),
        "run_benchmark": lambda: c(sizes=[8], repeat=1, seed=0, include_slow=False,
                                   outside=False, linear=(), linear_kn=(16, 16), peak=None,
                                   rungs=False),
        "thread_limit": lambda: c(1),
        "format_int4_table": lambda: c([]),
        "int4_competitors": lambda: c(),
        "read_bandwidth_gbs": lambda: c(1, 1, 1),
        "run_int4_benchmark": lambda: c(linear=(1,), kn=(64, 64), stack=(), group_size=32,
                                        repeat=1, seed=0, outside=False, bandwidth=10.0,
                                        skip=()),
        "cnn_benchmark": lambda: c(F.integer_cnn(), F.img, batches=(1, 2), repeat=1, threads=1),
        "cnn_onnx_model": lambda: c(F.integer_cnn(), (1, 8, 8)),
        "format_cnn_table": lambda: c([]),
        "unquiet_signs": lambda: c([], {1: 100.0}, {1: 101.0}, moved=0.15, slower=0.9),
        # calibration
        "EntropyObserver": lambda: c(bins=64, bits=8, signed=True, symmetric=False,
                                     narrow_range=False, flatten_zero_bin=True),
        "MSEObserver": lambda: c(20, bins=64, bits=8, signed=True, symmetric=False,
                                 narrow_range=False),
        "MinMaxObserver": lambda: c(bits=8, signed=True, symmetric=False, narrow_range=False,
                                    axis=None),
        "MovingAverageMinMaxObserver": lambda: c(0.1, bits=8, signed=True, symmetric=False,
                                                 narrow_range=False, axis=None),
        "Observer": lambda: c(bits=8, signed=True, symmetric=False, narrow_range=False),
        "PercentileObserver": lambda: c(99.0, bins=64, bits=8, signed=True, symmetric=False,
                                        narrow_range=False),
        "StreamingHistogram": lambda: c(64, include_zero=False),
        "calibrate": lambda: c(F.model(), "fc1", F.x32, F.observer(), batch_size=4,
                               where="output"),
        "compare_observers": lambda: c(F.model(), "fc1", {"minmax": MinMax()}, F.x32, F.x32, F.y,
                                       batch_size=4),
        "compare_static_dynamic": lambda: c(F.x, F.qp(), batch_size=2, bits=8, signed=True,
                                            symmetric=False, per_row=False),
        "dynamic_fake_quant_hook": lambda: c(bits=8, signed=True, symmetric=False,
                                             per_row=False),
        "dynamic_qparams": lambda: c(F.x, bits=8, signed=True, symmetric=False,
                                     narrow_range=False, per_row=False),
        "fake_quant_hook": lambda: c(F.qp()),
        "histogram_mse": lambda: c(F.edges, F.counts, F.qp()),
        "histogram_percentile": lambda: c(F.edges, F.counts, 90.0),
        "kl_divergence": lambda: c(np.array([1.0, 2, 3]), np.array([1.0, 1, 4])),
        "kl_threshold_search": lambda: c(np.arange(1.0, 65.0)[::-1], 8, eps=1e-4),
        # datasets
        "load_digits": lambda: c("train", 0, 0.25),
        "load_digits_raw": lambda: c(),
        "load_pydoc_text": lambda: c("heldout"),
        "pydoc_text_digest": lambda: c(),
        "pydoc_topics": lambda: c("heldout"),
        # deploy (one small random layer; the runtimes run it)
        "Conv2D": lambda: c(np.ones((2, 1, 3, 3), np.int8), np.zeros(2, np.int32),
                            np.array([0.01, 0.02]), 0.05, 0, clamp=(-128, 127), stride=(1, 1),
                            padding=(0, 0, 0, 0), groups=1),
        "Dense": lambda: c(F.a8, np.zeros(3, np.int32), np.array([0.01]), 0.05, 3,
                           clamp=(-128, 127)),
        "DeployModel": lambda: c(F.deploy()[0].input_shape, 0.02, 1, (F.deploy()[2],),
                                 name="m"),
        "Flatten": lambda: c(),
        "GlobalAvgPool": lambda: c(),
        "nn.Flatten": lambda: c(),
        "depthwise_conv_int8": lambda: c(F.a8[:2, :4].reshape(1, 2, 2, 2).repeat(2, axis=3),
                                         F.b8[:3, :3].reshape(3, 3, 1).repeat(4, axis=2), 0.01,
                                         padding=1),
        "depthwise_conv_int8_reference": lambda: c(
            F.a8[:2, :4].reshape(1, 2, 2, 2).repeat(2, axis=3),
            F.b8[:3, :3].reshape(3, 3, 1).repeat(4, axis=2), 0.01, padding=1),
        "MaxPool2D": lambda: c(kernel=(2, 2), stride=None),
        "adversarial_images": lambda: c(F.deploy()[0], 2, 0),
        "agreement": lambda: c(*F.deploy()[:2], ("onnx", "tflite-reference"), form="qoperator"),
        "course_model": lambda: c(),
        "ops_outside_delegates": lambda: (lambda m: c(__import__("qcourse").deploy.litert
                                                      ._interpreter(__import__("qcourse").deploy
                                                                    .to_tflite(m),
                                                                    "tflite-xnnpack",
                                                                    (1,) + m.input_shape)))(
            F.deploy()[0]),
        "from_integer_model": lambda: c(ptq.convert_to_integer(F.ptq()), name="m"),
        "main": lambda: c(["run", "--runtime", "onnx", "--inputs", F.deploy_inputs(), "--out",
                           F.deploy_inputs().replace("X.npy", "Y.npy")]),
        "predict_codes": lambda: c(*F.deploy()[:2], "tflite-builtin", all_layers=False),
        "quantize_divide_half_away": lambda: c(F.x32, np.float32(0.05), 3),
        "quantize_input": lambda: c(*F.deploy()[:2], "tflite-builtin"),
        "quantize_litert_builtin": lambda: c(F.x32.ravel(), np.float32(0.05), 3),
        "quantize_reciprocal_rne": lambda: c(F.x32, np.float32(0.05), 3),
        "random_dense_model": lambda: c(0, tie_heavy=False),
        "requantize_layer": lambda: c(F.deploy()[2], F.acc[:, :1].repeat(F.deploy()[2].out_channels,
                                                                      axis=1),
                                      np.float32(0.02), "half_up_twice", clamp=None),
        "run_onnx": lambda: (lambda m, X: c(__import__("qcourse").deploy.to_onnx(m), X,
                                            optimized_model_path=None))(*F.deploy()[:2]),
        "run_runtime": lambda: c(*F.deploy()[:2], "onnx", form="qoperator"),
        "run_tflite": lambda: (lambda m, X: c(__import__("qcourse").deploy.to_tflite(m), X,
                                              "tflite-reference", check_delegated=True))(
            *F.deploy()[:2]),
        "tflite_fused_activation": lambda: c(F.deploy()[2]),
        "to_onnx": lambda: c(F.deploy()[0], "qoperator", float_input=True),
        "to_tflite": lambda: c(F.deploy()[0], float_input=True),
        "xnnpack_clamp": lambda: c(F.deploy()[2]),
        # fixed_point
        "multiply_by_quantized_multiplier_half_up": lambda: c(np.array([1000, -7]), 2**30 + 5,
                                                              -3),
        "rounding_divide_by_pot_half_up": lambda: c(np.array([5, -7, 12]), 2),
        "accumulator_bits": lambda: c(8, 8, 100),
        "fixed_add": lambda: c(np.array([10, -20]), np.array([3, 4]), 3, 4,
                               overflow="saturate"),
        "fixed_mul": lambda: c(np.array([10, -20]), np.array([3, 4]), 3, 4,
                               rounding="nearest_even", overflow="saturate", seed=None),
        "fixed_range": lambda: c(3, 4),
        "from_fixed": lambda: c(np.array([10, -20]), 3, 4),
        "max_k": lambda: c(32, 8, 8, a_signed=True, b_signed=True),
        "min_accumulator_bits": lambda: c(8, 8, 100, a_signed=True, b_signed=True),
        "multiplier_to_real": lambda: c(2**30, -3),
        "multiply_by_quantized_multiplier": lambda: c(np.array([1000, -7]), 2**30 + 5, -3,
                                                      rounding="double"),
        "power_of_two_exponent": lambda: c(0.3),
        "product_range": lambda: c(8, 8, a_signed=True, b_signed=True),
        "quantize_multiplier": lambda: c(np.array([0.3, 0.001]), rounding="double"),
        "round_shift": lambda: c(np.array([5, -7, 12]), 2, "nearest_even", seed=None),
        "rounding_divide_by_pot": lambda: c(np.array([5, -7, 12]), 2),
        "srdhm": lambda: c(np.array([2**30, -5]), np.array([2**29, 7])),
        "to_fixed": lambda: c(np.array([0.3, -1.7]), 3, 4, rounding="nearest_even",
                              overflow="saturate", seed=None),
        # floats
        "FloatFormat": lambda: c("e4m3", 4, 3, bias=None, convention="ieee"),
        "bit_string": lambda: c(0x3C00, floats.FP16, " "),
        "float_parts": lambda: c(0x3C00, floats.FP16),
        "decode": lambda: c(F.bitsu16, floats.FP16),
        "double_rounding_inputs": lambda: c(floats.FP8_E4M3FN, floats.FP16),
        "encode": lambda: c(F.x, floats.FP16),
        "encode_via": lambda: c(F.x, floats.FP8_E4M3FN, floats.FP16),
        "enumerate_format": lambda: c(floats.FP8_E4M3FN, True),
        "fields": lambda: c(F.bitsu16, floats.FP16),
        "ulp": lambda: c(F.x, floats.FP16),
        # int_matmul
        "QuantizedLinear": lambda: c(np.array([[1, -2, 3], [0, 5, -6]], np.int8),
                                     np.array([10, -20], np.int32), F.qp(scale=0.02),
                                     F.qp(scale=0.01, zero_point=0, qmin=-127), F.qp(scale=0.1),
                                     "relu"),
        "activation_range": lambda: c("relu6", F.qp()),
        "float_multiplier": lambda: c(np.float32(0.02), np.array([0.01, 0.03], np.float32),
                                      np.float32(0.1)),
        "fold_zero_points": lambda: c(np.array([[1, -2, 3], [0, 5, -6]]), 3, np.array([1, 2]),
                                      np.array([10, -20], np.int32)),
        "linear_float": int_matmul_linear_float,
        "matmul_integer": lambda: c(F.u8, F.b8, np.uint8(3), np.int8(-1), overflow="raise"),
        "conv_integer": lambda: c(F.u8[:2, :4].reshape(1, 2, 2, 2).repeat(2, axis=3),
                                  F.b8[:4, :2].reshape(2, 2, 2, 1), np.uint8(3), np.int8(-1),
                                  auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
                                  pads=[1, 0, 0, 1], strides=None, overflow="raise"),
        "qlinear_conv": lambda: c(F.u8[:2, :4].reshape(1, 2, 2, 2).repeat(2, axis=3),
                                  np.float32(0.02), np.uint8(3), F.b8[:4, :2].reshape(2, 2, 2, 1),
                                  np.float32(0.01), np.int8(0), np.float32(0.5), np.uint8(7),
                                  np.array([5, -5], np.int32), auto_pad="NOTSET",
                                  dilations=None, group=1, kernel_shape=None, pads=[1, 1, 1, 1],
                                  strides=None, overflow="raise"),
        "qlinear_conv_reference": lambda: c(F.u8[:2, :4].reshape(1, 2, 2, 2).repeat(2, axis=3),
                                            np.float32(0.02), np.uint8(3),
                                            F.b8[:4, :2].reshape(2, 2, 2, 1), np.float32(0.01),
                                            np.int8(0), np.float32(0.5), np.uint8(7),
                                            np.array([5, -5], np.int32), auto_pad="NOTSET",
                                            dilations=None, group=1, kernel_shape=None,
                                            pads=[1, 0, 0, 1], strides=None, overflow="raise"),
        "matmul_integer_reference": lambda: c(F.u8, F.b8, np.uint8(3), np.int8(-1),
                                              overflow="raise"),
        "qlinear_matmul": lambda: c(F.u8, np.float32(0.02), np.uint8(3), F.b8,
                                    np.float32(0.01), np.int8(0), np.float32(0.5), np.uint8(7),
                                    overflow="raise"),
        "qlinear_matmul_reference": lambda: c(F.u8, np.float32(0.02), np.uint8(3), F.b8,
                                              np.float32(0.01), np.int8(0), np.float32(0.5),
                                              np.uint8(7), overflow="raise"),
        "quantize_bias": lambda: c(np.array([0.5, -1.25]), 0.02, np.array([0.01, 0.03])),
        "requantize_fixed_point": lambda: c(F.acc, np.array([2**30 + 7] * 4),
                                            np.array([-5] * 4), 3, -128, 127,
                                            rounding="double"),
        "requantize_float": lambda: c(F.acc, np.array([0.01, 0.02, 0.003, 0.5], np.float32), 3,
                                      -128, 127),
        "requantization_disagreements": lambda: c(0.37, np.arange(-300, 300)),
        "zero_point_terms": lambda: c(np.array([[1, 2, 3]]), np.array([[1, -2, 3], [0, 5, -6]]),
                                      3, np.array([1, 2])),
        "double_multiplier": lambda: c(np.float32(0.02), np.array([0.01, 0.03], np.float32),
                                       np.float32(0.1)),
        "requantize_double_half_away": lambda: c(F.acc, np.full(4, 0.01), 3, -128, 127),
        "requantize_fixed_point_half_up": lambda: c(F.acc, np.array([2**30 + 7] * 4),
                                                    np.array([-5] * 4), 3, -128, 127),
        # kernels
        "matmul_w4a8": lambda: c(F.x32[:2].repeat(8, axis=1), F.packed4(), path=None, threads=1),
        "matmul_w4a8_reference": lambda: c(F.x32[:2].repeat(8, axis=1), F.packed4(True)),
        "max_group_w4a8": lambda: c(),
        "prepack_int4": lambda: c(F.a8[:, :4].repeat(16, axis=1) // 16,
                                  np.full((3, 2), 0.05, np.float32), group_size=32,
                                  zero_points=np.array([[1, -2], [0, 7], [-8, 3]])),
        "quantize_rows_int8": lambda: c(F.x32),
        "w4a8_epilogue_reference": lambda: c(F.acc[:2, :3, None].repeat(2, axis=2),
                                             np.full((3, 2), 0.05, np.float32),
                                             np.array([0.5, 0.25], np.float32)),
        "w4a8_group_sums": lambda: c(F.a8[:2, :4].repeat(16, axis=1), F.packed4(), path=None,
                                     threads=1),
        "w4a8_group_sums_reference": lambda: c(F.a8[:2, :4].repeat(16, axis=1), F.packed4(True)),
        # kernels
        "PackedB": None,          # built only by prepack: calling it is the refusal tested below
        "available_paths": lambda: c(),
        "best_path": lambda: c(),
        "get_num_threads": lambda: c(),
        "matmul_int8": lambda: c(F.a8, F.b8, path=None, threads=1),
        "matmul_int8_bt": lambda: c(F.a8, F.b8),
        "matmul_int8_ikj": lambda: c(F.a8, F.b8),
        "matmul_int8_naive": lambda: c(F.a8, F.b8),
        "matmul_int8_reference": lambda: c(F.a8, F.b8),
        "matmul_int8_requant": lambda: c(F.a8, F.packed(), np.array([0.01, 0.02, 0.03, 0.04]),
                                         3, bias=np.arange(4, dtype=np.int32), a_zero_point=-2,
                                         b_zero_point=np.array([0, 1, 0, -1]), out_dtype=np.int8,
                                         qmin=-100, qmax=100, path=None, threads=1),
        "matmul_int8_requant_reference": lambda: c(
            F.a8, F.b8, 0.01, 3, bias=np.arange(4, dtype=np.int32), a_zero_point=-2,
            b_zero_point=1, out_dtype=np.int8, qmin=-100, qmax=100),
        "matmul_int8_u8s8": lambda: c(F.a8, F.b8, path=None),
        "max_k_s8s8": lambda: c(),
        "prepack": lambda: c(F.b8),
        "set_num_threads": lambda: c(kernels.get_num_threads()),
        # language models: nn.lm, transformer, kv_cache (a tiny one-block model)
        "CausalSelfAttention": lambda: c(16, 2, seed=0, std=0.02, proj_std=None,
                                         dtype=np.float32),
        "Embedding": lambda: c(256, 16, seed=0, std=0.02, dtype=np.float32),
        "FeedForward": lambda: c(16, 32, seed=0, std=0.02, proj_std=None, dtype=np.float32),
        "GELU": lambda: c(),
        "KVCache": lambda: c(2),
        "LMConfig": lambda: c(16, 2, 1, 32, 16),
        "LMTraining": lambda: c(F.lm_training().config, 0, 2, 2, 0.003, 1, 1.0, 1, 64),
        "LayerNorm": lambda: c(16, eps=1e-5, dtype=np.float32),
        "TransformerBlock": lambda: c(16, 2, 32, seed=0, proj_std=None, dtype=np.float32),
        "TransformerLM": lambda: c(F.lm()[0].config, seed=0, dtype=np.float32),
        "evaluate_lm": lambda: c(F.lm()[0], F.lm()[1], batch_size=2),
        "generate": lambda: c(F.lm()[0], b"def ", 3, temperature=0.0, seed=0, cache=None,
                              use_cache=True),
        "linear_inputs": lambda: c(*F.lm(), layers=None, batch_size=2),
        "lm_loss": lambda: c(F.x32[:4, :5].reshape(1, 4, 5), np.array([[0, 1, 2, 4]])),
        "lm_windows": lambda: c(bytes(range(40)), 9),
        "load_lm": lambda: c(None),
        "one_blas_thread": lambda: c(),
        "random_windows": lambda: c(bytes(range(40)), 9, 2, np.random.default_rng(0)),
        "save_lm": lambda: c(F.deploy_inputs().replace("X.npy", "lm.npz"), __import__(
            "qcourse.nn").nn.load_lm()),
        "shipped_lm_path": lambda: c(),
        "train_lm": lambda: c(F.lm()[0], bytes(range(64)), steps=2, batch_size=2, lr=0.003,
                              warmup=1, clip=1.0, seed=0, progress=False, callback=None),
        "train_reference_lm": lambda: c(F.lm_training(), progress=False),
        "IntegerBlock": lambda: c(F.lm()[0].blocks[0], reference=False),
        "LLMInt8Linear": lambda: c(F.lm()[0].blocks[0].mlp.fc1, 6.0, reference=False),
        "W8A8Linear": lambda: c(F.lm()[0].blocks[0].mlp.fc1, activation="per_token", bits=8,
                                weight_bits=8, reference=False),
        "activation_absmax": lambda: c(*F.lm()),
        "block_op_counts": lambda: c(F.lm()[0].config, 9),
        "dequantize_accumulators": lambda: c(F.acc, np.array([0.1, 0.2, 0.3], np.float32),
                                             np.full(4, 0.01, np.float32),
                                             np.zeros(4, np.float32)),
        "integer_lm": lambda: c(F.lm()[0], blocks=None, reference=False),
        "llm_int8_lm": lambda: c(F.lm()[0], 6.0),
        "llm_int8_matmul": lambda: c(F.x32[:3] * 4, F.w.T.copy(), 6.0, reference=False),
        "outlier_channels": lambda: c(F.x32 * 4, 6.0),
        "quantize_per_tensor": lambda: c(F.x32, 8),
        "quantize_per_token": lambda: c(F.x32, 8),
        "smooth_lm": lambda: (lambda m, ids: c(m, __import__("qcourse.transformer").transformer
                                                .activation_absmax(m, ids), 0.5))(*F.lm()),
        "smoothquant_scales": lambda: c(np.array([1.0, 8.0, 0.5]), np.array([0.2, 0.1, 0.4]),
                                        0.5),
        "w8a8_lm": lambda: c(F.lm()[0], activation="per_token", bits=8, weight_bits=8,
                             reference=False),
        "QuantizedKVCache": lambda: c(1, "int4", key_axis="channel", value_axis="token",
                                      group_size=32),
        "dequantize_kv_group": lambda: c(__import__("qcourse.kv_cache").kv_cache
                                         .quantize_kv_group(F.x32, "int4", "token")),
        "e4m3_round": lambda: c(F.x32),
        "evaluate_kv_cache": lambda: c(F.lm()[0], F.lm()[1], "int4", key_axis="channel",
                                       value_axis="token", group_size=8, batch_size=2),
        "kv_bytes_per_token": lambda: c(2, 4, 32, 16.0),
        "kv_cache_bytes": lambda: c(100, 2, 4, 32, "int4", key_axis="channel",
                                    value_axis="token", group_size=32, batch=1),
        "quantize_kv_group": lambda: c(F.x32, "int4", "token"),
        # conv (NHWC int8 codes: a (1, 4, 4, 2) input, three 3x3 filters)
        "IntegerCNN": lambda: (lambda m: c(m.input_qparams, m.layers, "float"))(F.integer_cnn()),
        "IntegerGlobalAvgPool": lambda: c(F.qp()),
        "QuantizedConv2d": lambda: c(F.w_conv[:2, :1], np.array([10, -20], np.int32),
                                     F.qp(scale=0.02), F.qp(scale=0.01, zero_point=0, qmin=-127),
                                     F.qp(scale=0.1), 1, 1, 1, "relu"),
        "conv2d_accumulate": lambda: c(F.x_nhwc, F.w_conv, x_zero_point=3,
                                       w_zero_point=np.array([0, 1, -1]),
                                       bias=np.array([5, -5, 0], np.int32), stride=1, padding=1,
                                       groups=1),
        "conv2d_int8": lambda: c(F.x_nhwc, F.w_conv, np.array([0.01, 0.02, 0.03]), 3,
                                 bias=np.array([5, -5, 0], np.int32), x_zero_point=3,
                                 w_zero_point=np.array([0, 1, -1]), stride=1, padding=1,
                                 groups=1, out_dtype=np.int8, qmin=-100, qmax=100, path=None),
        "conv2d_int8_reference": lambda: c(F.x_nhwc, F.w_conv, np.array([0.01, 0.02, 0.03]), 3,
                                           bias=np.array([5, -5, 0], np.int32), x_zero_point=3,
                                           w_zero_point=np.array([0, 1, -1]), stride=1,
                                           padding=1, groups=1, out_dtype=np.int8, qmin=-100,
                                           qmax=100),
        "conv_output_size": lambda: c(8, 3, stride=2, padding=1, name="height"),
        "im2col": lambda: c(F.x_nhwc, 3, stride=1, padding=1, layout="NHWC", pad_value=3),
        # nn.cnn
        "AvgPool2d": lambda: c(2),
        "BatchNorm2d": lambda: c(4, eps=1e-5, momentum=0.1, dtype=np.float32),
        "Conv2d": lambda: c(2, 4, 3, stride=1, padding=1, groups=2, bias=True, seed=0,
                            dtype=np.float32),
        "GlobalAvgPool2d": lambda: c(),
        # cnn (the tiny course CNN, six random images)
        "WeightFakeQuant": lambda: c(nn.Linear(4, 2), 4, per_channel=True),
        "adaround": lambda: c(F.folded_cnn(), F.img, weight_bits=4, per_channel=True,
                              iterations=2, seed=0, layers=["pw1"]),
        "adaround_weight": lambda: c(F.w, F.x32.T @ F.x32 / 12, 4, per_channel=True,
                                     iterations=5, lr=0.01, reg=10.0, warmup=0.2,
                                     beta=(20.0, 2.0), seed=0),
        "bias_correction": lambda: c(F.folded_cnn(), F.img, weight_bits=8, per_channel=False),
        "convert_cnn": lambda: c(F.cnn(), F.img, per_channel=True, requantization="float",
                                 weights=None),
        "course_cnn": lambda: c("relu6", seed=0, widths=(2, 4, 4, 4), dtype=np.float32,
                                batch_norm=True),
        "cross_layer_equalization": lambda: c(F.folded_cnn(), iterations=2),
        "digits_images": lambda: c("test", 0),
        "equalization_pairs": lambda: c(F.folded_cnn()),
        "fold_batch_norms": lambda: c(F.cnn()),
        "fold_conv_batch_norm": lambda: c(F.wf_conv, np.array([0.1, -0.2], np.float32),
                                          np.array([1.0, 2.0]), np.array([0.1, -0.1]),
                                          np.array([0.2, 0.0]), np.array([1.0, 0.5]), eps=1e-5),
        "load_course_cnn": lambda: c("relu"),
        "qat_cnn": lambda: c(F.folded_cnn(), F.img, F.img_y, F.img, weight_bits=4, act_bits=8,
                             per_channel=True, epochs=1, lr=0.001, batch_size=3, seed=0,
                             progress=False, act_ranges="ema", averaging_constant=0.01),
        "quantize_conv_weight": lambda: c(F.wf_conv, 4, per_channel=True),
        "simulate_quantized": lambda: c(F.folded_cnn(), F.img, weight_bits=8, act_bits=8,
                                        per_channel=True, weights=None),
        "train_cnn": lambda: c(F.cnn(), F.img, F.img_y, epochs=1, lr=0.01, weight_decay=0.003,
                               batch_size=3, seed=0, progress=False, stop_after=None),
        # weight_only (a (3, 8) weight, 12 calibration rows, groups of 4)
        "awq": lambda: c(F.w, F.x32, bits=4, group_size=4, n_grid=4, clip=True,
                         symmetric=False, scale_dtype=np.float16, return_codes=False),
        "awq_clip": lambda: c(F.w, F.x32, bits=4, group_size=4, n_grid=4, max_shrink=0.5,
                              symmetric=False, scale_dtype=np.float16),
        "awq_scales": lambda: c(F.w, F.x32, bits=4, group_size=4, n_grid=4, symmetric=False,
                                scale_dtype=np.float16),
        "compare_methods": lambda: c({"a": F.w}, {"a": F.x32}, lambda ws: float(
            np.abs(ws["a"]).sum()), methods=("rtn",), bits=(4,), group_sizes=(4, None),
            keep_layers=False),
        "gptq": lambda: c(F.w, F.hessian(), bits=4, group_size=4, damp=0.01, act_order=True,
                          block_size=4, symmetric=False, scale_dtype=np.float16,
                          return_codes=False),
        "gptq_reference": lambda: c(F.w, F.hessian(), bits=4, group_size=4, damp=0.01,
                                    act_order=True, symmetric=False, scale_dtype=np.float16,
                                    return_codes=False),
        "hessian": lambda: c(F.x32),
        "layer_error": lambda: c(F.x32, F.w, F.w.round(1)),
        "quantize_layer": lambda: c(F.w, F.x32, method="gptq", bits=4, group_size=4, damp=0.01,
                                    act_order=True, n_grid=4),
        "quantize_layers": lambda: c({"a": F.w}, {"a": F.x32}, method="awq+gptq", bits=4,
                                     group_size=4),
        "rtn": lambda: c(F.w, bits=4, group_size=4, symmetric=False, clip=None,
                         scale_dtype=np.float16, return_codes=False),
        "salient_channel_error": lambda: c(F.w, F.x32, bits=4, group_size=4, fraction=0.25,
                                           by="random", seed=0),
        # lowbit
        "Int4Weight": lambda: (lambda w4: c(w4.packed, w4.scale, w4.shape, w4.group_size))(
            F.w4()),
        "fp8_dequantize": lambda: c(np.array([0x38, 0xB0], np.uint8), 0.5, "e4m3fn"),
        "fp8_fake_quantize": lambda: c(F.x, "e4m3fn", None),
        "fp8_quantize": lambda: c(F.x, "e5m2", 0.01),
        "fp8_scale": lambda: c(F.x, "e4m3fn"),
        "format_sqnr": lambda: c(F.x),
        "int4_group_accumulators": lambda: c(F.a8[:, :4].repeat(2, axis=1), F.w4()),
        "int4_group_accumulators_reference": lambda: c(F.a8[:, :4].repeat(2, axis=1), F.w4()),
        "int4_linear_int8": lambda: c(F.x32[:3], F.w4(), np.ones(3, np.float32),
                                      reference=False, packed=None),
        "int4_linear_reference": lambda: c(F.x32[:3], F.w4(), np.ones(3, np.float32)),
        "int4_packed": lambda: c(F.w4_kernel()),
        "int4_weight_only": lambda: c(F.model(), 4, scale_dtype=np.float16),
        "quantize_int4_groupwise": lambda: c(F.w, 4, scale_dtype=np.float16),
        "mx_quantize": lambda: c(F.x32.reshape(3, 32), "mxfp4", 32),
        "mx_dequantize": lambda: c(np.array([[120], [127], [130]], np.uint8),
                                   (np.arange(96, dtype=np.uint8) % 16).reshape(3, 32), "mxfp4",
                                   32),
        "nvfp4_quantize": lambda: c(F.x32.reshape(6, 16), 16, tensor_scale=None),
        "nvfp4_dequantize": lambda: c(0.5, np.full((6, 1), 0x38, np.uint8),
                                      (np.arange(96, dtype=np.uint8) % 16).reshape(6, 16), 16),
        # mixed_precision
        "all_configurations": lambda: c(F.model(), F.x32, F.y, (4, 8), a_bits=None, X_cal=None,
                                        per_channel=True, max_configs=16),
        "allocate_bits_exhaustive": lambda: c({"fc1": {4: 1.0, 8: 0.1}, "fc2": {4: 2.0, 8: 0.2}},
                                              {"fc1": 48, "fc2": 18}, 600, (4, 8),
                                              max_configs=16),
        "allocate_bits_greedy": lambda: c({"fc1": {4: 1.0, 8: 0.1}, "fc2": {4: 2.0, 8: 0.2}},
                                          {"fc1": 48, "fc2": 18}, 600, (4, 8)),
        "bops": lambda: c(F.infos(), 8, 8),
        "exact_hessian_trace": lambda: c(F.model(), "fc2", F.x32, F.y),
        "fake_quantize_weight": lambda: c(F.w, 4, per_channel=True),
        "hawq_omega": lambda: c(2.5, F.w, 4, per_channel=True),
        "hessian_matrix": lambda: c(F.model(), "fc2", F.x32, F.y, method="exact", step=1e-5,
                                    max_size=64),
        "hutchinson_trace": lambda: c(lambda v: 2 * v, (3, 2), 8, 0),
        "hvp": lambda: c(F.model(), "fc2", F.x32, F.y, np.ones((3, 6)), method="exact",
                         step=1e-5),
        "layer_gradient": lambda: c(F.model()["fc2"].weight.copy(), F.model(), "fc2", F.x32,
                                    F.y),
        "layer_hessian_trace": lambda: c(F.model(), "fc2", F.x32, F.y, n_samples=4, seed=0),
        "network_hessian_traces": lambda: c(F.model(), F.x32, F.y, layers=None, n_samples=4,
                                            seed=0, step=1e-4),
        "layer_info": lambda: c(F.model()),
        "layer_loss_grad": lambda: c(F.model(), "fc2", F.x32, F.y, weight=None),
        "layer_sensitivity": lambda: c(F.model(), F.x32, F.y, 4, layers=None, per_channel=True),
        "linear_layers": lambda: c(F.model()),
        "mixed_precision_shares": lambda: c(0.7, 0.5, 1.0, 1.0, 4, 8),
        "model_size_bits": lambda: c(F.infos(), 8, overhead=False, per_channel=True),
        "pareto_front": lambda: c(np.array([1.0, 2, 3]), np.array([0.5, 0.4, 0.9])),
        "temporarily_quantized": lambda: c(F.model(), 4, None, X_cal=None, per_channel=True),
        "scaled_size_bops": lambda: c(1.0, 1.0, 4, 8),
        "spearman": lambda: c(np.array([1.0, 2, 3, 4]), np.array([2.0, 1, 4, 3])),
        # nn
        "make_mlp": lambda: c((8, 6, 3), activation="relu", seed=0, dtype=np.float32),
        "SGD": lambda: c(F.model().parameters(), 0.05, 0.9, 0.0),
        "Adam": lambda: c(F.model().parameters(), 0.001, (0.9, 0.999), 1e-8, 0.0),
        "Linear": lambda: c(8, 3, seed=0, dtype=np.float32),
        "Module": lambda: c(),
        "ReLU": lambda: c(),
        "ReLU6": lambda: c(),
        "Sequential": lambda: c(("fc", nn.Linear(4, 2)), ("act", nn.ReLU())),
        "accuracy": lambda: c(F.model(), F.x32, F.y, 4),
        "capture_activations": lambda: c(F.model(), F.x32, None, 4),
        "Classifier": lambda: c(),
        "copy_model": lambda: c(F.model()),
        "evaluate": lambda: c(F.model(), F.x32, F.y),
        "feed_activations": lambda: c(F.model(), F.x32, {("fc1", "output"): len}, batch_size=4),
        "swapped_weights": lambda: c(F.model(), {"fc2": np.zeros((3, 6), np.float32)}),
        "make_optimizer": lambda: c(F.model().parameters(), "sgd", 0.01, 0.0),
        "predict": lambda: c(F.model(), F.x32, 4),
        "softmax": lambda: c(F.x32[:, :3]),
        "softmax_cross_entropy": lambda: c(F.x32[:, :3], F.y),
        "train": lambda: c(F.model(), F.x32, F.y, 1, 4, 0.01, 0, False, optimizer="adam",
                           weight_decay=0.0),
        "train_epoch": lambda: (lambda m: c(m, F.x32, F.y, np.arange(12), 4,
                                            nn.make_optimizer(m.parameters(), "sgd", 0.01)))(
            F.model()),
        # ptq
        "DynamicIntegerModel": lambda: c(F.ptq("dynamic")),
        "IntegerModel": lambda: c([F.qlinear()], ["fc"], "float"),
        "compare_fake_quant_integer": lambda: (lambda m: c(m, ptq.convert_to_integer(m), F.x32,
                                                           F.y))(F.ptq()),
        "convert_to_integer": lambda: c(F.ptq(), requantization="tflite_double"),
        "dynamic_ptq": lambda: c(F.model(), weight_bits=8, activation_bits=8, per_channel=True,
                                 symmetric=True, per_row=False),
        "fold_batch_norm": lambda: c(F.w, np.zeros(3, np.float32), np.ones(3), np.zeros(3),
                                     np.full(3, 0.1), np.full(3, 2.0), eps=1e-5),
        "model_size": lambda: c(F.ptq()),
        "quantize_weight": lambda: c(F.w, bits=4, per_channel=True, symmetric=True),
        "static_ptq": lambda: c(F.model(), F.x32, weight_bits=8, activation_bits=8,
                                per_channel=True, symmetric=True, batch_size=4,
                                int32_bias=False),
        "train_reference_model": lambda: c(0, activation="relu", sizes=(64, 8, 10), epochs=1,
                                           lr=0.01, batch_size=256, split_seed=0,
                                           calib_size=16),
        "weight_only_ptq": lambda: c(F.model(), bits=4, per_channel=True, symmetric=True),
        # qat
        "FakeQuantLinear": lambda: c(8, 3, bits=4, act_bits=8, per_channel=True, ste="clipped",
                                     lsq=False, seed=0, dtype=np.float32,
                                     averaging_constant=0.01),
        "QATModel": lambda: c(("fc", nn.Linear(4, 2)), config={"bits": 4}),
        "compare_ptq_qat": lambda: c(F.model(), F.x32, F.y, F.x32, F.y, (4,), epochs=1, seed=0,
                                     act_bits="same", batch_size=4),
        "fake_quantize_torch": lambda: c(F.x, F.qp()),
        "lsq_grad_scale": lambda: c(100, 7),
        "lsq_init_scale": lambda: c(F.x, 7, None),
        "lsq_step_size_grad": lambda: c(np.ones_like(F.x), F.x, F.qp(), 1.0),
        "lsq_update_ratio": lambda: c(F.fq_layer(), with_grad_scale=True),
        "prepare_qat": lambda: c(F.model(), 4, act_bits=8, per_channel=True, ste="clipped",
                                 lsq=False, calib_X=F.x32, averaging_constant=0.01),
        "qat_finetune": lambda: c(F.model(), F.x32, F.y, 4, 1, 0, False, act_bits=8,
                                  per_channel=True, ste="clipped", lsq=False, lr=0.001,
                                  batch_size=4, optimizer="adam", weight_decay=0.0,
                                  calib_X=None, X_val=None, y_val=None),
        "set_qat_training": lambda: c(F.qat_model(), True),
        "ste_backward": lambda: c(np.ones_like(F.x), F.x, F.qp(), True),
        "ste_mask": lambda: c(F.x, F.qp()),
    }


#: Result records: plain values that functions return (NamedTuples and dataclasses without
#: computation).  Building one by hand with odd values is not an input to the library.
RECORDS = {
    name: "a result record returned by the library; it holds values and computes nothing"
    for name in ("ErrorBreakdown", "ObserverComparison", "StaticDynamicComparison", "FloatParts",
                 "Allocation", "ConfigSweep", "Evaluation", "HawqRow", "HutchinsonEstimate",
                 "LayerInfo", "LayerSensitivity", "LayerActivations",
                 "FakeQuantIntegerComparison", "ReferenceModel", "ModelSize", "PTQQATComparison",
                 "Result")
}
RECORDS["PTQModel"] = ("built by weight_only_ptq, dynamic_ptq and static_ptq from the library's "
                       "own intermediate state; those functions are fuzzed")
RECORDS["HookHandle"] = ("returned by Module.register_forward_hook; its constructor takes the "
                         "module's private hook table")
RECORDS["PackedB"] = ("built only by prepack (calling PackedB raises TypeError, checked in "
                      "test_kernels.py); prepack and every function taking a PackedB are fuzzed")

RECORDS["PackedInt4"] = ("built only by prepack_int4 (calling PackedInt4 raises TypeError, checked "
                         "in test_kernels.py); prepack_int4 and every function taking a "
                         "PackedInt4 are fuzzed")
RECORDS["KVGroup"] = ("built by quantize_kv_group (which is fuzzed); dequantize_kv_group is "
                      "fuzzed with a group that quantize_kv_group returned")
RECORDS["MXFormat"] = ("a record (NamedTuple) naming an MX element type; mx_quantize and "
                       "mx_dequantize, which take it, are fuzzed")
RECORDS["LMEvaluation"] = "a result record of evaluate_lm; it holds values and computes nothing"
RECORDS["TrainedLM"] = ("a record of train_reference_lm and load_lm (both fuzzed): a model, its "
                        "settings and history")
RECORDS["AdaRoundResult"] = ("a result record of adaround_weight and adaround (both fuzzed); it "
                            "holds values")
RECORDS["QuantSim"] = ("a record of simulate_quantized and qat_cnn (both fuzzed): the simulated "
                       "model and the grids they calibrated")
RECORDS["AWQScales"] = "a result record of awq_scales (fuzzed); it holds values"
RECORDS["MethodResult"] = "a result record of compare_methods (fuzzed); it holds values"
RECORDS["QuantizedWeight"] = ("a record of rtn, gptq, gptq_reference and awq with "
                              "return_codes=True (all fuzzed): codes, scales and the weight they "
                              "give; its dequantize() recomputes from its own fields")
RECORDS["HessianWarning"] = "a warning class that gptq issues; nothing to call"
RECORDS["ExportError"] = ("an exception class (a ValueError) that qcourse.deploy raises; nothing "
                          "to call")

#: Modules that reached main after this test and are not held to it yet: their callables have
#: valid calls in :func:`_valid_calls`, but the bad calls run only with ``QCOURSE_FUZZ=pending``.
#: Named here so that the gap is visible and cannot grow.  (The language-model modules --
#: transformer, kv_cache, nn.lm, nn.lm_training, weight_only -- were listed until their checks
#: moved onto qcourse._checks: 336 of their 1,653 bad calls misbehaved when first run; the CNN
#: modules -- conv, cnn, nn.cnn -- likewise, with the four benchmark and LiteRT helpers that
#: take their models.)
NOT_YET_FUZZED_MODULES: tuple[str, ...] = ()


def _not_yet_fuzzed() -> set[str]:
    names = set()
    for module_name in NOT_YET_FUZZED_MODULES:
        names |= set(getattr(importlib.import_module(module_name), "__all__", ()))
    return names


#: Exceptions other than TypeError/ValueError that a bad argument may deliberately raise,
#: by callable: (exception name, why).
DELIBERATE: dict[str, tuple[str, str]] = {
    "main": ("SystemExit", "a command line: argparse prints what is wrong with the arguments "
                           "(naming the option) and exits with status 2"),
    "load_lm": ("FileNotFoundError", "a path that names no file: Python's own error for it, "
                                     "with the path; a file that is not a model is a ValueError"),
}

#: Callables whose result is a drawing (matplotlib axes, a widget): an equivalent input (a view)
#: cannot be compared with the valid call's result, so views are not drawn again (each drawing
#: takes about a second); every other bad value is.
DRAWINGS = {"error_explorer", "plot_quantization"}
#: Callables whose result holds timings (a benchmark): a view is timed again and differs, so
#: views are not run (every other bad value is).
TIMINGS = {"cnn_benchmark"}

#: (callable, argument) pairs whose NaN/Inf result for a bad value is the right answer.
NONFINITE_OK = {
    ("ulp", "x"): "the ulp of NaN is NaN and of an infinity is infinite (IEEE-754), as in "
                  "the floats chapter",
    ("error_breakdown", "x"): "integer x lies on the grid: no error, an SQNR of +inf dB",
    ("format_sqnr", "x"): "integer x is exact in every format: an SQNR of +inf dB",
    ("compare_static_dynamic", "x"): "integer x is exact on the grid: an SQNR of +inf dB",
    ("clip_sweep", "x"): "a single value is exact at some clip: an SQNR of +inf dB",
}

#: Extra bad calls beyond one-argument substitutions: name -> list of (label, factory, names)
#: where factory returns (args, kwargs) and the message must name one of ``names``.
def _extra_calls():
    F = fx()
    K = 131072                                     # one past the int8 x int8 -> int32 bound
    big_a = lambda: np.ones((1, K), np.int8)       # noqa: E731
    big_b = lambda: np.ones((K, 1), np.int8)       # noqa: E731
    extra = {}
    for name in ("matmul_int8", "matmul_int8_reference", "matmul_int8_bt",
                 "matmul_int8_ikj", "matmul_int8_naive", "matmul_int8_u8s8"):
        extra[name] = [("K past the int32 bound", lambda: c(big_a(), big_b()), ("a", "b", "K"))]
    extra["prepack"] = [("K past the int32 bound", lambda: c(big_b()), ("b", "K"))]
    extra["matmul_int8_requant"] = [
        ("K past the int32 bound", lambda: c(big_a(), big_b(), 0.01), ("a", "b", "K")),
        ("b empty", lambda: c(F.a8, np.zeros((5, 0), np.int8), 0.01), ("b",)),
    ]
    extra["matmul_integer"] = [
        ("K past the int32 bound", lambda: c(np.full((1, K), 255, np.uint8),
                                             np.full((K, 1), -128, np.int8)),
         ("A", "B", "K", "overflow", "int32")),
    ]
    extra["qlinear_matmul"] = [
        ("zero point 10**30", lambda: c(F.u8, np.float32(0.02), 10**30, F.b8, np.float32(0.01),
                                        0, np.float32(0.5), 7), ("a_zero_point",)),
    ]
    return extra


# --------------------------------------------------------------------------- bad values


@dataclasses.dataclass(frozen=True)
class Bad:
    label: str
    value: object
    same: bool = False    # an equivalent input: the result must equal the valid one
    strict: bool = False  # never acceptable: returning at all is a silent loss or coercion


def _with_first(arr: np.ndarray, value) -> np.ndarray:
    out = arr.copy()
    out.flat[0] = value
    return out


def bad_values(v) -> list[Bad]:
    """The bad values of ``v``'s kind (see the module docstring)."""
    out = [Bad("None", None), Bad("a string", "bogus"), Bad("an object", object())]
    if isinstance(v, (bool, np.bool_)):
        out += [Bad("1 for a flag", 1, strict=True), Bad("0 for a flag", 0, strict=True),
                Bad("'yes' for a flag", "yes", strict=True),
                Bad("a list for a flag", ["a", "b"], strict=True),
                Bad("an array of flags", np.array([True, False]), strict=True)]
    elif isinstance(v, (int, np.integer)):
        out += [Bad("2**31", 2**31), Bad("10**30", 10**30), Bad("-1", -1), Bad("0", 0),
                Bad("-(2**63)", -(2**63)), Bad("3.7 for an int", 3.7, strict=True),
                Bad("True for an int", True, strict=True),
                Bad("a float equal to it", float(v)), Bad("nan", float("nan"))]
    elif isinstance(v, (float, np.floating)):
        out += [Bad("nan", float("nan")), Bad("inf", float("inf")), Bad("-inf", float("-inf")),
                Bad("1e300", 1e300), Bad("-1e300", -1e300), Bad("0.0", 0.0), Bad("-1.0", -1.0),
                Bad("complex", complex(float(v), 1.0), strict=True),
                Bad("True for a number", True, strict=True),
                Bad("a list of two", [float(v), float(v)])]
    elif isinstance(v, str):
        out += [Bad("an unknown name", "bogus-choice"), Bad("an empty string", ""),
                Bad("a number for a string", 3), Bad("a list for a string", [v])]
    elif isinstance(v, np.ndarray):
        out += _bad_arrays(v)
    elif isinstance(v, (list, tuple)) and not hasattr(v, "_fields") and all(
            isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in v):
        out += [Bad("an empty sequence", type(v)()),
                Bad("a huge entry", type(v)([2**31] * len(v))),
                Bad("a negative entry", type(v)([-1] * len(v))),
                Bad("a float entry", type(v)([1.5] * len(v))),
                Bad("a string entry", type(v)(["a"] * len(v)))]
    elif isinstance(v, dict):
        out += [Bad("an empty mapping", {}), Bad("an unknown key", {**v, "bogus": 8}),
                Bad("a string", "bogus")]
    elif isinstance(v, (type, np.dtype)):
        out += [Bad("int16", np.int16), Bad("complex", np.complex128), Bad("bool", np.bool_)]
    else:
        out += [Bad("an int", 3), Bad("an empty list", [])]
    return out


def _bad_arrays(v: np.ndarray) -> list[Bad]:
    out = [Bad("an empty array", v[:0] if v.ndim else np.empty(0, v.dtype)),
           Bad("a 0-d array", np.asarray(v.flat[0]) if v.size else np.asarray(0, v.dtype)),
           Bad("an extra axis", v[None]),
           Bad("complex dtype", v.astype(np.complex128) + 1j, strict=True),
           Bad("bool dtype", v.astype(bool), strict=v.dtype != bool),
           Bad("object dtype", v.astype(object), strict=True),
           Bad("a list of strings", ["a"] * max(1, v.size))]
    if v.ndim >= 1:
        out.append(Bad("one axis fewer", v[0]))
        strided = np.repeat(v, 2, axis=-1)[..., ::2]
        out.append(Bad("a non-contiguous view", strided, same=True))
    if v.ndim >= 2:
        out.append(Bad("a Fortran-ordered copy", np.asfortranarray(v), same=True))
    if v.dtype.kind == "f":
        out += [Bad("a NaN", _with_first(v, np.nan)), Bad("an Inf", _with_first(v, np.inf)),
                Bad("a -Inf", _with_first(v, -np.inf)),
                Bad("1e300", _with_first(v.astype(np.float64), 1e300)),
                Bad("integer dtype", v.astype(np.int64))]
    elif v.dtype.kind in "iu":
        out += [Bad("float dtype", v.astype(np.float64)),
                Bad("int64 extremes", _with_first(v.astype(np.int64), np.iinfo(np.int64).min)),
                Bad("uint64 huge", _with_first(np.abs(v.astype(np.int64)).astype(np.uint64),
                                               2**64 - 1))]
    return out


# --------------------------------------------------------------------------- one call


def _bind(fn, args, kwargs) -> list[tuple[str, object, int | str]]:
    """(parameter name, value, position or keyword) of each argument of a call."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    star = next((p for p in params if p.kind is p.VAR_POSITIONAL), None)
    out = []
    for i, a in enumerate(args):
        if i < len(params) and params[i].kind in (params[i].POSITIONAL_ONLY,
                                                  params[i].POSITIONAL_OR_KEYWORD):
            out.append((params[i].name, a, i))
        else:
            out.append((star.name if star else f"arg{i}", a, i))
    return out + [(k, v, k) for k, v in kwargs.items()]


def _names_argument(message: str, names) -> bool:
    """Does the message name one of ``names`` (as a word, followed by what a name is)?"""
    for name in names:
        pattern = rf"(?<!\w){re.escape(name)}(?!\w)"
        for m in re.finditer(pattern, message):
            rest = message[m.end():m.end() + 8]
            if len(name) > 1 or m.start() == 0 or re.match(r"(\[|\.|=|'s| must| has| is| hol|"
                                                           r" and| \(|:|,| of| does)", rest):
                return True
    return False


def _floats_in(result, depth=0):
    """Every float array / float scalar inside a result (tuples, dicts, records)."""
    if depth > 4:
        return
    if isinstance(result, np.ndarray):
        if result.dtype.kind in "fc":
            yield result
        elif result.dtype == object:
            for item in result.flat[:64]:
                yield from _floats_in(item, depth + 1)
    elif isinstance(result, (float, np.floating)):
        yield np.asarray(result)
    elif isinstance(result, dict):
        for item in list(result.values())[:64]:
            yield from _floats_in(item, depth + 1)
    elif isinstance(result, (list, tuple)):
        for item in list(result)[:64]:
            yield from _floats_in(item, depth + 1)
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        for f in dataclasses.fields(result):
            yield from _floats_in(getattr(result, f.name, None), depth + 1)


def _has_nonfinite(result) -> bool:
    return any(not np.all(np.isfinite(a)) for a in _floats_in(result))


def _same(r1, r2, depth=0) -> bool:
    """Equal results (exact for integers, float rounding allowed for floats); unknown kinds of
    objects (models, figures) count as equal."""
    if depth > 4:
        return True
    if isinstance(r1, np.ndarray) or isinstance(r2, np.ndarray):
        a, b = np.asarray(r1), np.asarray(r2)
        if a.shape != b.shape or a.dtype.kind != b.dtype.kind:
            return False
        if a.dtype.kind in "fc":
            return bool(np.allclose(a, b, rtol=1e-5, atol=1e-12, equal_nan=True))
        if a.dtype == object:
            return all(_same(x, y, depth + 1) for x, y in zip(a.flat, b.flat, strict=True))
        return bool(np.array_equal(a, b))
    if isinstance(r1, (float, np.floating)) and isinstance(r2, (float, np.floating)):
        return bool(np.isclose(r1, r2, rtol=1e-5, atol=1e-12, equal_nan=True))
    if isinstance(r1, (int, str, bool, np.integer, np.bool_)):
        return r1 == r2
    if isinstance(r1, dict) and isinstance(r2, dict):
        return r1.keys() == r2.keys() and all(_same(r1[k], r2[k], depth + 1) for k in r1)
    if isinstance(r1, (list, tuple)) and isinstance(r2, (list, tuple)):
        return len(r1) == len(r2) and all(_same(x, y, depth + 1) for x, y in
                                          zip(r1, r2, strict=True))
    if dataclasses.is_dataclass(r1) and type(r1) is type(r2):
        return all(_same(getattr(r1, f.name), getattr(r2, f.name), depth + 1)
                   for f in dataclasses.fields(r1))
    return True


def _call(fn, args, kwargs):
    result = fn(*args, **kwargs)
    if hasattr(result, "__enter__") and hasattr(result, "__exit__"):   # a context manager
        with result as inner:
            return inner
    return result


def classify(fn, args, kwargs, names, bad: Bad | None, valid_result) -> tuple[str, str]:
    """Run one call; return (outcome, detail).  Outcomes other than "refused" and "returned"
    are failures."""
    try:
        result = _call(fn, args, kwargs)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        if bad is None:
            return "valid call failed", f"{type(exc).__name__}: {message}"
        if _names_argument(message, names):
            return "refused", ""
        return "message does not name the argument", f"{type(exc).__name__}: {message}"
    except (Exception, SystemExit) as exc:             # noqa: BLE001 - that is the point
        detail = f"{type(exc).__name__}: {str(exc)[:300]}"
        return "other exception type", detail
    if bad is None:
        return "returned", ""
    if bad.strict:
        return "accepted a value it must refuse", bad.label
    if bad.same:
        if not _same(result, valid_result):
            return "different answer for an equivalent input", bad.label
        return "returned", ""
    if _has_nonfinite(result) and not _has_nonfinite(valid_result):
        return "silent NaN/Inf", bad.label
    return "returned", ""


# --------------------------------------------------------------------------- the child process

# A spec is [callable name, argument (position or keyword) or None, bad label or None, extra
# label or None]; the child rebuilds the valid call and the bad value from this module.

_CHILD = r"""
import json, os, sys, warnings
proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)                                   # whatever the library prints goes to stderr
sys.path.insert(0, sys.argv[1])
import test_bad_input as T
T.child_main(json.load(sys.stdin), proto, sys.argv[2])
"""


def _resolve(name: str, table: str):
    if table != "qcourse":
        return getattr(importlib.import_module("test_bad_input"), table)[name]
    return public_callables()[name]


def child_main(specs, proto, table: str) -> None:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    warnings.simplefilter("error")
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", PendingDeprecationWarning)
    valid_tables = _valid_calls() if table == "qcourse" else globals()[table + "_VALID"]()
    extras = _extra_calls() if table == "qcourse" else {}
    valid_results: dict[str, object] = {}
    for index, (name, arg, label, extra, *_) in specs:
        proto.write(json.dumps({"i": index, "event": "start"}) + "\n")
        t0 = time.perf_counter()
        try:
            fn = _resolve(name, table)
            outcome, detail = _run_spec(fn, name, arg, label, extra, valid_tables, extras,
                                        valid_results)
        except Exception as exc:                       # noqa: BLE001 - a bug of this file
            outcome, detail = "harness error", f"{type(exc).__name__}: {exc}"
        if "matplotlib.pyplot" in sys.modules:         # figures from plotting functions
            sys.modules["matplotlib.pyplot"].close("all")
        proto.write(json.dumps({"i": index, "event": "done", "outcome": outcome,
                                "detail": detail, "seconds": time.perf_counter() - t0}) + "\n")
    import matplotlib.pyplot as plt

    plt.close("all")
    proto.close()


def _run_spec(fn, name, arg, label, extra, valid_tables, extras, valid_results):
    if extra is not None:
        label_, factory, names = next(e for e in extras[name] if e[0] == extra)
        args, kwargs = factory()
        return classify(fn, args, kwargs, names, Bad(label_, None), None)
    if name not in valid_results:
        args, kwargs = valid_tables[name]()
        try:
            valid_results[name] = ("ok", _call(fn, args, kwargs))
        except (Exception, SystemExit) as exc:         # noqa: BLE001
            valid_results[name] = ("error", f"{type(exc).__name__}: {exc}")
    status, valid_result = valid_results[name]
    if arg is None:
        return ("returned", "") if status == "ok" else ("valid call failed", valid_result)
    if status != "ok":
        return "skipped: the valid call failed", ""
    args, kwargs = valid_tables[name]()
    pname, value, where = next(b for b in _bind(fn, args, kwargs) if b[2] == arg)
    bad = next(b for b in bad_values(value) if b.label == label)
    if isinstance(where, int):
        args = args[:where] + (bad.value,) + args[where + 1:]
    else:
        kwargs = {**kwargs, where: bad.value}
    return classify(fn, args, kwargs, (pname,), bad, valid_result)


# --------------------------------------------------------------------------- the parent side


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_specs(specs, table: str = "qcourse", call_seconds: float = CALL_SECONDS) -> dict:
    """Run indexed specs in child processes; return index -> (outcome, detail).  A child that
    dies or stalls is replaced, and the spec it was running is marked as the crash or hang."""
    results: dict[int, tuple[str, str]] = {}
    pending = list(specs)
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + os.environ.get("PYTHONPATH", "").split(
                   os.pathsep)).rstrip(os.pathsep))
    # a callable given a bad file name (e.g. "bogus-choice") may write it: not into the repo
    scratch = tempfile.TemporaryDirectory(prefix="qcourse-fuzz-")
    while pending:
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(HERE.parent), table],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    env=env, cwd=scratch.name, preexec_fn=_limits)
            proc.stdin.write(json.dumps(pending).encode())
            proc.stdin.close()
            current, reason = _follow(proc, results, call_seconds)
            proc.stdout.close()
            err.seek(0)
            stderr = err.read().decode(errors="replace")[-1500:]
        if current is None and reason is None:
            break
        if current is None:                  # the child died before its first call
            for index, *_ in pending:
                results[index] = ("child failed to start", stderr)
            break
        results[current] = (reason, stderr.strip().splitlines()[-1] if stderr.strip() else "")
        pending = [s for s in pending if s[0] not in results]
    scratch.cleanup()
    return results


#: Seconds each call took in its child (by spec index), for finding the slow callables.
SECONDS: dict[int, float] = {}


def _follow(proc, results, call_seconds):
    """Read the child's protocol until it exits; return (spec running when it died, why)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf, current, started = b"", None, time.monotonic()
    while True:
        if sel.select(timeout=0.25):
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if msg["event"] == "start":
                    current, started = msg["i"], time.monotonic()
                else:
                    results[msg["i"]] = (msg["outcome"], msg["detail"])
                    SECONDS[msg["i"]] = msg["seconds"]
                    current = None
        if current is not None and time.monotonic() - started > call_seconds:
            proc.kill()
            proc.wait()
            return current, f"hang (no answer within {call_seconds:.0f} s)"
    rc = proc.wait()
    if current is None and rc == 0:
        return None, None
    if rc < 0:
        why = f"crash (killed by {signal.Signals(-rc).name})"
    else:
        why = f"crash (child exited with {rc})"
    return current, why


def build_specs(names=None) -> list[list]:
    table = _valid_calls()
    extras = _extra_calls()
    callables = public_callables()
    specs = []
    for name in sorted(names or table):
        if table.get(name) is None:
            continue
        fn = callables[name]
        specs.append([name, None, None, None, None])
        args, kwargs = table[name]()
        for pname, value, where in _bind(fn, args, kwargs):
            for bad in bad_values(value):
                if not (bad.same and name in DRAWINGS | TIMINGS):
                    specs.append([name, where, bad.label, None, pname])
        for label, _factory, _names in extras.get(name, ()):
            specs.append([name, None, None, label, None])
    return [[i, s] for i, s in enumerate(specs)]


FAILURES = ("valid call failed", "message does not name the argument", "other exception type",
            "different answer for an equivalent input", "silent NaN/Inf",
            "accepted a value it must refuse")


def _is_failure(name, pname, label, outcome, detail) -> bool:
    if outcome in ("refused", "returned"):
        return False
    if outcome == "silent NaN/Inf" and (name, pname) in NONFINITE_OK:
        return False
    if outcome == "other exception type" and name in DELIBERATE:
        return not detail.startswith(DELIBERATE[name][0] + ":")
    return True


def report(specs, results) -> tuple[str, list[str]]:
    """A per-callable table of outcomes, and the failures as lines."""
    per: dict[str, dict[str, int]] = {}
    failures = []
    for index, (name, arg, label, extra, *pname) in specs:
        outcome, detail = results.get(index, ("not run", ""))
        per.setdefault(name, {}).setdefault(outcome, 0)
        per[name][outcome] += 1
        if _is_failure(name, (pname or [arg])[0], label, outcome, detail):
            what = extra or (f"{(pname or [arg])[0]}={label}" if arg is not None
                             else "valid call")
            failures.append(f"{name}({what}): {outcome}: {detail}")
    lines = [f"{'callable':34s} {'calls':>5s}  outcomes"]
    for name in sorted(per):
        counts = per[name]
        lines.append(f"{name:34s} {sum(counts.values()):5d}  " + ", ".join(
            f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines), failures


# --------------------------------------------------------------------------- the tests


def test_every_public_callable_has_a_valid_call_or_a_reason():
    table = _valid_calls()
    callables = public_callables()
    pending = _not_yet_fuzzed()
    missing = sorted(set(callables) - set(table) - set(RECORDS) - pending)
    assert not missing, f"public callables without a valid call in VALID: {missing}"
    untested = pending & set(callables) - set(table)
    print(f"not fuzzed yet ({', '.join(NOT_YET_FUZZED_MODULES)}): {len(untested)}")
    stale = sorted(set(table) - set(callables))
    assert not stale, f"VALID lists names that are not public callables: {stale}"


def _split(specs, parts: int):
    return [specs[i::parts] for i in range(parts)]


#: How much of the fuzz test runs: ``ci`` (the default, what ``make test`` runs) makes every
#: valid call and every extra call, and a sample of :data:`CI_BAD_PER_CALLABLE` bad calls per
#: callable, drawn with the seed ``QCOURSE_FUZZ_SEED`` (default 0: the same calls every run, as a
#: derandomized Hypothesis profile would); ``full`` makes every bad call (about 9,000; a few
#: minutes of CPU): ``QCOURSE_FUZZ=full pytest tests/test_bad_input.py``.
FUZZ_PROFILE = os.environ.get("QCOURSE_FUZZ", "ci")    # ci, full, or pending (see above)
FUZZ_SEED = os.environ.get("QCOURSE_FUZZ_SEED", "0")
CI_BAD_PER_CALLABLE = 4


def ci_sample(specs, per_callable: int = CI_BAD_PER_CALLABLE, seed: str = "0") -> list:
    """Every valid and extra call of ``specs``, and ``per_callable`` of each callable's bad
    calls, drawn without replacement by a generator seeded with ``seed`` and the callable's name
    (so that adding a callable changes no other callable's sample)."""
    import random

    by_name: dict[str, list] = {}
    for spec in specs:
        by_name.setdefault(spec[1][0], []).append(spec)
    chosen = []
    for name, group in by_name.items():
        fixed = [sp for sp in group if sp[1][1] is None]
        bad = [sp for sp in group if sp[1][1] is not None]
        rng = random.Random(f"{seed}:{name}")
        chosen += fixed + rng.sample(bad, min(per_callable, len(bad)))
    return sorted(chosen)


def test_the_ci_sample_keeps_every_callable_and_varies_with_the_seed():
    specs = build_specs()
    sample = ci_sample(specs, seed="0")
    names = {s[0] for _, s in specs}
    assert {s[0] for _, s in sample} == names
    assert all(any(s[0] == n and s[1] is None and s[3] is None for _, s in sample)
               for n in names)                                     # every valid call
    assert sum(s[3] is not None for _, s in sample) == sum(s[3] is not None for _, s in specs)
    assert sample == ci_sample(specs, seed="0") != ci_sample(specs, seed="1")
    assert len(sample) < len(specs) / 3


def test_bad_input_never_crashes_hangs_or_answers_silently():
    pending = _not_yet_fuzzed()
    specs = build_specs()
    if FUZZ_PROFILE == "pending":
        specs = [sp for sp in specs if sp[1][0] in pending]
    else:                  # the pending modules' valid calls only (their tables stay valid)
        specs = [sp for sp in specs if sp[1][0] not in pending or sp[1][1] is None]
    if FUZZ_PROFILE not in ("full", "pending"):
        specs = ci_sample(specs, seed=FUZZ_SEED)
    print(f"profile {FUZZ_PROFILE!r} (QCOURSE_FUZZ=full runs every bad call), seed {FUZZ_SEED}")
    results: dict[int, tuple[str, str]] = {}
    # two children at a time, interleaved so that each gets slow and fast callables
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        for part in pool.map(run_specs, _split(specs, 2)):
            results.update(part)
    table, failures = report(specs, results)
    print(table)
    counts: dict[str, int] = {}
    for outcome, _ in results.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    print(f"{len(specs)} calls: {counts}")
    assert not failures, f"{len(failures)} bad calls misbehaved:\n" + "\n".join(failures[:200])


# --------------------------------------------------------------------------- proving the harness


def _broken_segfault(x):
    """Reads address 0 when given a NaN: a crash the harness must survive and name."""
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        import ctypes

        ctypes.string_at(0)
    return x.sum()


def _broken_hang(n):
    """Loops forever on a large n: a hang the harness must stop and name."""
    while n > 10**6:
        pass
    return n


def _broken_unnamed(x):
    """Refuses NaN with a message that does not say which argument."""
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("bad input")
    return x.sum()


def _broken_wrong_type(x):
    """Raises KeyError on a string."""
    if isinstance(x, str):
        raise KeyError(x)
    return np.asarray(x, dtype=np.float64).sum()


def _broken_nan(x):
    """Returns NaN for NaN input without a word."""
    return float(np.asarray(x, dtype=np.float64).sum())


def _broken_view(x):
    """Reads the raw buffer, ignoring strides: garbage for a non-contiguous view."""
    x = np.asarray(x, dtype=np.float64)
    flat = np.frombuffer(x.data if x.flags.c_contiguous else x.base.tobytes(), np.float64)
    return flat[:x.size].reshape(x.shape).copy()


def BROKEN_VALID():
    return {name: (lambda: c(np.arange(1.0, 7.0).reshape(2, 3))) for name in (
        "_broken_segfault", "_broken_unnamed", "_broken_wrong_type", "_broken_nan",
        "_broken_view")} | {"_broken_hang": lambda: c(5)}


BROKEN = {name: globals()[name] for name in BROKEN_VALID()}


def test_the_harness_catches_each_kind_of_failure():
    expected = {
        ("_broken_segfault", "a NaN"): "crash (killed by SIGSEGV)",
        ("_broken_hang", "2**31"): "hang",
        ("_broken_unnamed", "a NaN"): "message does not name the argument",
        ("_broken_wrong_type", "a string"): "other exception type",
        ("_broken_nan", "a NaN"): "silent NaN/Inf",
        ("_broken_view", "a non-contiguous view"): "different answer for an equivalent input",
    }
    specs = [[i, [name, 0, label, None]] for i, (name, label) in enumerate(expected)]
    specs.append([len(specs), ["_broken_nan", 0, "a Fortran-ordered copy", None]])  # passes
    results = run_specs(specs, table="BROKEN", call_seconds=3.0)
    for (index, (name, _, label, _)), want in zip(specs, [*expected.values(), "returned"],
                                                   strict=True):
        outcome, detail = results[index]
        assert outcome.startswith(want), (name, label, outcome, detail)
    # the harness went on after the crash and the hang: every call has an outcome
    assert len(results) == len(specs)
    table, failures = report(specs, results)
    assert len(failures) == len(expected) and "_broken_segfault" in table


# --------------------------------------------------------------------------- one home for checks

#: Validation helpers that used to be written again in several modules (issue 13): each now
#: lives in qcourse/_checks.py only.
KNOWN_DUPLICATES = ("_check_int", "_check_bool", "_check_bits", "_check_real", "_check_positive",
                    "_real_array", "_int_array", "_onnx_scale", "_check_choice",
                    "_check_features", "_check_labels", "_check_int_param", "_check_batch",
                    "_check_fraction", "_float_array", "_integer_values", "_check_threads",
                    "_normalize_axis", "_INT32_MIN", "_INT32_MAX")


def _private_definitions() -> dict[str, list[str]]:
    """Top-level private names (functions, classes, constants) -> the modules defining them."""
    import ast

    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "qcourse").rglob("*.py")):
        if "grading" in path.parts or path.stem == "grading":
            continue                 # grading is a tool, being split into a package elsewhere
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module in NOT_YET_FUZZED_MODULES:
            continue                 # not moved onto qcourse._checks yet (see the list)
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def test_no_private_helper_is_defined_in_two_modules():
    found = _private_definitions()
    twice = {name: paths for name, paths in found.items() if len(paths) > 1}
    assert not twice, f"private helpers defined in more than one module: {twice}"
    outside = {name: paths for name, paths in found.items()
               if name in KNOWN_DUPLICATES and paths != ["qcourse/_checks.py"]}
    assert not outside, f"validation helpers outside qcourse/_checks.py: {outside}"
