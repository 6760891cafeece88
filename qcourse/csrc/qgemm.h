/*
 * qcourse/csrc/qgemm.h -- the contract of qcourse's compiled kernels.
 *
 * Every C file in qcourse/csrc/ includes this header, and qcourse/_kernels.pyx declares the entry
 * points below from it. Nothing in C checks its arguments: qcourse/kernels.py does that (dtypes,
 * shapes, contiguity, K <= 131071, thread counts), allocates every output and scratch buffer and
 * documents each function for the reader.
 *
 * FILES (one per component, and per instruction set where the component has SIMD code)
 *   cpu.c             which paths this CPU can run (CPUID)
 *   u8s8.c            rung 4: one plain C row-dot loop, compiled once per path
 *   pack.c            packing B; the k % 4 tail of A
 *   requant.c         the requantization epilogue (rung 6): portable, AVX2 and AVX-512 builds
 *   gemm.c            the packed GEMM's driver: threads over column groups, path dispatch, peak
 *   gemm_portable.c   the packed GEMM's group kernel, plain C
 *   gemm_avx2.c       ... with AVX2 vpmaddwd
 *   gemm_vnni512.c    ... with AVX-512 VNNI vpdpbusd (the micro-kernel, its cache blocking)
 *   measure.c         the machine's ceilings: the VNNI peak and the memory read bandwidth
 *   w4a8.h, w4a8*.c   the int4-weight (W4A8) kernel, a component with its own contract
 *
 * INSTRUCTION SETS. The build has no -march flag (a wheel or a Binder image is built on one
 * machine and run on others). A function that uses wider instructions carries QC_TARGET_AVX2 or
 * QC_TARGET_VNNI512 (GCC's and Clang's per-function target attribute), and a file whose functions
 * all need x86 wraps its body in `#if QC_X86`. Which function runs is decided at run time by
 * qc_path_supported(), from CPUID, so the same binary runs on any x86-64 CPU (and, with only the
 * portable path, on any other). Every path gives the identical exact result.
 *
 * ARITHMETIC. int32 sums are taken modulo 2^32 (unsigned C arithmetic, wrapping vector adds).
 * The u8 x s8 forms compute (a + 128) . b or a . (b + 128), which can leave the int32 range on
 * the way; after subtracting 128 * colsum(b) or 128 * rowsum(a) the true result comes out
 * exactly, because it fits int32 (K <= 131071).
 *
 * ADDING A COMPONENT (e.g. a depthwise convolution): put its contract in a header of its own
 * beside this one (what each entry point computes, its layouts), its code in one file per
 * instruction set (NAME.c for the driver and the portable code, NAME_avx2.c, NAME_vnni512.c, each
 * function with its QC_TARGET_ attribute), and declare the entry points in _kernels.pyx. Then
 * list the .c files in pyproject.toml's ext-modules `sources` and the header in `depends`
 * (tests/test_kernels.py checks that every file in csrc/ is listed, and the Makefile rebuilds
 * when any of them changes). Internal functions are QC_INTERNAL (hidden from other modules).
 */
#ifndef QCOURSE_QGEMM_H
#define QCOURSE_QGEMM_H

#include <stddef.h>
#include <stdint.h>

/* region: targets */
#if defined(__GNUC__) && defined(__x86_64__)
#define QC_X86 1
#include <immintrin.h>
#else
#define QC_X86 0
#endif
#define QC_TARGET_AVX2 __attribute__((target("avx2")))
#define QC_TARGET_VNNI512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define QC_INTERNAL __attribute__((visibility("hidden")))
/* endregion: targets */

/* ----------------------------------------------------------------------------------------------
 * Paths (cpu.c)
 * ------------------------------------------------------------------------------------------- */
#define QC_PATH_PORTABLE 0 /* plain C, any CPU */
#define QC_PATH_AVX2 1     /* 256-bit integer SIMD: vpmovsxbw + vpmaddwd (exact, no saturation) */
#define QC_PATH_VNNI512 2  /* AVX-512 VNNI: vpdpbusd, four u8 x s8 products into each int32 lane */

QC_INTERNAL int qc_path_supported(int path); /* 1 if this CPU can run `path` */
QC_INTERNAL int qc_best_path(void);          /* the fastest path it can run */

