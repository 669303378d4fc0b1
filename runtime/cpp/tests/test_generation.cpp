// Generation on tiny bundles exported by the fixture step: the C++ runtime's greedy ids
// equal the Python runtime's (computed by the fixture, afresh on every run), a mixed-adapter
// batch equals each row alone, the step API equals generate, and concurrent requests equal
// sequential ones. Quantized bundles (int4 runtime adapters, int8 merged) equal the Python
// runtime at the bundle's own ONNX Runtime accuracy level, at 4 and at 1.
#include <cmath>
#include <thread>

#include "fixtures.hpp"
#include "peft_export/runtime.hpp"

namespace {

using Ids = std::vector<std::vector<std::int64_t>>;

std::filesystem::path fixture_dir() {
  const char* dir = std::getenv("PEFT_EXPORT_TINY_BUNDLE");
  return dir ? dir : "";
}

struct Run {
  int quant_accuracy = -1;
  Ids token_ids;
};

// One bundle of the fixture: its rows' adapters and the Python runtime's ids per level.
struct Case {
  std::string name;
  std::vector<std::string> adapters;
  std::vector<Run> runs;
};

struct Expected {
  Ids prompts;
  std::int64_t max_new_tokens = 0;
  std::vector<Case> bundles;
  // The float bundle, with LoRA and prefix tuning, at its only run.
  std::vector<std::string> adapters;
  Ids token_ids;
};

Expected expected() {
  auto doc = fixtures::Json::parse(std::ifstream(fixture_dir() / "expected.json"));
  Expected out;
  out.prompts = doc.at("prompts").get<Ids>();
  out.max_new_tokens = doc.at("max_new_tokens").get<std::int64_t>();
  for (const auto& bundle : doc.at("bundles")) {
    Case item{bundle.at("name").get<std::string>(), {}, {}};
    for (const auto& adapter : bundle.at("adapters")) {
      item.adapters.push_back(adapter.is_null() ? "" : adapter.get<std::string>());
    }
    for (const auto& run : bundle.at("runs")) {
      item.runs.push_back({run.at("quant_accuracy").get<int>(), run.at("token_ids").get<Ids>()});
    }
    out.bundles.push_back(std::move(item));
  }
  out.adapters = out.bundles.at(0).adapters;
  out.token_ids = out.bundles.at(0).runs.at(0).token_ids;
  return out;
}

peft_export::RuntimeOptions one_thread(int quant_accuracy = -1) {
  peft_export::RuntimeOptions options;
  options.backend_options.threads = 1;
  options.backend_options.quant_accuracy = quant_accuracy;
  return options;
}

Ids generate(peft_export::Runtime& runtime, const Ids& prompts,
             const std::vector<std::string>& adapters, std::int64_t max_new_tokens,
             std::vector<std::size_t> rows) {
  std::vector<peft_export::RowRequest> requests;
  for (std::size_t row : rows) {
    peft_export::RowRequest request{prompts.at(row), "", adapters.at(row), {}};
    request.options.max_new_tokens = max_new_tokens;
    requests.push_back(request);
  }
  Ids out;
  for (const auto& row : runtime.generate(requests).rows) out.push_back(row.token_ids);
  return out;
}

Ids generate(peft_export::Runtime& runtime, const Expected& e, std::vector<std::size_t> rows) {
  return generate(runtime, e.prompts, e.adapters, e.max_new_tokens, std::move(rows));
}

// The prefill's last-position logits of every row of `c` at `quant_accuracy`.
std::vector<float> prefill_logits(const Expected& e, const Case& c, int quant_accuracy) {
  peft_export::Runtime runtime(fixture_dir() / c.name, one_thread(quant_accuracy));
  return runtime.start(e.prompts, c.adapters, 1)->prefill();
}

float max_abs_difference(const std::vector<float>& a, const std::vector<float>& b) {
  float gap = 0;
  for (std::size_t i = 0; i < a.size(); ++i) gap = std::max(gap, std::fabs(a[i] - b.at(i)));
  return gap;
}

}  // namespace

TEST(batch_equals_python_runtime_and_rows_alone) {
  Expected e = expected();
  peft_export::Runtime runtime(fixture_dir() / "bundle", one_thread());
  CHECK(generate(runtime, e, {0, 1, 2}) == e.token_ids);
  for (std::size_t row = 0; row < e.prompts.size(); ++row) {
    CHECK(generate(runtime, e, {row}).at(0) == e.token_ids[row]);
  }
}

