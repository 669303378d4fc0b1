// CUDA kernels of the peft_export::MultiLoRA op behind the C ABI in peft_multilora.h.
//
// Both paths run a shrink (v = A[s] @ x, fp32, split over `in` into partial sums kept in the
// workspace) and an expand (delta = B[s] @ sum(v)). They differ in how tokens are grouped
// into tiles that share one adapter slot, so that each tile reads its slot's weights once:
//   prefill: a tile is a run of consecutive tokens of one batch row (segments, SGMV-style);
//            fp16/bf16 use tensor cores (WMMA), fp32 uses the SIMT kernels.
//   decode:  a one-block plan kernel sorts the rows by slot and cuts them into tiles of at
//            most 16 tokens, so tokens of different rows with the same adapter share the
//            weight reads (gather variant); SIMT kernels for every dtype.
// Tiles whose slot is 0 (or an out-of-range id) write zeros and read no weights.

#include "peft_multilora.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

// cpu_emulation/ compiles this file with g++ to run the kernels on CPU threads in CI; it
// brings its own WMMA and launch().
#ifndef PEFT_MULTILORA_EMULATION
#include <mma.h>

template <typename... P, typename... Args>
static void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t st, Args... args) {
    kernel<<<grid, block, 0, st>>>(args...);
}
#endif

namespace {

// ---------------------------------------------------------------------------------------
// Launch policy. Everything here depends on shapes only (never on the device), so that
// peft_multilora_workspace_size and the forward call agree.
// ---------------------------------------------------------------------------------------
constexpr int64_t kTargetBlocks = 528;       // about 4 blocks per SM on a 132-SM H100/H200
constexpr int64_t kMaxSplits = 16;           // split-K partial sums per token
constexpr int64_t kSplitTokenBudget = 16384;  // splits * tokens <= max(tokens, budget)
constexpr int64_t kDecodeMaxSeq = 16;        // AUTO: rows shorter than this use decode
constexpr int64_t kDecodeMaxSlots = 65536;   // AUTO: the plan kernel scans every slot

constexpr int kSimtBM = 16;        // tokens per SIMT tile (decode and fp32 prefill)
constexpr int kSimtThreads = 256;  // 8 warps
constexpr int kSimtRows = 128;     // rank rows of A per SIMT shrink block (16 per warp)
constexpr int kSimtBN = 256;       // output columns per SIMT expand block (one per thread)
constexpr int kSimtRC = 64;        // rank chunk staged in shared memory by the SIMT expand

constexpr int kMmaBM = 64;   // tokens per tensor-core tile
constexpr int kMmaBK = 64;   // shrink: `in` step
constexpr int kMmaPad = 8;   // shared-memory row padding (elements) against bank conflicts
constexpr int kExpBN = 128;  // expand: output columns per step
constexpr int kExpSteps = 8;  // expand: column steps per block, re-reading v from L1
constexpr int kExpBK = 32;   // expand: rank step
constexpr int kPlanMaxThreads = 1024;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// ---------------------------------------------------------------------------------------
// Element helpers. Data moves as 16-byte vectors (uint4) of V = 16 / sizeof(T) elements.
// ---------------------------------------------------------------------------------------
template <typename T>
using Raw = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Elements [k, k + V) of `row`, zero where k + e >= end. With `vec` the caller guarantees
// 16-byte alignment and that `end` and `k` are multiples of V, so a vector is wholly inside
// or wholly outside; without it (odd sizes, unaligned tensors) elements load one by one.
template <typename T>
__device__ __forceinline__ uint4 load_vec(const T* __restrict__ row, int64_t k, int64_t end,
                                          bool vec) {
    if (vec) {
        return k < end ? __ldg(reinterpret_cast<const uint4*>(row + k)) : make_uint4(0, 0, 0, 0);
    }
    uint4 u = make_uint4(0, 0, 0, 0);
    Raw<T>* dst = reinterpret_cast<Raw<T>*>(&u);
    const Raw<T>* src = reinterpret_cast<const Raw<T>*>(row);
#pragma unroll
    for (int e = 0; e < kVec<T>; ++e) {
        if (k + e < end) dst[e] = src[k + e];
    }
    return u;
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4& u, float* f) {
    const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int e = 0; e < kVec<T>; ++e) f[e] = to_float(t[e]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Stores `n` (<= 8) converted floats at dst[0..n); one 16-byte store when `vec` and n == 8.
template <typename T>
__device__ __forceinline__ void store_row8(T* dst, const float* f, int n, bool vec) {
    if (vec && n == 8) {
        uint4 u;
        T* t = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int e = 0; e < 8; ++e) t[e] = from_float<T>(f[e]);
        *reinterpret_cast<uint4*>(dst) = u;
        return;
    }
    for (int e = 0; e < n; ++e) dst[e] = from_float<T>(f[e]);
}

// ---------------------------------------------------------------------------------------
// Tiles: up to BM tokens that share one slot. Prefill tiles come from the block index
// (row = tile / tiles_per_row); decode tiles come from the table the plan kernel wrote.
// ---------------------------------------------------------------------------------------
struct Tiles {
    const int64_t* ids;
    int64_t seq;
    int64_t slots;
    int64_t tiles_per_row;  // prefill
    const int4* table;      // decode: (slot, first index into tok_idx, count, 0)
    const int* num_tiles;   // decode
    const int* tok_idx;     // decode: token indices grouped by slot
};

struct TileInfo {
    int64_t slot;
    int count;
};

__device__ __forceinline__ int64_t normalize_slot(int64_t id, int64_t slots) {
    if (id < 0) id += slots;
    return (id > 0 && id < slots) ? id : 0;
}

// Every thread gets the same TileInfo; s_tok[0..BM) receives the tile's token indices.
// The caller must __syncthreads() before reading s_tok.
template <int BM>
__device__ TileInfo fetch_tile(const Tiles& tl, int64_t tile, int* s_tok) {
    TileInfo info{0, 0};
    if (tl.table == nullptr) {
        const int64_t row = tile / tl.tiles_per_row;
        const int64_t t0 = (tile % tl.tiles_per_row) * BM;
        info.slot = normalize_slot(tl.ids[row], tl.slots);
        info.count = static_cast<int>(lmin(BM, tl.seq - t0));
        for (int m = threadIdx.x; m < BM; m += blockDim.x) {
            s_tok[m] = static_cast<int>(row * tl.seq + t0 + min(m, info.count - 1));
        }
    } else if (tile < *tl.num_tiles) {
        const int4 t = tl.table[tile];
        info.slot = t.x;
        info.count = t.z;
        for (int m = threadIdx.x; m < BM; m += blockDim.x) {
            s_tok[m] = tl.tok_idx[t.y + min(m, info.count - 1)];
        }
    }
    return info;
}

// ---------------------------------------------------------------------------------------
// Decode plan: counting sort of the rows by slot (one block), then tiles of <= kSimtBM
// tokens per slot. Slot-0 rows get tiles too, so that the expand writes their zeros.
// ---------------------------------------------------------------------------------------
__device__ int2 block_inclusive_scan(int2 v, int2* s_warp) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int nx = __shfl_up_sync(0xffffffffu, v.x, o);
        const int ny = __shfl_up_sync(0xffffffffu, v.y, o);
        if (lane >= o) {
            v.x += nx;
            v.y += ny;
        }
    }
    if (lane == 31) s_warp[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int2 w = lane < nwarps ? s_warp[lane] : make_int2(0, 0);
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int nx = __shfl_up_sync(0xffffffffu, w.x, o);
            const int ny = __shfl_up_sync(0xffffffffu, w.y, o);
            if (lane >= o) {
                w.x += nx;
                w.y += ny;
            }
        }
        if (lane < nwarps) s_warp[lane] = w;
    }
    __syncthreads();
    if (warp > 0) {
        v.x += s_warp[warp - 1].x;
        v.y += s_warp[warp - 1].y;
    }
    return v;
}