/* region: packed_b */
/* ----------------------------------------------------------------------------------------------
 * Layout of packed B (pack.c), the operand of the packed GEMM.
 *
 * B (k x n int8, row-major) is stored as B + 128 in uint8, in groups of QC_NG = 4 panels of
 * QC_NR = 16 columns (64 columns per group). Inside a group, k runs in quads (4 consecutive k);
 * for each quad the group's 4 panels follow each other, 64 bytes each (one AVX-512 register: 16
 * columns x 4 k), so the micro-kernel reads one sequential stream of 256 bytes per quad:
 *
 *   block(p, q) = packed + ((p / 4) * kq + q) * 256 + (p % 4) * 64,       kq = ceil(k / 4)
 *   block(p, q)[c * 4 + t] = B[4q + t, 16p + c] + 128                     (0 outside B)
 *
 * n is padded to a multiple of 64 columns and k to a multiple of 4, with zero bytes. Unsigned B
 * because vpdpbusd multiplies unsigned bytes (the register operand: B) by signed bytes (the
 * operand it may broadcast straight from memory: A, which is never copied). colsum[j] = sum_k
 * B[k, j] (0 in the padding) lets the kernels remove the +128 and fold zero points.
 * ------------------------------------------------------------------------------------------- */
#define QC_NR 16 /* columns per panel: 16 int32 lanes of an AVX-512 register */
#define QC_NG 4  /* panels per group: 64 columns, 4 accumulator registers per row of a tile */

static inline ptrdiff_t qc_quads(ptrdiff_t k) { return (k + 3) / 4; }
static inline ptrdiff_t qc_groups(ptrdiff_t n) { return (n + QC_NG * QC_NR - 1) / (QC_NG * QC_NR); }
static inline ptrdiff_t qc_packed_b_size(ptrdiff_t k, ptrdiff_t n) {
    return qc_groups(n) * qc_quads(k) * QC_NG * 64;
}
static inline const uint8_t *qc_block(const uint8_t *bp, ptrdiff_t p, ptrdiff_t q, ptrdiff_t kq) {
    return bp + ((p / QC_NG) * kq + q) * (QC_NG * 64) + (p % QC_NG) * 64;
}
/* endregion: packed_b */

/* B -> packed (qc_packed_b_size bytes) and colsum (qc_groups(n) * 64 entries). */
QC_INTERNAL void qc_pack_b(const int8_t *b, ptrdiff_t k, ptrdiff_t n, uint8_t *packed,
                           int32_t *colsum);

/* ----------------------------------------------------------------------------------------------
 * Block sizes of the VNNI kernel (gemm_vnni512.c). Each was chosen by timing the alternatives
 * with everything else fixed: the packed GEMM on one thread, builds with -DQC_KCQ=... etc. timed
 * against the default build in interleaved runs, CPU time of the calling thread, medians of 15
 * (9 at 2048^3); AMD EPYC (Zen 4) with 1 MiB of L2 per core and 32 MiB of L3, on a machine busy
 * with other work (December 2026): ratios within about 4% of 1.00 are noise.
 * ------------------------------------------------------------------------------------------- */
/* Rows of C per register tile, set by the register budget rather than by timing: 6 rows x 64
 * columns = 24 zmm accumulators + 4 zmm of B = 28 of the 32 registers (7 rows would take all 32).
 * Per quad of k: 24 vpdpbusd for 256 + 24 bytes loaded. */
#define QC_MR 6
/* Quads of k per cache block: 1024 quads x 256 bytes = 256 KiB of B, which stays in the L2 while
 * every row tile of a chunk streams it. Speed relative to 1024: 64 quads (16 KiB, an L1-sized
 * block) 0.94x at 1024^3 and at 2048^3 (each block costs every tile a round trip of its partial
 * sums); 256 quads 1.04x and 1.00x, 4096 quads 0.98x at 2048^3 and 1.01x at 256 x 8192 x 256:
 * no difference, so the largest block that leaves most of the L2 free. */
