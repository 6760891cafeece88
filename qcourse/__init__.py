"""qcourse: the library behind the course on integer quantization of neural networks.

Each module matches one chapter of the book by its stem (``qcourse/floats.py`` <->
``book/floats.md``).  The names each module exports are listed in its ``__all__`` and imported
here explicitly.
"""

from qcourse.kernels import INT32_MAX, matmul_int8, matmul_int8_reference, max_k_s8s8

__version__ = "0.1.0"

__all__ = [
    "INT32_MAX",
    "matmul_int8",
    "matmul_int8_reference",
    "max_k_s8s8",
]