__global__ void plan_kernel(const int64_t* __restrict__ ids, int64_t batch, int64_t seq,
                            int64_t slots, int* counts, int* cursor, int* tok_idx, int4* table,
                            int* num_tiles) {
    __shared__ int2 s_warp[32];
    __shared__ int2 s_carry;
    for (int64_t s = threadIdx.x; s < slots; s += blockDim.x) counts[s] = 0;
    if (threadIdx.x == 0) s_carry = make_int2(0, 0);
    __syncthreads();
    for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
        atomicAdd(&counts[normalize_slot(ids[b], slots)], 1);
    }
    __syncthreads();
    // Exclusive scan over slots of (tokens, tiles); each slot writes its own tiles.
    for (int64_t base = 0; base < slots; base += blockDim.x) {
        const int64_t s = base + threadIdx.x;
        const int tokens = s < slots ? static_cast<int>(counts[s] * seq) : 0;
        const int tiles = static_cast<int>(ceil_div(tokens, kSimtBM));
        const int2 incl = block_inclusive_scan(make_int2(tokens, tiles), s_warp);
        const int tok0 = s_carry.x + incl.x - tokens;
        const int tile0 = s_carry.y + incl.y - tiles;
        if (tokens > 0) {
            cursor[s] = tok0;
            for (int i = 0; i < tiles; ++i) {
                table[tile0 + i] = make_int4(static_cast<int>(s), tok0 + i * kSimtBM,
                                             min(kSimtBM, tokens - i * kSimtBM), 0);
            }
        }
        __syncthreads();  // everyone has read s_carry
        if (threadIdx.x == blockDim.x - 1) {
            s_carry.x += incl.x;
            s_carry.y += incl.y;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) *num_tiles = s_carry.y;
    for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
        const int pos = atomicAdd(&cursor[normalize_slot(ids[b], slots)], static_cast<int>(seq));
        for (int64_t t = 0; t < seq; ++t) tok_idx[pos + t] = static_cast<int>(b * seq + t);
    }
}

