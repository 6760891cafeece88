/* qcourse/csrc/w4a8_vnni512.c -- the W4A8 kernel with AVX-512 VNNI. A single row (M = 1, or the
 * last row of M = 6t + 1) runs the one-row kernel below the tile. The tile: up to 6 rows x 64
 * columns; each 64-byte load of codes unpacks into two registers of 16 columns x 4 k (unsigned
 * 0..15), each used by vpdpbusd for every row of the tile, whose four activation bytes the
 * instruction broadcasts from memory. Per group, the integer sums are corrected, converted and
 * scaled into float accumulators kept in the thread's stack (24 accumulators of each kind would
 * not fit the 32 registers). */
#include "w4a8.h"

#if QC_X86
/* The tile's software prefetch distance (bytes ahead; a little faster than none at M = 128 here).
 * The one-row kernel's, which matters more, is w->prefetch (qc_w4_set_prefetch). */
#define QC_W4_TILE_PREFETCH 1024
/* region: w4_vnni_tile */
#define QC_W4_DPBUSD(acc, b, p)                                                                   \
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(b), "m"(*(const int32_t *)(p)))

static inline __attribute__((always_inline)) QC_TARGET_VNNI512 void qc_w4_tile(
    const int R, const qc_w4_args *w, ptrdiff_t cg, ptrdiff_t i0) {
    const ptrdiff_t g = w->g, G = w->k / g, octs = g / 8, bb = qc_w4_block_bytes(g, w->has_zp);
    const ptrdiff_t col0 = cg * QC_W4_GROUP_COLS;
    const ptrdiff_t width = w->n - col0 < QC_W4_GROUP_COLS ? w->n - col0 : QC_W4_GROUP_COLS;
    const uint8_t *bp = w->packed + cg * G * bb;
    const ptrdiff_t pf = QC_W4_TILE_PREFETCH;
    const int8_t *x[6];
    float fa[6][QC_W4_GROUP_COLS] __attribute__((aligned(64)));
    const __m512i low4 = _mm512_set1_epi8((char)w->mask);
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
        x[r] = w->xq + (i0 + r) * w->k;
        for (int v = 0; v < 4; v++) _mm512_store_ps(fa[r] + 16 * v, _mm512_setzero_ps());
    }
    for (ptrdiff_t j = 0; j < G; j++) {
        /* each accumulator starts at the correction -(8 + z) gsum (no subtraction per group) */
        __m512i acc[6][4];
        const int8_t *zc = w->has_zp ? (const int8_t *)(bp + octs * 256 + 256) : NULL;
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            const int32_t gs = w->gsum[(i0 + r) * G + j];
            const __m512i ngs = _mm512_set1_epi32((int32_t)(0u - (uint32_t)gs));
#pragma GCC unroll 4
            for (int p = 0; p < 4; p++)
                acc[r][p] = zc ? _mm512_mullo_epi32(_mm512_cvtepi8_epi32(_mm_load_si128(
                                                        (const __m128i *)(zc + 16 * p))),
                                                    ngs)
                               : _mm512_slli_epi32(ngs, 3);
        }
        for (ptrdiff_t o = 0; o < octs; o++, bp += 256) {
            const ptrdiff_t kk = j * g + 8 * o;
#pragma GCC unroll 4
            for (int p = 0; p < 4; p++) {
                if (pf) _mm_prefetch((const char *)bp + pf + 64 * p, _MM_HINT_T0);
                __m512i v = _mm512_load_si512((const void *)(bp + 64 * p));
                __m512i lo = _mm512_and_si512(v, low4);
#pragma GCC unroll 6
                for (int r = 0; r < R; r++) QC_W4_DPBUSD(acc[r][p], lo, x[r] + kk);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
#pragma GCC unroll 6
                for (int r = 0; r < R; r++) QC_W4_DPBUSD(acc[r][p], hi, x[r] + kk + 4);
            }
        }
        /* the group's epilogue: fa += (float)P * s */
        const float *sc = (const float *)bp;
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
            for (int p = 0; p < 4; p++) {
                const __m512i part = acc[r][p];
                if (w->sums) {
                    int32_t tmp[16];
                    _mm512_storeu_si512((void *)tmp, part);
                    for (int c = 0; c < 16 && 16 * p + c < width; c++)
                        w->sums[((i0 + r) * w->n + col0 + 16 * p + c) * G + j] = tmp[c];
                } else {
                    __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(part), _mm512_load_ps(sc + 16 * p));
                    _mm512_store_ps(fa[r] + 16 * p, _mm512_add_ps(_mm512_load_ps(fa[r] + 16 * p), f));
                }
            }
        }
        bp += bb - octs * 256;
    }
    if (w->sums) return;
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
        const __m512 s = _mm512_set1_ps(w->sx[i0 + r]);
        float *yr = w->y + (i0 + r) * w->n + col0;
        for (int p = 0; p < 4 && 16 * p < width; p++) {
            __mmask16 keep = width - 16 * p >= 16 ? (__mmask16)0xFFFF
                                                  : (__mmask16)((1u << (width - 16 * p)) - 1u);
            _mm512_mask_storeu_ps(yr + 16 * p, keep, _mm512_mul_ps(_mm512_load_ps(fa[r] + 16 * p), s));
        }
    }
}
/* endregion: w4_vnni_tile */