#ifndef QC_KCQ
#define QC_KCQ 1024
#endif
/* Row tiles per chunk: 16 x 6 = 96 rows, whose partial sums wait between blocks of k in a buffer
 * of the thread's own (96 x 64 int32 = 24 KiB, contiguous), not in C. Chunks of 4 and of 64 tiles
 * measured 1.00x and 0.99x at 1024^3, 1.00x and 1.00x at 2048^3: the chunk height does not
 * matter here; 16 keeps the buffer within the 32 KiB L1. */
#ifndef QC_MCT
#define QC_MCT 16
#endif
/* Outputs of at least 2 MiB (larger than the L2) whose rows are 64-byte aligned are written with
 * non-temporal stores, which skip reading C's lines into the cache before overwriting them. With
 * ordinary stores instead: 0.90x at 1024^3 (4 MiB of C), 0.91x at 2048^3 (16 MiB). */
#ifndef QC_STREAM_MIN_BYTES
#define QC_STREAM_MIN_BYTES (2 << 20)
#endif

/* region: requant_formula */
/* ----------------------------------------------------------------------------------------------
 * Requantization (requant.c), fused into the packed GEMM's write-out (rung 6):
 *
 *   v[i, j] = (int32)(acc[i, j] + colterm[j] + rowsum[i] * rowcoef[j])   (modulo 2^32)
 *   colterm[j] = bias[j] - z_A colsum[j] + K z_A z_B[j],   rowcoef[j] = -z_B[j]
 *   y[i, j] = clamp(round_half_even((float)v[i, j] * mult[j]), qmin - zp, qmax - zp) + zp
 *
 * the zero-point terms of sum_k (A - z_A)(B - z_B) + bias, then the float32 requantization of
 * ONNX Runtime's QLinearMatMul. Output bytes: int8 or uint8 (the low byte of the clamped value).
 * ------------------------------------------------------------------------------------------- */
/* endregion: requant_formula */
typedef struct { /* what the caller gives: the parameters as the user passed them */
    const int32_t *bias;  /* n entries, or NULL (no bias) */
    const int32_t *zb;    /* n entries, or NULL (B has zero point 0) */
    int32_t za;           /* A's zero point */
    const float *mult;    /* mult_len entries: 1 (one for all columns) or n */
    ptrdiff_t mult_len;
    int32_t zp, qmin, qmax;
    uint8_t *y;           /* m x n bytes, row stride n */
} qc_requant_args;

typedef struct { /* what the epilogue uses: per-column terms computed once per call */
    const int32_t *colterm; /* padded-n entries */
    const int32_t *rowsum;  /* m entries, or NULL */
    const int32_t *rowcoef; /* padded-n entries, or NULL */
    const float *mult;      /* padded-n entries */
    int32_t zp, qmin, qmax;
    uint8_t *y;
} qc_requant;

/* Fill rq from args; work: 3 x npad int32 that rq points into. */
QC_INTERNAL void qc_requant_prepare(const qc_requant_args *args, const int32_t *colsum,
                                    const int32_t *rowsum_a, ptrdiff_t n, ptrdiff_t npad,
                                    ptrdiff_t k, int32_t *work, qc_requant *rq);
/* Rows [i0, i0 + rows) x columns [j0, j0 + width) of y, from the int32 tile acc (row stride
 * ldacc, its row 0 is row i0), on the given path. */
QC_INTERNAL void qc_requant_rows(int path, const qc_requant *rq, const int32_t *acc,
                                 ptrdiff_t ldacc, ptrdiff_t i0, ptrdiff_t rows, ptrdiff_t j0,
                                 ptrdiff_t width, ptrdiff_t n);

/* ----------------------------------------------------------------------------------------------
 * Entry points called from _kernels.pyx. A is m x k int8, row-major, row stride k; C is m x n.
 * `threads`: OpenMP threads over groups of 64 output columns.
 * ------------------------------------------------------------------------------------------- */
/* Rung 4: C = (au) . bt^T - 128 * colsum, au = A + 128 as uint8, bt = B transposed (n x k). */
QC_INTERNAL void qc_u8s8(int path, const uint8_t *au, const int8_t *bt, const int32_t *colsum,
                         int32_t *c, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k);

/* int32 entries of per-call scratch: rowsum(A) (m), A's k % 4 tail as one zero-padded quad per
 * row (m x 4 bytes), and the three per-column arrays of the requantization (3 x padded n). */
