/*
 * qcourse/_depthwise.h -- the int8 depthwise convolution with fused requantization.
 *
 * Included from _kernels.pyx after _qgemm.h (whose QC_PATH_* constants, QC_X86 and
 * qc_round_half_even it uses). Nothing here checks its arguments: qcourse/kernels.py does.
 *
 * Layout: NHWC activations (channels contiguous), weights (kh, kw, C), one filter per channel.
 * For output (n, i, j, c):
 *
 *     acc = bias[c] + sum over the taps (u, v) inside the image of
 *           (x[n, s*i + u - p, s*j + v - p, c] - zx) * (w[u, v, c] - zw[c])
 *     y   = clamp(round_half_even(float(acc) * mult[c]), qmin - zp, qmax - zp) + zp
 *
 * Taps in the padding are skipped: they would multiply x - zx = 0 (padding holds the zero
 * point, the code of the real 0). A GEMM does not serve this layer: each output is a dot product
 * of only kh * kw = 9 terms, and its nine inputs are different for every channel, so there is no
 * shared matrix to tile. The work is instead vectorized across channels: for one output pixel,
 * every tap is a contiguous row of C input bytes times a contiguous row of C weights, added into
 * C int32 accumulators -- SIMD lanes are channels. The same source is compiled once per
 * instruction set and picked at run time (qc_dw_requant); every path gives the same bytes: the
 * integer sums are exact and the float steps (one int32 -> float32 conversion, one float32
 * product, round half to even) are the same IEEE operations on every path.
 */
#ifndef QCOURSE_DEPTHWISE_H
#define QCOURSE_DEPTHWISE_H

typedef struct {
    const int8_t *x;     /* (n, h, w, c), already shifted to int8 */
    const int32_t *bias; /* (c,) or NULL */
    const int16_t *wz;   /* (kh, kw, c): w - zw as int16 */
    const float *mult;   /* (c,) */
    int32_t zx, zp, qmin, qmax;
    ptrdiff_t n, h, wd, c, kh, kw, stride, pad, oh, ow;
    uint8_t *y;          /* (n, oh, ow, c) */
} qc_dw_args;

/* [depthwise-loop]
 * Images [n0, n1): for each output pixel, the valid taps are added channel-wise into acc[0..c),
 * then requantized into y. acc is a caller-provided scratch of c int32. */
#define QC_DW_BODY                                                                                \
    const ptrdiff_t c = a->c;                                                                     \
    const float lo = (float)(a->qmin - a->zp), hi = (float)(a->qmax - a->zp);                     \
    for (ptrdiff_t nb = n0; nb < n1; nb++) {                                                      \
        for (ptrdiff_t i = 0; i < a->oh; i++) {                                                   \
            for (ptrdiff_t j = 0; j < a->ow; j++) {                                               \
                int32_t *restrict acc = scratch;                                                  \
                if (a->bias) memcpy(acc, a->bias, (size_t)c * sizeof(int32_t));                   \
                else memset(acc, 0, (size_t)c * sizeof(int32_t));                                 \
                for (ptrdiff_t u = 0; u < a->kh; u++) {                                           \
                    ptrdiff_t r = i * a->stride + u - a->pad;                                     \
                    if (r < 0 || r >= a->h) continue;                                             \
                    for (ptrdiff_t v = 0; v < a->kw; v++) {                                       \
                        ptrdiff_t q = j * a->stride + v - a->pad;                                 \
                        if (q < 0 || q >= a->wd) continue;                                        \
                        const int8_t *restrict xr = a->x + ((nb * a->h + r) * a->wd + q) * c;     \
                        const int16_t *restrict wr = a->wz + (u * a->kw + v) * c;                 \
                        const int32_t zx = a->zx;                                                 \
                        for (ptrdiff_t ch = 0; ch < c; ch++)                                      \
                            acc[ch] += ((int32_t)xr[ch] - zx) * (int32_t)wr[ch];                  \
                    }                                                                             \
                }                                                                                 \
                uint8_t *restrict yr = a->y + ((nb * a->oh + i) * a->ow + j) * c;                 \
                const float *restrict mult = a->mult;                                             \
                const int32_t zp = a->zp;                                                         \
                for (ptrdiff_t ch = 0; ch < c; ch++) {                                            \
                    float f = (float)acc[ch] * mult[ch];                                          \
                    f = f < lo ? lo : (f > hi ? hi : f);                                          \
                    yr[ch] = (uint8_t)((int32_t)qc_round_half_even(f) + zp);                      \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }
/* [end depthwise-loop] */

static void qc_dw_portable(const qc_dw_args *a, int32_t *scratch, ptrdiff_t n0, ptrdiff_t n1) {
    QC_DW_BODY
}
#if QC_X86
__attribute__((target("avx2"))) static void qc_dw_avx2(const qc_dw_args *a, int32_t *scratch,
                                                       ptrdiff_t n0, ptrdiff_t n1) {
    QC_DW_BODY
}
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void qc_dw_512(
    const qc_dw_args *a, int32_t *scratch, ptrdiff_t n0, ptrdiff_t n1) {
    QC_DW_BODY
}
#endif

/* Images [n0, n1) on the given path; scratch holds c int32. */
static void qc_dw_requant(int path, const qc_dw_args *a, int32_t *scratch, ptrdiff_t n0,
                          ptrdiff_t n1) {
#if QC_X86
    if (path == QC_PATH_VNNI512) { qc_dw_512(a, scratch, n0, n1); return; }
    if (path == QC_PATH_AVX2) { qc_dw_avx2(a, scratch, n0, n1); return; }
#endif
    qc_dw_portable(a, scratch, n0, n1);
}

#endif
