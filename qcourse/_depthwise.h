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
 * Images [n0, n1). Stride 1: one output row at a time; for each tap (u, v) the valid output
 * columns [j0, j1) read one contiguous run of (j1 - j0) * c input bytes, multiplied by the tap's
 * weights repeated along the row (wrow, prepared once per call), so the inner loop is long and
 * contiguous whatever c is. Other strides: one output pixel at a time, the same sum. Then the row
 * of int32 sums is requantized in place, channel c of every pixel by mult[c].
 * acc: ow * c int32; wrow: kh * kw * ow * c int16; mrow: ow * c float; brow: ow * c int32. */
#define QC_DW_BODY                                                                                \
    const ptrdiff_t c = a->c, ow = a->ow, rowlen = ow * c;                                        \
    const float lo = (float)(a->qmin - a->zp), hi = (float)(a->qmax - a->zp);                     \
    const int32_t zx = a->zx, zp = a->zp;                                                         \
    for (ptrdiff_t nb = n0; nb < n1; nb++) {                                                      \
        for (ptrdiff_t i = 0; i < a->oh; i++) {                                                   \
            int32_t *restrict acc = s->acc;                                                       \
            memcpy(acc, s->brow, (size_t)rowlen * sizeof(int32_t));                               \
            for (ptrdiff_t u = 0; u < a->kh; u++) {                                               \
                ptrdiff_t r = i * a->stride + u - a->pad;                                         \
                if (r < 0 || r >= a->h) continue;                                                 \
                const int8_t *xrow = a->x + (nb * a->h + r) * a->wd * c;                          \
                for (ptrdiff_t v = 0; v < a->kw; v++) {                                           \
                    const int16_t *restrict wr = s->wrow + (u * a->kw + v) * rowlen;              \
                    if (a->stride == 1) {                                                         \
                        ptrdiff_t j0 = a->pad - v > 0 ? a->pad - v : 0;                           \
                        ptrdiff_t j1 = a->wd + a->pad - v < ow ? a->wd + a->pad - v : ow;         \
                        if (j1 <= j0) continue;                                                   \
                        const int8_t *restrict xr = xrow + (j0 + v - a->pad) * c;                 \
                        int32_t *restrict ac = acc + j0 * c;                                      \
                        const int16_t *restrict wj = wr + j0 * c;                                 \
                        const ptrdiff_t len = (j1 - j0) * c;                                      \
                        for (ptrdiff_t t = 0; t < len; t++)                                       \
                            ac[t] += ((int32_t)xr[t] - zx) * (int32_t)wj[t];                      \
                    } else {                                                                      \
                        for (ptrdiff_t j = 0; j < ow; j++) {                                      \
                            ptrdiff_t q = j * a->stride + v - a->pad;                             \
                            if (q < 0 || q >= a->wd) continue;                                    \
                            const int8_t *restrict xr = xrow + q * c;                             \
                            int32_t *restrict ac = acc + j * c;                                   \
                            for (ptrdiff_t ch = 0; ch < c; ch++)                                  \
                                ac[ch] += ((int32_t)xr[ch] - zx) * (int32_t)wr[ch];               \
                        }                                                                         \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
            uint8_t *restrict yr = a->y + (nb * a->oh + i) * rowlen;                              \
            const float *restrict mult = s->mrow;                                                 \
            for (ptrdiff_t t = 0; t < rowlen; t++) {                                              \
                float f = (float)acc[t] * mult[t];                                                \
                f = f < lo ? lo : (f > hi ? hi : f);                                              \
                yr[t] = (uint8_t)((int32_t)qc_round_half_even(f) + zp);                           \
            }                                                                                     \
        }                                                                                         \
    }
/* [end depthwise-loop] */

typedef struct {
    int32_t *acc, *brow;
    int16_t *wrow;
    float *mrow;
} qc_dw_scratch;

static void qc_dw_portable(const qc_dw_args *a, const qc_dw_scratch *s, ptrdiff_t n0,
                           ptrdiff_t n1) {
    QC_DW_BODY
}
#if QC_X86
__attribute__((target("avx2"))) static void qc_dw_avx2(const qc_dw_args *a,
                                                       const qc_dw_scratch *s, ptrdiff_t n0,
                                                       ptrdiff_t n1) {
    QC_DW_BODY
}
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void qc_dw_512(
    const qc_dw_args *a, const qc_dw_scratch *s, ptrdiff_t n0, ptrdiff_t n1) {
    QC_DW_BODY
}
#endif

/* Images [n0, n1) on the given path. Returns 0, or -1 if the row buffers cannot be allocated.
 * The per-channel weights, multipliers and biases are laid out along one output row first. */
static int qc_dw_requant(int path, const qc_dw_args *a, ptrdiff_t n0, ptrdiff_t n1) {
    const ptrdiff_t rowlen = a->ow * a->c, taps = a->kh * a->kw;
    qc_dw_scratch s;
    s.acc = (int32_t *)malloc((size_t)rowlen * sizeof(int32_t));
    s.brow = (int32_t *)malloc((size_t)rowlen * sizeof(int32_t));
    s.wrow = (int16_t *)malloc((size_t)(taps * rowlen) * sizeof(int16_t));
    s.mrow = (float *)malloc((size_t)rowlen * sizeof(float));
    int ok = s.acc && s.brow && s.wrow && s.mrow;
    if (ok) {
        for (ptrdiff_t j = 0; j < a->ow; j++) {
            for (ptrdiff_t ch = 0; ch < a->c; ch++) {
                s.brow[j * a->c + ch] = a->bias ? a->bias[ch] : 0;
                s.mrow[j * a->c + ch] = a->mult[ch];
                for (ptrdiff_t t = 0; t < taps; t++)
                    s.wrow[t * rowlen + j * a->c + ch] = a->wz[t * a->c + ch];
            }
        }
#if QC_X86
        if (path == QC_PATH_VNNI512) qc_dw_512(a, &s, n0, n1);
        else if (path == QC_PATH_AVX2) qc_dw_avx2(a, &s, n0, n1);
        else
#endif
            qc_dw_portable(a, &s, n0, n1);
    }
    free(s.acc);
    free(s.brow);
    free(s.wrow);
    free(s.mrow);
    return ok ? 0 : -1;
}


#endif
