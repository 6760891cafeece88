/*
 * qcourse/_qgemm.h -- the int8 GEMM loops that need the C compiler's help.
 *
 * Included from _kernels.pyx. Nothing here checks its arguments: qcourse/kernels.py does that.
 *
 * The build uses no -march flag: the package must run on any x86-64 (and non-x86) CPU, and the
 * machine that builds a wheel or a Binder image is not the one that runs it. Instead each loop
 * that benefits from wider instructions is compiled several times, with
 * __attribute__((target(...))), and qc_best_path() picks one at run time from CPUID:
 *
 *   QC_PATH_PORTABLE  plain C, any CPU
 *   QC_PATH_AVX2      256-bit integer SIMD (vpmovsxbw + vpmaddwd: exact, no saturation)
 *   QC_PATH_VNNI512   AVX-512 VNNI (vpdpbusd: four u8 x s8 products summed into each int32 lane)
 *
 * Every path computes the same exact integer result. Accumulation is done modulo 2^32 (unsigned
 * arithmetic in C, wrapping vector adds): the u8 x s8 form computes (a + 128) . b, which can leave
 * the int32 range on the way, but after subtracting 128 * colsum(b) the true result, which fits in
 * int32 because K <= 131071, comes out exactly.
 */
#ifndef QCOURSE_QGEMM_H
#define QCOURSE_QGEMM_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__)
#define QC_X86 1
#include <immintrin.h>
#else
#define QC_X86 0
#endif

#define QC_PATH_PORTABLE 0
#define QC_PATH_AVX2 1
#define QC_PATH_VNNI512 2

/* Packed B: panels of QC_NR = 16 columns; inside a panel, for each group of four k ("quad"),
 * 16 columns x 4 consecutive k values = 64 bytes, column-major within the quad:
 *   packed[((p * kq_total) + q) * 64 + c * 4 + t] = B[4q + t, 16p + c]   (0 outside B)
 * so that one 64-byte load holds, for each of 16 output columns, the four B values that one
 * vpdpbusd lane multiplies with four A values. */
#define QC_NR 16

static int qc_path_supported(int path) {
#if QC_X86
    __builtin_cpu_init();
    switch (path) {
    case QC_PATH_PORTABLE:
        return 1;
    case QC_PATH_AVX2:
        return __builtin_cpu_supports("avx2");
    case QC_PATH_VNNI512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vnni");
    default:
        return 0;
    }
#else
    return path == QC_PATH_PORTABLE;
#endif
}

static int qc_best_path(void) {
    if (qc_path_supported(QC_PATH_VNNI512)) return QC_PATH_VNNI512;
    if (qc_path_supported(QC_PATH_AVX2)) return QC_PATH_AVX2;
    return QC_PATH_PORTABLE;
}

/* ---------------------------------------------------------------------------------------------
 * Rung: the u8 x s8 row-dot loop, left to the compiler's auto-vectorizer.
 * C[i, j] = sum_k (A[i, k] + 128) * Bt[j, k] - 128 * colsum[j], with au = A + 128 as uint8 and Bt
 * = B transposed (rows of Bt are contiguous). The same source is compiled once per instruction set.
 * ------------------------------------------------------------------------------------------- */
#define QC_U8S8_CHUNK 65536
#define QC_U8S8_BODY                                                                              \
    for (ptrdiff_t i = 0; i < m; i++) {                                                           \
        const uint8_t *ar = au + i * k;                                                           \
        for (ptrdiff_t j = 0; j < n; j++) {                                                       \
            const int8_t *br = bt + j * k;                                                        \
            uint32_t total = 0;                                                                   \
            for (ptrdiff_t t0 = 0; t0 < k; t0 += QC_U8S8_CHUNK) {                                 \
                ptrdiff_t t1 = t0 + QC_U8S8_CHUNK < k ? t0 + QC_U8S8_CHUNK : k;                   \
                int32_t acc = 0;                                                                  \
                for (ptrdiff_t t = t0; t < t1; t++) acc += (int32_t)ar[t] * (int32_t)br[t];       \
                total += (uint32_t)acc;                                                           \
            }                                                                                     \
            c[i * n + j] = (int32_t)(total - 128u * (uint32_t)colsum[j]);                         \
        }                                                                                         \
    }

