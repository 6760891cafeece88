/* qcourse/csrc/pack.c -- packing B for the packed GEMM (the layout is in qgemm.h), and the k % 4
 * tail of A that the kernels may not read past the end of a row for. */
#include <string.h>

#include "qgemm.h"

void qc_pack_b(const int8_t *b, ptrdiff_t k, ptrdiff_t n, uint8_t *packed, int32_t *colsum) {
    ptrdiff_t kq = qc_quads(k), npad = qc_groups(n) * QC_NG * QC_NR;
    memset(packed, 0, (size_t)qc_packed_b_size(k, n));
    for (ptrdiff_t j = 0; j < npad; j++) colsum[j] = 0;
    for (ptrdiff_t kk = 0; kk < k; kk++) {
        const int8_t *row = b + kk * n;
        ptrdiff_t q = kk / 4, t = kk % 4;
        for (ptrdiff_t j = 0; j < n; j++) {
            ((uint8_t *)qc_block(packed, j / QC_NR, q, kq))[(j % QC_NR) * 4 + t] =
                (uint8_t)(row[j] + 128);
            colsum[j] += row[j];
        }
    }
}

void qc_prepare_tail(const int8_t *a, ptrdiff_t lda, ptrdiff_t m, ptrdiff_t k, int8_t *tail) {
    ptrdiff_t k0 = k / 4 * 4;
    for (ptrdiff_t i = 0; i < m; i++)
        for (ptrdiff_t t = 0; t < 4; t++) tail[i * 4 + t] = k0 + t < k ? a[i * lda + k0 + t] : 0;
}
