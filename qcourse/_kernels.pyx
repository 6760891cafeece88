# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Typed int8 loops, and nothing else.

Every function here trusts its caller: shapes, dtypes, contiguity and the int32 overflow bound
are checked in ``qcourse/kernels.py``, which allocates the outputs and carries the documentation.
All loops run without the GIL.  Loops that need particular instructions are C, in
``qcourse/csrc/`` (``qgemm.h`` states their contract), compiled once per instruction set and
chosen at run time.
"""

from libc.stdint cimport int8_t, int16_t, int32_t, uint8_t, uint32_t


cdef extern from "csrc/qgemm.h" nogil:
    int QC_PATH_PORTABLE
    int QC_PATH_AVX2
    int QC_PATH_VNNI512
    int QC_NR
    int qc_path_supported(int path)
    int qc_best_path()
    void qc_u8s8(int path, const uint8_t *au, const int8_t *bt, const int32_t *colsum,
                 int32_t *c, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k)
    void qc_pack_b(const int8_t *b, Py_ssize_t k, Py_ssize_t n, uint8_t *packed, int32_t *colsum)
    Py_ssize_t qc_packed_b_size(Py_ssize_t k, Py_ssize_t n)
    Py_ssize_t qc_scratch_size(Py_ssize_t m, Py_ssize_t k)
    Py_ssize_t qc_groups(Py_ssize_t n)
    int QC_NG
    int QC_MR
    int QC_KCQ
    int QC_MCT
    double qc_vnni_peak(Py_ssize_t iters, int threads)
    int QC_PEAK_MACS_PER_ITER
    ctypedef struct qc_requant_args:
        const int32_t *bias
        const int32_t *zb
        int32_t za
        const float *mult
        Py_ssize_t mult_len
        int32_t zp
        int32_t qmin
        int32_t qmax
        uint8_t *y
    int qc_gemm_packed_requant(int path, const int8_t *a, int32_t *scratch, const uint8_t *bp,
                               const int32_t *colsum, const qc_requant_args *args, Py_ssize_t m,
                               Py_ssize_t n, Py_ssize_t k, int threads)
    int qc_gemm_packed(int path, const int8_t *a, int32_t *scratch, const uint8_t *bp,
                       const int32_t *colsum, int32_t *c, Py_ssize_t m, Py_ssize_t n,
                       Py_ssize_t k, int threads)


cdef extern from "csrc/w4a8.h" nogil:
    int QC_W4_GROUP_COLS
    int QC_W4_BROKEN
    Py_ssize_t qc_w4_set_prefetch(Py_ssize_t nbytes)
    Py_ssize_t qc_w4_packed_size(Py_ssize_t k, Py_ssize_t n, Py_ssize_t g, int has_zp)
    void qc_w4_pack(const int8_t *codes, const float *scales, const int8_t *zp, Py_ssize_t k,
                    Py_ssize_t n, Py_ssize_t g, uint8_t *packed)
    void qc_w4_quantize_rows(int path, const float *x, Py_ssize_t m, Py_ssize_t k, Py_ssize_t g,
                             int8_t *xq, int32_t *gsum, float *sx)
    int qc_w4a8(int path, const int8_t *xq, const int32_t *gsum, const float *sx,
                const uint8_t *packed, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, Py_ssize_t g,
                int has_zp, float *y, int32_t *sums, int threads)
    double qc_read_bandwidth(int path, const uint8_t *buf, Py_ssize_t nbytes, int threads,
                             int rounds)


PATH_PORTABLE = QC_PATH_PORTABLE
PATH_AVX2 = QC_PATH_AVX2
PATH_VNNI512 = QC_PATH_VNNI512
PANEL_WIDTH = QC_NR
GROUP_WIDTH = QC_NR * QC_NG
TILE_ROWS = QC_MR
K_BLOCK = 4 * QC_KCQ  # values of k per cache block of the VNNI kernel
CHUNK_ROWS = QC_MCT * QC_MR  # rows of A per chunk of row tiles of the VNNI kernel


def packed_b_size(Py_ssize_t k, Py_ssize_t n):
    """Bytes of B (k x n) packed by pack_b; its colsum needs padded_columns(n) entries."""
    return qc_packed_b_size(k, n)


def padded_columns(Py_ssize_t n):
    return qc_groups(n) * QC_NR * QC_NG


def scratch_size(Py_ssize_t m, Py_ssize_t n):
    """int32 entries of scratch gemm_packed needs for an (m x k) . (k x n) product."""
    return qc_scratch_size(m, n)


def vnni_peak_loop(Py_ssize_t iters, int threads):
    """iters x 16 register-only vpdpbusd on each of `threads` threads, each timing its own loop.

    Returns (MACs done in all, MACs per second summed over the threads)."""
    cdef double rate
    with nogil:
        rate = qc_vnni_peak(iters, threads)
    return iters * QC_PEAK_MACS_PER_ITER * threads, rate


def path_supported(int path):
    """True if this CPU can run the given path (CPUID, checked at run time)."""
    return bool(qc_path_supported(path))


def best_path():
    """The fastest path this CPU supports."""
    return qc_best_path()


def matmul_s8s8_naive(const int8_t[:, ::1] a not None, const int8_t[:, ::1] b not None,
                      int32_t[:, ::1] out not None):
    """Rung 1: out[i, j] = sum_k a[i, k] * b[k, j], the textbook i-j-k order (b read down a column)."""
    cdef Py_ssize_t m = a.shape[0], kk = a.shape[1], n = b.shape[1]
    cdef Py_ssize_t i, j, k
    cdef int32_t acc
    with nogil:
        for i in range(m):
            for j in range(n):
                acc = 0
                for k in range(kk):
                    acc = acc + a[i, k] * b[k, j]
                out[i, j] = acc


def matmul_s8s8_ikj(const int8_t[:, ::1] a not None, const int8_t[:, ::1] b not None,
                    int32_t[:, ::1] out not None):
    """Rung 2: i-k-j order, b read along its rows; out must be zero on entry."""
    cdef Py_ssize_t m = a.shape[0], kk = a.shape[1], n = b.shape[1]
    cdef Py_ssize_t i, k, j
    cdef int32_t aik
    with nogil:
        for i in range(m):
            for k in range(kk):
                aik = a[i, k]
                for j in range(n):
                    out[i, j] += aik * b[k, j]


def matmul_s8s8_bt(const int8_t[:, ::1] a not None, const int8_t[:, ::1] bt not None,
                   int32_t[:, ::1] out not None):
    """Rung 3: out[i, j] = a[i, :] . bt[j, :] with bt = b transposed, both rows contiguous."""
    cdef Py_ssize_t m = a.shape[0], kk = a.shape[1], n = bt.shape[0]
    cdef Py_ssize_t i, j, k
    cdef int32_t acc
    with nogil:
        for i in range(m):
            for j in range(n):
                acc = 0
                for k in range(kk):
                    acc = acc + a[i, k] * bt[j, k]
                out[i, j] = acc


def matmul_u8s8(int path, const uint8_t[:, ::1] au not None, const int8_t[:, ::1] bt not None,
                const int32_t[::1] colsum not None, int32_t[:, ::1] out not None):
    """Rung 4: out = (a + 128) . bt^T - 128 * colsum, with au = a + 128 given as uint8."""
    cdef Py_ssize_t m = au.shape[0], kk = au.shape[1], n = bt.shape[0]
    with nogil:
        qc_u8s8(path, &au[0, 0], &bt[0, 0], &colsum[0], &out[0, 0], m, n, kk)


def pack_b(const int8_t[:, ::1] b not None, uint8_t[::1] packed not None,
           int32_t[::1] colsum not None):
    """Pack b (k x n) as b + 128 into groups of 64 columns of k-quads, and sum its columns."""
    with nogil:
        qc_pack_b(&b[0, 0], b.shape[0], b.shape[1], &packed[0], &colsum[0])


cdef int _check_packed(const uint8_t[::1] packed, const int32_t[::1] colsum, Py_ssize_t k,
                       Py_ssize_t n) except -1:
    """The packed operand must cover k x n and start on a 64-byte boundary (aligned loads)."""
    if (packed.shape[0] < qc_packed_b_size(k, n)
            or colsum.shape[0] < qc_groups(n) * QC_NR * QC_NG):
        raise ValueError(f"packed B holds {packed.shape[0]} bytes and {colsum.shape[0]} column "
                         f"sums, too few for K={k}, N={n}")
    if <size_t>&packed[0] % 64:
        raise ValueError("packed B must start on a 64-byte boundary")
    return 0


def gemm_packed(int path, const int8_t[:, ::1] a not None, int32_t[::1] scratch not None,
                const uint8_t[::1] packed not None, const int32_t[::1] colsum not None,
                int32_t[:, ::1] out not None, int threads):
    """Rung 5: out = a . b from b packed by pack_b; returns the path that ran."""
    cdef int ran
    _check_packed(packed, colsum, a.shape[1], out.shape[1])
    with nogil:
        ran = qc_gemm_packed(path, &a[0, 0], &scratch[0], &packed[0], &colsum[0], &out[0, 0],
                             a.shape[0], out.shape[1], a.shape[1], threads)
    if ran < 0:
        raise MemoryError("could not allocate the per-thread int32 buffer")
    return ran


def gemm_packed_requant(int path, const int8_t[:, ::1] a not None, int32_t[::1] scratch not None,
                        const uint8_t[::1] packed not None, const int32_t[::1] colsum not None,
                        const int32_t[::1] bias not None, int a_zero_point,
                        const int32_t[::1] b_zero_point not None,
                        const float[::1] mult not None, int zero_point, int qmin, int qmax,
                        uint8_t[:, ::1] y not None, int threads):
    """Rung 6: the packed GEMM with requantization to 8 bits fused into the write-out.

    bias and b_zero_point may be empty (none, zero); mult has 1 or n entries.  Returns the path
    that ran."""
    cdef qc_requant_args args
    cdef int ran
    _check_packed(packed, colsum, a.shape[1], y.shape[1])
    args.bias = &bias[0] if bias.shape[0] > 0 else NULL
    args.zb = &b_zero_point[0] if b_zero_point.shape[0] > 0 else NULL
    args.za = a_zero_point
    args.mult = &mult[0]
    args.mult_len = mult.shape[0]
    args.zp = zero_point
    args.qmin = qmin
    args.qmax = qmax
    args.y = &y[0, 0]
    with nogil:
        ran = qc_gemm_packed_requant(path, &a[0, 0], &scratch[0], &packed[0], &colsum[0], &args,
                                     a.shape[0], y.shape[1], a.shape[1], threads)
    if ran < 0:
        raise MemoryError("could not allocate the per-thread int32 buffer")
    return ran


cdef extern from "csrc/depthwise.h" nogil:
    ctypedef struct qc_dw_args:
        const int8_t *x
        const int32_t *bias
        const int16_t *wz
        const float *mult
        int32_t zx, zp, qmin, qmax
        Py_ssize_t n, h, wd, c, kh, kw, stride, pad, oh, ow
        uint8_t *y
    int qc_dw_requant(int path, const qc_dw_args *a, Py_ssize_t n0, Py_ssize_t n1)


def depthwise_requant(int path, const int8_t[:, :, :, ::1] x, const int16_t[:, :, ::1] wz,
                      const int32_t[::1] bias, const float[::1] mult, int x_zero_point,
                      int zero_point, int qmin, int qmax, int stride, int pad,
                      uint8_t[:, :, :, ::1] y):
    """Depthwise convolution, NHWC, with requantization fused; wz = w - zw as int16 (kh, kw, c).

    bias may be empty (none); mult has c entries."""
    cdef qc_dw_args args
    cdef int status
    args.x = &x[0, 0, 0, 0]
    args.bias = &bias[0] if bias.shape[0] > 0 else NULL
    args.wz = &wz[0, 0, 0]
    args.mult = &mult[0]
    args.zx = x_zero_point
    args.zp = zero_point
    args.qmin = qmin
    args.qmax = qmax
    args.n = x.shape[0]
    args.h = x.shape[1]
    args.wd = x.shape[2]
    args.c = x.shape[3]
    args.kh = wz.shape[0]
    args.kw = wz.shape[1]
    args.stride = stride
    args.pad = pad
    args.oh = y.shape[1]
    args.ow = y.shape[2]
    args.y = &y[0, 0, 0, 0]
    with nogil:
        status = qc_dw_requant(path, &args, 0, args.n)
    if status < 0:
        raise MemoryError("could not allocate the depthwise row buffers")


# --- W4A8: int4 weights in groups, int8 activations per row (csrc/w4a8.h) -----------------------

W4_GROUP_COLS = QC_W4_GROUP_COLS
W4_BROKEN = QC_W4_BROKEN  # path | W4_BROKEN: a deliberately broken kernel, for the tests


def w4_set_prefetch(Py_ssize_t nbytes):
    """Set the W4A8 VNNI one-row (M = 1) kernel's software prefetch distance (bytes ahead, 0 for
    none, the default; rounded down to a cache line) for later calls; returns the previous one.
    For tuning on a machine."""
    if nbytes < 0 or nbytes > 1 << 20:
        raise ValueError(f"nbytes must be in [0, 1048576], got {nbytes}")
    return qc_w4_set_prefetch(nbytes)


def w4_packed_size(Py_ssize_t k, Py_ssize_t n, Py_ssize_t g, bint has_zp):
    """Bytes of an (n x k) int4 weight packed by w4_pack with groups of g."""
    return qc_w4_packed_size(k, n, g, has_zp)


cdef int _check_w4(const uint8_t[::1] packed, Py_ssize_t k, Py_ssize_t n, Py_ssize_t g,
                   bint has_zp) except -1:
    """Packed int4 weights must describe whole groups of 8k values, cover k x n and start on a
    64-byte boundary (the kernels' aligned loads)."""
    if n < 1 or k < 1 or g < 8 or g % 8 or k % g:
        raise ValueError(f"packed int4 weights need n >= 1 and groups g of a multiple of 8 "
                         f"dividing k, got n={n}, k={k}, g={g}")
    if packed.shape[0] < qc_w4_packed_size(k, n, g, has_zp):
        raise ValueError(f"packed int4 weights hold {packed.shape[0]} bytes, too few for K={k}, "
                         f"N={n}, group size {g}")
    if <size_t>&packed[0] % 64:
        raise ValueError("packed int4 weights must start on a 64-byte boundary")
    return 0


cdef int _check_w4_rows(Py_ssize_t m, Py_ssize_t k, Py_ssize_t g, const int8_t[:, ::1] xq,
                        const int32_t[:, ::1] gsum) except -1:
    if m < 1 or xq.shape[0] != m or xq.shape[1] != k or gsum.shape[0] != m or (
            gsum.shape[1] != k // g):
        raise ValueError(f"activation buffers do not fit m={m}, k={k}, g={g}")
    return 0


def w4_pack(const int8_t[:, ::1] codes not None, const float[:, ::1] scales not None,
            zero_points, Py_ssize_t g, uint8_t[::1] packed not None):
    """codes (n x k, in [-8, 7]), scales (n x k/g), zero_points (n x k/g int8 or None) -> packed."""
    cdef const int8_t[:, ::1] zp
    cdef const int8_t *zp_ptr = NULL
    cdef Py_ssize_t n = codes.shape[0], k = codes.shape[1]
    _check_w4(packed, k, n, g, zero_points is not None)
    if scales.shape[0] != n or scales.shape[1] != k // g:
        raise ValueError(f"scales must be ({n}, {k // g}), got ({scales.shape[0]}, "
                         f"{scales.shape[1]})")
    if zero_points is not None:
        zp = zero_points
        if zp.shape[0] != n or zp.shape[1] != k // g:
            raise ValueError(f"zero points must be ({n}, {k // g})")
        zp_ptr = &zp[0, 0]
    with nogil:
        qc_w4_pack(&codes[0, 0], &scales[0, 0], zp_ptr, k, n, g, &packed[0])


def w4_quantize_rows(int path, const float[:, ::1] x not None, Py_ssize_t g,
                     int8_t[:, ::1] xq not None, int32_t[:, ::1] gsum not None,
                     float[::1] sx not None):
    """Per-row int8 activations: xq, the per-group sums of xq, and the row scales sx."""
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1]
    if g < 1 or k % g:
        raise ValueError(f"g={g} must divide k={k}")
    _check_w4_rows(m, k, g, xq, gsum)
    if sx.shape[0] != m:
        raise ValueError(f"sx must hold {m} row scales")
    with nogil:
        qc_w4_quantize_rows(path, &x[0, 0], m, k, g, &xq[0, 0], &gsum[0, 0], &sx[0])


def w4a8(int path, const float[:, ::1] x not None, const uint8_t[::1] packed not None,
         Py_ssize_t n, Py_ssize_t g, bint has_zp, int8_t[:, ::1] xq not None,
         int32_t[:, ::1] gsum not None, float[::1] sx not None, float[:, ::1] y not None,
         int threads):
    """y = the W4A8 product of x and the packed weights (activations quantized into xq, gsum, sx
    on the way); returns the path that ran."""
    cdef int ran
    cdef Py_ssize_t m = x.shape[0], k = x.shape[1]
    _check_w4(packed, k, n, g, has_zp)
    _check_w4_rows(m, k, g, xq, gsum)
    if sx.shape[0] != m or y.shape[0] != m or y.shape[1] != n:
        raise ValueError(f"sx and y must fit m={m}, n={n}")
    with nogil:
        qc_w4_quantize_rows(path, &x[0, 0], m, k, g, &xq[0, 0], &gsum[0, 0], &sx[0])
        ran = qc_w4a8(path, &xq[0, 0], &gsum[0, 0], &sx[0], &packed[0], m, n, k, g, has_zp,
                      &y[0, 0], NULL, threads)
    return ran


def w4a8_group_sums(int path, const int8_t[:, ::1] xq not None,
                    const int32_t[:, ::1] gsum not None, const uint8_t[::1] packed not None,
                    Py_ssize_t n, Py_ssize_t g, bint has_zp, int32_t[:, :, ::1] sums not None,
                    int threads):
    """The kernel's integer partial sums P (m x n x k/g) instead of y; returns the path."""
    cdef int ran
    cdef float unused = 0
    cdef Py_ssize_t m = xq.shape[0], k = xq.shape[1]
    _check_w4(packed, k, n, g, has_zp)
    _check_w4_rows(m, k, g, xq, gsum)
    if sums.shape[0] != m or sums.shape[1] != n or sums.shape[2] != k // g:
        raise ValueError(f"sums must be ({m}, {n}, {k // g})")
    with nogil:
        ran = qc_w4a8(path, &xq[0, 0], &gsum[0, 0], &unused, &packed[0], m, n, k, g, has_zp,
                      NULL, &sums[0, 0, 0], threads)
    return ran


def read_bandwidth(int path, const uint8_t[::1] buf not None, int threads, int rounds):
    """Bytes per second with which `threads` threads read their shares of buf (best round)."""
    cdef double rate
    with nogil:
        rate = qc_read_bandwidth(path, &buf[0], buf.shape[0], threads, rounds)
    return rate
