#include "multiLoRACpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PEFT_ML_AVX2 1
#endif

namespace peft_multilora_cpu {
namespace {

// Tokens of one slot handled together, so each weight row is read once per block.
constexpr int64_t kTokenBlock = 16;
// Shrink work is split over ranks (decode has one token per row), four A rows a task: the
// rows `dots4` reads in one pass over x. Expand work is split over outputs.
constexpr int64_t kRankChunk = 4;
constexpr int64_t kOutChunk = 128;
// Blocks of at least this many tokens expand from B transposed (expand_many) at ranks without
// a sixteen-row AVX-512 path; a decode step's single tokens keep expand_token.
constexpr int64_t kTransposeTokens = 4;
constexpr int64_t kLanes = 16;
// Below this many multiply-adds a phase runs on the calling thread: waking the pool costs more.
constexpr int64_t kInlineMacs = 1 << 14;
// Software prefetch: the shrink reads the next four A rows ahead, the expand B rows this many
// outputs ahead. Each slot's weights come from memory every decode step (the base weights
// evict them) in short runs the hardware prefetcher is slow to pick up; reading ahead took a
// decode step's kernel time from ~0.9 to ~0.75 ms (SmolLM2, all-linear rank 16) here.
constexpr int64_t kPrefetchOutputs = 64;

void prefetch(const float* start, int64_t floats) {
  const char* bytes = reinterpret_cast<const char*>(start);
  for (int64_t i = 0; i < floats * int64_t{sizeof(float)}; i += 64) __builtin_prefetch(bytes + i);
}

float dot(const float* __restrict u, const float* __restrict w, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += u[i] * w[i];
  return acc;
}

#if PEFT_ML_AVX2
// Lane j of the result is the sum of the eight lanes of acc[j].
__m256 sum_lanes(const __m256 (&acc)[8]) {
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]);
  const __m256 t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]);
  const __m256 t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// dst[o] = b[o, :] . v for eight consecutive rows of b; rank >= 8.
__m256 eight_dots(const float* v, const float* b, int64_t rank) {
  const int64_t whole = rank / 8 * 8;
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) {
    const float* row = b + j * rank;
    __m256 s = _mm256_mul_ps(_mm256_loadu_ps(row), _mm256_loadu_ps(v));
    for (int64_t k = 8; k < whole; k += 8) {
      s = _mm256_fmadd_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(v + k), s);
    }
    acc[j] = s;
  }
  __m256 sums = sum_lanes(acc);
  if (whole < rank) {
    alignas(32) float tail[8];
    for (int j = 0; j < 8; ++j) tail[j] = dot(v + whole, b + j * rank + whole, rank - whole);
    sums = _mm256_add_ps(sums, _mm256_load_ps(tail));
  }
  return sums;
}
#endif

#if defined(__AVX512F__)
#define PEFT_ML_AVX512 1
// Row r of a 16-row group goes to position 4 * (r % 4) + r / 4 of `sixteen_dots`' input, so
// that the reduction below leaves row r's sum in lane r.
constexpr int kRowOrder[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

// _mm512_shuffle_f32x4 with every lane written: GCC 12 warns (wrongly) that the plain form
// reads an uninitialized vector.
template <int kImm>
__m512 shuffle_quarters(__m512 a, __m512 b) {
  return _mm512_mask_shuffle_f32x4(a, __mmask16(0xFFFF), a, b, kImm);
}

// dst[o] = b[o, :] . v for sixteen consecutive rows of b, rank = 16 * kChunks. A
// compile-time rank keeps the sixteen partial sums in registers.
template <int kChunks>
__m512 sixteen_dots(const float* v, const float* b) {
  constexpr int64_t rank = 16 * kChunks;
  __m512 p[16];
  for (int i = 0; i < 16; ++i) {
    const float* row = b + kRowOrder[i] * rank;
    __m512 s = _mm512_mul_ps(_mm512_loadu_ps(row), _mm512_loadu_ps(v));
    for (int k = 1; k < kChunks; ++k) {
      s = _mm512_fmadd_ps(_mm512_loadu_ps(row + 16 * k), _mm512_loadu_ps(v + 16 * k), s);
    }
    p[i] = s;
  }
  // Halve the lanes per row four times, pairing rows: 256-bit halves, 128-bit quarters,
  // then pairs and single floats inside each quarter.
  __m512 a[8];
  for (int i = 0; i < 8; ++i) {
    a[i] = _mm512_add_ps(shuffle_quarters<0x44>(p[2 * i], p[2 * i + 1]),
                         shuffle_quarters<0xEE>(p[2 * i], p[2 * i + 1]));
  }
  __m512 q[4];
  for (int i = 0; i < 4; ++i) {
    q[i] = _mm512_add_ps(shuffle_quarters<0x88>(a[2 * i], a[2 * i + 1]),
                         shuffle_quarters<0xDD>(a[2 * i], a[2 * i + 1]));
  }
  __m512 c[2];
  for (int i = 0; i < 2; ++i) {
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * i], q[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(q[2 * i], q[2 * i + 1], 0xEE));
  }
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}