static inline ptrdiff_t qc_scratch_size(ptrdiff_t m, ptrdiff_t n) {
    return 2 * m + 3 * qc_groups(n) * QC_NG * QC_NR;
}
/* Rung 5: C (m x n int32) = A . B, B packed by qc_pack_b. Returns the path that ran, or -1 if a
 * per-thread buffer could not be allocated. */
QC_INTERNAL int qc_gemm_packed(int path, const int8_t *a, int32_t *scratch, const uint8_t *bp,
                               const int32_t *colsum, int32_t *c, ptrdiff_t m, ptrdiff_t n,
                               ptrdiff_t k, int threads);
/* Rung 6: the same product requantized to 8 bits as it is written (args->y); the int32 result
 * matrix never exists. Same return value. */
QC_INTERNAL int qc_gemm_packed_requant(int path, const int8_t *a, int32_t *scratch,
                                       const uint8_t *bp, const int32_t *colsum,
                                       const qc_requant_args *args, ptrdiff_t m, ptrdiff_t n,
                                       ptrdiff_t k, int threads);
/* The instruction's own speed (measure.c): `iters` x 16 independent register-only vpdpbusd on
 * each of `threads` threads, each timing its own loop; returns MACs per second summed over the
 * threads (0 without VNNI). */
#define QC_PEAK_MACS_PER_ITER (16 * 64)
QC_INTERNAL double qc_vnni_peak(ptrdiff_t iters, int threads);

/* ----------------------------------------------------------------------------------------------
 * Internal: the pieces gemm.c puts together, one per path.
 * ------------------------------------------------------------------------------------------- */
/* Columns [64 g, 64 g + 64) of C = A . B into c (the group's first column, row stride ldc). */
QC_INTERNAL void qc_gemm_portable_group(const int8_t *a, ptrdiff_t lda, const uint8_t *bp,
                                        int32_t *c, ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n,
                                        ptrdiff_t k, ptrdiff_t g);
QC_INTERNAL void qc_rowsum_portable(const int8_t *a, ptrdiff_t lda, ptrdiff_t m, ptrdiff_t k,
                                    int32_t *rowsum);
/* A's last k % 4 columns as one zero-padded quad per row (4 bytes each) into tail. */
QC_INTERNAL void qc_prepare_tail(const int8_t *a, ptrdiff_t lda, ptrdiff_t m, ptrdiff_t k,
                                 int8_t *tail);
#if QC_X86
QC_INTERNAL void qc_gemm_avx2_group(const int8_t *a, ptrdiff_t lda, const uint8_t *bp,
                                    int32_t *c, ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n,
                                    ptrdiff_t k, ptrdiff_t g);
/* The VNNI group: with rq, each chunk of row tiles is finished in buf (QC_CHUNK_BUF_BYTES of the
 * thread's own) and requantized from there, and c is unused; else C goes to c. rowsum and tail
 * as computed by qc_rowsum_vnni and qc_prepare_tail. */
#define QC_CHUNK_BUF_BYTES ((size_t)QC_MCT * QC_MR * QC_NG * QC_NR * sizeof(int32_t))
QC_INTERNAL void qc_gemm_vnni_group(const int8_t *a, ptrdiff_t lda, const int32_t *rowsum,
                                    const int8_t *tail, const uint8_t *bp, int32_t *c,
                                    ptrdiff_t ldc, ptrdiff_t m, ptrdiff_t n, ptrdiff_t k,
                                    ptrdiff_t g, const qc_requant *rq, int32_t *buf);
QC_INTERNAL void qc_rowsum_vnni(const int8_t *a, ptrdiff_t lda, ptrdiff_t m, ptrdiff_t k,
                                int32_t *rowsum);
QC_INTERNAL uint32_t qc_vnni_peak_loop(ptrdiff_t iters);
QC_INTERNAL void qc_requant_rows_512(const qc_requant *rq, const int32_t *acc, ptrdiff_t ldacc,
                                     ptrdiff_t i0, ptrdiff_t rows, ptrdiff_t j0, ptrdiff_t width,
                                     ptrdiff_t n);
#endif

#endif /* QCOURSE_QGEMM_H */