// ---------------------------------------------------------------------------------------
// SIMT shrink: block = (tile, split, 128-row rank chunk). Each warp owns 16 rank rows; a
// lane reads 2 vectors of an A row per `in` sub-chunk and the warp reduces one dot product
// per token of the tile. Lane m keeps the sum for token m, so partials leave once.
// ---------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    shrink_simt(const T* __restrict__ x, const T* __restrict__ A, Tiles tl, int64_t K,
                int64_t R, int64_t Rp, int64_t tokens, int64_t k_chunk,
                float* __restrict__ ws, bool vec) {
    constexpr int V = kVec<T>;
    constexpr int KS = 64 * V;  // `in` elements per sub-chunk: 2 vectors per lane
    constexpr int kRowsPerWarp = kSimtRows / (kSimtThreads / 32);
    constexpr int kGroup = 2;  // rows whose loads are in flight together (4 spills)
    __shared__ __align__(16) T xs[kSimtBM][KS];
    __shared__ int s_tok[kSimtBM];

    const TileInfo ti = fetch_tile<kSimtBM>(tl, blockIdx.x, s_tok);
    if (ti.slot == 0 || ti.count == 0) return;
    __syncthreads();

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int64_t k_begin = blockIdx.y * k_chunk;
    const int64_t k_end = lmin(K, k_begin + k_chunk);
    const int64_t r0 = static_cast<int64_t>(blockIdx.z) * kSimtRows + warp;
    const T* Aslot = A + ti.slot * R * K;

    float acc[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) acc[i] = 0.f;

    for (int64_t kb = k_begin; kb < k_end; kb += KS) {
        __syncthreads();  // the previous sub-chunk is no longer read
        for (int e = threadIdx.x; e < kSimtBM * (KS / V); e += kSimtThreads) {
            const int m = e / (KS / V);
            const int c = (e % (KS / V)) * V;
            uint4 u = make_uint4(0, 0, 0, 0);
            if (m < ti.count) u = load_vec(x + static_cast<int64_t>(s_tok[m]) * K, kb + c, k_end, vec);
            *reinterpret_cast<uint4*>(&xs[m][c]) = u;
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < kRowsPerWarp; g += kGroup) {
            uint4 a[kGroup][2];
#pragma unroll
            for (int i = 0; i < kGroup; ++i) {
                const int64_t j = r0 + 8 * (g + i);
                const T* arow = Aslot + lmin(j, R - 1) * K;
                const bool live = j < R;
                a[i][0] = live ? load_vec(arow, kb + lane * V, k_end, vec) : make_uint4(0, 0, 0, 0);
                a[i][1] = live ? load_vec(arow, kb + KS / 2 + lane * V, k_end, vec)
                               : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int i = 0; i < kGroup; ++i) {
                if (r0 + 8 * (g + i) < R) {
                    float af[2][V];
                    unpack<T>(a[i][0], af[0]);
                    unpack<T>(a[i][1], af[1]);
                    float mine = 0.f;
                    for (int m = 0; m < ti.count; ++m) {
                        float xf[2][V];
                        unpack<T>(*reinterpret_cast<const uint4*>(&xs[m][lane * V]), xf[0]);
                        unpack<T>(*reinterpret_cast<const uint4*>(&xs[m][KS / 2 + lane * V]), xf[1]);
                        float p = 0.f;
#pragma unroll
                        for (int e = 0; e < V; ++e) {
                            p = fmaf(af[0][e], xf[0][e], fmaf(af[1][e], xf[1][e], p));
                        }
                        p = warp_sum(p);
                        if (lane == m) mine = p;
                    }
                    acc[g + i] += mine;
                }
            }
        }
    }
    if (lane < ti.count) {
        float* dst = ws + (blockIdx.y * tokens + s_tok[lane]) * Rp;
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
            const int64_t j = r0 + 8 * i;
            if (j < R) dst[j] = acc[i];
        }
    }
}

