/*
 * qcourse/csrc/depthwise.h -- the contract of the int8 depthwise convolution with fused
 * requantization (a component added as qgemm.h says: this header, depthwise.c with the driver and
 * the portable build, depthwise_avx2.c and depthwise_vnni512.c with the same loop compiled for
 * wider instructions). Nothing here checks its arguments: qcourse/kernels.py does.
 *
 * LAYOUT. NHWC activations (channels contiguous), weights (kh, kw, C), one filter per channel.
 * For output (n, i, j, c):
 *
 *     acc = bias[c] + sum over the taps (u, v) inside the image of
 *           (x[n, s*i + u - p, s*j + v - p, c] - zx) * (w[u, v, c] - zw[c])
 *     y   = clamp(round_half_even(float(acc) * mult[c]), qmin - zp, qmax - zp) + zp
 *
 * Taps in the padding are skipped: they would multiply x - zx = 0 (padding holds the zero point,
 * the code of the real 0). The requantization is requant.c's epilogue (qc_requant_rows), with the
 * bias as its per-column term, so the bytes are those of the GEMM's rung 6 and of ONNX Runtime's
 * QLinearConv.
 *
 * WHY NOT THE GEMM. Each output is a dot product of only kh * kw = 9 terms, and its nine inputs
 * are different for every channel: there is no shared matrix to tile. The work is vectorized
 * across channels instead: for one output row, every tap is a contiguous run of input bytes times
 * the tap's weights laid along the row, added into a row of int32 accumulators (SIMD lanes are
 * channels and columns at once). Every path gives the same bytes: the integer sums are exact and
 * the float steps are the same IEEE operations on every path.
 */
#ifndef QCOURSE_DEPTHWISE_H
#define QCOURSE_DEPTHWISE_H

#include <string.h>

#include "qgemm.h"

typedef struct { /* what the caller gives */
    const int8_t *x;     /* (n, h, w, c), already shifted to int8 */
    const int32_t *bias; /* (c,) or NULL */
    const int16_t *wz;   /* (kh, kw, c): w - zw as int16 */
    const float *mult;   /* (c,) */
    int32_t zx, zp, qmin, qmax;
    ptrdiff_t n, h, wd, c, kh, kw, stride, pad, oh, ow;
    uint8_t *y;          /* (n, oh, ow, c) */
} qc_dw_args;

typedef struct { /* per-call buffers, the per-channel values laid along one output row */
    int32_t *acc;  /* ow * c: the row's sums */
    int16_t *wrow; /* kh * kw * ow * c: tap t's weights at wrow + t * ow * c */
    qc_requant rq; /* colterm: the bias along the row; mult: the multipliers along the row */
} qc_dw_scratch;

/* Entry point (depthwise.c): images [n0, n1) on the given path. Returns 0, or -1 if the row
 * buffers cannot be allocated. */
QC_INTERNAL int qc_dw_requant(int path, const qc_dw_args *a, ptrdiff_t n0, ptrdiff_t n1);

/* The loop of one path: images [n0, n1), every output row summed into s->acc, then requantized
 * into a->y on that path. */
QC_INTERNAL void qc_dw_rows_portable(const qc_dw_args *a, qc_dw_scratch *s, ptrdiff_t n0,
                                     ptrdiff_t n1);
#if QC_X86
QC_INTERNAL void qc_dw_rows_avx2(const qc_dw_args *a, qc_dw_scratch *s, ptrdiff_t n0,
                                 ptrdiff_t n1);
QC_INTERNAL void qc_dw_rows_vnni512(const qc_dw_args *a, qc_dw_scratch *s, ptrdiff_t n0,
                                    ptrdiff_t n1);
#endif

/* region: depthwise_loop */
/* Output row i of image nb into acc (ow * c int32). Stride 1: for each tap (u, v), the valid
 * output columns [j0, j1) read one contiguous run of (j1 - j0) * c input bytes, multiplied by the
 * tap's weights along the row, so the inner loop is long and contiguous whatever c is. Other
 * strides: one output pixel at a time, the same sum. Inlined into each path's function, which the
 * compiler vectorizes for that path's instructions. */
static inline __attribute__((always_inline)) void qc_dw_row_sums(const qc_dw_args *a,
                                                                 const int16_t *wrow,
                                                                 ptrdiff_t nb, ptrdiff_t i,
                                                                 int32_t *restrict acc) {
    const ptrdiff_t c = a->c, ow = a->ow, rowlen = ow * c;
    const int32_t zx = a->zx;
    memset(acc, 0, (size_t)rowlen * sizeof(int32_t));
    for (ptrdiff_t u = 0; u < a->kh; u++) {
        ptrdiff_t r = i * a->stride + u - a->pad;
        if (r < 0 || r >= a->h) continue;
        const int8_t *xrow = a->x + (nb * a->h + r) * a->wd * c;
        for (ptrdiff_t v = 0; v < a->kw; v++) {
            const int16_t *restrict wr = wrow + (u * a->kw + v) * rowlen;
            if (a->stride == 1) {
                ptrdiff_t j0 = a->pad - v > 0 ? a->pad - v : 0;
                ptrdiff_t j1 = a->wd + a->pad - v < ow ? a->wd + a->pad - v : ow;
                if (j1 <= j0) continue;
                const int8_t *restrict xr = xrow + (j0 + v - a->pad) * c;
                int32_t *restrict ac = acc + j0 * c;
                const int16_t *restrict wj = wr + j0 * c;
                const ptrdiff_t len = (j1 - j0) * c;
                for (ptrdiff_t t = 0; t < len; t++) ac[t] += ((int32_t)xr[t] - zx) * (int32_t)wj[t];
            } else {
                for (ptrdiff_t j = 0; j < ow; j++) {
                    ptrdiff_t q = j * a->stride + v - a->pad;
                    if (q < 0 || q >= a->wd) continue;
                    const int8_t *restrict xr = xrow + q * c;
                    int32_t *restrict ac = acc + j * c;
                    for (ptrdiff_t ch = 0; ch < c; ch++)
                        ac[ch] += ((int32_t)xr[ch] - zx) * (int32_t)wr[ch];
                }
            }
        }
    }
}
/* endregion: depthwise_loop */

/* Images [n0, n1): each row summed, then requantized (bias added) on `path`. */
static inline __attribute__((always_inline)) void qc_dw_rows_body(int path, const qc_dw_args *a,
                                                                  qc_dw_scratch *s, ptrdiff_t n0,
                                                                  ptrdiff_t n1) {
    const ptrdiff_t rowlen = a->ow * a->c;
    for (ptrdiff_t nb = n0; nb < n1; nb++) {
        for (ptrdiff_t i = 0; i < a->oh; i++) {
            qc_dw_row_sums(a, s->wrow, nb, i, s->acc);
            qc_requant_rows(path, &s->rq, s->acc, rowlen, nb * a->oh + i, 1, 0, rowlen, rowlen);
        }
    }
}

#endif /* QCOURSE_DEPTHWISE_H */
