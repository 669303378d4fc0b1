// Encoder bundles: the fixture's tiny BERT classifier with two LoRA adapters whose heads have
// different label sets. A mixed batch equals PyTorch/PEFT's logits for each row's adapter
// (computed by the fixture step, afresh on every run) and each row run alone; labels come
// from each adapter's file; requests it cannot serve are refused with the fix.
#include <algorithm>
#include <cmath>
#include <thread>

#include "fixtures.hpp"
#include "peft_export/encoder.hpp"
#include "peft_export/runtime.hpp"

namespace {

constexpr float kTolerance = 1e-4f;

std::filesystem::path fixture_dir() {
  const char* dir = std::getenv("PEFT_EXPORT_TINY_BUNDLE");
  return dir ? dir : "";
}

struct Row {
  peft_export::EncoderRow request;
  std::vector<std::string> labels;
  std::vector<float> logits;  // PyTorch/PEFT's
};

std::vector<Row> expected_rows() {
  auto doc = fixtures::Json::parse(std::ifstream(fixture_dir() / "expected.json"));
  std::vector<Row> rows;
  for (const auto& item : doc.at("encoder")) {
    Row row;
    row.request.input_ids = item.at("input_ids").get<std::vector<std::int64_t>>();
    if (!item.at("adapter").is_null()) row.request.adapter = item.at("adapter").get<std::string>();
    row.labels = item.at("labels").get<std::vector<std::string>>();
    row.logits = item.at("logits").get<std::vector<float>>();
    rows.push_back(std::move(row));
  }
  return rows;
}

peft_export::EncoderOptions one_thread(int slots = 0) {
  peft_export::EncoderOptions options;
  options.backend_options.threads = 1;
  options.slots = slots;
  return options;
}

std::vector<peft_export::EncoderRow> requests(const std::vector<Row>& rows) {
  std::vector<peft_export::EncoderRow> out;
  for (const Row& row : rows) out.push_back(row.request);
  return out;
}

float gap(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  float most = 0;
  for (std::size_t i = 0; i < a.size(); ++i) most = std::max(most, std::fabs(a[i] - b[i]));
  return most;
}

}  // namespace

TEST(mixed_batch_equals_peft_and_rows_alone) {
  std::vector<Row> rows = expected_rows();
  CHECK(rows.size() == 4);
  peft_export::Encoder encoder(fixture_dir() / "encoder", one_thread());
  CHECK(encoder.task() == "sequence-classification");
  auto results = encoder.run(requests(rows));
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto& logits = results[i].outputs.at("logits").values;
    float difference = gap(logits, rows[i].logits);
    if (!(difference <= kTolerance)) std::cerr << "row " << i << ": gap " << difference << "\n";
    CHECK(difference <= kTolerance);
    CHECK(results[i].labels == rows[i].labels);
    auto top = std::max_element(rows[i].logits.begin(), rows[i].logits.end()) - rows[i].logits.begin();
    CHECK(results[i].best().label == rows[i].labels[static_cast<std::size_t>(top)]);
    auto alone = encoder.run({rows[i].request});
    CHECK(gap(alone[0].outputs.at("logits").values, logits) <= 1e-5f);
  }
}

TEST(two_slots_swap_adapters_between_graph_calls) {
  std::vector<Row> rows = expected_rows();
  peft_export::Encoder encoder(fixture_dir() / "encoder", one_thread(2));
  auto results = encoder.run(requests(rows));
  for (std::size_t i = 0; i < rows.size(); ++i) {
    CHECK(gap(results[i].outputs.at("logits").values, rows[i].logits) <= kTolerance);
  }
  CHECK(encoder.adapters().swaps() >= 2);
}

TEST(concurrent_requests_equal_sequential) {
  std::vector<Row> rows = expected_rows();
  peft_export::Encoder encoder(fixture_dir() / "encoder", one_thread(2));
  std::vector<std::vector<float>> got(8);
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < got.size(); ++t) {
    threads.emplace_back([&, t] {
      got[t] = encoder.run({rows[t % rows.size()].request})[0].outputs.at("logits").values;
    });
  }
  for (auto& thread : threads) thread.join();
  for (std::size_t t = 0; t < got.size(); ++t) {
    CHECK(gap(got[t], rows[t % rows.size()].logits) <= kTolerance);
  }
}

TEST(requests_the_bundle_cannot_serve_are_refused) {
  std::vector<Row> rows = expected_rows();
  peft_export::Encoder encoder(fixture_dir() / "encoder", one_thread());
  peft_export::EncoderRow row = rows[0].request;
  row.adapter = "missing";
  CHECK_THROWS(encoder.run({row}), peft_export::InferenceError, "unknown adapter 'missing'");
  row.adapter = "";
  row.input_ids = {2, 999999, 3};
  CHECK_THROWS(encoder.run({row}), peft_export::InferenceError, "token ids outside [0, ");
  row.input_ids = {2, 3};
  row.attention_mask = {1};
  CHECK_THROWS(encoder.run({row}), peft_export::InferenceError, "attention_mask has 1 entries");
  CHECK_THROWS(encoder.run({}), peft_export::InferenceError, "no rows given");
  CHECK_THROWS(peft_export::Runtime(fixture_dir() / "encoder"), peft_export::InferenceError,
               "open it with peft_export::Encoder");
  CHECK_THROWS(peft_export::Encoder(fixture_dir() / "bundle"), peft_export::InferenceError,
               "decoder (generation) bundle");
}

int main() {
  if (!std::filesystem::exists(fixture_dir() / "expected.json")) {
    std::cerr << "no tiny bundle (exporter not installed); skipping\n";
    return 77;
  }
  return check::run_all();
}