// ---------------------------------------------------------------------------------------
// SIMT expand: block = (tile, 256 output columns), one column per thread. The summed v of
// the tile's tokens is staged in shared memory as [rank][token]; a thread streams its row
// of B[s] and keeps MT accumulators (MT = 4 for the usual 1-4 tokens of a decode tile).
// ---------------------------------------------------------------------------------------
template <typename T, int MT>
__device__ __forceinline__ void expand_simt_body(const float* __restrict__ ws,
                                                 const T* __restrict__ brow, int64_t n,
                                                 int64_t N, int64_t R, int64_t Rp,
                                                 int64_t tokens, int splits, const int* s_tok,
                                                 int count, float (*vs)[kSimtBM],
                                                 T* __restrict__ out, bool vec) {
    constexpr int V = kVec<T>;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.f;
    for (int64_t j0 = 0; j0 < R; j0 += kSimtRC) {
        __syncthreads();
        for (int e = threadIdx.x; e < kSimtRC * kSimtBM; e += kSimtThreads) {
            const int m = e / kSimtRC;
            const int jj = e % kSimtRC;
            float v = 0.f;
            if (m < count && j0 + jj < R) {
                for (int s = 0; s < splits; ++s) v += ws[(s * tokens + s_tok[m]) * Rp + j0 + jj];
            }
            vs[jj][m] = v;
        }
        __syncthreads();
        if (n < N) {
            const int64_t jn = lmin(kSimtRC, R - j0);
            for (int jj = 0; jj < jn; jj += V) {
                float b[V];
                unpack<T>(load_vec(brow, j0 + jj, R, vec), b);
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    if (jj + e < jn) {
#pragma unroll
                        for (int m = 0; m < MT; ++m) acc[m] = fmaf(b[e], vs[jj + e][m], acc[m]);
                    }
                }
            }
        }
    }
    if (n < N) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            if (m < count) out[static_cast<int64_t>(s_tok[m]) * N + n] = from_float<T>(acc[m]);
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    expand_simt(const float* __restrict__ ws, const T* __restrict__ B, Tiles tl, int64_t N,
                int64_t R, int64_t Rp, int64_t tokens, int splits, T* __restrict__ out,
                bool vec) {
    __shared__ int s_tok[kSimtBM];
    __shared__ __align__(16) float vs[kSimtRC][kSimtBM];
    const TileInfo ti = fetch_tile<kSimtBM>(tl, blockIdx.x, s_tok);
    if (ti.count == 0) return;
    __syncthreads();
    const int64_t n = static_cast<int64_t>(blockIdx.y) * kSimtBN + threadIdx.x;
    if (ti.slot == 0) {
        if (n < N) {
            for (int m = 0; m < ti.count; ++m) out[static_cast<int64_t>(s_tok[m]) * N + n] = from_float<T>(0.f);
        }
        return;
    }
    const T* brow = B + (ti.slot * N + lmin(n, N - 1)) * R;
    if (ti.count <= 4) {
        expand_simt_body<T, 4>(ws, brow, n, N, R, Rp, tokens, splits, s_tok, ti.count, vs, out, vec);
    } else {
        expand_simt_body<T, kSimtBM>(ws, brow, n, N, R, Rp, tokens, splits, s_tok, ti.count, vs, out,
                                     vec);
    }
}

// ---------------------------------------------------------------------------------------
// Tensor-core shrink (fp16/bf16 prefill): block = (64-token tile, split, RT-row rank chunk),
// 4 warps, each 16 tokens x RT ranks of fp32 accumulators. The next `in` step is loaded into
// registers while the current one is multiplied.
// ---------------------------------------------------------------------------------------
template <typename T, int RT>
__global__ void __launch_bounds__(128)
    shrink_mma(const T* __restrict__ x, const T* __restrict__ A, Tiles tl, int64_t K, int64_t R,
               int64_t Rp, int64_t tokens, int64_t k_chunk, float* __restrict__ ws, bool vec) {
    using namespace nvcuda;
    constexpr int V = 8;
    constexpr int LD = kMmaBK + kMmaPad;
    constexpr int kXVecs = kMmaBM * kMmaBK / V / 128;
    constexpr int kAVecs = RT * kMmaBK / V / 128;
    constexpr int kFrags = RT / 16;
    __shared__ __align__(32) T xs[kMmaBM * LD];
    __shared__ __align__(32) T as[RT * LD];
    __shared__ __align__(32) float stage[4][16 * 16];
    __shared__ int s_tok[kMmaBM];

    const TileInfo ti = fetch_tile<kMmaBM>(tl, blockIdx.x, s_tok);
    if (ti.slot == 0 || ti.count == 0) return;
    __syncthreads();

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int64_t k_begin = blockIdx.y * k_chunk;
    const int64_t k_end = lmin(K, k_begin + k_chunk);
    const int64_t r0 = static_cast<int64_t>(blockIdx.z) * RT;
    const T* Aslot = A + ti.slot * R * K;

    uint4 xr[kXVecs];
    uint4 ar[kAVecs];
    auto load_regs = [&](int64_t kb) {
#pragma unroll
        for (int i = 0; i < kXVecs; ++i) {
            const int e = threadIdx.x + i * 128;
            const int m = e / (kMmaBK / V);
            const int c = (e % (kMmaBK / V)) * V;
            xr[i] = m < ti.count ? load_vec(x + static_cast<int64_t>(s_tok[m]) * K, kb + c, k_end, vec)
                                 : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < kAVecs; ++i) {
            const int e = threadIdx.x + i * 128;
            const int64_t j = r0 + e / (kMmaBK / V);
            const int c = (e % (kMmaBK / V)) * V;
            ar[i] = j < R ? load_vec(Aslot + j * K, kb + c, k_end, vec) : make_uint4(0, 0, 0, 0);
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFrags];
#pragma unroll
    for (int f = 0; f < kFrags; ++f) wmma::fill_fragment(acc[f], 0.f);

    if (k_begin < k_end) load_regs(k_begin);
    for (int64_t kb = k_begin; kb < k_end; kb += kMmaBK) {
        __syncthreads();
#pragma unroll
        for (int i = 0; i < kXVecs; ++i) {
            const int e = threadIdx.x + i * 128;
            *reinterpret_cast<uint4*>(&xs[(e / (kMmaBK / V)) * LD + (e % (kMmaBK / V)) * V]) = xr[i];
        }
#pragma unroll
        for (int i = 0; i < kAVecs; ++i) {
            const int e = threadIdx.x + i * 128;
            *reinterpret_cast<uint4*>(&as[(e / (kMmaBK / V)) * LD + (e % (kMmaBK / V)) * V]) = ar[i];
        }
        __syncthreads();
        if (kb + kMmaBK < k_end) load_regs(kb + kMmaBK);
#pragma unroll
        for (int kk = 0; kk < kMmaBK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
            wmma::load_matrix_sync(af, xs + warp * 16 * LD + kk, LD);
#pragma unroll
            for (int f = 0; f < kFrags; ++f) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
                wmma::load_matrix_sync(bf, as + f * 16 * LD + kk, LD);
                wmma::mma_sync(acc[f], af, bf, acc[f]);
            }
        }
    }

    // Epilogue: through a per-warp 16x16 staging tile; lane -> (row lane/2, 8 columns).
    float* st = stage[warp];
    const int row = lane >> 1;
    const int col = (lane & 1) * 8;
    const int m = warp * 16 + row;
#pragma unroll
    for (int f = 0; f < kFrags; ++f) {
        const int64_t j = r0 + f * 16 + col;
        wmma::store_matrix_sync(st, acc[f], 16, wmma::mem_row_major);
        __syncwarp();
        if (m < ti.count && j < Rp) {
            float4* dst = reinterpret_cast<float4*>(ws + (blockIdx.y * tokens + s_tok[m]) * Rp + j);
            dst[0] = *reinterpret_cast<const float4*>(st + row * 16 + col);
            dst[1] = *reinterpret_cast<const float4*>(st + row * 16 + col + 4);
        }
        __syncwarp();
    }
}

