/* qcourse/csrc/u8s8.c -- rung 4: the u8 x s8 row-dot loop, left to the compiler's vectorizer.
 *
 * C[i, j] = sum_k (A[i, k] + 128) * Bt[j, k] - 128 * colsum[j], with au = A + 128 as uint8 and
 * Bt = B transposed (rows of Bt are contiguous). One source, compiled once per instruction set:
 * the body is always inlined into a wrapper that carries the path's target attribute, so each
 * copy is vectorized for its own instructions (vpdpbusd in the VNNI build); the wrappers are
 * kept out of line so that the disassembly shows each build under its own name. */
#include "qgemm.h"

/* region: u8s8 */
/* One chunk of 65536 products of at most 255 * 128 in magnitude stays inside int32 (the plain
 * int32 sum is the pattern the vectorizer turns into dot-product instructions); chunks are added
 * modulo 2^32. */
#define QC_U8S8_CHUNK 65536
static inline __attribute__((always_inline)) void qc_u8s8_body(
    const uint8_t *au, const int8_t *bt, const int32_t *colsum, int32_t *c, ptrdiff_t m,
    ptrdiff_t n, ptrdiff_t k) {
    for (ptrdiff_t i = 0; i < m; i++) {
        const uint8_t *ar = au + i * k;
        for (ptrdiff_t j = 0; j < n; j++) {
            const int8_t *br = bt + j * k;
            uint32_t total = 0;
            for (ptrdiff_t t0 = 0; t0 < k; t0 += QC_U8S8_CHUNK) {
                ptrdiff_t t1 = t0 + QC_U8S8_CHUNK < k ? t0 + QC_U8S8_CHUNK : k;
                int32_t acc = 0;
                for (ptrdiff_t t = t0; t < t1; t++) acc += (int32_t)ar[t] * (int32_t)br[t];
                total += (uint32_t)acc;
            }
            c[i * n + j] = (int32_t)(total - 128u * (uint32_t)colsum[j]);
        }
    }
}

__attribute__((noinline)) static void qc_u8s8_portable(const uint8_t *au, const int8_t *bt, const int32_t *colsum,
                             int32_t *c, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k) {
    qc_u8s8_body(au, bt, colsum, c, m, n, k);
}
#if QC_X86
__attribute__((noinline)) QC_TARGET_AVX2 static void qc_u8s8_avx2(const uint8_t *au, const int8_t *bt,
                                        const int32_t *colsum, int32_t *c, ptrdiff_t m,
                                        ptrdiff_t n, ptrdiff_t k) {
    qc_u8s8_body(au, bt, colsum, c, m, n, k);
}
__attribute__((noinline)) QC_TARGET_VNNI512 static void qc_u8s8_vnni512(const uint8_t *au, const int8_t *bt,
                                              const int32_t *colsum, int32_t *c, ptrdiff_t m,
                                              ptrdiff_t n, ptrdiff_t k) {
    qc_u8s8_body(au, bt, colsum, c, m, n, k);
}
#endif
/* endregion: u8s8 */

void qc_u8s8(int path, const uint8_t *au, const int8_t *bt, const int32_t *colsum, int32_t *c,
             ptrdiff_t m, ptrdiff_t n, ptrdiff_t k) {
#if QC_X86
    if (path == QC_PATH_VNNI512) { qc_u8s8_vnni512(au, bt, colsum, c, m, n, k); return; }
    if (path == QC_PATH_AVX2) { qc_u8s8_avx2(au, bt, colsum, c, m, n, k); return; }
#endif
    qc_u8s8_portable(au, bt, colsum, c, m, n, k);
}