/* One chunk of 65536 products of at most 255 * 128 in magnitude stays inside int32 (the plain
 * int32 sum is the pattern the vectorizer turns into dot-product instructions); chunks are added
 * modulo 2^32. */
static void qc_u8s8_portable(const uint8_t *au, const int8_t *bt, const int32_t *colsum,
                             int32_t *c, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k) {
    QC_U8S8_BODY
}
#if QC_X86
__attribute__((target("avx2"))) static void qc_u8s8_avx2(const uint8_t *au, const int8_t *bt,
                                                         const int32_t *colsum, int32_t *c,
                                                         ptrdiff_t m, ptrdiff_t n, ptrdiff_t k) {
    QC_U8S8_BODY
}
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void qc_u8s8_vnni512(
    const uint8_t *au, const int8_t *bt, const int32_t *colsum, int32_t *c, ptrdiff_t m,
    ptrdiff_t n, ptrdiff_t k) {
    QC_U8S8_BODY
}
#endif

static void qc_u8s8(int path, const uint8_t *au, const int8_t *bt, const int32_t *colsum,
                    int32_t *c, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k) {
#if QC_X86
    if (path == QC_PATH_VNNI512) { qc_u8s8_vnni512(au, bt, colsum, c, m, n, k); return; }
    if (path == QC_PATH_AVX2) { qc_u8s8_avx2(au, bt, colsum, c, m, n, k); return; }
#endif
    qc_u8s8_portable(au, bt, colsum, c, m, n, k);
}

/* ---------------------------------------------------------------------------------------------
 * Packing.
 *
 * B (k x n) is packed once, in groups of QC_NG = 4 panels of 16 columns (64 columns). Inside a
 * group the k dimension runs in quads; for each quad the group's 4 panels are stored one after the
 * other, 64 bytes each, so the micro-kernel reads one sequential stream of 256 bytes per quad:
 *   block(p, q) = packed + ((p / 4) * kq + q) * 256 + (p % 4) * 64
 *   block(p, q)[c * 4 + t] = B[4q + t, 16p + c]            (0 outside B)
 * n is padded to a multiple of 64 columns and k to a multiple of 4 with zeros.
 *
 * A is packed per call into tiles of QC_MR = 6 rows, quad-interleaved the same way, as uint8
 * (A + 128) for the VNNI path: apack + (tile * kq + q) * 24 + r * 4 + t = A[6 tile + r, 4q + t].
 * ------------------------------------------------------------------------------------------- */
#define QC_NG 4
#define QC_MR 6
static inline ptrdiff_t qc_quads(ptrdiff_t k) { return (k + 3) / 4; }
static inline ptrdiff_t qc_groups(ptrdiff_t n) { return (n + QC_NG * QC_NR - 1) / (QC_NG * QC_NR); }
static inline ptrdiff_t qc_packed_b_size(ptrdiff_t k, ptrdiff_t n) {
    return qc_groups(n) * qc_quads(k) * QC_NG * 64;
}
static inline ptrdiff_t qc_row_tiles(ptrdiff_t m) { return (m + QC_MR - 1) / QC_MR; }
static inline ptrdiff_t qc_packed_a_size(ptrdiff_t m, ptrdiff_t k) {
    return qc_row_tiles(m) * qc_quads(k) * QC_MR * 4;
}
static inline const int8_t *qc_block(const int8_t *bp, ptrdiff_t p, ptrdiff_t q, ptrdiff_t kq) {
    return bp + ((p / QC_NG) * kq + q) * (QC_NG * 64) + (p % QC_NG) * 64;
}

/* B (k x n, row-major int8) -> packed (qc_packed_b_size bytes) and colsum[j] = sum_k B[k, j]
 * for j < n, 0 for the padding up to a multiple of 64 columns. */
static void qc_pack_b(const int8_t *b, ptrdiff_t k, ptrdiff_t n, int8_t *packed, int32_t *colsum) {
    ptrdiff_t kq = qc_quads(k), npad = qc_groups(n) * QC_NG * QC_NR;
    memset(packed, 0, (size_t)qc_packed_b_size(k, n));
    for (ptrdiff_t j = 0; j < npad; j++) colsum[j] = 0;
    for (ptrdiff_t kk = 0; kk < k; kk++) {
        const int8_t *row = b + kk * n;
        ptrdiff_t q = kk / 4, t = kk % 4;
        for (ptrdiff_t j = 0; j < n; j++) {
            ((int8_t *)qc_block(packed, j / QC_NR, q, kq))[(j % QC_NR) * 4 + t] = row[j];
            colsum[j] += row[j];
        }
    }
}

