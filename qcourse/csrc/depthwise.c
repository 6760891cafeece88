/* qcourse/csrc/depthwise.c -- the depthwise convolution's driver (buffers, path dispatch) and its
 * portable build. depthwise.h states the contract. */
#include <stdlib.h>

#include "qgemm.h"
#include "depthwise.h"

void qc_dw_rows_portable(const qc_dw_args *a, qc_dw_scratch *s, ptrdiff_t n0, ptrdiff_t n1) {
    qc_dw_rows_body(QC_PATH_PORTABLE, a, s, n0, n1);
}

/* region: depthwise_driver */
/* The per-channel weights, biases and multipliers are laid along one output row once per call,
 * so that every inner loop runs over a whole row of ow * c values. */
int qc_dw_requant(int path, const qc_dw_args *a, ptrdiff_t n0, ptrdiff_t n1) {
    const ptrdiff_t rowlen = a->ow * a->c, taps = a->kh * a->kw;
    qc_dw_scratch s;
    int32_t *brow = (int32_t *)malloc((size_t)rowlen * sizeof(int32_t));
    float *mrow = (float *)malloc((size_t)rowlen * sizeof(float));
    s.acc = (int32_t *)malloc((size_t)rowlen * sizeof(int32_t));
    s.wrow = (int16_t *)malloc((size_t)(taps * rowlen) * sizeof(int16_t));
    int ok = brow && mrow && s.acc && s.wrow;
    if (ok) {
        for (ptrdiff_t j = 0; j < a->ow; j++) {
            for (ptrdiff_t ch = 0; ch < a->c; ch++) {
                brow[j * a->c + ch] = a->bias ? a->bias[ch] : 0;
                mrow[j * a->c + ch] = a->mult[ch];
                for (ptrdiff_t t = 0; t < taps; t++)
                    s.wrow[t * rowlen + j * a->c + ch] = a->wz[t * a->c + ch];
            }
        }
        s.rq = (qc_requant){.colterm = brow, .rowsum = NULL, .rowcoef = NULL, .mult = mrow,
                            .zp = a->zp, .qmin = a->qmin, .qmax = a->qmax, .y = a->y};
#if QC_X86
        if (path == QC_PATH_VNNI512) qc_dw_rows_vnni512(a, &s, n0, n1);
        else if (path == QC_PATH_AVX2) qc_dw_rows_avx2(a, &s, n0, n1);
        else
#endif
            qc_dw_rows_portable(a, &s, n0, n1);
    }
    free(brow);
    free(mrow);
    free(s.acc);
    free(s.wrow);
    return ok ? 0 : -1;
}
/* endregion: depthwise_driver */