// Advances o over whole groups of sixteen outputs below o1.
template <int kChunks>
void expand_sixteens(const float* v, const float* b, int64_t rows, int64_t& o, int64_t o1,
                     float* dst) {
  constexpr int64_t rank = 16 * kChunks;
  for (; o + 16 <= o1; o += 16) {
    if (o + kPrefetchOutputs + 16 <= rows) prefetch(b + (o + kPrefetchOutputs) * rank, 16 * rank);
    _mm512_storeu_ps(dst + o, sixteen_dots<kChunks>(v, b + o * rank));
  }
}
#endif

// dst[o] = b[o, :] . v for o in [o0, o1) of b's `rows` rows. b rows are rank long, and
// short: vectorizing across rows (sixteen at a time with AVX-512 at ranks 16, 32 and 64,
// else eight) beats one horizontal sum per output.
void expand_token(const float* v, const float* b, int64_t rank, int64_t rows, int64_t o0,
                  int64_t o1, float* dst) {
  int64_t o = o0;
  prefetch(b + o0 * rank, std::min(kPrefetchOutputs, o1 - o0) * rank);
#if PEFT_ML_AVX512
  if (rank == 16) {
    expand_sixteens<1>(v, b, rows, o, o1, dst);
  } else if (rank == 32) {
    expand_sixteens<2>(v, b, rows, o, o1, dst);
  } else if (rank == 64) {
    expand_sixteens<4>(v, b, rows, o, o1, dst);
  }
#endif
#if PEFT_ML_AVX2
  if (rank >= 8) {
    for (; o + 8 <= o1; o += 8) {
      // Past o1 too: the next share usually runs next on this thread.
      if (o + kPrefetchOutputs + 8 <= rows) prefetch(b + (o + kPrefetchOutputs) * rank, 8 * rank);
      _mm256_storeu_ps(dst + o, eight_dots(v, b + o * rank, rank));
    }
  }
#endif
  for (; o < o1; ++o) dst[o] = dot(v, b + o * rank, rank);
}

struct Block {
  int64_t slot;
  int64_t first;  // index into Plan::tokens
  int64_t count;
};

// Active tokens ordered by slot, cut into blocks; v holds A @ x per active token. Each
// calling thread keeps one, so its vectors are allocated once, not on every node of every
// step.
struct Plan {
  const Problem* p = nullptr;
  std::vector<std::pair<int64_t, int64_t>> rows;  // (slot, row) of rows with an adapter
  std::vector<int64_t> tokens;  // global token index (row * seq + t)
  std::vector<Block> blocks;
  std::vector<float> v;         // [tokens.size(), rank]
  int64_t rank_chunks = 0;
  int64_t out_chunks = 0;
};

int64_t resolve_slot(int64_t id, int64_t slots) {
  const int64_t slot = id < 0 ? id + slots : id;
  return (slot > 0 && slot < slots) ? slot : 0;
}