TEST(step_api_equals_generate) {
  Expected e = expected();
  peft_export::Runtime runtime(fixture_dir() / "bundle", one_thread());
  auto batch = runtime.start({e.prompts[1]}, {e.adapters[1]}, e.max_new_tokens);
  std::vector<std::int64_t> tokens;
  const std::vector<float>* logits = &batch->prefill();
  for (std::int64_t step = 0; step < e.max_new_tokens; ++step) {
    std::int64_t best = 0;
    for (std::int64_t i = 1; i < batch->vocab(); ++i) {
      if ((*logits)[static_cast<std::size_t>(i)] > (*logits)[static_cast<std::size_t>(best)]) best = i;
    }
    tokens.push_back(best);
    if (step + 1 < e.max_new_tokens) logits = &batch->decode({best});
  }
  auto eos = runtime.manifest().tokenizer.eos_token_ids;
  auto end = std::find_first_of(tokens.begin(), tokens.end(), eos.begin(), eos.end());
  if (end != tokens.end()) tokens.erase(end + 1, tokens.end());
  CHECK(tokens == e.token_ids[1]);
  CHECK_THROWS(batch->prefill(), peft_export::InferenceError, "prefill runs once");
}

TEST(concurrent_requests_equal_sequential) {
  Expected e = expected();
  peft_export::Runtime runtime(fixture_dir() / "bundle", one_thread());
  std::vector<Ids> results(6);
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < results.size(); ++t) {
    threads.emplace_back([&, t] { results[t] = generate(runtime, e, {t % 3}); });
  }
  for (auto& thread : threads) thread.join();
  for (std::size_t t = 0; t < results.size(); ++t) CHECK(results[t].at(0) == e.token_ids[t % 3]);
}

TEST(requests_the_bundle_cannot_serve_are_refused) {
  Expected e = expected();
  peft_export::Runtime runtime(fixture_dir() / "bundle", one_thread());
  peft_export::RowRequest request{{1, 2, 3}, "", "missing", {}};
  CHECK_THROWS(runtime.generate({request}), peft_export::InferenceError, "unknown adapter 'missing'");
  request.adapter = "";
  request.prompt_ids = {1, 999999};
  CHECK_THROWS(runtime.generate({request}), peft_export::InferenceError, "outside [0, ");
  request.prompt_ids = {1, 2};
  request.options.top_p = 0;
  CHECK_THROWS(runtime.generate({request}), peft_export::InferenceError, "top_p must be in (0, 1]");
}

TEST(quantized_bundles_equal_python_runtime_at_each_accuracy_level) {
  Expected e = expected();
  CHECK(e.bundles.size() == 3);
  for (const Case& c : e.bundles) {
    for (const Run& run : c.runs) {
      peft_export::Runtime runtime(fixture_dir() / c.name, one_thread(run.quant_accuracy));
      bool quantized = runtime.manifest().quantization.has_value();
      CHECK(quantized == (c.name != "bundle"));
      Ids batch = generate(runtime, e.prompts, c.adapters, e.max_new_tokens, {0, 1, 2});
      if (batch != run.token_ids) {
        std::cerr << c.name << " at quant_accuracy " << run.quant_accuracy
                  << ": ids differ from the Python runtime's\n";
      }
      CHECK(batch == run.token_ids);
      for (std::size_t row = 0; row < e.prompts.size(); ++row) {
        CHECK(generate(runtime, e.prompts, c.adapters, e.max_new_tokens, {row}).at(0) ==
              run.token_ids[row]);
      }
    }
  }
}

TEST(accuracy_level_reaches_onnx_runtime) {
  // Level 4 quantizes activations to int8, level 1 does not: their logits differ a little.
  // The bundle's own level (-1) is 4 and must give level 4's logits exactly.
  Expected e = expected();
  for (const Case& c : e.bundles) {
    if (c.name == "bundle") continue;
    CHECK(peft_export::load_manifest(fixture_dir() / c.name).quantization->accuracy_level == 4);
    auto own = prefill_logits(e, c, -1);
    auto fast = prefill_logits(e, c, 4);
    auto exact = prefill_logits(e, c, 1);
    CHECK(max_abs_difference(own, fast) == 0.0f);
    float gap = max_abs_difference(fast, exact);
    if (!(gap > 0.0f && gap < 0.25f)) std::cerr << c.name << ": level 4 vs 1 gap " << gap << "\n";
    CHECK(gap > 0.0f && gap < 0.25f);
  }
}

int main() {
  if (!std::filesystem::exists(fixture_dir() / "expected.json")) {
    std::cerr << "no tiny bundle (exporter not installed); skipping\n";
    return 77;
  }
  return check::run_all();
}
