/* LD_PRELOAD helper: flush denormal floats to zero in a native server's main thread before
 * main() runs (FTZ bit 15, DAZ bit 6 of MXCSR); threads it creates inherit it. For programs
 * such as llama-server that have no setting of their own and cannot be loaded through
 * ctypes (ftz.c covers runtimes loaded into a Python worker). Built by
 * scripts/bench_serving.py into the bench's workdir; never committed as a binary. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>

__attribute__((constructor)) static void peers_flush_at_load(void) {
    _mm_setcsr(_mm_getcsr() | 0x8040u);
}
#endif