void build(Plan& plan) {
  const Problem& p = *plan.p;
  auto& rows = plan.rows;
  rows.clear();
  plan.tokens.clear();
  plan.blocks.clear();
  for (int64_t row = 0; row < p.batch; ++row) {
    const int64_t slot = resolve_slot(p.ids[row], p.slots);
    if (slot == 0) {
      for (int64_t t = 0; t < p.seq; ++t) {
        std::memset(p.delta + (row * p.seq + t) * p.delta_stride, 0, sizeof(float) * p.out);
      }
    } else {
      rows.emplace_back(slot, row);
    }
  }
  std::sort(rows.begin(), rows.end());  // by slot, then row: rows keep their order
  for (size_t i = 0; i < rows.size();) {
    const int64_t slot = rows[i].first;
    const int64_t first = static_cast<int64_t>(plan.tokens.size());
    for (; i < rows.size() && rows[i].first == slot; ++i) {
      for (int64_t t = 0; t < p.seq; ++t) plan.tokens.push_back(rows[i].second * p.seq + t);
    }
    const int64_t end = static_cast<int64_t>(plan.tokens.size());
    for (int64_t start = first; start < end; start += kTokenBlock) {
      plan.blocks.push_back({slot, start, std::min(kTokenBlock, end - start)});
    }
  }
  plan.v.resize(plan.tokens.size() * static_cast<size_t>(p.rank));  // the shrink writes all of it
  plan.rank_chunks = (p.rank + kRankChunk - 1) / kRankChunk;
  plan.out_chunks = (p.out + kOutChunk - 1) / kOutChunk;
}

// Task `index` of a phase: its block and its [lo, hi) share of `extent` (ranks or outputs).
struct Share {
  const Block& block;
  int64_t lo;
  int64_t hi;
};

Share share_of(const Plan& plan, size_t index, int64_t chunks, int64_t chunk, int64_t extent) {
  const int64_t i = static_cast<int64_t>(index);
  const int64_t lo = (i % chunks) * chunk;
  return {plan.blocks[static_cast<size_t>(i / chunks)], lo, std::min(lo + chunk, extent)};
}

// Four dot products of one input with four consecutive weight rows: independent chains.
void dots4(const float* __restrict u, const float* __restrict w, int64_t n, float* out) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < n; ++i) {
    const float v = u[i];
    s0 += v * w[i];
    s1 += v * w[n + i];
    s2 += v * w[2 * n + i];
    s3 += v * w[3 * n + i];
  }
  out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

void shrink_task(void* arg, size_t index) {
  Plan& plan = *static_cast<Plan*>(arg);
  const Problem& p = *plan.p;
  const Share share = share_of(plan, index, plan.rank_chunks, kRankChunk, p.rank);
  const Block& block = share.block;
  const float* a_slot = p.a + block.slot * p.rank * p.in;
  prefetch(a_slot + share.lo * p.in, (share.hi - share.lo) * p.in);
  int64_t k = share.lo;
  for (; k + 4 <= share.hi; k += 4) {
    const float* a_row = a_slot + k * p.in;
    prefetch(a_row + 4 * p.in, std::min<int64_t>(4, p.rank - k - 4) * p.in);
    for (int64_t j = block.first; j < block.first + block.count; ++j) {
      float out[4];
      dots4(p.x + plan.tokens[static_cast<size_t>(j)] * p.in, a_row, p.in, out);
      for (int q = 0; q < 4; ++q) plan.v[static_cast<size_t>(j * p.rank + k + q)] = out[q];
    }
  }
  for (; k < share.hi; ++k) {
    const float* a_row = a_slot + k * p.in;
    for (int64_t j = block.first; j < block.first + block.count; ++j) {
      plan.v[static_cast<size_t>(j * p.rank + k)] =
          dot(p.x + plan.tokens[static_cast<size_t>(j)] * p.in, a_row, p.in);
    }
  }
}

// True where expand_token has no sixteen-row AVX-512 path for this rank (there, the
// transposed form measured slower: rank 16, 4096 tokens 1.44 -> 1.80 ms).
bool transposed_expand_pays(int64_t rank) {
#if PEFT_ML_AVX512
  if (rank == 16 || rank == 32 || rank == 64) return false;
#endif
  return rank > 0;
}