/* A (m x k int8, row stride lda) -> apack as uint8 A + 128 (padding: 128, times B's zero pad). */
static void qc_pack_a_u8(const int8_t *a, ptrdiff_t lda, ptrdiff_t m, ptrdiff_t k,
                         uint8_t *apack) {
    ptrdiff_t kq = qc_quads(k), tiles = qc_row_tiles(m);
    memset(apack, 128, (size_t)qc_packed_a_size(m, k));
    for (ptrdiff_t i = 0; i < m; i++) {
        uint8_t *dst = apack + (i / QC_MR) * kq * QC_MR * 4 + (i % QC_MR) * 4;
        const int8_t *src = a + i * lda;
        for (ptrdiff_t kk = 0; kk < k; kk++)
            dst[(kk / 4) * QC_MR * 4 + (kk % 4)] = (uint8_t)(src[kk] + 128);
    }
    (void)tiles;
}

/* ---------------------------------------------------------------------------------------------
 * Requantization epilogue, fused into the GEMM: int32 accumulators -> 8-bit outputs.
 *   v   = (int32)(acc[i, j] + colterm[j] + rowsum[i] * rowcoef[j])     (modulo 2^32)
 *   y   = clamp(round_half_even((float)v * mult[j]), qmin - zp, qmax - zp) + zp
 * in float32, as ONNX Runtime's requantization does. Clamping before rounding gives the same
 * result as after (the bounds are integers); rounding uses the 1.5 * 2^23 trick, exact here
 * because |value| <= 2^16 after the clamp. Output bytes: int8 or uint8 (two's complement low byte
 * of the clamped value either way).
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    const int32_t *colterm; /* n entries */
    const int32_t *rowsum;  /* m entries, or NULL */
    const int32_t *rowcoef; /* n entries, or NULL */
    const float *mult;      /* n entries */
    int32_t zp, qmin, qmax;
    uint8_t *y;             /* m x n bytes, row stride n */
} qc_requant;

static inline float qc_round_half_even(float v) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return (v + magic) - magic; /* two IEEE additions; the build never uses -ffast-math */
}

/* Rows [i0, i0 + rows) of columns [j0, j0 + width) from the int32 tile acc (row stride ldacc).
 * Copied into restrict-qualified locals so that the compiler can vectorize the loop. */
#define QC_REQUANT_BODY                                                                           \
    const int32_t *restrict colterm = rq->colterm + j0;                                           \
    const float *restrict mult = rq->mult + j0;                                                   \
    const int32_t *restrict rowcoef = rq->rowcoef ? rq->rowcoef + j0 : NULL;                      \
    const int32_t zp = rq->zp;                                                                    \
    const float lo = (float)(rq->qmin - zp), hi = (float)(rq->qmax - zp);                         \
    for (ptrdiff_t r = 0; r < rows; r++) {                                                        \
        uint8_t *restrict yr = rq->y + (i0 + r) * n + j0;                                         \
        const int32_t *restrict ar = acc + r * ldacc;                                             \
        const uint32_t rs = rq->rowsum ? (uint32_t)rq->rowsum[i0 + r] : 0u;                       \
        for (ptrdiff_t j = 0; j < width; j++) {                                                   \
            uint32_t v = (uint32_t)ar[j] + (uint32_t)colterm[j];                                  \
            if (rowcoef) v += rs * (uint32_t)rowcoef[j];                                          \
            float f = (float)(int32_t)v * mult[j];                                                \
            f = f < lo ? lo : (f > hi ? hi : f);                                                  \
            yr[j] = (uint8_t)((int32_t)qc_round_half_even(f) + zp);                               \
        }                                                                                         \
    }

