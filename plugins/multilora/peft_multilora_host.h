/*
 * Host-side helper exported by libpeft_multilora_ort.so (plain C, for ctypes): writing an
 * adapter into bank slots on the CPU.
 *
 * A slot write copies one adapter (tens of MB for an all-linear LoRA) into hundreds of bank
 * regions. Done region by region from Python, the interpreter's per-call cost is a third of
 * the time, and ordinary stores first read every destination line. This copies all regions
 * in one call with streaming (non-temporal) stores where the CPU has them, on up to four
 * threads for copies of several MiB (one core does not saturate memory), and returns once
 * the data is visible to other threads.
 */
#ifndef PEFT_MULTILORA_HOST_H
#define PEFT_MULTILORA_HOST_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define PEFT_ML_HOST_API __attribute__((visibility("default")))
#else
#define PEFT_ML_HOST_API
#endif

/* dst[i] <- src[i] for `bytes[i]` bytes, for i in [0, count). Regions must not overlap. */
PEFT_ML_HOST_API void peft_multilora_copy_regions(void* const* dst, const void* const* src,
                                                  const size_t* bytes, size_t count);

#ifdef __cplusplus
}
#endif

#endif /* PEFT_MULTILORA_HOST_H */
