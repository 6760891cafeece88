/* qcourse/csrc/gemm_avx2.c -- the packed GEMM with 256-bit AVX2 integer instructions. */
#include <string.h>

#include "qgemm.h"

#if QC_X86
/* A quad of A widened to four int16, broadcast; 16 bytes of a B block (4 columns x 4 k) widened
 * to 16 int16 and shifted back to signed (minus 128); vpmaddwd sums adjacent pairs into int32,
 * giving two partial sums per column, added together when the tile is stored. Exact for s8 x s8:
 * |pair sum| <= 2 * 16384. Tiles of 2 rows x 16 columns. */
#define QC_AVX2_MR 2
QC_TARGET_AVX2 void qc_gemm_avx2_group(const int8_t *a, ptrdiff_t lda, const uint8_t *bp,
                                       int32_t *c, ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n,
                                       ptrdiff_t k, ptrdiff_t g) {
    ptrdiff_t kq = qc_quads(k);
    const __m256i offset = _mm256_set1_epi16(128);
    for (ptrdiff_t i0 = 0; i0 < m; i0 += QC_AVX2_MR) {
        int mr = (int)(m - i0 < QC_AVX2_MR ? m - i0 : QC_AVX2_MR);
        for (ptrdiff_t p = g * QC_NG; p < (g + 1) * QC_NG && p * QC_NR < n; p++) {
            __m256i acc[QC_AVX2_MR][4];
            for (int r = 0; r < QC_AVX2_MR; r++)
                for (int v = 0; v < 4; v++) acc[r][v] = _mm256_setzero_si256();
            for (ptrdiff_t q = 0; q < kq; q++) {
                const uint8_t *blk = qc_block(bp, p, q, kq);
                __m256i bw[4];
                for (int v = 0; v < 4; v++)
                    bw[v] = _mm256_sub_epi16(
                        _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blk + v * 16))),
                        offset);
                for (int r = 0; r < mr; r++) {
                    const int8_t *ar = a + (i0 + r) * lda + 4 * q;
                    int16_t w[4] = {0, 0, 0, 0};
                    for (int t = 0; t < 4 && 4 * q + t < k; t++) w[t] = ar[t];
                    int64_t packed4;
                    memcpy(&packed4, w, 8);
                    __m256i av = _mm256_set1_epi64x(packed4);
                    for (int v = 0; v < 4; v++)
                        acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(av, bw[v]));
                }
            }
            ptrdiff_t width = n - p * QC_NR < QC_NR ? n - p * QC_NR : QC_NR;
            for (int r = 0; r < mr; r++) {
                int32_t part[32];
                for (int v = 0; v < 4; v++) _mm256_storeu_si256((__m256i *)(part + 8 * v), acc[r][v]);
                for (ptrdiff_t cc = 0; cc < width; cc++)
                    c[(i0 + r) * ldc + (p - g * QC_NG) * QC_NR + cc] =
                        (int32_t)((uint32_t)part[2 * cc] + (uint32_t)part[2 * cc + 1]);
            }
        }
    }
}
#else
typedef int qc_no_avx2_here; /* a translation unit may not be empty */
#endif
