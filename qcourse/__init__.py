"""qcourse: the library behind the course on integer quantization of neural networks.

Each module matches one chapter of the book by its stem (``qcourse/floats.py`` <->
``book/floats.md``).  The names each module exports are listed in its ``__all__`` and imported
here explicitly.
"""

from qcourse.floats import (
    BF16,
    ENERGY_45NM_PJ,
    ENERGY_SOURCE,
    FORMATS,
    FP8_E4M3FN,
    FP8_E5M2,
    FP16,
    FP32,
    FP64,
    FloatFormat,
    FloatParts,
    bit_string,
    breakdown,
    decode,
    double_rounding_inputs,
    encode,
    encode_via,
    enumerate_format,
    fields,
    ulp,
)
from qcourse.kernels import (
    INT32_MAX,
    LADDER,
    PackedB,
    available_paths,
    best_path,
    get_num_threads,
    matmul_int8,
    matmul_int8_bt,
    matmul_int8_ikj,
    matmul_int8_naive,
    matmul_int8_packed,
    matmul_int8_reference,
    matmul_int8_requant,
    matmul_int8_requant_reference,
    matmul_int8_u8s8,
    max_k_s8s8,
    prepack,
    set_num_threads,
)

__version__ = "0.1.0"

__all__ = [
    # floats
    "BF16",
    "ENERGY_45NM_PJ",
    "ENERGY_SOURCE",
    "FORMATS",
    "FP8_E4M3FN",
    "FP8_E5M2",
    "FP16",
    "FP32",
    "FP64",
    "FloatFormat",
    "FloatParts",
    "bit_string",
    "breakdown",
    "decode",
    "double_rounding_inputs",
    "encode",
    "encode_via",
    "enumerate_format",
    "fields",
    "ulp",
    # kernels
    "INT32_MAX",
    "LADDER",
    "PackedB",
    "available_paths",
    "best_path",
    "get_num_threads",
    "matmul_int8",
    "matmul_int8_bt",
    "matmul_int8_ikj",
    "matmul_int8_naive",
    "matmul_int8_packed",
    "matmul_int8_reference",
    "matmul_int8_requant",
    "matmul_int8_requant_reference",
    "matmul_int8_u8s8",
    "max_k_s8s8",
    "prepack",
    "set_num_threads",
]
