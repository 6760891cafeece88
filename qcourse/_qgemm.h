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
 * arithmetic in C, wrapping vector adds): the u8 x s8 forms compute (a + 128) . b or a . (b + 128),
 * which can leave the int32 range on the way, but after subtracting 128 * colsum(b) or
 * 128 * rowsum(a) the true result, which fits in int32 because K <= 131071, comes out exactly.
 */
#ifndef QCOURSE_QGEMM_H
#define QCOURSE_QGEMM_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static double omp_get_wtime(void) { return 0.0; }
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define QC_X86 1
#include <immintrin.h>
#else
#define QC_X86 0
#endif

#define QC_PATH_PORTABLE 0
#define QC_PATH_AVX2 1
#define QC_PATH_VNNI512 2

/* Packed B: panels of QC_NR = 16 columns, so that one 64-byte register holds, for each of 16
 * output columns, the four B values (a "quad" of k) that one vpdpbusd lane multiplies with four
 * A values (the layout is given in full under "Packing" below). */
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
 *   block(p, q)[c * 4 + t] = B[4q + t, 16p + c] + 128   as uint8 (0 outside B)
 * n is padded to a multiple of 64 columns and k to a multiple of 4 with zero bytes.
 *
 * The bytes are B + 128, unsigned, because vpdpbusd multiplies unsigned bytes (held in a register:
 * B) by signed bytes (which may come straight from memory, broadcast: A, unpacked). The kernels
 * subtract the 128 * rowsum(A) this adds.
 * ------------------------------------------------------------------------------------------- */
#define QC_NG 4
#define QC_MR 6
static inline ptrdiff_t qc_quads(ptrdiff_t k) { return (k + 3) / 4; }
static inline ptrdiff_t qc_groups(ptrdiff_t n) { return (n + QC_NG * QC_NR - 1) / (QC_NG * QC_NR); }
static inline ptrdiff_t qc_packed_b_size(ptrdiff_t k, ptrdiff_t n) {
    return qc_groups(n) * qc_quads(k) * QC_NG * 64;
}
static inline ptrdiff_t qc_row_tiles(ptrdiff_t m) { return (m + QC_MR - 1) / QC_MR; }
static inline const uint8_t *qc_block(const uint8_t *bp, ptrdiff_t p, ptrdiff_t q, ptrdiff_t kq) {
    return bp + ((p / QC_NG) * kq + q) * (QC_NG * 64) + (p % QC_NG) * 64;
}

/* B (k x n, row-major int8) -> packed (qc_packed_b_size bytes) and colsum[j] = sum_k B[k, j]
 * for j < n, 0 for the padding up to a multiple of 64 columns. */
