/* qcourse/csrc/w4a8.c -- the W4A8 kernel's packing, activation quantization, driver and portable
 * kernel (the contract is in w4a8.h). */
#include <string.h>

#include "w4a8.h"

void qc_w4_pack(const int8_t *codes, const float *scales, const int8_t *zp, ptrdiff_t k,
                ptrdiff_t n, ptrdiff_t g, uint8_t *packed) {
    const ptrdiff_t G = k / g, bb = qc_w4_block_bytes(g, zp != NULL);
    memset(packed, 0, (size_t)qc_w4_packed_size(k, n, g, zp != NULL));
    for (ptrdiff_t cg = 0; cg < qc_w4_col_groups(n); cg++)
        for (ptrdiff_t j = 0; j < G; j++) {
            uint8_t *blk = packed + (cg * G + j) * bb;
            float *sc = (float *)(blk + g / 8 * 256);
            for (ptrdiff_t c = 0; c < QC_W4_GROUP_COLS; c++) {
                ptrdiff_t col = cg * QC_W4_GROUP_COLS + c, p = c / 16, cc = c % 16;
                const int8_t *row = codes + col * k + j * g;
                for (ptrdiff_t o = 0; o < g / 8; o++)
                    for (int t = 0; t < 4; t++) {
                        int lo = col < n ? row[8 * o + t] + 8 : 8;
                        int hi = col < n ? row[8 * o + 4 + t] + 8 : 8;
                        blk[o * 256 + p * 64 + cc * 4 + t] = (uint8_t)(lo | hi << 4);
                    }
                sc[c] = col < n ? scales[col * G + j] : 0.0f;
                if (zp) blk[g / 8 * 256 + 256 + c] = (uint8_t)(col < n ? 8 + zp[col * G + j] : 8);
            }
        }
}

/* region: w4_quantize */
/* One plain loop, compiled per path like rung 4: |x| is compared as bits (for finite floats the
 * order of |x| and of its bit pattern agree, and an integer maximum vectorizes), and rounding
 * adds and subtracts 1.5 * 2^23 (round half to even, exact for |v| < 2^22). */
static inline __attribute__((always_inline)) void qc_w4_quantize_body(
    const float *x, ptrdiff_t m, ptrdiff_t k, ptrdiff_t g, int8_t *xq, int32_t *gsum,
    float *sx) {
    for (ptrdiff_t i = 0; i < m; i++) {
        const float *restrict xr = x + i * k;
        int8_t *restrict qr = xq + i * k;
        uint32_t bits = 0;
        for (ptrdiff_t t = 0; t < k; t++) {
            uint32_t b;
            memcpy(&b, xr + t, 4);
            b &= 0x7FFFFFFFu;
            bits = b > bits ? b : bits;
        }
        float amax, inv = 0.0f, s = 0.0f;
        memcpy(&amax, &bits, 4);
        if (amax > 0.0f) {
            inv = 127.0f / amax;
            s = amax / 127.0f;
            if (inv > 0x1p100f) {
                inv = 0x1p100f;
                s = 0x1p-100f;
            }
        }
        sx[i] = s;
        const float magic = 12582912.0f; /* 1.5 * 2^23 */
        for (ptrdiff_t t = 0; t < k; t++) qr[t] = (int8_t)(int32_t)((xr[t] * inv + magic) - magic);
        for (ptrdiff_t j = 0; j < k / g; j++) {
            int32_t total = 0;
            for (ptrdiff_t t = 0; t < g; t++) total += qr[j * g + t];
            gsum[i * (k / g) + j] = total;
        }
    }
}
/* endregion: w4_quantize */

__attribute__((noinline)) static void qc_w4_quantize_portable(const float *x, ptrdiff_t m,
                                                              ptrdiff_t k, ptrdiff_t g, int8_t *xq,
                                                              int32_t *gsum, float *sx) {
    qc_w4_quantize_body(x, m, k, g, xq, gsum, sx);
}
#if QC_X86
__attribute__((noinline)) QC_TARGET_AVX2 static void qc_w4_quantize_avx2(
    const float *x, ptrdiff_t m, ptrdiff_t k, ptrdiff_t g, int8_t *xq, int32_t *gsum, float *sx) {
    qc_w4_quantize_body(x, m, k, g, xq, gsum, sx);
}
__attribute__((noinline)) QC_TARGET_VNNI512 static void qc_w4_quantize_512(
    const float *x, ptrdiff_t m, ptrdiff_t k, ptrdiff_t g, int8_t *xq, int32_t *gsum, float *sx) {
    qc_w4_quantize_body(x, m, k, g, xq, gsum, sx);
}
#endif

