# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Typed int8 loops, and nothing else.

Every function here trusts its caller: shapes, dtypes, contiguity and the int32 overflow bound
are checked in ``qcourse/kernels.py``, which allocates the output and carries the documentation.
The loops run without the GIL.
"""

from libc.stdint cimport int8_t, int32_t


def matmul_s8s8_ikj(const int8_t[:, ::1] a, const int8_t[:, ::1] b, int32_t[:, ::1] out):
    """out[i, j] = sum_k a[i, k] * b[k, j]; out must be zero on entry (C-contiguous, int32)."""
    cdef Py_ssize_t m = a.shape[0], kk = a.shape[1], n = b.shape[1]
    cdef Py_ssize_t i, k, j
    cdef int32_t aik
    with nogil:
        for i in range(m):
            for k in range(kk):
                aik = a[i, k]
                for j in range(n):
                    out[i, j] += aik * b[k, j]
