#include "sampling.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace peft_export::detail {

std::int64_t argmax(const float* logits, std::int64_t vocab) {
  std::int64_t best = 0;
  for (std::int64_t i = 1; i < vocab; ++i) {
    if (logits[i] > logits[best] || (std::isnan(logits[i]) && !std::isnan(logits[best]))) {
      best = i;
    }
  }
  return best;
}

std::int64_t choose(const float* logits, std::int64_t vocab, const SamplingOptions& options,
                    std::mt19937_64& rng) {
  if (options.greedy()) return argmax(logits, vocab);
  std::vector<std::int64_t> order(static_cast<std::size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  auto higher = [&](std::int64_t a, std::int64_t b) { return logits[a] > logits[b]; };
  if (options.top_k > 0 && options.top_k < vocab) {
    std::partial_sort(order.begin(), order.begin() + options.top_k, order.end(), higher);
    order.resize(static_cast<std::size_t>(options.top_k));
  }
  std::stable_sort(order.begin(), order.end(), higher);
  std::vector<double> probs(order.size());
  double top = static_cast<double>(logits[order[0]]) / options.temperature;
  double sum = 0.0;
  for (std::size_t i = 0; i < order.size(); ++i) {
    probs[i] = std::exp(static_cast<double>(logits[order[i]]) / options.temperature - top);
    sum += probs[i];
  }
  std::size_t kept = probs.size();
  if (options.top_p < 1.0) {
    double cumulative = 0.0;
    for (std::size_t i = 0; i < probs.size(); ++i) {
      cumulative += probs[i] / sum;
      if (cumulative >= options.top_p) {
        kept = i + 1;
        break;
      }
    }
    sum = std::accumulate(probs.begin(), probs.begin() + static_cast<std::ptrdiff_t>(kept), 0.0);
  }
  double draw = std::uniform_real_distribution<double>(0.0, 1.0)(rng) * sum;
  double cumulative = 0.0;
  for (std::size_t i = 0; i < kept; ++i) {
    cumulative += probs[i];
    if (draw < cumulative) return order[i];
  }
  return order[kept - 1];
}

}  // namespace peft_export::detail
