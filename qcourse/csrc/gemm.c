/* qcourse/csrc/gemm.c -- the packed GEMM's driver (rungs 5 and 6): per-call preparation of A,
 * threads over groups of 64 output columns, and the group kernel of the chosen path. */
#include <stdlib.h>
#include <string.h>

#include "qgemm.h"

static int qc_clamp_threads(int threads, ptrdiff_t groups) {
    if (threads < 1) threads = 1;
    if (threads > groups) threads = (int)groups;
    return threads;
}

/* With or without fused requantization (args). scratch: qc_scratch_size(m, n) int32. Each thread
 * has one buffer: on the VNNI path a chunk of partial sums (QC_CHUNK_BUF_BYTES); on the others,
 * with args, one m x 64 int32 tile, converted to 8 bits once a group is done. */
static int qc_gemm_packed_any(int path, const int8_t *a, int32_t *scratch, const uint8_t *bp,
                              const int32_t *colsum, int32_t *c, const qc_requant_args *args,
                              ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, int threads) {
    ptrdiff_t groups = qc_groups(n), npad = groups * QC_NG * QC_NR;
    int32_t *rowsum = scratch;
    int8_t *tail = (int8_t *)(scratch + m);
    qc_requant rq_storage, *rq = NULL;
    int failed = 0;
    threads = qc_clamp_threads(threads, groups);
    qc_prepare_tail(a, k, m, k, tail);
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

int qc_gemm_packed(int path, const int8_t *a, int32_t *scratch, const uint8_t *bp,
                   const int32_t *colsum, int32_t *c, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k,
                   int threads) {
    return qc_gemm_packed_any(path, a, scratch, bp, colsum, c, NULL, m, n, k, threads);
}

int qc_gemm_packed_requant(int path, const int8_t *a, int32_t *scratch, const uint8_t *bp,
                           const int32_t *colsum, const qc_requant_args *args, ptrdiff_t m,
                           ptrdiff_t n, ptrdiff_t k, int threads) {
    return qc_gemm_packed_any(path, a, scratch, bp, colsum, NULL, args, m, n, k, threads);
}