// ---------------------------------------------------------------------------------------
// Tensor-core expand (fp16/bf16 prefill): block = (64-token tile, 8 steps of 128 output
// columns), 8 warps in a 4 x 2 grid, each 16 tokens x 64 columns of a step. The fp32 v is
// split into hi = T(v) and lo = T(v - hi), and both are multiplied, so that v keeps ~fp32
// precision. Walking several column steps per block reads the tile's partial sums of v
// from L2 once and from L1 after that.
// ---------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(256, 2)
    expand_mma(const float* __restrict__ ws, const T* __restrict__ B, Tiles tl, int64_t N,
               int64_t R, int64_t Rp, int64_t tokens, int splits, T* __restrict__ out,
               bool vec) {
    using namespace nvcuda;
    constexpr int LD = kExpBK + kMmaPad;
    constexpr int kVVecs = kMmaBM * kExpBK / 4 / 256;   // float4 per thread
    constexpr int kBVecs = kExpBN * kExpBK / 8 / 256;   // 8-element vectors per thread
    __shared__ __align__(32) T vhi[kMmaBM * LD];
    __shared__ __align__(32) T vlo[kMmaBM * LD];
    __shared__ __align__(32) T bs[kExpBN * LD];
    __shared__ __align__(32) float stage[8][16 * 16];
    __shared__ int s_tok[kMmaBM];

    const TileInfo ti = fetch_tile<kMmaBM>(tl, blockIdx.x, s_tok);
    if (ti.count == 0) return;
    __syncthreads();

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    if (ti.slot == 0) {
        const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * kExpBN * kExpSteps;
        const int64_t n_end = lmin(N, n_begin + kExpBN * kExpSteps);
        for (int64_t e = threadIdx.x; e < ti.count * (n_end - n_begin); e += 256) {
            const int64_t n = n_begin + e % (n_end - n_begin);
            out[static_cast<int64_t>(s_tok[e / (n_end - n_begin)]) * N + n] = from_float<T>(0.f);
        }
        return;
    }
    const T* Bslot = B + ti.slot * N * R;
    const int wm = warp & 3;
    const int wn = warp >> 2;
    const int row = lane >> 1;
    const int col = (lane & 1) * 8;
    const int m = wm * 16 + row;

    float4 vr[kVVecs];
    uint4 br[kBVecs];
    for (int step = 0; step < kExpSteps; ++step) {
        const int64_t n0 = (static_cast<int64_t>(blockIdx.y) * kExpSteps + step) * kExpBN;
        if (n0 >= N) break;
        auto load_regs = [&](int64_t j0) {
#pragma unroll
            for (int i = 0; i < kVVecs; ++i) {
                const int e = threadIdx.x + i * 256;
                const int mm = e / (kExpBK / 4);
                const int64_t j = j0 + (e % (kExpBK / 4)) * 4;
                float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
                // Columns [R, Rp) are zeros: shrink_mma multiplies zero-filled rows of A there.
                if (mm < ti.count && j < R) {
                    for (int s = 0; s < splits; ++s) {
                        const float4 p =
                            *reinterpret_cast<const float4*>(ws + (s * tokens + s_tok[mm]) * Rp + j);
                        v.x += p.x;
                        v.y += p.y;
                        v.z += p.z;
                        v.w += p.w;
                    }
                }
                vr[i] = v;
            }
#pragma unroll
            for (int i = 0; i < kBVecs; ++i) {
                const int e = threadIdx.x + i * 256;
                const int64_t n = n0 + e / (kExpBK / 8);
                const int64_t j = j0 + (e % (kExpBK / 8)) * 8;
                br[i] = n < N ? load_vec(Bslot + n * R, j, R, vec) : make_uint4(0, 0, 0, 0);
            }
        };

        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
        for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.f);

        load_regs(0);
        for (int64_t j0 = 0; j0 < R; j0 += kExpBK) {
            __syncthreads();
#pragma unroll
            for (int i = 0; i < kVVecs; ++i) {
                const int e = threadIdx.x + i * 256;
                const int idx = (e / (kExpBK / 4)) * LD + (e % (kExpBK / 4)) * 4;
                const float v[4] = {vr[i].x, vr[i].y, vr[i].z, vr[i].w};
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const T hi = from_float<T>(v[c]);
                    vhi[idx + c] = hi;
                    vlo[idx + c] = from_float<T>(v[c] - to_float(hi));
                }
            }
#pragma unroll
            for (int i = 0; i < kBVecs; ++i) {
                const int e = threadIdx.x + i * 256;
                *reinterpret_cast<uint4*>(&bs[(e / (kExpBK / 8)) * LD + (e % (kExpBK / 8)) * 8]) = br[i];
            }
            __syncthreads();
            if (j0 + kExpBK < R) load_regs(j0 + kExpBK);
#pragma unroll
            for (int kk = 0; kk < kExpBK; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> ahi, alo;
                wmma::load_matrix_sync(ahi, vhi + wm * 16 * LD + kk, LD);
                wmma::load_matrix_sync(alo, vlo + wm * 16 * LD + kk, LD);
#pragma unroll
                for (int f = 0; f < 4; ++f) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
                    wmma::load_matrix_sync(bf, bs + (wn * 64 + f * 16) * LD + kk, LD);
                    wmma::mma_sync(acc[f], ahi, bf, acc[f]);
                    wmma::mma_sync(acc[f], alo, bf, acc[f]);
                }
            }
        }

        float* st = stage[warp];
