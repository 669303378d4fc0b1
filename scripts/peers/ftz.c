/* Flush denormal floats to zero in the calling thread (x86-64 MXCSR: FTZ bit 15, DAZ bit 6).
 *
 * Why: llama.cpp (ggml) has no setting for it, and denormals can make adapter math several
 * times slower (docs/environment.md). Linux threads start with a copy of their creator's MXCSR,
 * so calling this in a worker's main thread before the runtime creates its threads flushes
 * denormals in all of them. (Useless for ONNX Runtime: it rewrites MXCSR from its own session
 * option when a session is created.) Built by
 * scripts/peers/setup_common.py into the bench's workdir; never committed as a binary. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>

unsigned int peers_flush_denormals(void) {
    _mm_setcsr(_mm_getcsr() | 0x8040u);
    return _mm_getcsr();
}

unsigned int peers_mxcsr(void) { return _mm_getcsr(); }
#else
unsigned int peers_flush_denormals(void) { return 0u; }

unsigned int peers_mxcsr(void) { return 0u; }
#endif
