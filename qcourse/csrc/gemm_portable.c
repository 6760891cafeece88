/* qcourse/csrc/gemm_portable.c -- the packed GEMM in plain C, for any CPU: the same packed layout
 * read one byte at a time, s8 x s8 (the packed byte minus 128), modulo-2^32 accumulation. */
#include "qgemm.h"

void qc_gemm_portable_group(const int8_t *a, ptrdiff_t lda, const uint8_t *bp, int32_t *c,
                            ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, ptrdiff_t g) {
    ptrdiff_t kq = qc_quads(k);
    for (ptrdiff_t i = 0; i < m; i++) {
        const int8_t *ar = a + i * lda;
        for (ptrdiff_t p = g * QC_NG; p < (g + 1) * QC_NG && p * QC_NR < n; p++) {
            uint32_t acc[QC_NR] = {0};
            for (ptrdiff_t q = 0; q < kq; q++) {
                const uint8_t *bq = qc_block(bp, p, q, kq);
                for (int t = 0; t < 4 && 4 * q + t < k; t++) {
                    int32_t av = ar[4 * q + t];
                    for (int cc = 0; cc < QC_NR; cc++)
                        acc[cc] += (uint32_t)(av * ((int32_t)bq[cc * 4 + t] - 128));
                }
            }
            ptrdiff_t width = n - p * QC_NR < QC_NR ? n - p * QC_NR : QC_NR;
            for (ptrdiff_t cc = 0; cc < width; cc++)
                c[i * ldc + (p - g * QC_NG) * QC_NR + cc] = (int32_t)acc[cc];
        }
    }
}

/* rowsum[i] = sum_k A[i, k] (the VNNI path has its own). */
void qc_rowsum_portable(const int8_t *a, ptrdiff_t lda, ptrdiff_t m, ptrdiff_t k,
                        int32_t *rowsum) {
    for (ptrdiff_t i = 0; i < m; i++) {
        int32_t total = 0;
        for (ptrdiff_t t = 0; t < k; t++) total += a[i * lda + t];
        rowsum[i] = total;
    }
}
