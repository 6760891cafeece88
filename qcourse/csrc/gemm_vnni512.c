/* qcourse/csrc/gemm_vnni512.c -- the packed GEMM with AVX-512 VNNI: the register-tiled
 * micro-kernel (rung 5), its cache blocking (block sizes in qgemm.h), the row sums of A, and the
 * register-only loop that measures the instruction's peak. Every function is compiled for
 * AVX-512 VNNI and only called when the CPU has it. */
#include <stdlib.h>
#include <string.h>

#include "qgemm.h"

#if QC_X86
static inline ptrdiff_t qc_row_tiles(ptrdiff_t m) { return (m + QC_MR - 1) / QC_MR; }

/* region: vnni_tile */
/* AVX-512 VNNI micro-kernel: a tile of R <= 6 rows x 64 columns of C in 4R zmm registers for the
 * whole k loop. Per quad of k: 4 aligned loads of packed B (256 bytes, one stream, u8) and 4R
 * vpdpbusd, each of which broadcasts one quad of a row of A (s8) straight from A's own memory to
 * 16 lanes, multiplies 16 lanes x 4 (u8 x s8) and adds them into int32. No copy of A is made.
 * On the last block of k, C = acc - 128 * rowsum(A), the row's share of the +128 in B. */
/* acc += u8(b) . s8(4 bytes at p, broadcast). Inline assembly, with the accumulator as a
 * read-write register operand: GCC 12 copies the accumulator around the intrinsic
 * _mm512_dpbusd_epi32 and, with 24 of them live, spills them to the stack on every iteration; and
 * the intrinsic cannot express the {1to16} memory broadcast. */
