// Next-token choice per row (private header): greedy, or temperature / top-k / top-p.
#pragma once

#include <cstdint>
#include <random>

#include "peft_export/runtime.hpp"

namespace peft_export::detail {

// Greedy rows take the first maximum, exactly like numpy.argmax in the Python runtime.
std::int64_t argmax(const float* logits, std::int64_t vocab);

std::int64_t choose(const float* logits, std::int64_t vocab, const SamplingOptions& options,
                    std::mt19937_64& rng);

}  // namespace peft_export::detail
