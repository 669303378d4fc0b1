// The kernels of multiLoRAKernels.cu behind the same C ABI, run on CPU threads (see
// cuda_emulation.h). Built by tests/test_multilora_emulated.py with g++ and the CUDA headers.
#include "cuda_emulation.h"

#include "../multiLoRAKernels.cu"
