/* qcourse/csrc/requant.c -- rung 6's epilogue: int32 accumulators -> 8-bit outputs, as the
 * formula in qgemm.h says, in float32 as ONNX Runtime's requantization does. One plain C loop
 * compiled for the portable and AVX2 paths, and an AVX-512 version written out. */
#include "qgemm.h"

void qc_requant_prepare(const qc_requant_args *args, const int32_t *colsum,
                        const int32_t *rowsum_a, ptrdiff_t n, ptrdiff_t npad, ptrdiff_t k,
                        int32_t *work, qc_requant *rq) {
    int32_t *colterm = work, *rowcoef = work + npad;
    float *mult = (float *)(work + 2 * npad);
    uint32_t za = (uint32_t)args->za, kza = (uint32_t)k * za;
    for (ptrdiff_t j = 0; j < npad; j++) { /* sums modulo 2^32, as the accumulators */
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

/* region: requant */
/* Clamping before rounding gives the same result as after (the bounds are integers); rounding
 * adds and subtracts 1.5 * 2^23, which rounds half to even in IEEE arithmetic (the build never
 * uses -ffast-math) and is exact here because |value| <= 2^16 after the clamp. */
static inline float qc_round_half_even(float v) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return (v + magic) - magic;
}

/* The locals are restrict-qualified so that the compiler can vectorize the inner loop. */
static inline __attribute__((always_inline)) void qc_requant_body(
    const qc_requant *rq, const int32_t *acc, ptrdiff_t ldacc, ptrdiff_t i0, ptrdiff_t rows,
    ptrdiff_t j0, ptrdiff_t width, ptrdiff_t n) {
    const int32_t *restrict colterm = rq->colterm + j0;
    const float *restrict mult = rq->mult + j0;
    const int32_t *restrict rowcoef = rq->rowcoef ? rq->rowcoef + j0 : NULL;
    const int32_t zp = rq->zp;
    const float lo = (float)(rq->qmin - zp), hi = (float)(rq->qmax - zp);
    for (ptrdiff_t r = 0; r < rows; r++) {
        uint8_t *restrict yr = rq->y + (i0 + r) * n + j0;
        const int32_t *restrict ar = acc + r * ldacc;
        const uint32_t rs = rq->rowsum ? (uint32_t)rq->rowsum[i0 + r] : 0u;
        for (ptrdiff_t j = 0; j < width; j++) {
            uint32_t v = (uint32_t)ar[j] + (uint32_t)colterm[j];
            if (rowcoef) v += rs * (uint32_t)rowcoef[j];
            float f = (float)(int32_t)v * mult[j];
            f = f < lo ? lo : (f > hi ? hi : f);
            yr[j] = (uint8_t)((int32_t)qc_round_half_even(f) + zp);
        }
    }
}
/* endregion: requant */

static void qc_requant_rows_portable(const qc_requant *rq, const int32_t *acc, ptrdiff_t ldacc,
                                     ptrdiff_t i0, ptrdiff_t rows, ptrdiff_t j0, ptrdiff_t width,
                                     ptrdiff_t n) {
    qc_requant_body(rq, acc, ldacc, i0, rows, j0, width, n);
}

#if QC_X86
QC_TARGET_AVX2 static void qc_requant_rows_avx2(const qc_requant *rq, const int32_t *acc,
                                                ptrdiff_t ldacc, ptrdiff_t i0, ptrdiff_t rows,
                                                ptrdiff_t j0, ptrdiff_t width, ptrdiff_t n) {
    qc_requant_body(rq, acc, ldacc, i0, rows, j0, width, n);
}

/* AVX-512: the same steps, 16 outputs per instruction: rounding to nearest even by the conversion
 * itself (embedded rounding, whatever the MXCSR says), and vpmovdb keeping the low byte of each
 * lane on the way to memory. */
QC_TARGET_VNNI512 void qc_requant_rows_512(const qc_requant *rq, const int32_t *acc,
                                           ptrdiff_t ldacc, ptrdiff_t i0, ptrdiff_t rows,
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

void qc_requant_rows(int path, const qc_requant *rq, const int32_t *acc, ptrdiff_t ldacc,
                     ptrdiff_t i0, ptrdiff_t rows, ptrdiff_t j0, ptrdiff_t width, ptrdiff_t n) {
#if QC_X86
    if (path == QC_PATH_VNNI512) {
        qc_requant_rows_512(rq, acc, ldacc, i0, rows, j0, width, n);
        return;
    }
    if (path == QC_PATH_AVX2) {
        qc_requant_rows_avx2(rq, acc, ldacc, i0, rows, j0, width, n);
        return;
    }
#endif
    qc_requant_rows_portable(rq, acc, ldacc, i0, rows, j0, width, n);
}