// A block's share of outputs when it has many tokens: B's rows [lo, hi) transposed once
// (rank x width, in L1), then sixteen outputs at a time are sums of the token's rank scaled
// rows, held in registers, instead of one short dot product per output. Rank-8 LoRA over
// 32 x 128 tokens (MiniLM's query/value): 1.37-1.57 -> 1.09-1.18 ms a node, 2 threads.
void expand_many(const Plan& plan, const Share& share, const float* b_slot) {
  const Problem& p = *plan.p;
  const Block& block = share.block;
  const int64_t width = share.hi - share.lo;
  thread_local std::vector<float> transposed;
  transposed.resize(static_cast<size_t>(p.rank * width));
  float* bt = transposed.data();
  for (int64_t o = 0; o < width; ++o) {
    const float* b_row = b_slot + (share.lo + o) * p.rank;
    for (int64_t k = 0; k < p.rank; ++k) bt[k * width + o] = b_row[k];
  }
  for (int64_t j = block.first; j < block.first + block.count; ++j) {
    const float* v = plan.v.data() + j * p.rank;
    float* __restrict dst =
        p.delta + plan.tokens[static_cast<size_t>(j)] * p.delta_stride + share.lo;
    int64_t o = 0;
    for (; o + kLanes <= width; o += kLanes) {
      float acc[kLanes] = {};
      for (int64_t k = 0; k < p.rank; ++k) {
        const float vk = v[k];
        const float* __restrict row = bt + k * width + o;
#pragma omp simd
        for (int64_t i = 0; i < kLanes; ++i) acc[i] += vk * row[i];
      }
#pragma omp simd
      for (int64_t i = 0; i < kLanes; ++i) dst[o + i] = acc[i];
    }
    for (; o < width; ++o) {
      float sum = 0.0f;
      for (int64_t k = 0; k < p.rank; ++k) sum += v[k] * bt[k * width + o];
      dst[o] = sum;
    }
  }
}

void expand_task(void* arg, size_t index) {
  Plan& plan = *static_cast<Plan*>(arg);
  const Problem& p = *plan.p;
  const Share share = share_of(plan, index, plan.out_chunks, kOutChunk, p.out);
  const Block& block = share.block;
  const float* b_slot = p.b + block.slot * p.out * p.rank;
  if (block.count >= kTransposeTokens && transposed_expand_pays(p.rank)) {
    expand_many(plan, share, b_slot);
    return;
  }
  for (int64_t j = block.first; j < block.first + block.count; ++j) {
    const float* v = plan.v.data() + j * p.rank;
    expand_token(v, b_slot, p.rank, p.out, share.lo, share.hi,
                 p.delta + plan.tokens[static_cast<size_t>(j)] * p.delta_stride);
  }
}

void run_phase(const Parallel& parallel, size_t tasks, int64_t macs, void (*fn)(void*, size_t),
               Plan& plan) {
  if (tasks > 1 && macs >= kInlineMacs) {
    parallel.run(tasks, fn, &plan);
    return;
  }
  for (size_t i = 0; i < tasks; ++i) fn(&plan, i);
}

// True when scale[0, n) is all ones: the row keeps its values. Branch-free, so that it
// vectorizes: with an early exit it took longer than the multiplication it saves.
bool all_ones(const float* scale, int64_t n) {
  int differ = 0;
#pragma omp simd reduction(| : differ)
  for (int64_t i = 0; i < n; ++i) differ |= static_cast<int>(scale[i] != 1.0f);
  return differ == 0;
}

}  // namespace

void scale_rows(const ScaleProblem& p) {
  const int64_t row_floats = p.seq * p.n;
  for (int64_t row = 0; row < p.batch; ++row) {
    const int64_t slot = resolve_slot(p.ids[row], p.slots);
    const float* __restrict scale = p.scale + slot * p.n;
    const float* __restrict x = p.x + row * row_floats;
    float* __restrict y = p.y + row * row_floats;
    if (slot == 0 || all_ones(scale, p.n)) {
      std::memcpy(y, x, sizeof(float) * static_cast<size_t>(row_floats));
      continue;
    }
    for (int64_t t = 0; t < p.seq; ++t) {
#pragma omp simd
      for (int64_t i = 0; i < p.n; ++i) y[t * p.n + i] = x[t * p.n + i] * scale[i];
    }
  }
}

void forward(const Problem& p, const Parallel& parallel) {
  thread_local Plan plan;
  plan.p = &p;
  build(plan);
  if (plan.tokens.empty()) return;
  const int64_t tokens = static_cast<int64_t>(plan.tokens.size());
  const size_t blocks = plan.blocks.size();
  run_phase(parallel, blocks * static_cast<size_t>(plan.rank_chunks), tokens * p.rank * p.in,
            shrink_task, plan);
  run_phase(parallel, blocks * static_cast<size_t>(plan.out_chunks), tokens * p.rank * p.out,
            expand_task, plan);
}

}  // namespace peft_multilora_cpu