#pragma unroll
        for (int f = 0; f < 4; ++f) {
            wmma::store_matrix_sync(st, acc[f], 16, wmma::mem_row_major);
            __syncwarp();
            const int64_t n = n0 + wn * 64 + f * 16 + col;
            if (m < ti.count && n < N) {
                store_row8(out + static_cast<int64_t>(s_tok[m]) * N + n, st + row * 16 + col,
                           static_cast<int>(lmin(8, N - n)), vec);
            }
            __syncwarp();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------
struct Problem {
    int64_t batch, seq, K, N, R, S;
    int64_t tokens;
    int64_t Rp;  // rank padded to 16: row stride of the partial sums
};

struct Layout {
    size_t partials, counts, cursor, tok_idx, table, num_tiles, total;
};

int64_t max_decode_tiles(const Problem& p) {
    return ceil_div(p.tokens, kSimtBM) + std::min(p.batch, p.S);
}

// Workspace regions, all sized by monotone bounds (see peft_multilora_workspace_size).
Layout layout_for(const Problem& p) {
    Layout l{};
    size_t off = 0;
    auto take = [&](size_t bytes) {
        const size_t at = off;
        off = align_up(off + bytes, 256);
        return at;
    };
    l.partials = take(sizeof(float) * static_cast<size_t>(std::max(p.tokens, kSplitTokenBudget)) *
                      static_cast<size_t>(p.Rp));
    l.counts = take(sizeof(int) * static_cast<size_t>(p.S));
    l.cursor = take(sizeof(int) * static_cast<size_t>(p.S));
    l.tok_idx = take(sizeof(int) * static_cast<size_t>(p.tokens));
    l.table = take(sizeof(int4) * static_cast<size_t>(max_decode_tiles(p)));
    l.num_tiles = take(sizeof(int));
    l.total = off;
    return l;
}

// Split-K plan: enough blocks to fill the GPU, within the partial-sum budget.
struct Split {
    int splits;
    int64_t k_chunk;
};

Split choose_split(int64_t blocks, int64_t K, int64_t k_step, int64_t tokens) {
    const int64_t steps = ceil_div(K, k_step);
    int64_t s = ceil_div(kTargetBlocks, std::max<int64_t>(blocks, 1));
    s = std::min({s, steps, kMaxSplits, std::max<int64_t>(1, kSplitTokenBudget / tokens)});
    s = std::max<int64_t>(s, 1);
    const int64_t per = ceil_div(steps, s);
    return {static_cast<int>(ceil_div(steps, per)), per * k_step};
}

int rank_tile(int64_t R) { return R <= 16 ? 16 : R <= 32 ? 32 : R <= 64 ? 64 : 128; }

template <typename T>
void launch_shrink_mma(int rt, dim3 grid, cudaStream_t st, const T* x, const T* A, const Tiles& tl,
                       const Problem& p, int64_t k_chunk, float* ws, bool vec) {
    switch (rt) {
        case 16: launch(shrink_mma<T, 16>, grid, 128, st, x, A, tl, p.K, p.R, p.Rp, p.tokens, k_chunk, ws, vec); break;
        case 32: launch(shrink_mma<T, 32>, grid, 128, st, x, A, tl, p.K, p.R, p.Rp, p.tokens, k_chunk, ws, vec); break;
        case 64: launch(shrink_mma<T, 64>, grid, 128, st, x, A, tl, p.K, p.R, p.Rp, p.tokens, k_chunk, ws, vec); break;
        default: launch(shrink_mma<T, 128>, grid, 128, st, x, A, tl, p.K, p.R, p.Rp, p.tokens, k_chunk, ws, vec); break;
    }
}

// fp16/bf16 prefill on tensor cores.
template <typename T>
void run_prefill_mma(const Problem& p, const T* x, const T* A, const T* B, const int64_t* ids,
                     T* out, float* partials, bool vec, cudaStream_t st) {
    Tiles tl{ids, p.seq, p.S, ceil_div(p.seq, kMmaBM), nullptr, nullptr, nullptr};
    const int64_t tiles = p.batch * tl.tiles_per_row;
    const int rt = rank_tile(p.R);
    const int64_t rchunks = ceil_div(p.R, rt);
    const Split sp = choose_split(tiles * rchunks, p.K, kMmaBK, p.tokens);
    launch_shrink_mma<T>(rt, dim3(static_cast<unsigned>(tiles), sp.splits, static_cast<unsigned>(rchunks)),
                         st, x, A, tl, p, sp.k_chunk, partials, vec);
    const dim3 eg(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div(p.N, kExpBN * kExpSteps)));
    launch(expand_mma<T>, eg, 256, st, partials, B, tl, p.N, p.R, p.Rp, p.tokens, sp.splits, out, vec);
}