/* region: w4_vnni_row */
/* One row (M = 1, a decoding step): bound by reading the weights, not by arithmetic, so the loop
 * spends as few instructions per byte of codes as it can, which lets the out-of-order window hold
 * more loads in flight. Per 64 bytes: two ands that read the line themselves (lo = v & 0x0F and
 * hi = v & 0xF0, which is 16 x the high nibble: no shift; QC_W4_ANDM below) and two vpdpbusd into
 * separate accumulators; the high one,
 * 16 x its sum, is shifted back once per group (exact: the sum is a multiple of 16, and it is
 * folded every QC_W4_HI_OCTS octs, before 16 x the sum could leave int32). The correction
 * -(8 + z) gsum starts the low accumulator instead of being subtracted at the end, and the float
 * accumulators stay in registers. */
/* n = mask & the 64 bytes at p, the and reading memory itself: each line of codes is read twice
 * (low and high nibbles; the second read hits the L1 cache), and the loop spends two macro-ops per
 * nibble half instead of three per line plus two (load, and, and): more of the loop's loads fit in
 * the out-of-order window, so more cache misses are in flight (measured: 8-16 % more bandwidth at
 * M = 1 over a DRAM-sized stack, in alternating rounds against the load-once loop). */
#define QC_W4_ANDM(n, mask, p)                                                                     \
    __asm__("vpandd %1, %2, %0" : "=v"(n) : "m"(*(const __m512i *)(p)), "v"(mask))
