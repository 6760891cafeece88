/* region: w4_layout */
/*
 * qcourse/csrc/w4a8.h -- the contract of the W4A8 kernel: int4 weights in groups along K, int8
 * activations quantized per row on the fly, int32 dot products per group, float32 out.
 *
 * Files: w4a8.c (packing, activation quantization, the driver, the portable kernel),
 * w4a8_avx2.c, w4a8_vnni512.c; measure.c measures the read bandwidth the kernel is held to.
 * Paths and target attributes as in qgemm.h.
 *
 * WHAT IT COMPUTES, for x (m x k float32), codes q (n x k, in [-8, 7]), scales s (n x G float32,
 * G = k / g groups of g consecutive k) and optional zero points z (n x G, in [-8, 7]):
 *
 *   amax_i = max_k |x[i, k]|,   inv_i = 127 / amax_i,   sx_i = amax_i / 127     (float32;
 *            inv_i = sx_i = 0 when amax_i = 0; inv_i = 2^100, sx_i = 2^-100 when 127 / amax_i
 *            would exceed 2^100)
 *   xq[i, k] = round_half_even(x[i, k] * inv_i)                    in [-127, 127], int8
 *   P[i, n, j] = sum_{k in group j} xq[i, k] * (q[n, k] - z[n, j])      exact int32
 *   acc = 0;  for j = 0 .. G-1:  acc = acc + (float)P[i, n, j] * s[n, j]  (float32, this order)
 *   y[i, n] = acc * sx_i                                                  (float32)
 *
 * Every float operation is a single IEEE float32 operation (the build contracts none into an
 * FMA), so every path, and the NumPy reference that performs the same operations in the same
 * order, gives the same y bit for bit.
 *
 * LAYOUT of packed weights (qc_w4_pack): n padded to a multiple of 64 (a column group of 4
 * panels of 16), g a multiple of 8, k a multiple of g. For column group cg and group j, one block
 * of qc_w4_block_bytes(g, zp) bytes at packed + (cg * G + j) * block_bytes:
 *
 *   codes: g / 8 "octs" of 8 k, each 4 panels x 64 bytes; in oct o of panel p, byte c * 4 + t
 *          holds, for column n = 64 cg + 16 p + c,
 *             low nibble:  q[n, j g + 8 o + t] + 8        (k of quad 2o)
 *             high nibble: q[n, j g + 8 o + 4 + t] + 8    (k of quad 2o + 1)
 *   scales: 64 float32, s[64 cg + c, j] (0 in the padding)
 *   zero points (only when given): 64 int8, 8 + z[64 cg + c, j]
 *
 * So the kernel reads each column group as one sequential stream, and one 64-byte load of codes
 * unpacks (and, shift, and) into two registers of unsigned bytes in [0, 15] for vpdpbusd, 16
 * columns x 4 k each (the one-row kernel instead keeps v & 0xF0, 16 x the high nibble, and
 * divides its sum by 16 once per group). The codes are stored with +8 (unsigned), and the
 * kernels subtract (8 + z) * gsum[i, j], gsum[i, j] = sum_{k in group j} xq[i, k], per group.
 */
/* endregion: w4_layout */
#ifndef QCOURSE_W4A8_H
#define QCOURSE_W4A8_H

#include "qgemm.h"

#define QC_W4_GROUP_COLS 64 /* columns per column group */
/* A deliberately broken kernel, for the tests that must show they catch one: path | QC_W4_BROKEN
 * runs that path with the nibble mask 0x0E for 0x0F (bit 0 of every code + 8 dropped, an
 * off-by-one on odd codes). Never set by the library itself. */
