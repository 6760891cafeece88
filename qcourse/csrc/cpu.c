/* qcourse/csrc/cpu.c -- which instruction-set paths this CPU can run, asked at run time. */
#include "qgemm.h"

/* region: dispatch */
int qc_path_supported(int path) {
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

int qc_best_path(void) {
    if (qc_path_supported(QC_PATH_VNNI512)) return QC_PATH_VNNI512;
    if (qc_path_supported(QC_PATH_AVX2)) return QC_PATH_AVX2;
    return QC_PATH_PORTABLE;
}
/* endregion: dispatch */