void qc_w4_quantize_rows(int path, const float *x, ptrdiff_t m, ptrdiff_t k, ptrdiff_t g,
                         int8_t *xq, int32_t *gsum, float *sx) {
    path &= ~QC_W4_BROKEN;
#if QC_X86
    if (path == QC_PATH_VNNI512) { qc_w4_quantize_512(x, m, k, g, xq, gsum, sx); return; }
    if (path == QC_PATH_AVX2) { qc_w4_quantize_avx2(x, m, k, g, xq, gsum, sx); return; }
#endif
    qc_w4_quantize_portable(x, m, k, g, xq, gsum, sx);
}

/* region: w4_portable */
/* One row at a time, one column at a time, the bytes unpacked as the layout says. */
void qc_w4_group_portable(const qc_w4_args *w, ptrdiff_t cg) {
    const ptrdiff_t g = w->g, G = w->k / g, bb = qc_w4_block_bytes(g, w->has_zp);
    const uint8_t *base = w->packed + cg * G * bb;
    for (ptrdiff_t i = 0; i < w->m; i++) {
        const int8_t *xr = w->xq + i * w->k;
        for (ptrdiff_t c = 0; c < QC_W4_GROUP_COLS; c++) {
            ptrdiff_t col = cg * QC_W4_GROUP_COLS + c, p = c / 16, cc = c % 16;
            if (col >= w->n) break;
            float acc = 0.0f;
            for (ptrdiff_t j = 0; j < G; j++) {
                const uint8_t *blk = base + j * bb;
                int32_t dot = 0; /* sum of xq * (q + 8) over the group */
                for (ptrdiff_t o = 0; o < g / 8; o++)
                    for (int t = 0; t < 4; t++) {
                        uint8_t byte = blk[o * 256 + p * 64 + cc * 4 + t];
                        dot += xr[j * g + 8 * o + t] * (byte & w->mask);
                        dot += xr[j * g + 8 * o + 4 + t] * (byte >> 4 & w->mask);
                    }
                int32_t coef = w->has_zp ? blk[g / 8 * 256 + 256 + c] : 8; /* 8 + z */
                int32_t part = dot - coef * w->gsum[i * G + j];
                if (w->sums) {
                    w->sums[(i * w->n + col) * G + j] = part;
                } else {
                    const float *sc = (const float *)(blk + g / 8 * 256);
                    acc = acc + (float)part * sc[c];
                }
            }
            if (!w->sums) w->y[i * w->n + col] = acc * w->sx[i];
        }
    }
}
/* endregion: w4_portable */

#ifdef _OPENMP
#include <omp.h>
#endif

static ptrdiff_t qc_w4_prefetch = QC_W4_PREFETCH;
ptrdiff_t qc_w4_set_prefetch(ptrdiff_t bytes) {
    ptrdiff_t previous = qc_w4_prefetch;
    qc_w4_prefetch = bytes < 0 ? 0 : bytes / 64 * 64;
    return previous;
}

/* region: w4_driver */
int qc_w4a8(int path, const int8_t *xq, const int32_t *gsum, const float *sx,
            const uint8_t *packed, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, ptrdiff_t g, int has_zp,
            float *y, int32_t *sums, int threads) {
    const qc_w4_args args = {xq, gsum, sx, packed, m, n, k, g, has_zp, y, sums,
                             (uint8_t)(path & QC_W4_BROKEN ? 0x0E : 0x0F), qc_w4_prefetch};
    const ptrdiff_t groups = qc_w4_col_groups(n);
    path &= ~QC_W4_BROKEN;
    if (threads < 1) threads = 1;
    if (threads > groups) threads = (int)groups;
    /* dynamic: a thread slowed by anything else on its core (another program, another library's
     * pool still spinning after its call) takes fewer groups instead of holding up the result */
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (ptrdiff_t cg = 0; cg < groups; cg++) {
#if QC_X86
        if (path == QC_PATH_VNNI512) {
            qc_w4_group_vnni512(&args, cg);
            continue;
        }
        if (path == QC_PATH_AVX2) {
            qc_w4_group_avx2(&args, cg);
            continue;
        }
#endif
        qc_w4_group_portable(&args, cg);
    }
    return path;
}
/* endregion: w4_driver */
