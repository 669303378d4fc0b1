/*
 * CPU (fp32) implementation of peft_export::MultiLoRA, behind ONNX Runtime's custom-op
 * library (multiLoRAOrtOp.cpp). Plain C++, no ONNX Runtime include, so it can be tested and
 * reused on its own.
 *
 *   delta[b, t, :] = B[ids[b]] @ (A[ids[b]] @ x[b, t, :])
 *
 * Why it exists: the op's ONNX function body gathers every row's adapter into a fresh
 * tensor each step, so a decode step copies the adapter weights before reading them. This
 * reads each slot's weights in place, once for all the tokens that use that slot.
 */
#ifndef PEFT_MULTILORA_CPU_H
#define PEFT_MULTILORA_CPU_H

#include <cstddef>
#include <cstdint>

namespace peft_multilora_cpu {

struct Problem {
  const float* x;       // [batch, seq, in]
  const float* a;       // [slots, rank, in]
  const float* b;       // [slots, out, rank]
  const int64_t* ids;   // [batch]; negative counts from the end; 0 or out of range: zeros
  float* delta;         // [batch, seq, out], token rows delta_stride floats apart
  int64_t batch, seq, in, out, rank, slots;
  int64_t delta_stride;  // >= out; > out writes into a slice of a wider (packed) output
};

/* The host's thread pool: runs fn(arg, i) for every i in [0, count) and returns when all
 * have run. */
class Parallel {
 public:
  virtual void run(size_t count, void (*fn)(void*, size_t), void* arg) const = 0;

 protected:
  ~Parallel() = default;
};

/* Computes p.delta. Sizes must be non-negative and consistent (the caller checks shapes). */
void forward(const Problem& p, const Parallel& parallel);

/* Per-row scales of DoRA and IA3 (peft_export::SlotScale):
 *
 *   y[b, t, :] = x[b, t, :] * scale[ids[b], :]
 *
 * Slot 0 (the base model) holds ones, and so does every slot whose adapter has no scales
 * (plain LoRA): rows of such slots, and ids outside [0, slots), are copied, not multiplied. */
struct ScaleProblem {
  const float* x;      // [batch, seq, n]
  const float* scale;  // [slots, n]
  const int64_t* ids;  // [batch]; negative counts from the end
  float* y;            // [batch, seq, n]
  int64_t batch, seq, n, slots;
};

void scale_rows(const ScaleProblem& p);

}  // namespace peft_multilora_cpu

#endif  // PEFT_MULTILORA_CPU_H
