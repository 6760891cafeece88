/* qcourse/csrc/w4a8_avx2.c -- the W4A8 kernel with AVX2: one row at a time, 64 columns in 8 ymm
 * accumulators. 32 bytes of codes (8 columns x 8 k) unpack into two registers of unsigned bytes;
 * vpmaddubsw multiplies them by four broadcast activation bytes (u8 x s8, pairs summed into
 * int16: at most 2 x 15 x 127, no saturation) and vpmaddwd against ones sums each column's four
 * products into int32. */
#include "w4a8.h"

#if QC_X86
QC_TARGET_AVX2 void qc_w4_group_avx2(const qc_w4_args *w, ptrdiff_t cg) {
    const ptrdiff_t g = w->g, G = w->k / g, octs = g / 8, bb = qc_w4_block_bytes(g, w->has_zp);
    const ptrdiff_t col0 = cg * QC_W4_GROUP_COLS;
    const ptrdiff_t width = w->n - col0 < QC_W4_GROUP_COLS ? w->n - col0 : QC_W4_GROUP_COLS;
    const __m256i low4 = _mm256_set1_epi8((char)w->mask), ones = _mm256_set1_epi16(1);
    for (ptrdiff_t i = 0; i < w->m; i++) {
        const int8_t *xr = w->xq + i * w->k;
        const uint8_t *bp = w->packed + cg * G * bb;
        float fa[QC_W4_GROUP_COLS] __attribute__((aligned(32))) = {0};
        for (ptrdiff_t j = 0; j < G; j++) {
            __m256i acc[8];
            for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_si256();
            for (ptrdiff_t o = 0; o < octs; o++, bp += 256) {
                int32_t xlo, xhi;
                __builtin_memcpy(&xlo, xr + j * g + 8 * o, 4);
                __builtin_memcpy(&xhi, xr + j * g + 8 * o + 4, 4);
                const __m256i bl = _mm256_set1_epi32(xlo), bh = _mm256_set1_epi32(xhi);
                for (int v = 0; v < 8; v++) {
                    __m256i b = _mm256_load_si256((const __m256i *)(bp + 32 * v));
                    __m256i lo = _mm256_and_si256(b, low4);
                    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
                    __m256i s = _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_maddubs_epi16(lo, bl), ones),
                        _mm256_madd_epi16(_mm256_maddubs_epi16(hi, bh), ones));
                    acc[v] = _mm256_add_epi32(acc[v], s);
                }
            }
            const float *sc = (const float *)bp;
            const int8_t *zc = w->has_zp ? (const int8_t *)(bp + 256) : NULL;
            const int32_t gs = w->gsum[i * G + j];
            for (int v = 0; v < 8; v++) {
                __m256i corr = zc ? _mm256_mullo_epi32(
                                        _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(zc + 8 * v))),
                                        _mm256_set1_epi32(gs))
                                  : _mm256_set1_epi32((int32_t)((uint32_t)gs << 3));
                __m256i part = _mm256_sub_epi32(acc[v], corr);
                if (w->sums) {
                    int32_t tmp[8];
                    _mm256_storeu_si256((__m256i *)tmp, part);
                    for (int c = 0; c < 8 && 8 * v + c < width; c++)
                        w->sums[(i * w->n + col0 + 8 * v + c) * G + j] = tmp[c];
                } else {
                    __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(part), _mm256_load_ps(sc + 8 * v));
                    _mm256_store_ps(fa + 8 * v, _mm256_add_ps(_mm256_load_ps(fa + 8 * v), f));
                }
            }
            bp += bb - octs * 256;
        }
        if (!w->sums)
            for (ptrdiff_t c = 0; c < width; c++) w->y[i * w->n + col0 + c] = fa[c] * w->sx[i];
    }
}
#else
typedef int qc_no_avx2_here; /* a translation unit may not be empty */
#endif