#define QC_W4_HI_OCTS 8192 /* 16 x 128 x 15 x 4 k x 8192 < 2^31 */
QC_TARGET_VNNI512 static void qc_w4_row(const qc_w4_args *w, ptrdiff_t cg, ptrdiff_t i) {
    const ptrdiff_t g = w->g, G = w->k / g, octs = g / 8, bb = qc_w4_block_bytes(g, w->has_zp);
    const ptrdiff_t col0 = cg * QC_W4_GROUP_COLS;
    const ptrdiff_t width = w->n - col0 < QC_W4_GROUP_COLS ? w->n - col0 : QC_W4_GROUP_COLS;
    const uint8_t *bp = w->packed + cg * G * bb;
    const ptrdiff_t pf = w->prefetch;
    const int8_t *x = w->xq + i * w->k;
    const __m512i low4 = _mm512_set1_epi8((char)w->mask);
    const __m512i high4 = _mm512_set1_epi8((char)(w->mask << 4));
    __m512 fa0 = _mm512_setzero_ps(), fa1 = fa0, fa2 = fa0, fa3 = fa0;
    for (ptrdiff_t j = 0; j < G; j++) {
        const int32_t gs = w->gsum[i * G + j];
        const int8_t *zc = w->has_zp ? (const int8_t *)(bp + octs * 256 + 256) : NULL;
        __m512i l0, l1, l2, l3;
        if (zc) {
            const __m512i ngs = _mm512_set1_epi32(-gs);
            l0 = _mm512_mullo_epi32(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)zc)), ngs);
            l1 = _mm512_mullo_epi32(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(zc + 16))), ngs);
            l2 = _mm512_mullo_epi32(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(zc + 32))), ngs);
            l3 = _mm512_mullo_epi32(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(zc + 48))), ngs);
        } else {
            l0 = l1 = l2 = l3 = _mm512_set1_epi32((int32_t)(0u - ((uint32_t)gs << 3)));
        }
        const int8_t *xk = x + j * g;
        for (ptrdiff_t o0 = 0; o0 < octs; o0 += QC_W4_HI_OCTS) {
            const ptrdiff_t o1 = octs - o0 < QC_W4_HI_OCTS ? octs : o0 + QC_W4_HI_OCTS;
            __m512i h0 = _mm512_setzero_si512(), h1 = h0, h2 = h0, h3 = h0;
#pragma GCC unroll 2 /* half the loop overhead: ~10 % faster from the cache */
            for (ptrdiff_t o = o0; o < o1; o++, bp += 256, xk += 8) {
                if (pf) {
                    _mm_prefetch((const char *)bp + pf, _MM_HINT_T0);
                    _mm_prefetch((const char *)bp + pf + 64, _MM_HINT_T0);
                    _mm_prefetch((const char *)bp + pf + 128, _MM_HINT_T0);
                    _mm_prefetch((const char *)bp + pf + 192, _MM_HINT_T0);
                }
                __m512i n;
                QC_W4_ANDM(n, low4, bp);        QC_W4_DPBUSD(l0, n, xk);
                QC_W4_ANDM(n, high4, bp);       QC_W4_DPBUSD(h0, n, xk + 4);
                QC_W4_ANDM(n, low4, bp + 64);   QC_W4_DPBUSD(l1, n, xk);
                QC_W4_ANDM(n, high4, bp + 64);  QC_W4_DPBUSD(h1, n, xk + 4);
                QC_W4_ANDM(n, low4, bp + 128);  QC_W4_DPBUSD(l2, n, xk);
                QC_W4_ANDM(n, high4, bp + 128); QC_W4_DPBUSD(h2, n, xk + 4);
                QC_W4_ANDM(n, low4, bp + 192);  QC_W4_DPBUSD(l3, n, xk);
                QC_W4_ANDM(n, high4, bp + 192); QC_W4_DPBUSD(h3, n, xk + 4);
            }
            l0 = _mm512_add_epi32(l0, _mm512_srai_epi32(h0, 4));
            l1 = _mm512_add_epi32(l1, _mm512_srai_epi32(h1, 4));
            l2 = _mm512_add_epi32(l2, _mm512_srai_epi32(h2, 4));
            l3 = _mm512_add_epi32(l3, _mm512_srai_epi32(h3, 4));
        }
        const float *sc = (const float *)bp;
        if (w->sums) {
            int32_t tmp[QC_W4_GROUP_COLS];
            _mm512_storeu_si512((void *)tmp, l0);
            _mm512_storeu_si512((void *)(tmp + 16), l1);
            _mm512_storeu_si512((void *)(tmp + 32), l2);
            _mm512_storeu_si512((void *)(tmp + 48), l3);
            for (ptrdiff_t c = 0; c < width; c++) w->sums[(i * w->n + col0 + c) * G + j] = tmp[c];
        } else {
            fa0 = _mm512_add_ps(fa0, _mm512_mul_ps(_mm512_cvtepi32_ps(l0), _mm512_load_ps(sc)));
            fa1 = _mm512_add_ps(fa1, _mm512_mul_ps(_mm512_cvtepi32_ps(l1), _mm512_load_ps(sc + 16)));
            fa2 = _mm512_add_ps(fa2, _mm512_mul_ps(_mm512_cvtepi32_ps(l2), _mm512_load_ps(sc + 32)));
            fa3 = _mm512_add_ps(fa3, _mm512_mul_ps(_mm512_cvtepi32_ps(l3), _mm512_load_ps(sc + 48)));
        }
        bp += bb - octs * 256;
    }
    if (w->sums) return;
    const __m512 s = _mm512_set1_ps(w->sx[i]);
    float *yr = w->y + i * w->n + col0;
    const __m512 f[4] = {_mm512_mul_ps(fa0, s), _mm512_mul_ps(fa1, s), _mm512_mul_ps(fa2, s),
                         _mm512_mul_ps(fa3, s)};
    for (int p = 0; p < 4 && 16 * p < width; p++) {
        __mmask16 keep = width - 16 * p >= 16 ? (__mmask16)0xFFFF
                                              : (__mmask16)((1u << (width - 16 * p)) - 1u);
        _mm512_mask_storeu_ps(yr + 16 * p, keep, f[p]);
    }
}
/* endregion: w4_vnni_row */

/* Rows in tiles of 6 (the tile compiled for each height), all of k per tile: the column group's
 * codes and scales (k / 2 x 64 bytes and k / g x 256) stay in the L2 cache while the tiles
 * stream them. */
QC_TARGET_VNNI512 void qc_w4_group_vnni512(const qc_w4_args *w, ptrdiff_t cg) {
    for (ptrdiff_t i0 = 0; i0 < w->m; i0 += 6) {
        switch (w->m - i0 < 6 ? (int)(w->m - i0) : 6) {
        case 6: qc_w4_tile(6, w, cg, i0); break;
        case 5: qc_w4_tile(5, w, cg, i0); break;
        case 4: qc_w4_tile(4, w, cg, i0); break;
        case 3: qc_w4_tile(3, w, cg, i0); break;
        case 2: qc_w4_tile(2, w, cg, i0); break;
        default: qc_w4_row(w, cg, i0); break;
        }
    }
}
#else
typedef int qc_no_vnni_here; /* a translation unit may not be empty */
#endif
