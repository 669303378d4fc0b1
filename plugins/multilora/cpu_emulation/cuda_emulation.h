// Minimal CUDA execution model on the CPU, enough to run multiLoRAKernels.cu unchanged.
//
// Why: the kernels' indexing (tiles, plan, split-K, bounds, hi/lo expand) must be checked in
// CI, where nvcc compiles but no GPU runs. Blocks run one after another; the threads of a
// block are cooperative fibers (ucontext) on one OS thread, switched at barriers, so a run
// is deterministic. `__shared__` becomes `static` (one block at a time makes that
// block-shared); __syncthreads / __syncwarp wait for every live thread of the block / warp;
// shuffles exchange through a per-warp buffer between two warp barriers; WMMA fragments hold
// the whole 16x16 tile in every lane (the kernels never touch fragment elements, so only
// load/store/mma semantics matter). Memory is host memory.
// Not modelled: timing, races (use compute-sanitizer on a GPU), real fragment layouts, and
// the tensor cores' own accumulation order. Build with -fno-strict-aliasing: the kernels view
// 16-byte vectors as elements, which nvcc allows and g++ -O2 would otherwise reorder.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define PEFT_MULTILORA_EMULATION 1
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

// Set by the scheduler before it resumes a fiber.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {

// A barrier over the live fibers of a group (the block, or one warp). A fiber that returns
// leaves every group it belongs to, as an exited thread does on the GPU.
struct Barrier {
    unsigned live = 0;
    unsigned arrived = 0;
    uint64_t generation = 0;
    void arrive() {
        if (++arrived >= live) {
            arrived = 0;
            ++generation;
        }
    }
    void leave() {
        --live;
        if (arrived > 0 && arrived >= live) {
            arrived = 0;
            ++generation;
        }
    }
};

struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    bool done = false;
    unsigned syncs = 0;  // __syncthreads passed, compared across the block
};

struct Scheduler {
    static constexpr size_t kStack = 256 * 1024;
    explicit Scheduler(unsigned n) : fibers(n), warps(n / 32), shfl(n) {
        for (Fiber& f : fibers) f.stack.reset(new char[kStack]);
    }
    ucontext_t main;
    std::vector<Fiber> fibers;
    Barrier block;
    std::vector<Barrier> warps;
    std::vector<uint64_t> shfl;
    unsigned current = 0;
    std::function<void()> kernel;
};

inline Scheduler* g_sched = nullptr;

inline void yield() { swapcontext(&g_sched->fibers[g_sched->current].context, &g_sched->main); }

inline void wait(Barrier& b) {
    const uint64_t mine = b.generation;
    b.arrive();
    while (b.generation == mine) yield();
}

inline void fiber_entry() {
    Scheduler& s = *g_sched;
    s.kernel();
    Fiber& f = s.fibers[s.current];
    f.done = true;
    s.block.leave();
    s.warps[s.current / 32].leave();
}

template <typename T>
T exchange(T v, unsigned src_lane) {
    static_assert(sizeof(T) <= sizeof(uint64_t));
    Scheduler& s = *g_sched;
    const unsigned t = s.current;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    s.shfl[t] = bits;
    wait(s.warps[t / 32]);
    const uint64_t got = s.shfl[(t / 32) * 32 + src_lane];
    wait(s.warps[t / 32]);
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}

}  // namespace emu

inline void __syncthreads() {
    ++emu::g_sched->fibers[emu::g_sched->current].syncs;
    emu::wait(emu::g_sched->block);
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::g_sched->warps[emu::g_sched->current / 32]); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    return emu::exchange(v, (threadIdx.x % 32) ^ static_cast<unsigned>(lane_mask));
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
    const unsigned lane = threadIdx.x % 32;
    return emu::exchange(v, lane >= delta ? lane - delta : lane);
}
template <typename T>
T __ldg(const T* p) {
    return *p;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int min(int a, int b) { return a < b ? a : b; }

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 is emulated");
    float v[16 * 16];  // element (r, c) at v[r * 16 + c]
};

template <typename F>
void fill_fragment(F& f, float value) {
    for (float& e : f.v) e = value;
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
    for (int r = 0; r < 16; ++r) {
        for (int c = 0; c < 16; ++c) {
            const T e = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
            f.v[r * 16 + c] = static_cast<float>(e);
        }
    }
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
    float out[16 * 16];
    for (int r = 0; r < 16; ++r) {
        for (int n = 0; n < 16; ++n) {
            float s = c.v[r * 16 + n];
            for (int k = 0; k < 16; ++k) s = std::fma(a.v[r * 16 + k], b.v[k * 16 + n], s);
            out[r * 16 + n] = s;
        }
    }
    std::memcpy(d.v, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t) {
    for (int r = 0; r < 16; ++r) {
        for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.v[r * 16 + c];
    }
}
}  // namespace nvcuda::wmma

// Runs the grid block by block. Throws when the threads of a block passed a different
// number of __syncthreads (a divergent barrier, undefined behaviour on a GPU).
template <typename... P, typename... Args>
static void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t, Args... args) {
    const unsigned n = block.x * block.y * block.z;
    if (block.y != 1 || block.z != 1 || n % 32 != 0) throw std::runtime_error("1-D blocks of whole warps only");
    emu::Scheduler s(n);
    s.kernel = [&] { kernel(args...); };
    emu::g_sched = &s;
    blockDim = block;
    gridDim = grid;
    for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = uint3{x, y, z};
                s.block = emu::Barrier{n};
                for (emu::Barrier& w : s.warps) w = emu::Barrier{32};
                for (emu::Fiber& f : s.fibers) {
                    f.done = false;
                    f.syncs = 0;
                    getcontext(&f.context);
                    f.context.uc_stack.ss_sp = f.stack.get();
                    f.context.uc_stack.ss_size = emu::Scheduler::kStack;
                    f.context.uc_link = &s.main;
                    makecontext(&f.context, emu::fiber_entry, 0);
                }
                for (unsigned running = n; running > 0;) {
                    running = 0;
                    for (unsigned t = 0; t < n; ++t) {
                        if (s.fibers[t].done) continue;
                        s.current = t;
                        threadIdx = uint3{t, 0, 0};
                        swapcontext(&s.main, &s.fibers[t].context);
                        running += s.fibers[t].done ? 0 : 1;
                    }
                }
                for (const emu::Fiber& f : s.fibers) {
                    if (f.syncs != s.fibers[0].syncs) {
                        emu::g_sched = nullptr;
                        throw std::runtime_error("divergent __syncthreads in block " + std::to_string(x));
                    }
                }
            }
        }
    }
    emu::g_sched = nullptr;
}

extern "C" {
// The two runtime calls the host code makes, on host memory.
inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
    std::memset(p, value, count);
    return cudaSuccess;
}
}
