// The C++ runtime: open a bundle, serve many adapters from one copy of the base weights.
//
//   peft_export::Runtime runtime("bundle/");
//   auto result = runtime.generate({{.prompt_ids = {1, 42, 7}, .adapter = "fr"}});
//
// A Runtime is safe to share between threads: every request keeps its own KV cache, and the
// adapter store hands out bank slots under a lock without disturbing running requests.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "peft_export/adapter_store.hpp"
#include "peft_export/backend.hpp"
#include "peft_export/errors.hpp"
#include "peft_export/manifest.hpp"
#include "peft_export/tokenizer.hpp"

namespace peft_export {

// How one row picks its next tokens; temperature 0 (the default) is greedy.
struct SamplingOptions {
  std::int64_t max_new_tokens = 64;
  double temperature = 0.0;
  std::int64_t top_k = 0;  // 0 keeps all tokens
  double top_p = 1.0;      // 1.0 keeps all tokens
  std::optional<std::uint64_t> seed;
  std::vector<std::int64_t> stop_token_ids;  // besides the bundle's EOS tokens
  bool ignore_eos = false;

  bool greedy() const { return temperature == 0.0; }
  void validate() const;  // throws InferenceError with the fix
};

struct RowRequest {
  std::vector<std::int64_t> prompt_ids;  // used as given when non-empty
  std::string text;                      // tokenized when prompt_ids is empty (needs a tokenizer)
  std::string adapter;                   // "" for the base model (or the merged adapter)
  SamplingOptions options;
};

struct RowResult {
  std::vector<std::int64_t> prompt_ids;
  std::vector<std::int64_t> token_ids;  // including the EOS / stop token that ended the row
  std::string text;                     // decoded when a tokenizer is set
  std::string finish_reason;            // "eos", "stop_token" or "length"
};

struct GenerationResult {
  std::vector<RowResult> rows;
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
  std::int64_t steps = 0;
};

struct TokenEvent {
  std::size_t row = 0;
  std::int64_t token_id = 0;
  bool finished = false;
};
using StreamCallback = std::function<void(const TokenEvent&)>;

struct RuntimeOptions {
  std::string backend = "ort";  // "ort" or "tensorrt"
  BackendOptions backend_options;
  bool load_tokenizer = true;  // use the bundle's tokenizer.json when it is byte-level BPE
  int slots = 0;  // adapter bank slots incl. slot 0; 0: the manifest's (at least 2)
};

class Batch;

class Runtime {
 public:
  explicit Runtime(const std::filesystem::path& bundle_dir, RuntimeOptions options = {});
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  const Manifest& manifest() const { return manifest_; }
  const std::filesystem::path& bundle_dir() const { return bundle_dir_; }
  AdapterStore& adapters() { return *store_; }
  Backend& backend() { return *backend_; }
  std::int64_t pad_token_id() const;

  void set_tokenizer(std::shared_ptr<const Tokenizer> tokenizer) { tokenizer_ = std::move(tokenizer); }
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }

  // Runs one batch to completion (left-padded rows, each with its own adapter and options).
  GenerationResult generate(const std::vector<RowRequest>& rows,
                            const StreamCallback& stream = {});

  // Starts a batch for step-by-step use (prefill, then decode steps).
  std::unique_ptr<Batch> start(const std::vector<std::vector<std::int64_t>>& prompt_ids,
                               const std::vector<std::string>& adapters,
                               std::int64_t max_new_tokens);

 private:
  friend class Batch;
  std::vector<std::int64_t> prompt_of(const RowRequest& row, std::size_t index) const;

  std::filesystem::path bundle_dir_;
  Manifest manifest_;
  std::unique_ptr<AdapterBanks> banks_;
  std::unique_ptr<AdapterStore> store_;
  std::unique_ptr<Backend> backend_;
  std::shared_ptr<const Tokenizer> tokenizer_;
};

// One running batch: owns its adapter slots and KV cache until destroyed.
class Batch {
 public:
  ~Batch();
  std::int64_t rows() const { return batch_; }
  std::int64_t vocab() const { return vocab_; }
  std::int64_t past_len() const { return past_len_; }
  // The first step over the prompts; returns the last position's logits [rows, vocab].
  const std::vector<float>& prefill();
  // One decode step feeding one token per row; returns the new logits [rows, vocab].
  const std::vector<float>& decode(const std::vector<std::int64_t>& tokens);

 private:
  friend class Runtime;
  struct PromptSide;
  Batch(Runtime& runtime, const std::vector<std::vector<std::int64_t>>& prompt_ids,
        const std::vector<std::string>& adapters, std::int64_t max_new_tokens);
  void run(const std::vector<std::int64_t>& step_ids, std::int64_t step_len);

  Runtime& runtime_;
  AdapterStore::Lease lease_;
  std::unique_ptr<KVState> state_;
  std::unique_ptr<PromptSide> prompt_side_;
  std::int64_t batch_ = 0;
  std::int64_t vocab_ = 0;
  std::int64_t text_len_ = 0;
  std::int64_t capacity_ = 0;
  std::int64_t past_len_ = 0;
  std::int64_t step_ = 0;
  std::vector<std::int64_t> input_ids_;  // [rows, text_len], left-padded
  std::vector<std::int64_t> mask_;       // [rows, capacity]: prefix | prompt | text | new
  std::vector<float> logits_;
};

}  // namespace peft_export