#define QC_DPBUSD(acc, b, p)                                                                      \
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(b), "m"(*(const int32_t *)(p)))
#define QC_ROW(r, p)                                                                              \
    if (R > r) {                                                                                  \
        QC_DPBUSD(c##r##0, b0, p); QC_DPBUSD(c##r##1, b1, p);                                     \
        QC_DPBUSD(c##r##2, b2, p); QC_DPBUSD(c##r##3, b3, p);                                     \
    }
#define QC_LOAD_B(bp)                                                                             \
    b0 = _mm512_load_si512((const void *)((bp) + 0));                                            \
    b1 = _mm512_load_si512((const void *)((bp) + 64));                                           \
    b2 = _mm512_load_si512((const void *)((bp) + 128));                                          \
    b3 = _mm512_load_si512((const void *)((bp) + 192));
#define QC_INIT_ROW(r)                                                                            \
    if (R > r) {                                                                                  \
        if (in) {                                                                                 \
            c##r##0 = _mm512_loadu_si512((const void *)(in + (r) * ldi + 0));                     \
            c##r##1 = _mm512_loadu_si512((const void *)(in + (r) * ldi + 16));                    \
            c##r##2 = _mm512_loadu_si512((const void *)(in + (r) * ldi + 32));                    \
            c##r##3 = _mm512_loadu_si512((const void *)(in + (r) * ldi + 48));                    \
        } else {                                                                                  \
            c##r##0 = c##r##1 = c##r##2 = c##r##3 = _mm512_setzero_si512();                       \
        }                                                                                         \
    }
#define QC_STORE4(STORE, r)                                                                       \
    STORE((void *)(out + (r) * ldo + 0), _mm512_sub_epi32(c##r##0, corr));                        \
    STORE((void *)(out + (r) * ldo + 16), _mm512_sub_epi32(c##r##1, corr));                       \
    STORE((void *)(out + (r) * ldo + 32), _mm512_sub_epi32(c##r##2, corr));                       \
    STORE((void *)(out + (r) * ldo + 48), _mm512_sub_epi32(c##r##3, corr));
#define QC_STORE_ROW(r)                                                                           \
    if (R > r) {                                                                                  \
        __m512i corr = rowsum ? _mm512_set1_epi32((int32_t)((uint32_t)rowsum[r] << 7))           \
                              : _mm512_setzero_si512();                                           \
        if (stream) {                                                                             \
            QC_STORE4(_mm512_stream_si512, r)                                                     \
        } else {                                                                                  \
            QC_STORE4(_mm512_storeu_si512, r)                                                     \
        }                                                                                         \
    }

/* R rows of A from a (row stride lda) times nq quads of packed B from bp, then, if tail is not
 * NULL, one more quad whose A values come from tail (4 bytes per row). in: partial sums to
 * continue from (row stride ldi), or NULL to start from zero. rowsum: NULL, or (last block of k)
 * rowsum(A) of the R rows, for the correction. out: the R x 64 result, row stride ldo; stream:
 * store it with non-temporal stores (out 64-byte aligned), which write C to memory without first
 * reading its cache lines in, for outputs too large to stay in the cache anyway. */
static inline __attribute__((always_inline)) QC_TARGET_VNNI512 void qc_vnni_tile(
    const int R, const int8_t *a, ptrdiff_t lda, const uint8_t *bp, ptrdiff_t nq,
    const int8_t *tail, const int32_t *in, ptrdiff_t ldi, const int32_t *rowsum, int32_t *out,
    ptrdiff_t ldo, int stream) {
    __m512i c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23;
    __m512i c30, c31, c32, c33, c40, c41, c42, c43, c50, c51, c52, c53;
    __m512i b0, b1, b2, b3;
    QC_INIT_ROW(0) QC_INIT_ROW(1) QC_INIT_ROW(2) QC_INIT_ROW(3) QC_INIT_ROW(4) QC_INIT_ROW(5)
    const int8_t *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
    const int8_t *a4 = a + 4 * lda, *a5 = a + 5 * lda;
#pragma GCC unroll 2
    for (ptrdiff_t q = 0; q < nq; q++) {
        QC_LOAD_B(bp)
        QC_ROW(0, a0) QC_ROW(1, a1) QC_ROW(2, a2) QC_ROW(3, a3) QC_ROW(4, a4) QC_ROW(5, a5)
        a0 += 4; a1 += 4; a2 += 4; a3 += 4; a4 += 4; a5 += 4;
        bp += QC_NG * 64;
    }
    if (tail) {
        QC_LOAD_B(bp)
        QC_ROW(0, tail) QC_ROW(1, tail + 4) QC_ROW(2, tail + 8) QC_ROW(3, tail + 12)
        QC_ROW(4, tail + 16) QC_ROW(5, tail + 20)
    }
    QC_STORE_ROW(0) QC_STORE_ROW(1) QC_STORE_ROW(2) QC_STORE_ROW(3) QC_STORE_ROW(4)
    QC_STORE_ROW(5)
}

/* endregion: vnni_tile */

/* The tile kernel compiled for each row count, so that the edge rows of C need no padding. */
QC_TARGET_VNNI512 static void qc_vnni_tile_rows(int rows, const int8_t *a, ptrdiff_t lda,
                                             const uint8_t *bp, ptrdiff_t nq, const int8_t *tail,
                                             const int32_t *in, ptrdiff_t ldi,
                                             const int32_t *rowsum, int32_t *out, ptrdiff_t ldo,
                                             int stream) {
    switch (rows) {
    case 6: qc_vnni_tile(6, a, lda, bp, nq, tail, in, ldi, rowsum, out, ldo, stream); break;
    case 5: qc_vnni_tile(5, a, lda, bp, nq, tail, in, ldi, rowsum, out, ldo, stream); break;
    case 4: qc_vnni_tile(4, a, lda, bp, nq, tail, in, ldi, rowsum, out, ldo, stream); break;
    case 3: qc_vnni_tile(3, a, lda, bp, nq, tail, in, ldi, rowsum, out, ldo, stream); break;
    case 2: qc_vnni_tile(2, a, lda, bp, nq, tail, in, ldi, rowsum, out, ldo, stream); break;
    default: qc_vnni_tile(1, a, lda, bp, nq, tail, in, ldi, rowsum, out, ldo, stream); break;
    }
}


/* region: vnni_peak */
/* The instruction's own speed: iters x 16 independent register-to-register vpdpbusd (no memory
 * traffic, no dependency chain longer than iters), 16 x 64 MACs per iteration. Returns a value
 * derived from the sums so that the compiler cannot drop the loop. */
#define QC_DPBUSD_REG(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))
QC_TARGET_VNNI512 uint32_t qc_vnni_peak_loop(ptrdiff_t iters) {
    __m512i x = _mm512_set1_epi32(0x01020304), y = _mm512_set1_epi32(0x01FF01FF);
    __m512i s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15;
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = _mm512_setzero_si512();
    s8 = s9 = s10 = s11 = s12 = s13 = s14 = s15 = _mm512_setzero_si512();
    for (ptrdiff_t i = 0; i < iters; i++) {
        QC_DPBUSD_REG(s0, x, y); QC_DPBUSD_REG(s1, x, y); QC_DPBUSD_REG(s2, x, y);
        QC_DPBUSD_REG(s3, x, y); QC_DPBUSD_REG(s4, x, y); QC_DPBUSD_REG(s5, x, y);
        QC_DPBUSD_REG(s6, x, y); QC_DPBUSD_REG(s7, x, y); QC_DPBUSD_REG(s8, x, y);
        QC_DPBUSD_REG(s9, x, y); QC_DPBUSD_REG(s10, x, y); QC_DPBUSD_REG(s11, x, y);
        QC_DPBUSD_REG(s12, x, y); QC_DPBUSD_REG(s13, x, y); QC_DPBUSD_REG(s14, x, y);
        QC_DPBUSD_REG(s15, x, y);
    }
    __m512i t = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)),
                                 _mm512_add_epi32(_mm512_add_epi32(s4, s5), _mm512_add_epi32(s6, s7)));
    __m512i u = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(s8, s9), _mm512_add_epi32(s10, s11)),
                                 _mm512_add_epi32(_mm512_add_epi32(s12, s13), _mm512_add_epi32(s14, s15)));
    return (uint32_t)_mm512_reduce_add_epi32(_mm512_add_epi32(t, u));
}
/* endregion: vnni_peak */


/* rowsum[i] = sum_k A[i, k], 64 bytes at a time (vpdpbusd against a register of ones); exact in
 * int32 for k <= 131071. */
QC_TARGET_VNNI512 void qc_rowsum_vnni(const int8_t *a, ptrdiff_t lda, ptrdiff_t m,
                                          ptrdiff_t k, int32_t *rowsum) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (ptrdiff_t i = 0; i < m; i++) {
        const int8_t *row = a + i * lda;
        __m512i acc = _mm512_setzero_si512();
        ptrdiff_t t = 0;
        for (; t + 64 <= k; t += 64)
            acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512((const void *)(row + t)));
        if (t < k) {
            __mmask64 rest = (__mmask64)(~0ULL >> (64 - (k - t)));
            acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(rest, row + t));
        }
        rowsum[i] = _mm512_reduce_add_epi32(acc);
    }
}


/* One group of 64 columns. buf: QC_CHUNK_BUF_BYTES of the thread's own memory. Without rq: C into
 * c (the group's first column, row stride ldc). With rq (fused requantization): each chunk of
 * QC_MCT row tiles is finished in buf and converted to 8 bits from there; c is not used. */
QC_TARGET_VNNI512 void qc_gemm_vnni_group(const int8_t *a, ptrdiff_t lda, const int32_t *rowsum,
                                              const int8_t *tail, const uint8_t *bp, int32_t *c,
                                              ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k,
                                              ptrdiff_t g, const qc_requant *rq, int32_t *buf) {
    const ptrdiff_t width_max = QC_NG * QC_NR;
    ptrdiff_t kq = qc_quads(k), j0 = g * width_max;
    ptrdiff_t width = n - j0 < width_max ? n - j0 : width_max;
    const uint8_t *bgroup = bp + g * kq * QC_NG * 64;
    ptrdiff_t tiles = qc_row_tiles(m);
    int direct = !rq && width == width_max; /* last block of k: straight into C */
    /* non-temporal stores for a C larger than the L2 cache, when its rows are 64-byte aligned */
    int stream = direct && m * n * (ptrdiff_t)sizeof(int32_t) >= QC_STREAM_MIN_BYTES &&
                 ((uintptr_t)c & 63) == 0 && ldc % 16 == 0;
    for (ptrdiff_t t0 = 0; t0 < tiles; t0 += QC_MCT) {
        ptrdiff_t t1 = t0 + QC_MCT < tiles ? t0 + QC_MCT : tiles;
        for (ptrdiff_t q0 = 0; q0 < kq; q0 += QC_KCQ) {
            ptrdiff_t len = kq - q0 < QC_KCQ ? kq - q0 : QC_KCQ;
            int last = q0 + len == kq, has_tail = last && k % 4 != 0;
            for (ptrdiff_t tile = t0; tile < t1; tile++) {
                ptrdiff_t i0 = tile * QC_MR;
                int rows = m - i0 < QC_MR ? (int)(m - i0) : QC_MR;
                int32_t *partial = buf + (i0 - t0 * QC_MR) * width_max;
                int32_t *out = direct && last ? c + i0 * ldc : partial;
                qc_vnni_tile_rows(rows, a + i0 * lda + q0 * 4, lda, bgroup + q0 * QC_NG * 64,
                                  has_tail ? len - 1 : len, has_tail ? tail + i0 * 4 : NULL,
                                  q0 == 0 ? NULL : partial, width_max, last ? rowsum + i0 : NULL,
                                  out, direct && last ? ldc : width_max, stream && last);
            }
        }
        ptrdiff_t i0 = t0 * QC_MR, rows = (t1 - t0) * QC_MR < m - i0 ? (t1 - t0) * QC_MR : m - i0;
        if (rq) {
            qc_requant_rows_512(rq, buf, width_max, i0, rows, j0, width, n);
        } else if (!direct) {
            for (ptrdiff_t r = 0; r < rows; r++)
                memcpy(c + (i0 + r) * ldc, buf + r * width_max, (size_t)width * sizeof(int32_t));
        }
    }
    if (stream) _mm_sfence(); /* order the non-temporal stores before the caller reads C */
}
#else
typedef int qc_no_vnni_here; /* a translation unit may not be empty */
#endif
