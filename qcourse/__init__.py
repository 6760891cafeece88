"""qcourse: the library behind the course on integer quantization of neural networks.

Each module matches one chapter of the book by its stem (``qcourse/floats.py`` <->
``book/floats.md``); ``qcourse.nn`` is the small NumPy network the quantization chapters work on,
``qcourse.datasets`` the data they share, ``qcourse.deploy`` the export to ONNX Runtime and
LiteRT and the check of what they compute; ``qcourse.nn.lm`` (with ``qcourse.nn.lm_training``) is
the byte-level language model of the transformer, kv_cache and weight_only chapters.  Reach a name
through its module, as the chapters do: ``qcourse.calibration.MinMaxObserver``,
``from qcourse.ptq import static_ptq``.

The package itself exports the modules and the small core a reader meets in every chapter: the
affine quantizer (``QParams`` ... ``quantize_weight``), the ONNX operators it reproduces bit for
bit (``quantize_linear``, ``dequantize_linear``, ``matmul_integer``, ``qlinear_matmul``), the
fixed-point requantization (``quantize_multiplier``, ``multiply_by_quantized_multiplier``), the
int8 kernels (``matmul_int8``, ``matmul_int8_requant``, ``prepack``), the quantized layer
(``QuantizedLinear``) and the float codec (``encode``, ``decode``).

Any other name the package exported before this release still resolves here, with a
``DeprecationWarning`` that gives its module; the next release removes that fallback.
"""

import importlib
import warnings

# The core modules load with the package; every other chapter's module loads the first time it
# is named (``qcourse.cnn``, ``from qcourse import cnn``, ``import qcourse.cnn``), so that a
# notebook, a grading process or a test pays only for what it uses (``import qcourse`` took
# 0.5 s with every module, most of it the networks and their progress bars).
from qcourse import affine, fixed_point, floats, int_matmul, kernels
from qcourse.affine import (
    QParams,
    choose_qparams,
    dequantize,
    dequantize_linear,
    fake_quantize,
    qparams_from_range,
    qrange,
    quantize,
    quantize_linear,
    quantize_weight,
)
from qcourse.fixed_point import multiply_by_quantized_multiplier, quantize_multiplier
from qcourse.floats import decode, encode
from qcourse.int_matmul import QuantizedLinear, matmul_integer, qlinear_matmul
from qcourse.kernels import matmul_int8, matmul_int8_requant, prepack

__version__ = "0.1.0"

#: The modules that load when first named.
_LAZY_MODULES = ("calibration", "cnn", "conv", "datasets", "deploy", "kv_cache", "lowbit",
                 "mixed_precision", "nn", "ptq", "qat", "transformer", "weight_only")

__all__ = [
    # the modules
    "affine",
    "calibration",
    "cnn",
    "conv",
    "datasets",
    "deploy",
    "fixed_point",
    "floats",
    "int_matmul",
    "kernels",
    "kv_cache",
    "lowbit",
    "mixed_precision",
    "nn",
    "ptq",
    "qat",
    "transformer",
    "weight_only",
    # the affine quantizer
    "QParams",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "qparams_from_range",
    "qrange",
    "quantize",
    "quantize_weight",
    # the ONNX operators
    "dequantize_linear",
    "matmul_integer",
    "qlinear_matmul",
    "quantize_linear",
    # requantization, the layer, the kernels
    "QuantizedLinear",
    "matmul_int8",
    "matmul_int8_requant",
    "multiply_by_quantized_multiplier",
    "prepack",
    "quantize_multiplier",
    # floats
    "decode",
    "encode",
]

# The chapter modules, searched in this order for a name the package used to export.
_FORMER_HOMES = ("floats", "fixed_point", "affine", "calibration", "int_matmul", "kernels",
                 "lowbit", "mixed_precision", "ptq", "qat")


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"qcourse.{name}")  # the import binds it here too
    if not name.startswith("_"):
        for stem in _FORMER_HOMES:
            module = importlib.import_module(f"qcourse.{stem}")
            if name in module.__all__:
                warnings.warn(f"qcourse.{name} is deprecated and goes in the next release: use "
                              f"{module.__name__}.{name}", DeprecationWarning, stacklevel=2)
                return getattr(module, name)
    raise AttributeError(f"module 'qcourse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_MODULES))
