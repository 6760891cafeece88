/* qcourse/csrc/measure.c -- the machine's two ceilings, measured: the int8 arithmetic peak
 * (register-only vpdpbusd, the loop is in gemm_vnni512.c) and the memory read bandwidth. Each
 * thread times its own loop after a barrier, so that waking the threads is not counted. */
#include "w4a8.h"
#ifdef _OPENMP
#include <omp.h>
#else
static double omp_get_wtime(void) { return 0.0; }
static int omp_get_thread_num(void) { return 0; }
#endif

/* Each thread times its own loop after a barrier, so that waking the threads is not counted. */
static volatile uint32_t qc_peak_sink;
double qc_vnni_peak(ptrdiff_t iters, int threads) {
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

/* region: read_loop */
/* Sum 64-bit words of [p, p + bytes) (bytes a multiple of 64), the loop compiled per path so that
 * it reads with the widest loads the CPU has; the sum keeps the compiler from dropping it. */
static inline __attribute__((always_inline)) uint64_t qc_read_body(const uint8_t *p,
                                                                   ptrdiff_t bytes) {
    const uint64_t *restrict w = (const uint64_t *)p;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    for (ptrdiff_t i = 0; i < bytes / 8; i += 8) {
        s0 += w[i]; s1 += w[i + 1]; s2 += w[i + 2]; s3 += w[i + 3];
        s4 += w[i + 4]; s5 += w[i + 5]; s6 += w[i + 6]; s7 += w[i + 7];
    }
    return s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7;
}
/* endregion: read_loop */
__attribute__((noinline)) static uint64_t qc_read_portable(const uint8_t *p, ptrdiff_t bytes) {
    return qc_read_body(p, bytes);
}
#if QC_X86
__attribute__((noinline)) QC_TARGET_AVX2 static uint64_t qc_read_avx2(const uint8_t *p,
                                                                     ptrdiff_t bytes) {
    return qc_read_body(p, bytes);
}
__attribute__((noinline)) QC_TARGET_VNNI512 static uint64_t qc_read_512(const uint8_t *p,
                                                                       ptrdiff_t bytes) {
    return qc_read_body(p, bytes);
}
#endif

static volatile uint64_t qc_read_sink;
double qc_read_bandwidth(int path, const uint8_t *buf, ptrdiff_t bytes, int threads, int rounds) {
    double rate = 0.0;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) reduction(+ : rate)
    {
        const int t = omp_get_thread_num();
        const ptrdiff_t share = bytes / threads / 64 * 64;
        const uint8_t *p = buf + t * share;
        double best = 0.0;
        for (int r = 0; r < rounds; r++) {
#pragma omp barrier
            double t0 = omp_get_wtime();
            uint64_t s;
#if QC_X86
            if (path == QC_PATH_VNNI512)
                s = qc_read_512(p, share);
            else if (path == QC_PATH_AVX2)
                s = qc_read_avx2(p, share);
            else
#endif
                s = qc_read_portable(p, share);
            double seconds = omp_get_wtime() - t0;
            qc_read_sink = s;
            if (seconds > 0 && share / seconds > best) best = share / seconds;
        }
        rate += best;
    }
    return rate;
}
