// Encoder (BERT-family) bundles in C++: classify, tag, answer and embed with many adapters and
// their task heads in one batch, as the Python runtime's EncoderBundle (runtime/encoder.py).
//
//   peft_export::Encoder encoder("bundle/");
//   std::vector<peft_export::EncoderRow> rows(2);
//   rows[0].input_ids = {2, 12, 9, 3};
//   rows[0].adapter = "sentiment";
//   rows[1].input_ids = {2, 40, 3};
//   rows[1].adapter = "topic";
//   encoder.run(rows)[0].best().label;  // from the adapter's id2label
//
// Rows carry token ids: tokenize with the bundle's tokenizer.json on the caller's side (this
// runtime has no WordPiece tokenizer). Each row names its adapter ("" for the base); its slot
// holds the adapter's LoRA-family deltas and its trained head, so rows with different tasks and
// label sets run in one graph call. An Encoder is safe to share between threads.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "peft_export/adapter_store.hpp"
#include "peft_export/backend.hpp"
#include "peft_export/manifest.hpp"

namespace peft_export {

struct EncoderOptions {
  BackendOptions backend_options;  // ONNX Runtime: threads, denormals, optimization, kernels
  int slots = 0;  // bank slots incl. slot 0; 0: the manifest's (at least 2)
};

struct EncoderRow {
  std::vector<std::int64_t> input_ids;       // with the special tokens, e.g. [CLS] ... [SEP]
  std::vector<std::int64_t> attention_mask;  // empty: all ones
  std::vector<std::int64_t> token_type_ids;  // empty: zeros (pairs: 1 for the second text)
  std::string adapter;                       // "" for the base model (or the merged adapter)
};

// One output of one row: padding cut off (token positions past the row, labels past its
// adapter's own label count).
struct RowTensor {
  std::vector<std::int64_t> shape;
  std::vector<float> values;
};

struct Prediction {
  std::int64_t id = 0;
  std::string label;
  float score = 0.0f;  // softmax probability over the adapter's own labels
};

struct AnswerSpan {
  std::int64_t start = 0;  // token positions, inclusive
  std::int64_t end = 0;
  float score = 0.0f;  // start probability x end probability
};

struct EncoderResult {
  std::string adapter;
  std::vector<std::string> labels;  // labelled tasks: this row's labels, in id order
  // Graph outputs by name: "logits" [labels] or [tokens, labels], "start_logits" and
  // "end_logits" [tokens], "embeddings" [hidden] (pooled in the graph as the model pools).
  std::map<std::string, RowTensor> outputs;

  // Sequence classification: the best label. Token classification: `position`'s.
  Prediction best(std::int64_t position = 0) const;
  // softmax over this row's labels (at `position` for token classification).
  std::vector<float> scores(std::int64_t position = 0) const;
  // Question answering: the best span with start <= end < start + max_tokens, among positions
  // where `allowed` is nonzero (empty: every position), as the Python runtime scores it.
  AnswerSpan answer(const std::vector<std::int64_t>& allowed = {},
                    std::int64_t max_tokens = 30) const;
};

class EncoderSession;  // the graph on ONNX Runtime (src/ort_encoder.cpp)

class Encoder {
 public:
  explicit Encoder(const std::filesystem::path& bundle_dir, EncoderOptions options = {});
  ~Encoder();
  Encoder(const Encoder&) = delete;
  Encoder& operator=(const Encoder&) = delete;

  const Manifest& manifest() const { return manifest_; }
  const EncoderInfo& info() const { return *manifest_.encoder; }
  const std::string& task() const { return info().task; }
  AdapterStore& adapters() { return *store_; }

  // The labels rows with `adapter` get ("" for the base head's).
  std::vector<std::string> labels(const std::string& adapter);

  // Runs the rows (right-padded into one batch per prompt length, at most slots - 1 distinct
  // adapters per graph call) and returns each row's outputs, in order.
  std::vector<EncoderResult> run(const std::vector<EncoderRow>& rows);

 private:
  std::vector<std::string> labels_of(const std::string& adapter, const HostAdapter* host) const;
  std::string canonical(const std::string& adapter) const;
  void check_row(const EncoderRow& row, std::size_t index, std::int64_t prompt_len) const;
  void run_chunk(const std::vector<EncoderRow>& rows, const std::vector<std::size_t>& chunk,
                 std::vector<EncoderResult>& results);

  std::filesystem::path bundle_dir_;
  Manifest manifest_;
  std::unique_ptr<AdapterBanks> banks_;
  std::unique_ptr<AdapterStore> store_;
  std::unique_ptr<EncoderSession> session_;
};

}  // namespace peft_export
