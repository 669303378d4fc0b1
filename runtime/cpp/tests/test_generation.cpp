// Generation on a tiny bundle exported by the fixture step: the C++ runtime's greedy ids
// equal the Python runtime's (computed by the fixture), a mixed-adapter batch equals each row
// alone, the step API equals generate, and concurrent requests equal sequential ones.
#include <thread>

#include "fixtures.hpp"
#include "peft_export/runtime.hpp"

namespace {

std::filesystem::path fixture_dir() {
  const char* dir = std::getenv("PEFT_EXPORT_TINY_BUNDLE");
  return dir ? dir : "";
}

struct Expected {
  std::vector<std::vector<std::int64_t>> prompts;
  std::vector<std::string> adapters;
  std::int64_t max_new_tokens = 0;
  std::vector<std::vector<std::int64_t>> token_ids;
};

Expected expected() {
  auto doc = fixtures::Json::parse(std::ifstream(fixture_dir() / "expected.json"));
  Expected out;
  out.prompts = doc["prompts"].get<std::vector<std::vector<std::int64_t>>>();
  for (const auto& adapter : doc["adapters"]) out.adapters.push_back(adapter.is_null() ? "" : adapter.get<std::string>());
  out.max_new_tokens = doc["max_new_tokens"].get<std::int64_t>();
  out.token_ids = doc["token_ids"].get<std::vector<std::vector<std::int64_t>>>();
  return out;
}

peft_export::RuntimeOptions one_thread() {
  peft_export::RuntimeOptions options;
  options.backend_options.threads = 1;
  return options;
}

std::vector<std::vector<std::int64_t>> generate(peft_export::Runtime& runtime, const Expected& e,
                                                std::vector<std::size_t> rows) {
  std::vector<peft_export::RowRequest> requests;
  for (std::size_t row : rows) {
    peft_export::RowRequest request{e.prompts[row], "", e.adapters[row], {}};
    request.options.max_new_tokens = e.max_new_tokens;
    requests.push_back(request);
  }
  std::vector<std::vector<std::int64_t>> out;
  for (const auto& row : runtime.generate(requests).rows) out.push_back(row.token_ids);
  return out;
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
  std::vector<std::vector<std::vector<std::int64_t>>> results(6);
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

int main() {
  if (!std::filesystem::exists(fixture_dir() / "expected.json")) {
    std::cerr << "no tiny bundle (exporter not installed); skipping\n";
    return 77;
  }
  return check::run_all();
}