static void qc_requant_rows_portable(const qc_requant *rq, const int32_t *acc, ptrdiff_t ldacc,
                                     ptrdiff_t i0, ptrdiff_t rows, ptrdiff_t j0, ptrdiff_t width,
                                     ptrdiff_t n) {
    QC_REQUANT_BODY
}
#if QC_X86
__attribute__((target("avx2"))) static void qc_requant_rows_avx2(
    const qc_requant *rq, const int32_t *acc, ptrdiff_t ldacc, ptrdiff_t i0, ptrdiff_t rows,
    ptrdiff_t j0, ptrdiff_t width, ptrdiff_t n) {
    QC_REQUANT_BODY
}
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void qc_requant_rows_512(
    const qc_requant *rq, const int32_t *acc, ptrdiff_t ldacc, ptrdiff_t i0, ptrdiff_t rows,
    ptrdiff_t j0, ptrdiff_t width, ptrdiff_t n) {
    QC_REQUANT_BODY
}
#endif

static void qc_requant_rows(int path, const qc_requant *rq, const int32_t *acc, ptrdiff_t ldacc,
                            ptrdiff_t i0, ptrdiff_t rows, ptrdiff_t j0, ptrdiff_t width,
                            ptrdiff_t n) {
#if QC_X86
    if (path == QC_PATH_VNNI512) { qc_requant_rows_512(rq, acc, ldacc, i0, rows, j0, width, n); return; }
    if (path == QC_PATH_AVX2) { qc_requant_rows_avx2(rq, acc, ldacc, i0, rows, j0, width, n); return; }
#endif
    qc_requant_rows_portable(rq, acc, ldacc, i0, rows, j0, width, n);
}

/* ---------------------------------------------------------------------------------------------
 * Rung: packed, register-tiled GEMM. C (m x n, row stride ldc) = A (m x k) . B, B packed.
 * Work is split over groups of 64 output columns: `threads` OpenMP threads take groups in turn.
 * A group function computes columns [64 g, 64 g + 64) and writes them at c (which points at the
 * group's first column), row stride ldc.
 * ------------------------------------------------------------------------------------------- */

/* Portable: scalar, same layout, s8 x s8 directly (no +128 needed), modulo-2^32 accumulation. */
static void qc_gemm_portable_group(const int8_t *a, ptrdiff_t lda, const int8_t *bp, int32_t *c,
                                   ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k,
                                   ptrdiff_t g) {
    ptrdiff_t kq = qc_quads(k);
    for (ptrdiff_t i = 0; i < m; i++) {
        const int8_t *ar = a + i * lda;
        for (ptrdiff_t p = g * QC_NG; p < (g + 1) * QC_NG && p * QC_NR < n; p++) {
            uint32_t acc[QC_NR] = {0};
            for (ptrdiff_t q = 0; q < kq; q++) {
                int32_t av[4] = {0, 0, 0, 0};
                for (int t = 0; t < 4 && 4 * q + t < k; t++) av[t] = ar[4 * q + t];
                const int8_t *bq = qc_block(bp, p, q, kq);
                for (int cc = 0; cc < QC_NR; cc++)
                    acc[cc] += (uint32_t)(av[0] * bq[cc * 4] + av[1] * bq[cc * 4 + 1] +
                                          av[2] * bq[cc * 4 + 2] + av[3] * bq[cc * 4 + 3]);
            }
            ptrdiff_t width = n - p * QC_NR < QC_NR ? n - p * QC_NR : QC_NR;
            for (ptrdiff_t cc = 0; cc < width; cc++)
                c[i * ldc + (p - g * QC_NG) * QC_NR + cc] = (int32_t)acc[cc];
        }
    }
}

#if QC_X86
/* AVX2: a quad of A widened to four int16, broadcast; 16 bytes of a B block (4 columns x 4 k)
 * widened to 16 int16; vpmaddwd sums adjacent pairs into int32, giving two partial sums per
 * column, added together when the tile is stored. Exact for s8 x s8: |pair sum| <= 2 * 16384. */