#define QC_W4_BROKEN 0x100
/* Software prefetch distance of the VNNI one-row (M = 1) kernel, in bytes ahead of the codes being
 * read (0: none, the hardware prefetcher alone); the default, changed at run time by
 * qc_w4_set_prefetch (the tile of M >= 2 rows has its own, QC_W4_TILE_PREFETCH). None:
 * the codes are one sequential stream, which the hardware prefetcher follows; on the 2-core
 * EPYC (Zen 4) a software prefetch 512 to 8192 bytes ahead made M = 1 slower, from the cache
 * and from DRAM alike (e.g. 0.17 ms against 0.15 ms from the cache at 1024 bytes). */
#ifndef QC_W4_PREFETCH
#define QC_W4_PREFETCH 0
#endif

static inline ptrdiff_t qc_w4_block_bytes(ptrdiff_t g, int has_zp) {
    return g / 8 * 256 + 256 + (has_zp ? 64 : 0);
}
static inline ptrdiff_t qc_w4_col_groups(ptrdiff_t n) {
    return (n + QC_W4_GROUP_COLS - 1) / QC_W4_GROUP_COLS;
}
static inline ptrdiff_t qc_w4_packed_size(ptrdiff_t k, ptrdiff_t n, ptrdiff_t g, int has_zp) {
    return qc_w4_col_groups(n) * (k / g) * qc_w4_block_bytes(g, has_zp);
}

/* codes (n x k int8), scales (n x G float32), zp (n x G int8 or NULL) -> packed. */
QC_INTERNAL void qc_w4_pack(const int8_t *codes, const float *scales, const int8_t *zp,
                            ptrdiff_t k, ptrdiff_t n, ptrdiff_t g, uint8_t *packed);

/* Activations, as above: x (m x k) -> xq (m x k), gsum (m x G), sx (m). */
QC_INTERNAL void qc_w4_quantize_rows(int path, const float *x, ptrdiff_t m, ptrdiff_t k,
                                     ptrdiff_t g, int8_t *xq, int32_t *gsum, float *sx);

/* y (m x n float32) from xq, gsum, sx and packed weights; or, when sums is not NULL, the integer
 * partial sums P (m x n x G int32) into sums and no y. threads: OpenMP threads taking column
 * groups one at a time. Returns the path that ran. */
QC_INTERNAL int qc_w4a8(int path, const int8_t *xq, const int32_t *gsum, const float *sx,
                        const uint8_t *packed, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, ptrdiff_t g,
                        int has_zp, float *y, int32_t *sums, int threads);

/* Set the prefetch distance of later calls (bytes, 0 for none; for tuning it on a machine, between
 * calls, not during one); returns the previous distance. */
QC_INTERNAL ptrdiff_t qc_w4_set_prefetch(ptrdiff_t bytes);

/* One column group (cg) for rows [i0, i0 + rows), per path; the same arguments as qc_w4a8. */
typedef struct {
    const int8_t *xq;
    const int32_t *gsum;
    const float *sx;
    const uint8_t *packed;
    ptrdiff_t m, n, k, g;
    int has_zp;
    float *y;
    int32_t *sums;
    uint8_t mask;       /* 0x0F, the nibble mask (0x0E: QC_W4_BROKEN) */
    ptrdiff_t prefetch; /* the VNNI one-row kernel's prefetch distance in bytes, 0 for none */
} qc_w4_args;
QC_INTERNAL void qc_w4_group_portable(const qc_w4_args *w, ptrdiff_t cg);
#if QC_X86
QC_INTERNAL void qc_w4_group_avx2(const qc_w4_args *w, ptrdiff_t cg);
QC_INTERNAL void qc_w4_group_vnni512(const qc_w4_args *w, ptrdiff_t cg);
#endif

/* The machine's read bandwidth: `threads` threads each sum their share of buf (bytes) `rounds`
 * times with the loads of `path`, each timing its own loop after a barrier; returns
 * bytes per second summed over the threads (the best round of each thread). */
QC_INTERNAL double qc_read_bandwidth(int path, const uint8_t *buf, ptrdiff_t bytes,
                                     int threads, int rounds);

#endif /* QCOURSE_W4A8_H */