static void qc_pack_b(const int8_t *b, ptrdiff_t k, ptrdiff_t n, uint8_t *packed, int32_t *colsum) {
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

/* Per-call scratch of the packed GEMM, in int32 units: rowsum(A) (m), the last k % 4 columns of
 * A, zero-padded to one quad per row (m x 4 bytes: the kernel cannot read past the end of a row),
 * and three per-column arrays of the requantization (3 x the padded n). */
static inline ptrdiff_t qc_scratch_size(ptrdiff_t m, ptrdiff_t n) {
    return 2 * m + 3 * qc_groups(n) * QC_NG * QC_NR;
}
static void qc_prepare_a(const int8_t *a, ptrdiff_t lda, ptrdiff_t m, ptrdiff_t k,
                         int32_t *scratch, int32_t **rowsum, int8_t **tail) {
    *rowsum = scratch;
    *tail = (int8_t *)(scratch + m);
    ptrdiff_t k0 = k / 4 * 4;
    for (ptrdiff_t i = 0; i < m; i++)
        for (ptrdiff_t t = 0; t < 4; t++) (*tail)[i * 4 + t] = k0 + t < k ? a[i * lda + k0 + t] : 0;
}

/* ---------------------------------------------------------------------------------------------
 * Requantization epilogue, fused into the GEMM: int32 accumulators -> 8-bit outputs.
 *   v   = (int32)(acc[i, j] + colterm[j] + rowsum[i] * rowcoef[j])     (modulo 2^32)
 *   colterm[j] = bias[j] - z_A colsum[j] + K z_A z_B[j],  rowcoef[j] = -z_B[j]
 * (the zero-point terms of sum_k (A - z_A)(B - z_B), computed once per call by qc_requant_prepare)
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

/* What the caller gives: the requantization parameters as the user passed them. */
typedef struct {
    const int32_t *bias;   /* n entries, or NULL (no bias) */
    const int32_t *zb;     /* n entries, or NULL (B has zero point 0) */
    int32_t za;            /* A's zero point */
    const float *mult;     /* mult_len entries: 1 (one for all columns) or n */
    ptrdiff_t mult_len;
    int32_t zp, qmin, qmax;
    uint8_t *y;            /* m x n bytes, row stride n */
} qc_requant_args;

/* Fill rq from args: colterm, rowcoef and mult (npad entries each, in work), rowsum (rowsum(A)
 * when B has a zero point). Sums modulo 2^32, as the accumulators. */
static void qc_requant_prepare(const qc_requant_args *args, const int32_t *colsum,
                               const int32_t *rowsum_a, ptrdiff_t n, ptrdiff_t npad, ptrdiff_t k,
                               int32_t *work, qc_requant *rq) {
    int32_t *colterm = work, *rowcoef = work + npad;
    float *mult = (float *)(work + 2 * npad);
    uint32_t za = (uint32_t)args->za, kza = (uint32_t)k * za;
    for (ptrdiff_t j = 0; j < npad; j++) {
        uint32_t zb = j < n && args->zb ? (uint32_t)args->zb[j] : 0u;
        uint32_t bias = j < n && args->bias ? (uint32_t)args->bias[j] : 0u;
        colterm[j] = (int32_t)(bias - za * (uint32_t)colsum[j] + kza * zb);
        rowcoef[j] = (int32_t)(0u - zb);
        mult[j] = j >= n ? 1.0f : args->mult[args->mult_len == 1 ? 0 : j];
    }
    rq->colterm = colterm;
    rq->rowcoef = args->zb ? rowcoef : NULL;
    rq->rowsum = args->zb ? rowsum_a : NULL;
    rq->mult = mult;
    rq->zp = args->zp;
    rq->qmin = args->qmin;
    rq->qmax = args->qmax;
    rq->y = args->y;
}

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
/* AVX-512: the same steps, 16 outputs per instruction, written out: rounding to nearest even
 * by the conversion itself (embedded rounding, whatever the MXCSR says), and vpmovdb keeping the
 * low byte of each lane on the way to memory. */
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void qc_requant_rows_512(
    const qc_requant *rq, const int32_t *acc, ptrdiff_t ldacc, ptrdiff_t i0, ptrdiff_t rows,
    ptrdiff_t j0, ptrdiff_t width, ptrdiff_t n) {
    const int32_t *colterm = rq->colterm + j0, *rowcoef = rq->rowcoef ? rq->rowcoef + j0 : NULL;
    const float *mult = rq->mult + j0;
    const __m512 lo = _mm512_set1_ps((float)(rq->qmin - rq->zp));
    const __m512 hi = _mm512_set1_ps((float)(rq->qmax - rq->zp));
    const __m512i zp = _mm512_set1_epi32(rq->zp);
    for (ptrdiff_t r = 0; r < rows; r++) {
        uint8_t *yr = rq->y + (i0 + r) * n + j0;
        const int32_t *ar = acc + r * ldacc;
        const __m512i rs = _mm512_set1_epi32(rq->rowsum ? rq->rowsum[i0 + r] : 0);
        for (ptrdiff_t j = 0; j < width; j += 16) {
            __mmask16 keep = width - j >= 16 ? (__mmask16)0xFFFF
                                             : (__mmask16)((1u << (width - j)) - 1u);
            __m512i v = _mm512_add_epi32(_mm512_maskz_loadu_epi32(keep, ar + j),
                                         _mm512_maskz_loadu_epi32(keep, colterm + j));
            if (rowcoef)
                v = _mm512_add_epi32(
                    v, _mm512_mullo_epi32(rs, _mm512_maskz_loadu_epi32(keep, rowcoef + j)));
            __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_maskz_loadu_ps(keep, mult + j));
            f = _mm512_min_ps(_mm512_max_ps(f, lo), hi);
            __m512i q = _mm512_cvt_roundps_epi32(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm512_mask_cvtepi32_storeu_epi8(yr + j, keep, _mm512_add_epi32(q, zp));
        }
    }
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

/* Portable: scalar, same layout, s8 x s8 (the packed byte minus 128), modulo-2^32 accumulation. */
static void qc_gemm_portable_group(const int8_t *a, ptrdiff_t lda, const uint8_t *bp, int32_t *c,
                                   ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k,
                                   ptrdiff_t g) {
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

#if QC_X86
/* AVX2: a quad of A widened to four int16, broadcast; 16 bytes of a B block (4 columns x 4 k)
 * widened to 16 int16 and shifted back to signed (minus 128); vpmaddwd sums adjacent pairs into
 * int32, giving two partial sums per column, added together when the tile is stored. Exact for
 * s8 x s8: |pair sum| <= 2 * 16384. */
#define QC_AVX2_MR 2
__attribute__((target("avx2"))) static void qc_gemm_avx2_group(const int8_t *a, ptrdiff_t lda,
                                                               const uint8_t *bp, int32_t *c,
                                                               ptrdiff_t ldc, ptrdiff_t m,
                                                               ptrdiff_t n, ptrdiff_t k,
                                                               ptrdiff_t g) {
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

/* AVX-512 VNNI micro-kernel: a tile of R <= 6 rows x 64 columns of C in 4R zmm registers for the
 * whole k loop. Per quad of k: 4 aligned loads of packed B (256 bytes, one stream, u8) and 4R
 * vpdpbusd, each of which broadcasts one quad of a row of A (s8) straight from A's own memory to
 * 16 lanes, multiplies 16 lanes x 4 (u8 x s8) and adds them into int32. No copy of A is made.
 * On the last block of k, C = acc - 128 * rowsum(A), the row's share of the +128 in B. */
#define QC_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))
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
static inline __attribute__((always_inline)) QC_VNNI_TARGET void qc_vnni_tile(
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

/* The tile kernel compiled for each row count, so that the edge rows of C need no padding. */
QC_VNNI_TARGET static void qc_vnni_tile_rows(int rows, const int8_t *a, ptrdiff_t lda,
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

/* The instruction's own speed: iters x 16 independent register-to-register vpdpbusd (no memory
 * traffic, no dependency chain longer than iters), 16 x 64 MACs per iteration. Returns a value
 * derived from the sums so that the compiler cannot drop the loop. */
#define QC_DPBUSD_REG(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b))
QC_VNNI_TARGET static uint32_t qc_vnni_peak_loop(ptrdiff_t iters) {
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
#define QC_PEAK_MACS_PER_ITER (16 * 64)

/* rowsum[i] = sum_k A[i, k], 64 bytes at a time (vpdpbusd against a register of ones); exact in
 * int32 for k <= 131071. */
QC_VNNI_TARGET static void qc_rowsum_vnni(const int8_t *a, ptrdiff_t lda, ptrdiff_t m,
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

/* Quads of k per cache block: QC_KCQ * 256 bytes of B (256 KiB) stay in the L2 cache while
 * every row tile of the chunk streams them (256 bytes per 24 vpdpbusd, a sequential stream the
 * hardware prefetcher keeps ahead of). Blocks of 64 quads, which would fit in L1, were measured
 * slower: every block costs each tile a round trip of its partial sums. */
#ifndef QC_KCQ
#define QC_KCQ 1024
#endif
/* Row tiles per chunk: 16 x 6 rows. Between blocks of k a chunk's partial sums wait in the
 * thread's buffer (96 x 64 int32, 24 KiB, contiguous), not in C, whose rows may be far apart. */
#ifndef QC_MCT
#define QC_MCT 16
#endif
#ifndef QC_STREAM_MIN_BYTES
#define QC_STREAM_MIN_BYTES (2 << 20)
#endif
#define QC_CHUNK_BUF_BYTES ((size_t)QC_MCT * QC_MR * QC_NG * QC_NR * sizeof(int32_t))

/* One group of 64 columns. buf: QC_CHUNK_BUF_BYTES of the thread's own memory. Without rq: C into
 * c (the group's first column, row stride ldc). With rq (fused requantization): each chunk of
 * QC_MCT row tiles is finished in buf and converted to 8 bits from there; c is not used. */
QC_VNNI_TARGET static void qc_gemm_vnni_group(const int8_t *a, ptrdiff_t lda, const int32_t *rowsum,
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
#endif

static int qc_clamp_threads(int threads, ptrdiff_t groups) {
    if (threads < 1) threads = 1;
    if (threads > groups) threads = (int)groups;
    return threads;
}

/* rowsum[i] = sum_k A[i, k], plain C (the VNNI path has its own). */
static void qc_rowsum_portable(const int8_t *a, ptrdiff_t lda, ptrdiff_t m, ptrdiff_t k,
                               int32_t *rowsum) {
    for (ptrdiff_t i = 0; i < m; i++) {
        int32_t total = 0;
        for (ptrdiff_t t = 0; t < k; t++) total += a[i * lda + t];
        rowsum[i] = total;
    }
}

/* The packed GEMM, with or without fused requantization (args). C (m x n int32, used without
 * args) = A (m x k int8, row-major) . B (packed by qc_pack_b, column sums colsum). scratch:
 * qc_scratch_size(m, n) int32. threads: OpenMP threads over column groups. Each thread has one
 * buffer: on the VNNI path a chunk of partial sums (QC_CHUNK_BUF_BYTES); on the others, with
 * args, one m x 64 int32 tile, converted to 8 bits once a group is done. Returns the path used,
 * or -1 if memory for the buffers ran out. */
static int qc_gemm_packed_any(int path, const int8_t *a, int32_t *scratch, const uint8_t *bp,
                              const int32_t *colsum, int32_t *c, const qc_requant_args *args,
                              ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, int threads) {
    ptrdiff_t groups = qc_groups(n), npad = groups * QC_NG * QC_NR;
    int32_t *rowsum = NULL;
    int8_t *tail = NULL;
    qc_requant rq_storage, *rq = NULL;
    int failed = 0;
    threads = qc_clamp_threads(threads, groups);
    qc_prepare_a(a, k, m, k, scratch, &rowsum, &tail);
#if QC_X86
    if (path == QC_PATH_VNNI512)
        qc_rowsum_vnni(a, k, m, k, rowsum);
    else
#endif
        if (args && args->zb)
        qc_rowsum_portable(a, k, m, k, rowsum);
    if (args) {
        qc_requant_prepare(args, colsum, rowsum, n, npad, k, scratch + 2 * m, &rq_storage);
        rq = &rq_storage;
    }
    size_t buf_bytes = path == QC_PATH_VNNI512 ? QC_CHUNK_BUF_BYTES
                       : rq                    ? (size_t)m * QC_NG * QC_NR * sizeof(int32_t)
                                               : 0;
#pragma omp parallel num_threads(threads)
    {
        int32_t *buf = buf_bytes ? (int32_t *)malloc(buf_bytes) : NULL;
        if (buf_bytes && !buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (ptrdiff_t g = 0; g < groups; g++) {
            if (buf_bytes && !buf) continue;
            ptrdiff_t j0 = g * QC_NG * QC_NR;
            ptrdiff_t width = n - j0 < QC_NG * QC_NR ? n - j0 : QC_NG * QC_NR;
#if QC_X86
            if (path == QC_PATH_VNNI512) {
                qc_gemm_vnni_group(a, k, rowsum, tail, bp, rq ? NULL : c + j0, n, m, n, k, g, rq,
                                   buf);
                continue;
            }
#endif
            int32_t *dst = rq ? buf : c + j0;
            ptrdiff_t ldd = rq ? QC_NG * QC_NR : n;
#if QC_X86
            if (path == QC_PATH_AVX2)
                qc_gemm_avx2_group(a, k, bp, dst, ldd, m, n, k, g);
            else
#endif
                qc_gemm_portable_group(a, k, bp, dst, ldd, m, n, k, g);
            if (rq) qc_requant_rows(path, rq, buf, QC_NG * QC_NR, 0, m, j0, width, n);
        }
        free(buf);
    }
    return failed ? -1 : path;
}

/* Run qc_vnni_peak_loop(iters) on `threads` OpenMP threads at once, each timing its own loop
 * (after a barrier, so that waking the threads is not counted). Returns the sum over threads of
 * MACs per second, or 0 if VNNI is not compiled in (non-x86). */
static volatile uint32_t qc_peak_sink;
static double qc_vnni_peak(ptrdiff_t iters, int threads) {
    double rate = 0.0;
#if QC_X86
#pragma omp parallel num_threads(threads) reduction(+ : rate)
    {
#pragma omp barrier
        double t0 = omp_get_wtime();
        uint32_t sum = qc_vnni_peak_loop(iters);
        double seconds = omp_get_wtime() - t0;
        qc_peak_sink = sum;
        rate += seconds > 0 ? (double)iters * QC_PEAK_MACS_PER_ITER / seconds : 0.0;
    }
#else
    (void)iters;
    (void)threads;
#endif
    return rate;
}

/* C (m x n int32) = A (m x k int8) . B (packed). Returns the path used, or -1 (out of memory). */
static int qc_gemm_packed(int path, const int8_t *a, int32_t *scratch, const uint8_t *bp,
                          const int32_t *colsum, int32_t *c, ptrdiff_t m, ptrdiff_t n,
                          ptrdiff_t k, int threads) {
    return qc_gemm_packed_any(path, a, scratch, bp, colsum, c, NULL, m, n, k, threads);
}

/* The same GEMM with requantization fused into the write-out; the int32 result matrix never
 * exists. */
static int qc_gemm_packed_requant(int path, const int8_t *a, int32_t *scratch, const uint8_t *bp,
                                  const int32_t *colsum, const qc_requant_args *args,
                                  ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, int threads) {
    return qc_gemm_packed_any(path, a, scratch, bp, colsum, NULL, args, m, n, k, threads);
}

#endif /* QCOURSE_QGEMM_H */