#define QC_AVX2_MR 2
__attribute__((target("avx2"))) static void qc_gemm_avx2_group(const int8_t *a, ptrdiff_t lda,
                                                               const int8_t *bp, int32_t *c,
                                                               ptrdiff_t ldc, ptrdiff_t m,
                                                               ptrdiff_t n, ptrdiff_t k,
                                                               ptrdiff_t g) {
    ptrdiff_t kq = qc_quads(k);
    for (ptrdiff_t i0 = 0; i0 < m; i0 += QC_AVX2_MR) {
        int mr = (int)(m - i0 < QC_AVX2_MR ? m - i0 : QC_AVX2_MR);
        for (ptrdiff_t p = g * QC_NG; p < (g + 1) * QC_NG && p * QC_NR < n; p++) {
            __m256i acc[QC_AVX2_MR][4];
            for (int r = 0; r < QC_AVX2_MR; r++)
                for (int v = 0; v < 4; v++) acc[r][v] = _mm256_setzero_si256();
            for (ptrdiff_t q = 0; q < kq; q++) {
                const int8_t *blk = qc_block(bp, p, q, kq);
                __m256i bw[4];
                for (int v = 0; v < 4; v++)
                    bw[v] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + v * 16)));
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

/* AVX-512 VNNI micro-kernel: a 6 x 64 tile of C in 24 zmm registers for the whole k loop. Per
 * quad of k: 4 loads of B (256 bytes, one stream), 6 broadcasts of A, 24 vpdpbusd, each of which
 * multiplies 16 lanes x 4 (u8 x s8) and adds them into int32. Then C = acc - 128 * colsum. */
#define QC_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define QC_BCAST(r) (memcpy(&quad, ap + 4 * (r), 4), _mm512_set1_epi32(quad))
/* acc += u8(a) . s8(b) per 4-byte group. Written as inline assembly with the accumulator as a
 * read-write register operand: GCC 12 copies the accumulator around the intrinsic
 * _mm512_dpbusd_epi32 and, with 24 of them live, spills them to the stack on every iteration. */
#define QC_DPBUSD(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))
#define QC_ROW(r)                                                                                 \
    x = QC_BCAST(r);                                                                              \
    QC_DPBUSD(c##r##0, x, b0);                                                                    \
    QC_DPBUSD(c##r##1, x, b1);                                                                    \
    QC_DPBUSD(c##r##2, x, b2);                                                                    \
    QC_DPBUSD(c##r##3, x, b3);
#define QC_STORE_ROW(r)                                                                           \
    _mm512_storeu_si512((void *)(out + (r) * ldo + 0), _mm512_sub_epi32(c##r##0, k0));            \
    _mm512_storeu_si512((void *)(out + (r) * ldo + 16), _mm512_sub_epi32(c##r##1, k1));           \
    _mm512_storeu_si512((void *)(out + (r) * ldo + 32), _mm512_sub_epi32(c##r##2, k2));           \
    _mm512_storeu_si512((void *)(out + (r) * ldo + 48), _mm512_sub_epi32(c##r##3, k3));

#define QC_LOAD_ROW(r)                                                                            \
    c##r##0 = _mm512_loadu_si512((const void *)(out + (r) * ldo + 0));                            \
    c##r##1 = _mm512_loadu_si512((const void *)(out + (r) * ldo + 16));                           \
    c##r##2 = _mm512_loadu_si512((const void *)(out + (r) * ldo + 32));                           \
    c##r##3 = _mm512_loadu_si512((const void *)(out + (r) * ldo + 48));

/* One 6 x 64 tile over kq quads of k. first: start from zero (else add to what out holds);
 * colsum != NULL: this is the last block of k, so subtract 128 * colsum before storing. */
QC_VNNI_TARGET static void qc_vnni_6x64(const uint8_t *ap, const int8_t *bp, ptrdiff_t kq,
                                        int first, const int32_t *colsum, int32_t *out,
                                        ptrdiff_t ldo) {
    __m512i c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23;
    __m512i c30, c31, c32, c33, c40, c41, c42, c43, c50, c51, c52, c53;
    if (first) {
        __m512i z = _mm512_setzero_si512();
        c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = c20 = c21 = c22 = c23 = z;
        c30 = c31 = c32 = c33 = c40 = c41 = c42 = c43 = c50 = c51 = c52 = c53 = z;
    } else {
        QC_LOAD_ROW(0) QC_LOAD_ROW(1) QC_LOAD_ROW(2) QC_LOAD_ROW(3) QC_LOAD_ROW(4) QC_LOAD_ROW(5)
    }
    __m512i b0, b1, b2, b3, x;
    int32_t quad;
    for (ptrdiff_t q = 0; q < kq; q++) {
        b0 = _mm512_loadu_si512((const void *)(bp + 0));
        b1 = _mm512_loadu_si512((const void *)(bp + 64));
        b2 = _mm512_loadu_si512((const void *)(bp + 128));
        b3 = _mm512_loadu_si512((const void *)(bp + 192));
        QC_ROW(0) QC_ROW(1) QC_ROW(2) QC_ROW(3) QC_ROW(4) QC_ROW(5)
        ap += QC_MR * 4;
        bp += QC_NG * 64;
    }
    __m512i k0, k1, k2, k3;
    if (colsum) { /* 128 * colsum, modulo 2^32 like the accumulators */
        k0 = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(colsum + 0)), 7);
        k1 = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(colsum + 16)), 7);
        k2 = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(colsum + 32)), 7);
        k3 = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(colsum + 48)), 7);
    } else {
        k0 = k1 = k2 = k3 = _mm512_setzero_si512();
    }
    QC_STORE_ROW(0) QC_STORE_ROW(1) QC_STORE_ROW(2) QC_STORE_ROW(3) QC_STORE_ROW(4)
    QC_STORE_ROW(5)
}

/* Quads of k per cache block: QC_KCQ * 256 bytes of B (16 KiB) stay in L1 while every full row
 * tile of the column group runs over them. */
#ifndef QC_KCQ
#define QC_KCQ 64
#endif
/* Row tiles per chunk: 32 x 6 rows; A chunk 32 x QC_KCQ x 24 bytes, C chunk 192 x 256 bytes. */
#ifndef QC_MCT
#define QC_MCT 32
#endif

/* One group of 64 columns. Without rq: C into c (the group's first column, row stride ldc).
 * With rq (fused requantization): each chunk of QC_MCT row tiles is computed into chunkbuf
 * (QC_MCT * QC_MR x 64 int32, L2-resident) and converted to 8 bits as soon as its last k block
 * is done; c is not used. */
QC_VNNI_TARGET static void qc_gemm_vnni_group(const uint8_t *apack, const int8_t *bp,
                                              const int32_t *colsum, int32_t *c, ptrdiff_t ldc,
                                              ptrdiff_t m, ptrdiff_t n, ptrdiff_t k,
                                              ptrdiff_t g, const qc_requant *rq,
                                              int32_t *chunkbuf) {
    ptrdiff_t kq = qc_quads(k), j0 = g * QC_NG * QC_NR;
    ptrdiff_t width = n - j0 < QC_NG * QC_NR ? n - j0 : QC_NG * QC_NR;
    const int8_t *bgroup = bp + g * kq * QC_NG * 64;
    ptrdiff_t full_tiles = width == QC_NG * QC_NR ? m / QC_MR : 0;
    /* Full tiles: in chunks of QC_MCT row tiles (their A and C blocks stay in L2), blocked over
     * k (the B block stays in L1), accumulating in C between k blocks. */
    for (ptrdiff_t t0 = 0; t0 < full_tiles; t0 += QC_MCT) {
        ptrdiff_t t1 = t0 + QC_MCT < full_tiles ? t0 + QC_MCT : full_tiles;
        ptrdiff_t ldd = rq ? QC_NG * QC_NR : ldc;
        for (ptrdiff_t q0 = 0; q0 < kq; q0 += QC_KCQ) {
            ptrdiff_t len = kq - q0 < QC_KCQ ? kq - q0 : QC_KCQ;
            const int32_t *corr = q0 + len == kq ? colsum + j0 : NULL;
            for (ptrdiff_t tile = t0; tile < t1; tile++)
                qc_vnni_6x64(apack + (tile * kq + q0) * QC_MR * 4, bgroup + q0 * QC_NG * 64,
                             len, q0 == 0, corr,
                             rq ? chunkbuf + (tile - t0) * QC_MR * ldd : c + tile * QC_MR * ldd,
                             ldd);
        }
        if (rq)
            qc_requant_rows_512(rq, chunkbuf, QC_NG * QC_NR, t0 * QC_MR, (t1 - t0) * QC_MR, j0,
                                width, n);
    }
    /* Edge tiles (fewer rows or columns): whole k at once into a local tile, then copied. */
    int32_t edge[QC_MR * QC_NG * QC_NR];
    for (ptrdiff_t tile = full_tiles; tile * QC_MR < m; tile++) {
        ptrdiff_t i0 = tile * QC_MR, rows = m - i0 < QC_MR ? m - i0 : QC_MR;
        qc_vnni_6x64(apack + tile * kq * QC_MR * 4, bgroup, kq, 1, colsum + j0, edge,
                     QC_NG * QC_NR);
        if (rq) {
            qc_requant_rows_512(rq, edge, QC_NG * QC_NR, i0, rows, j0, width, n);
        } else {
            for (ptrdiff_t r = 0; r < rows; r++)
                memcpy(c + (i0 + r) * ldc, edge + r * QC_NG * QC_NR,
                       (size_t)width * sizeof(int32_t));
        }
    }
}
#endif

/* One column group of C, on the given path, into c (pointing at the group's first column). */
static void qc_gemm_group(int path, const int8_t *a, const uint8_t *apack, const int8_t *bp,
                          const int32_t *colsum, int32_t *c, ptrdiff_t ldc, ptrdiff_t m,
                          ptrdiff_t n, ptrdiff_t k, ptrdiff_t g) {
#if QC_X86
    if (path == QC_PATH_VNNI512) {
        qc_gemm_vnni_group(apack, bp, colsum, c, ldc, m, n, k, g, NULL, NULL);
        return;
    }
    if (path == QC_PATH_AVX2) {
        qc_gemm_avx2_group(a, k, bp, c, ldc, m, n, k, g);
        return;
    }
#endif
    (void)apack;
    (void)colsum;
    qc_gemm_portable_group(a, k, bp, c, ldc, m, n, k, g);
}

static int qc_clamp_threads(int threads, ptrdiff_t groups) {
    if (threads < 1) threads = 1;
    if (threads > groups) threads = (int)groups;
    return threads;
}

/* C (m x n int32) = A (m x k int8, row-major) . B (packed by qc_pack_b). apack_scratch:
 * qc_packed_a_size(m, k) bytes, used by the VNNI path. threads: OpenMP threads over column
 * groups. Returns the path used. */
static int qc_gemm_packed(int path, const int8_t *a, uint8_t *apack_scratch, const int8_t *bp,
                          const int32_t *colsum, int32_t *c, ptrdiff_t m, ptrdiff_t n,
                          ptrdiff_t k, int threads) {
    ptrdiff_t groups = qc_groups(n);
    threads = qc_clamp_threads(threads, groups);
    if (path == QC_PATH_VNNI512) qc_pack_a_u8(a, k, m, k, apack_scratch);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (ptrdiff_t g = 0; g < groups; g++)
        qc_gemm_group(path, a, apack_scratch, bp, colsum, c + g * QC_NG * QC_NR, n, m, n, k, g);
    return path;
}

/* The same GEMM with requantization fused into the write-out; the int32 result matrix never
 * exists. VNNI path: per thread, one L2-sized chunk buffer; each chunk of rows is converted to 8
 * bits as soon as it is complete. Other paths: per thread, one m x 64 int32 tile per column group.
 * Returns the path used, or -1 if memory ran out. */
static int qc_gemm_packed_requant(int path, const int8_t *a, uint8_t *apack_scratch,
                                  const int8_t *bp, const int32_t *colsum, const qc_requant *rq,
                                  ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, int threads) {
    ptrdiff_t groups = qc_groups(n);
    int failed = 0;
    threads = qc_clamp_threads(threads, groups);
    if (path == QC_PATH_VNNI512) qc_pack_a_u8(a, k, m, k, apack_scratch);
    size_t rows = path == QC_PATH_VNNI512 ? (size_t)(QC_MCT * QC_MR) : (size_t)m;
#pragma omp parallel num_threads(threads)
    {
        int32_t *tile = (int32_t *)malloc(rows * QC_NG * QC_NR * sizeof(int32_t));
        if (!tile) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (ptrdiff_t g = 0; g < groups; g++) {
            if (!tile) continue;
            ptrdiff_t j0 = g * QC_NG * QC_NR;
            ptrdiff_t width = n - j0 < QC_NG * QC_NR ? n - j0 : QC_NG * QC_NR;
#if QC_X86
            if (path == QC_PATH_VNNI512) {
                qc_gemm_vnni_group(apack_scratch, bp, colsum, NULL, 0, m, n, k, g, rq, tile);
                continue;
            }
#endif
            qc_gemm_group(path, a, apack_scratch, bp, colsum, tile, QC_NG * QC_NR, m, n, k, g);
            qc_requant_rows(path, rq, tile, QC_NG * QC_NR, 0, m, j0, width, n);
        }
        free(tile);
    }
    return failed ? -1 : path;
}

#endif /* QCOURSE_QGEMM_H */
