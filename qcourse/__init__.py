"""qcourse: the library behind the course on integer quantization of neural networks.

Each module matches one chapter of the book by its stem (``qcourse/floats.py`` <->
``book/floats.md``).  The names each module exports are listed in its ``__all__`` and imported
here explicitly.
"""

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
