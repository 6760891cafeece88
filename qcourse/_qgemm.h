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
 * ------------------------------------------------------------------------------------------- */
static inline ptrdiff_t qc_quads(ptrdiff_t k) { return (k + 3) / 4; }
static inline ptrdiff_t qc_panels(ptrdiff_t n) { return (n + QC_NR - 1) / QC_NR; }

/* B (k x n, row-major int8) -> packed panels (see above) and colsum[j] = sum_k B[k, j]. */
static void qc_pack_b(const int8_t *b, ptrdiff_t k, ptrdiff_t n, int8_t *packed, int32_t *colsum) {
    ptrdiff_t kq = qc_quads(k), np = qc_panels(n);
    memset(packed, 0, (size_t)(np * kq * 64));
    for (ptrdiff_t j = 0; j < n; j++) colsum[j] = 0;
    for (ptrdiff_t kk = 0; kk < k; kk++) {
        const int8_t *row = b + kk * n;
        ptrdiff_t q = kk / 4, t = kk % 4;
        for (ptrdiff_t j = 0; j < n; j++) {
            ptrdiff_t p = j / QC_NR, cc = j % QC_NR;
            packed[(p * kq + q) * 64 + cc * 4 + t] = row[j];
            colsum[j] += row[j];
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Rung: packed, register-tiled GEMM. C (m x n) = A (m x k) . B, with B packed by qc_pack_b.
 * A micro-tile of MR rows x NV panels of output stays in registers for the whole k loop; B is
 * read in the order it was packed, 64 bytes at a time.
 * ------------------------------------------------------------------------------------------- */

/* Portable: scalar, same blocking and layout, s8 x s8 directly (no +128 needed). */
static void qc_gemm_packed_portable(const int8_t *a, ptrdiff_t lda, const int8_t *bp,
                                    int32_t *c, ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n,
                                    ptrdiff_t k) {
    ptrdiff_t kq = qc_quads(k), np = qc_panels(n);
    for (ptrdiff_t i = 0; i < m; i++) {
        const int8_t *ar = a + i * lda;
        for (ptrdiff_t p = 0; p < np; p++) {
            uint32_t acc[QC_NR] = {0};
            const int8_t *panel = bp + p * kq * 64;
            for (ptrdiff_t q = 0; q < kq; q++) {
                int32_t av[4] = {0, 0, 0, 0};
                for (int t = 0; t < 4 && 4 * q + t < k; t++) av[t] = ar[4 * q + t];
                const int8_t *bq = panel + q * 64;
                for (int cc = 0; cc < QC_NR; cc++)
                    acc[cc] += (uint32_t)(av[0] * bq[cc * 4] + av[1] * bq[cc * 4 + 1] +
                                          av[2] * bq[cc * 4 + 2] + av[3] * bq[cc * 4 + 3]);
            }
            ptrdiff_t width = n - p * QC_NR < QC_NR ? n - p * QC_NR : QC_NR;
            for (ptrdiff_t cc = 0; cc < width; cc++) c[i * ldc + p * QC_NR + cc] = (int32_t)acc[cc];
        }
    }
}

#if QC_X86
/* AVX2: a quad of A widened to four int16, broadcast; 16 bytes of a B quad (4 columns x 4 k)
 * widened to 16 int16; vpmaddwd sums adjacent pairs into int32, giving two partial sums per
 * column, added together when the tile is stored. Exact for s8 x s8: |pair sum| <= 2 * 16384. */
#define QC_AVX2_MR 2
__attribute__((target("avx2"))) static void qc_gemm_packed_avx2(const int8_t *a, ptrdiff_t lda,
                                                                const int8_t *bp, int32_t *c,
                                                                ptrdiff_t ldc, ptrdiff_t m,
                                                                ptrdiff_t n, ptrdiff_t k) {
    ptrdiff_t kq = qc_quads(k), np = qc_panels(n);
    for (ptrdiff_t i0 = 0; i0 < m; i0 += QC_AVX2_MR) {
        int mr = (int)(m - i0 < QC_AVX2_MR ? m - i0 : QC_AVX2_MR);
        for (ptrdiff_t p = 0; p < np; p++) {
            __m256i acc[QC_AVX2_MR][4];
            for (int r = 0; r < QC_AVX2_MR; r++)
                for (int v = 0; v < 4; v++) acc[r][v] = _mm256_setzero_si256();
            const int8_t *panel = bp + p * kq * 64;
            for (ptrdiff_t q = 0; q < kq; q++) {
                __m256i bw[4];
                for (int v = 0; v < 4; v++)
                    bw[v] = _mm256_cvtepi8_epi16(
                        _mm_loadu_si128((const __m128i *)(panel + q * 64 + v * 16)));
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
                    c[(i0 + r) * ldc + p * QC_NR + cc] =
                        (int32_t)((uint32_t)part[2 * cc] + (uint32_t)part[2 * cc + 1]);
            }
        }
    }
}

/* AVX-512 VNNI: A is given as au = A + 128 (uint8), rows padded to 4 * kq bytes. One vpdpbusd
 * multiplies 16 lanes x 4 (u8 x s8) and adds them into 16 int32 accumulators. A micro-tile is
 * MR rows x NV panels (NV * 16 columns); the result is corrected by - 128 * colsum. */
#define QC_VNNI_MR 6
#define QC_VNNI_NV 4
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static inline void qc_vnni_tile(
    const uint8_t *au, ptrdiff_t lda, const int8_t *bp, ptrdiff_t kq, ptrdiff_t q0, ptrdiff_t q1,
    int mr, int nv, __m512i acc[QC_VNNI_MR][QC_VNNI_NV]) {
    for (ptrdiff_t q = q0; q < q1; q++) {
        __m512i bv[QC_VNNI_NV];
        for (int v = 0; v < QC_VNNI_NV; v++)
            if (v < nv) bv[v] = _mm512_loadu_si512((const void *)(bp + (v * kq + q) * 64));
        for (int r = 0; r < QC_VNNI_MR; r++) {
            if (r >= mr) break;
            int32_t quad;
            memcpy(&quad, au + r * lda + 4 * q, 4);
            __m512i av = _mm512_set1_epi32(quad);
            for (int v = 0; v < QC_VNNI_NV; v++)
                if (v < nv) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], av, bv[v]);
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void qc_gemm_packed_vnni512(
    const uint8_t *au, ptrdiff_t lda, const int8_t *bp, const int32_t *colsum, int32_t *c,
    ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k) {
    ptrdiff_t kq = qc_quads(k), np = qc_panels(n);
    for (ptrdiff_t p0 = 0; p0 < np; p0 += QC_VNNI_NV) {
        int nv = (int)(np - p0 < QC_VNNI_NV ? np - p0 : QC_VNNI_NV);
        const int8_t *bgroup = bp + p0 * kq * 64;
        for (ptrdiff_t i0 = 0; i0 < m; i0 += QC_VNNI_MR) {
            int mr = (int)(m - i0 < QC_VNNI_MR ? m - i0 : QC_VNNI_MR);
            __m512i acc[QC_VNNI_MR][QC_VNNI_NV];
            for (int r = 0; r < QC_VNNI_MR; r++)
                for (int v = 0; v < QC_VNNI_NV; v++) acc[r][v] = _mm512_setzero_si512();
            if (mr == QC_VNNI_MR && nv == QC_VNNI_NV)
                qc_vnni_tile(au + i0 * lda, lda, bgroup, kq, 0, kq, QC_VNNI_MR, QC_VNNI_NV, acc);
            else
                qc_vnni_tile(au + i0 * lda, lda, bgroup, kq, 0, kq, mr, nv, acc);
            for (int v = 0; v < nv; v++) {
                ptrdiff_t j0 = (p0 + v) * QC_NR;
                ptrdiff_t width = n - j0 < QC_NR ? n - j0 : QC_NR;
                __mmask16 mask = (__mmask16)((1u << width) - 1u);
                __m512i corr = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask, colsum + j0), 7);
                for (int r = 0; r < mr; r++)
                    _mm512_mask_storeu_epi32(c + (i0 + r) * ldc + j0, mask,
                                             _mm512_sub_epi32(acc[r][v], corr));
            }
        }
    }
}
#endif

/* A (m x k int8) -> au (m x 4*kq uint8) = A + 128, padding with 128 (times a zero B value). */
static void qc_pack_a_u8(const int8_t *a, ptrdiff_t m, ptrdiff_t k, uint8_t *au) {
    ptrdiff_t kp = 4 * qc_quads(k);
    for (ptrdiff_t i = 0; i < m; i++) {
        for (ptrdiff_t t = 0; t < k; t++) au[i * kp + t] = (uint8_t)(a[i * k + t] + 128);
        for (ptrdiff_t t = k; t < kp; t++) au[i * kp + t] = 128;
    }
}

/* Dispatch. a is m x k int8 row-major; for the VNNI path the caller supplies au from qc_pack_a_u8
 * (scratch of m * 4 * kq bytes). Returns the path used. */
static int qc_gemm_packed(int path, const int8_t *a, uint8_t *au_scratch, const int8_t *bp,
                          const int32_t *colsum, int32_t *c, ptrdiff_t m, ptrdiff_t n,
                          ptrdiff_t k) {
#if QC_X86
    if (path == QC_PATH_VNNI512) {
        qc_pack_a_u8(a, m, k, au_scratch);
        qc_gemm_packed_vnni512(au_scratch, 4 * qc_quads(k), bp, colsum, c, n, m, n, k);
        return path;
    }
    if (path == QC_PATH_AVX2) {
        qc_gemm_packed_avx2(a, k, bp, c, n, m, n, k);
        return path;
    }
#endif
    (void)au_scratch;
    (void)colsum;
    qc_gemm_packed_portable(a, k, bp, c, n, m, n, k);
    return QC_PATH_PORTABLE;
}

#endif /* QCOURSE_QGEMM_H */
