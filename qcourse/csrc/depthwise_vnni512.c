/* qcourse/csrc/depthwise_vnni512.c -- depthwise.h's loop compiled for the AVX-512 path (the same
 * C source in 512-bit registers; the row is requantized by requant.c's AVX-512 epilogue). */
#include "qgemm.h"
#include "depthwise.h"

#if QC_X86
QC_TARGET_VNNI512 void qc_dw_rows_vnni512(const qc_dw_args *a, qc_dw_scratch *s, ptrdiff_t n0,
                                          ptrdiff_t n1) {
    qc_dw_rows_body(QC_PATH_VNNI512, a, s, n0, n1);
}
#else
typedef int qc_no_vnni512_here; /* a translation unit may not be empty */
#endif
