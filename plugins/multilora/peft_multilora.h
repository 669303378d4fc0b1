/*
 * C ABI of the peft_export::MultiLoRA CUDA kernels (libpeft_multilora_kernels.so).
 *
 *   delta[b, t, :] = B[ids[b]] @ (A[ids[b]] @ x[b, t, :])
 *   x [batch, seq, in], A [slots, r, in], B [slots, out, r], ids [batch] int64, delta [batch, seq, out]
 *
 * All tensors are dense, row-major, on the device, of one dtype (ids: int64). Accumulation is
 * in fp32. Slot 0 is the base model (zeros): rows whose id is 0 get zeros without reading the
 * banks. A negative id counts from the end (as ONNX Gather does); an id still outside
 * [0, slots) also gives zeros instead of reading out of bounds.
 *
 * fp16: the intermediate v = A[s] @ x is kept in fp32 and fed to the second product as a
 * sum of two fp16 values, so it must be finite in fp16 (|v| < 65504), as it must be for the
 * reference's fp16 bmm. bf16 has fp32's range.
 *
 * `workspace` is device memory of at least peft_multilora_workspace_size() bytes, 16-byte
 * aligned (cudaMalloc's 256 is fine), with no required contents. A forward call neither
 * allocates nor synchronizes with the host, so it can be captured in a CUDA graph.
 *
 * The header is plain C with no CUDA include so that ctypes, the TensorRT plugin and C
 * callers share it; `stream` is a cudaStream_t passed as void*.
 */
#ifndef PEFT_MULTILORA_H
#define PEFT_MULTILORA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PEFT_MULTILORA_ABI_VERSION 1

/* The libraries build with hidden visibility; only this ABI is exported. */
#if defined(__GNUC__)
#define PEFT_ML_API __attribute__((visibility("default")))
#else
#define PEFT_ML_API
#endif

/* dtype of x, A, B and the output. */
enum {
    PEFT_ML_FLOAT32 = 0,
    PEFT_ML_FLOAT16 = 1,
    PEFT_ML_BFLOAT16 = 2
};

/* Kernel family. AUTO picks DECODE for short rows (seq < 16), PREFILL otherwise. */
enum {
    PEFT_ML_PATH_AUTO = 0,
    PEFT_ML_PATH_PREFILL = 1, /* per-row segments: segmented shrink, then expand (SGMV) */
    PEFT_ML_PATH_DECODE = 2   /* tokens gathered by adapter, then shrink and expand (BGMV-like) */
};

/* Status codes. */
enum {
    PEFT_ML_OK = 0,
    PEFT_ML_ERR_INVALID_ARGUMENT = 1,
    PEFT_ML_ERR_WORKSPACE_TOO_SMALL = 2,
    PEFT_ML_ERR_CUDA = 3
};

/* PEFT_MULTILORA_ABI_VERSION of the built library. */
PEFT_ML_API int peft_multilora_abi_version(void);

/* Bytes of device workspace that forward needs for these sizes, for every dtype and path.
 * The size never decreases when any argument grows, so the size for the largest shapes
 * covers every smaller call. Returns 0 for invalid (negative) sizes. */
PEFT_ML_API size_t peft_multilora_workspace_size(int64_t batch, int64_t seq,
                                                 int64_t in_features, int64_t out_features,
                                                 int64_t rank, int64_t slots);

/* Enqueues the op on `stream` (AUTO path). Returns a PEFT_ML_* status; no host sync. */
PEFT_ML_API int peft_multilora_forward(int dtype, const void* x, const void* A, const void* B,
                                       const int64_t* adapter_ids, int64_t batch, int64_t seq,
                                       int64_t in_features, int64_t out_features, int64_t rank,
                                       int64_t slots, void* out, void* workspace,
                                       size_t workspace_size, void* stream);

/* Same as peft_multilora_forward with an explicit PEFT_ML_PATH_*; tests use it to check
 * both kernel families on the same inputs. */
PEFT_ML_API int peft_multilora_forward_path(int dtype, const void* x, const void* A,
                                            const void* B, const int64_t* adapter_ids,
                                            int64_t batch, int64_t seq, int64_t in_features,
                                            int64_t out_features, int64_t rank, int64_t slots,
                                            void* out, void* workspace, size_t workspace_size,
                                            void* stream, int path);

/* Static, human-readable text for a status code. */
PEFT_ML_API const char* peft_multilora_status_string(int status);

#ifdef __cplusplus
}
#endif

#endif /* PEFT_MULTILORA_H */