// SIMT kernels on prefill tiles (fp32) or on the decode plan's tiles (every dtype).
template <typename T>
void run_simt(const Problem& p, const T* x, const T* A, const T* B, const Tiles& tl,
              int64_t tiles, T* out, float* partials, bool vec, cudaStream_t st) {
    const int64_t rchunks = ceil_div(p.R, kSimtRows);
    const Split sp = choose_split(tiles * rchunks, p.K, 64 * kVec<T>, p.tokens);
    launch(shrink_simt<T>, dim3(static_cast<unsigned>(tiles), sp.splits, static_cast<unsigned>(rchunks)),
           kSimtThreads, st, x, A, tl, p.K, p.R, p.Rp, p.tokens, sp.k_chunk, partials, vec);
    const dim3 eg(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div(p.N, kSimtBN)));
    launch(expand_simt<T>, eg, kSimtThreads, st, partials, B, tl, p.N, p.R, p.Rp, p.tokens, sp.splits, out, vec);
}

template <typename T>
void run(const Problem& p, int path, const void* x_, const void* A_, const void* B_,
         const int64_t* ids, void* out_, char* ws, const Layout& l, bool vec, cudaStream_t st) {
    const T* x = static_cast<const T*>(x_);
    const T* A = static_cast<const T*>(A_);
    const T* B = static_cast<const T*>(B_);
    T* out = static_cast<T*>(out_);
    float* partials = reinterpret_cast<float*>(ws + l.partials);
    if (path == PEFT_ML_PATH_DECODE) {
        int* counts = reinterpret_cast<int*>(ws + l.counts);
        int* cursor = reinterpret_cast<int*>(ws + l.cursor);
        int* tok_idx = reinterpret_cast<int*>(ws + l.tok_idx);
        int4* table = reinterpret_cast<int4*>(ws + l.table);
        int* num_tiles = reinterpret_cast<int*>(ws + l.num_tiles);
        const int threads = static_cast<int>(
            std::min<int64_t>(kPlanMaxThreads, align_up(std::max(p.batch, p.S), 32)));
        launch(plan_kernel, 1, threads, st, ids, p.batch, p.seq, p.S, counts, cursor, tok_idx, table,
               num_tiles);
        const Tiles tl{ids, p.seq, p.S, 0, table, num_tiles, tok_idx};
        run_simt<T>(p, x, A, B, tl, max_decode_tiles(p), out, partials, vec, st);
        return;
    }
    if constexpr (std::is_same_v<T, float>) {
        const Tiles tl{ids, p.seq, p.S, ceil_div(p.seq, kSimtBM), nullptr, nullptr, nullptr};
        run_simt<T>(p, x, A, B, tl, p.batch * tl.tiles_per_row, out, partials, vec, st);
    } else {
        run_prefill_mma<T>(p, x, A, B, ids, out, partials, vec, st);
    }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

size_t element_size(int dtype) { return dtype == PEFT_ML_FLOAT32 ? 4 : 2; }

bool make_problem(int64_t batch, int64_t seq, int64_t K, int64_t N, int64_t R, int64_t S,
                  Problem* p) {
    if (batch < 0 || seq < 0 || K < 0 || N < 0 || R < 0 || S < 1) return false;
    // grid.y / grid.z limits of the expand and shrink launches.
    if (N > int64_t{65535} * kExpBN || R > int64_t{65535} * kSimtRows) return false;
    // Token indices are int32 in the kernels; 2^30 tokens is far past any real batch.
    if (seq != 0 && batch > (int64_t{1} << 30) / seq) return false;
    *p = Problem{batch, seq, K, N, R, S, batch * seq, ceil_div(R, 16) * 16};
    return true;
}

}  // namespace

