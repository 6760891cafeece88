/* qcourse/csrc/depthwise_avx2.c -- depthwise.h's loop compiled for AVX2 (the same C source; the
 * compiler widens the int16 x int16 products into 256-bit registers). */
#include "qgemm.h"
#include "depthwise.h"

#if QC_X86
QC_TARGET_AVX2 void qc_dw_rows_avx2(const qc_dw_args *a, qc_dw_scratch *s, ptrdiff_t n0,
                                    ptrdiff_t n1) {
    qc_dw_rows_body(QC_PATH_AVX2, a, s, n0, n1);
}
#else
typedef int qc_no_avx2_here; /* a translation unit may not be empty */
#endif
