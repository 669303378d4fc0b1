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
// Shrink work is split over ranks (decode has one token per row), expand work over outputs.
constexpr int64_t kRankChunk = 4;
constexpr int64_t kOutChunk = 128;
// Below this many multiply-adds a phase runs on the calling thread: waking the pool costs more.
constexpr int64_t kInlineMacs = 1 << 14;
// Software prefetch distances: A rows ahead in the shrink, B rows ahead in the expand. Each
// slot's weights come from memory every decode step (the base weights evict them) in short
// runs the hardware prefetcher is slow to pick up; reading ahead took a decode step's
// kernel time from ~0.9 to ~0.75 ms (SmolLM2, all-linear rank 16) here.
constexpr int64_t kPrefetchRows = 2;
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

// dst[o] = b[o, :] . v for o in [o0, o1) of b's `rows` rows. b rows are rank long, and
// short: vectorizing across rows (eight at a time) beats one horizontal sum per output.
void expand_token(const float* v, const float* b, int64_t rank, int64_t rows, int64_t o0,
                  int64_t o1, float* dst) {
  int64_t o = o0;
  prefetch(b + o0 * rank, std::min(kPrefetchOutputs, o1 - o0) * rank);
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

// Active tokens ordered by slot, cut into blocks; v holds A @ x per active token.
struct Plan {
  const Problem* p;
  std::vector<int64_t> tokens;  // global token index (row * seq + t)
  std::vector<Block> blocks;
  std::vector<float> v;         // [tokens.size(), rank]
  int64_t rank_chunks;
  int64_t out_chunks;
};

int64_t resolve_slot(int64_t id, int64_t slots) {
  const int64_t slot = id < 0 ? id + slots : id;
  return (slot > 0 && slot < slots) ? slot : 0;
}

void build(Plan& plan) {
  const Problem& p = *plan.p;
  std::vector<std::pair<int64_t, int64_t>> rows;  // (slot, row)
  for (int64_t row = 0; row < p.batch; ++row) {
    const int64_t slot = resolve_slot(p.ids[row], p.slots);
    if (slot == 0) {
      std::memset(p.delta + row * p.seq * p.out, 0, sizeof(float) * p.seq * p.out);
    } else {
      rows.emplace_back(slot, row);
    }
  }
  std::stable_sort(rows.begin(), rows.end(),
                   [](const auto& l, const auto& r) { return l.first < r.first; });
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
  plan.v.assign(plan.tokens.size() * static_cast<size_t>(p.rank), 0.0f);
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

void shrink_task(void* arg, size_t index) {
  Plan& plan = *static_cast<Plan*>(arg);
  const Problem& p = *plan.p;
  const Share share = share_of(plan, index, plan.rank_chunks, kRankChunk, p.rank);
  const Block& block = share.block;
  const float* a_slot = p.a + block.slot * p.rank * p.in;
  prefetch(a_slot + share.lo * p.in, std::min(kPrefetchRows, share.hi - share.lo) * p.in);
  for (int64_t k = share.lo; k < share.hi; ++k) {
    const float* a_row = a_slot + k * p.in;
    if (k + kPrefetchRows < p.rank) prefetch(a_row + kPrefetchRows * p.in, p.in);
    for (int64_t j = block.first; j < block.first + block.count; ++j) {
      plan.v[static_cast<size_t>(j * p.rank + k)] =
          dot(p.x + plan.tokens[static_cast<size_t>(j)] * p.in, a_row, p.in);
    }
  }
}

void expand_task(void* arg, size_t index) {
  Plan& plan = *static_cast<Plan*>(arg);
  const Problem& p = *plan.p;
  const Share share = share_of(plan, index, plan.out_chunks, kOutChunk, p.out);
  const Block& block = share.block;
  const float* b_slot = p.b + block.slot * p.out * p.rank;
  for (int64_t j = block.first; j < block.first + block.count; ++j) {
    const float* v = plan.v.data() + j * p.rank;
    expand_token(v, b_slot, p.rank, p.out, share.lo, share.hi,
                 p.delta + plan.tokens[static_cast<size_t>(j)] * p.out);
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

}  // namespace

void forward(const Problem& p, const Parallel& parallel) {
  Plan plan{&p, {}, {}, {}, 0, 0};
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