extern "C" {

int peft_multilora_abi_version(void) { return PEFT_MULTILORA_ABI_VERSION; }

size_t peft_multilora_workspace_size(int64_t batch, int64_t seq, int64_t in_features,
                                     int64_t out_features, int64_t rank, int64_t slots) {
    Problem p;
    if (!make_problem(batch, seq, in_features, out_features, rank, slots, &p)) return 0;
    return layout_for(p).total;
}

int peft_multilora_forward_path(int dtype, const void* x, const void* A, const void* B,
                                const int64_t* adapter_ids, int64_t batch, int64_t seq,
                                int64_t in_features, int64_t out_features, int64_t rank,
                                int64_t slots, void* out, void* workspace,
                                size_t workspace_size, void* stream, int path) {
    Problem p;
    if (dtype < PEFT_ML_FLOAT32 || dtype > PEFT_ML_BFLOAT16 || path < PEFT_ML_PATH_AUTO ||
        path > PEFT_ML_PATH_DECODE ||
        !make_problem(batch, seq, in_features, out_features, rank, slots, &p)) {
        return PEFT_ML_ERR_INVALID_ARGUMENT;
    }
    if (p.tokens == 0 || p.N == 0) return PEFT_ML_OK;
    if (out == nullptr || adapter_ids == nullptr || (p.K > 0 && p.R > 0 && (x == nullptr || A == nullptr || B == nullptr))) {
        return PEFT_ML_ERR_INVALID_ARGUMENT;
    }
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    if (p.K == 0 || p.R == 0) {  // A @ x or B @ v is empty: the delta is zero
        const cudaError_t err =
            cudaMemsetAsync(out, 0, static_cast<size_t>(p.tokens * p.N) * element_size(dtype), st);
        return err == cudaSuccess ? PEFT_ML_OK : PEFT_ML_ERR_CUDA;
    }
    const Layout l = layout_for(p);
    if (workspace == nullptr || workspace_size < l.total) return PEFT_ML_ERR_WORKSPACE_TOO_SMALL;
    if (!aligned16(workspace)) return PEFT_ML_ERR_INVALID_ARGUMENT;
    if (path == PEFT_ML_PATH_AUTO) {
        path = (p.seq < kDecodeMaxSeq && p.S <= kDecodeMaxSlots) ? PEFT_ML_PATH_DECODE
                                                                 : PEFT_ML_PATH_PREFILL;
    }
    const int64_t v = 16 / static_cast<int64_t>(element_size(dtype));
    const bool vec = aligned16(x) && aligned16(A) && aligned16(B) && aligned16(out) &&
                     p.K % v == 0 && p.R % v == 0 && p.N % v == 0;
    char* ws = static_cast<char*>(workspace);
    switch (dtype) {
        case PEFT_ML_FLOAT32: run<float>(p, path, x, A, B, adapter_ids, out, ws, l, vec, st); break;
        case PEFT_ML_FLOAT16: run<__half>(p, path, x, A, B, adapter_ids, out, ws, l, vec, st); break;
        default: run<__nv_bfloat16>(p, path, x, A, B, adapter_ids, out, ws, l, vec, st); break;
    }
    return cudaGetLastError() == cudaSuccess ? PEFT_ML_OK : PEFT_ML_ERR_CUDA;
}

int peft_multilora_forward(int dtype, const void* x, const void* A, const void* B,
                           const int64_t* adapter_ids, int64_t batch, int64_t seq,
                           int64_t in_features, int64_t out_features, int64_t rank,
                           int64_t slots, void* out, void* workspace, size_t workspace_size,
                           void* stream) {
    return peft_multilora_forward_path(dtype, x, A, B, adapter_ids, batch, seq, in_features,
                                       out_features, rank, slots, out, workspace,
                                       workspace_size, stream, PEFT_ML_PATH_AUTO);
}

const char* peft_multilora_status_string(int status) {
    switch (status) {
        case PEFT_ML_OK: return "ok";
        case PEFT_ML_ERR_INVALID_ARGUMENT:
            return "invalid argument (dtype, path, a negative size, slots < 1, a null pointer, a "
                   "workspace not 16-byte aligned, more than 2^30 tokens, or out/rank > 8388480)";
        case PEFT_ML_ERR_WORKSPACE_TOO_SMALL: return "workspace is null or smaller than peft_multilora_workspace_size()";
        case PEFT_ML_ERR_CUDA: return "a CUDA call or kernel launch failed";
        default: return "unknown status";
    }
}

}  // extern "C"
