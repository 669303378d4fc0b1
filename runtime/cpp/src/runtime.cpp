#include "peft_export/runtime.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <set>

#include "sampling.hpp"

namespace peft_export {
namespace {

constexpr const char* kPrefixTuning = "prefix_tuning";
constexpr const char* kAdaptionPrompt = "adaption_prompt";

bool is_prompt_embed_method(const std::string& method) {
  return method == "prompt_tuning" || method == "p_tuning" || method == "cpt";
}

// Graph inputs of docs/bundle-format.md this runtime does not feed (Python runtime only):
// refused when the bundle opens, not at the first step.
void refuse_unfed_inputs(const Manifest& manifest) {
  for (const TensorSpec& input : manifest.graph.inputs) {
    if (input.name.rfind("tokens.", 0) == 0 || input.name == "alora_start") {
      throw InferenceError("graph input '" + input.name +
                           "' (trainable tokens / activated LoRA) is not fed by the C++ "
                           "runtime; serve this bundle with the Python runtime, or re-export "
                           "it without --extra-tokens, --token-rows, --head-rank and --alora");
    }
  }
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Left-aligned copy of `len` rows of `row_bytes` into the last `len` of `total` rows.
void copy_right_aligned(std::byte* dst, std::int64_t total, const std::byte* src, std::int64_t len,
                        std::size_t row_bytes) {
  std::memcpy(dst + static_cast<std::size_t>(total - len) * row_bytes, src,
              static_cast<std::size_t>(len) * row_bytes);
}

}  // namespace

void SamplingOptions::validate() const {
  if (max_new_tokens < 0) {
    throw InferenceError("max_new_tokens must be 0 or more; pass a non-negative count");
  }
  if (temperature < 0) throw InferenceError("temperature must be >= 0 (0 is greedy); pass e.g. 0.7");
  if (top_k < 0) throw InferenceError("top_k must be >= 0 (0 keeps all tokens); pass e.g. 50");
  if (!(top_p > 0.0 && top_p <= 1.0)) {
    throw InferenceError("top_p must be in (0, 1]; pass e.g. 0.9 (1.0 keeps all tokens)");
  }
}

// Prompt-side adapter feeds of one batch (prefix KV, prompt embeddings, AdaptionPrompt),
// each row's part right-aligned with mask 0 in front, as the Python runtime builds them.
struct Batch::PromptSide {
  std::int64_t prefix_len = 0;
  std::int64_t prompt_len = 0;
  std::vector<std::int64_t> prefix_mask;  // [rows, prefix_len]
  std::vector<std::int64_t> prompt_mask;  // [rows, prompt_len]
  std::map<std::string, HostTensor> first_step;  // prefix past, prompt embeddings
  std::map<std::string, HostTensor> every_step;  // AdaptionPrompt feeds
  HostTensor no_prompt;                          // prompt_embeds of later steps: [rows, 0, hidden]

  PromptSide(const Manifest& manifest, const std::vector<std::shared_ptr<const HostAdapter>>& rows);

  void feeds(std::int64_t step, std::map<std::string, TensorRef>& extra) const {
    for (const auto& [name, tensor] : every_step) extra[name] = {tensor.dtype, tensor.shape, tensor.data.data()};
    if (step == 0) {
      for (const auto& [name, tensor] : first_step) extra[name] = {tensor.dtype, tensor.shape, tensor.data.data()};
    } else if (!no_prompt.shape.empty()) {
      extra["prompt_embeds"] = {no_prompt.dtype, no_prompt.shape, nullptr};
    }
  }
};

Batch::PromptSide::PromptSide(const Manifest& manifest,
                              const std::vector<std::shared_ptr<const HostAdapter>>& rows) {
  const KVLayout& kv = manifest.kv;
  const AdapterLayout& layout = manifest.adapters;
  auto batch = static_cast<std::int64_t>(rows.size());
  auto method_is = [](const std::shared_ptr<const HostAdapter>& row, auto predicate) {
    return row != nullptr && predicate(row->method);
  };
  auto is_prefix = [](const std::string& m) { return m == kPrefixTuning; };
  auto is_adaption = [](const std::string& m) { return m == kAdaptionPrompt; };
  for (const auto& row : rows) {
    if (method_is(row, is_prefix)) prefix_len = std::max(prefix_len, row->prefix_len());
    if (method_is(row, is_prompt_embed_method)) prompt_len = std::max(prompt_len, row->prompt_len());
  }
  auto left_mask = [&](auto predicate, std::int64_t length, auto row_len) {
    std::vector<std::int64_t> mask(static_cast<std::size_t>(batch * length), 0);
    for (std::int64_t b = 0; b < batch; ++b) {
      const auto& row = rows[static_cast<std::size_t>(b)];
      if (!method_is(row, predicate)) continue;
      for (std::int64_t i = length - row_len(*row); i < length; ++i) mask[static_cast<std::size_t>(b * length + i)] = 1;
    }
    return mask;
  };
  prefix_mask = left_mask(is_prefix, prefix_len, [](const HostAdapter& a) { return a.prefix_len(); });
  prompt_mask = left_mask(is_prompt_embed_method, prompt_len, [](const HostAdapter& a) { return a.prompt_len(); });

  std::size_t kv_item = dtype_size(kv.dtype);
  auto head_rows = static_cast<std::size_t>(kv.head_dim) * kv_item;
  if (prefix_len > 0) {
    for (int layer = 0; layer < kv.num_layers; ++layer) {
      for (const char* kind : {"key", "value"}) {
        std::string source = "prefix." + std::to_string(layer) + "." + kind;
        HostTensor past{kv.dtype, {batch, kv.num_kv_heads, prefix_len, kv.head_dim}, {}};
        past.data.resize(static_cast<std::size_t>(element_count(past.shape)) * kv_item);
        for (std::int64_t b = 0; b < batch; ++b) {
          const auto& row = rows[static_cast<std::size_t>(b)];
          if (!method_is(row, is_prefix)) continue;
          const HostTensor& t = row->tensors.at(source);
          std::int64_t len = t.shape[1];
          for (std::int64_t h = 0; h < kv.num_kv_heads; ++h) {
            copy_right_aligned(past.data.data() + static_cast<std::size_t>((b * kv.num_kv_heads + h) * prefix_len) * head_rows,
                               prefix_len, t.data.data() + static_cast<std::size_t>(h * len) * head_rows, len, head_rows);
          }
        }
        first_step["past_key_values." + std::to_string(layer) + "." + kind] = std::move(past);
      }
    }
  }
  if (layout.prompt_max_len > 0) {
    const TensorSpec* spec = manifest.graph.input("prompt_embeds");
    DType dtype = spec ? spec->dtype : kv.dtype;
    std::size_t row_bytes = static_cast<std::size_t>(manifest.hidden_size) * dtype_size(dtype);
    HostTensor embeds{dtype, {batch, prompt_len, manifest.hidden_size}, {}};
    embeds.data.resize(static_cast<std::size_t>(batch * prompt_len) * row_bytes);
    for (std::int64_t b = 0; b < batch; ++b) {
      const auto& row = rows[static_cast<std::size_t>(b)];
      if (!method_is(row, is_prompt_embed_method)) continue;
      const HostTensor& t = row->tensors.at("prompt_embeds");
      copy_right_aligned(embeds.data.data() + static_cast<std::size_t>(b * prompt_len) * row_bytes,
                         prompt_len, t.data.data(), t.shape[0], row_bytes);
    }
    first_step["prompt_embeds"] = std::move(embeds);
    no_prompt = HostTensor{dtype, {batch, 0, manifest.hidden_size}, {}};
  }
  if (layout.adaption_max_len > 0) {
    std::int64_t length = 0;
    for (const auto& row : rows) {
      if (method_is(row, is_adaption)) length = std::max(length, row->adaption_len());
    }
    length = std::max<std::int64_t>(length, 1);
    HostTensor mask{DType::kInt64, {batch, length}, {}};
    auto mask_values = left_mask(is_adaption, length, [](const HostAdapter& a) { return a.adaption_len(); });
    mask.data.resize(mask_values.size() * sizeof(std::int64_t));
    std::memcpy(mask.data.data(), mask_values.data(), mask.data.size());
    every_step["adaption_mask"] = std::move(mask);
    for (int layer = 0; layer < kv.num_layers; ++layer) {
      std::string prefix = "adaption." + std::to_string(layer) + ".";
      const TensorSpec* spec = manifest.graph.input(prefix + "key");
      DType dtype = spec ? spec->dtype : kv.dtype;
      std::size_t item = dtype_size(dtype);
      std::size_t row_bytes = static_cast<std::size_t>(kv.head_dim) * item;
      HostTensor gates{dtype, {batch}, std::vector<std::byte>(static_cast<std::size_t>(batch) * item)};
      for (const char* kind : {"key", "value"}) {
        HostTensor out{dtype, {batch, kv.num_kv_heads, length, kv.head_dim}, {}};
        out.data.resize(static_cast<std::size_t>(element_count(out.shape)) * item);
        for (std::int64_t b = 0; b < batch; ++b) {
          const auto& row = rows[static_cast<std::size_t>(b)];
          if (!method_is(row, is_adaption) || !row->tensors.count(prefix + "gate")) continue;
          const HostTensor& t = row->tensors.at(prefix + kind);
          std::int64_t len = t.shape[1];
          for (std::int64_t h = 0; h < kv.num_kv_heads; ++h) {
            copy_right_aligned(out.data.data() + static_cast<std::size_t>((b * kv.num_kv_heads + h) * length) * row_bytes,
                               length, t.data.data() + static_cast<std::size_t>(h * len) * row_bytes, len, row_bytes);
          }
          std::memcpy(gates.data.data() + static_cast<std::size_t>(b) * item,
                      row->tensors.at(prefix + "gate").data.data(), item);
        }
        every_step[prefix + kind] = std::move(out);
      }
      every_step[prefix + "gate"] = std::move(gates);
    }
  }
}

Runtime::Runtime(const std::filesystem::path& bundle_dir, RuntimeOptions options)
    : bundle_dir_(bundle_dir), manifest_(load_manifest(bundle_dir)) {
  if (manifest_.encoder) {
    throw InferenceError(bundle_dir.string() + " is an encoder (" + manifest_.encoder->task +
                         ") bundle, which does not generate; open it with peft_export::Encoder "
                         "(C ABI: peft_export_encode, program: peft-encode)");
  }
  refuse_unfed_inputs(manifest_);
  if (manifest_.runtime_mode()) {
    banks_ = std::make_unique<AdapterBanks>(manifest_, options.slots);
    if (banks_->specs().empty()) banks_.reset();
  }
  store_ = std::make_unique<AdapterStore>(manifest_, bundle_dir_, banks_.get());
  // The tokenizer before the backend, not beside it: parsed on a second thread while ONNX
  // Runtime builds the session, SmolLM2 int4 opened 0.07 s sooner but peaked 24 MB higher
  // (224 vs 200 MB), since the parse's transient memory then meets the session's.
  if (options.load_tokenizer && manifest_.tokenizer.file) {
    std::error_code ec;
    std::filesystem::path file = confined_path(bundle_dir_, *manifest_.tokenizer.file);
    if (std::filesystem::is_regular_file(file, ec)) {
      try {
        tokenizer_ = load_byte_level_bpe(file);
      } catch (const BundleError&) {
        tokenizer_.reset();  // another tokenizer kind: callers plug in their own
      }
    }
  }
  if (options.backend == "ort") {
    backend_ = make_ort_backend(bundle_dir_, manifest_, banks_.get(), options.backend_options);
  } else if (options.backend == "tensorrt") {
    backend_ = make_tensorrt_backend(bundle_dir_, manifest_, banks_.get(), options.backend_options);
  } else {
    throw InferenceError("unknown backend '" + options.backend + "'; use ort or tensorrt");
  }
}

Runtime::~Runtime() = default;

std::int64_t Runtime::pad_token_id() const {
  const TokenizerInfo& info = manifest_.tokenizer;
  if (info.pad_token_id) return *info.pad_token_id;
  return info.eos_token_ids.empty() ? 0 : info.eos_token_ids.front();
}

std::vector<std::int64_t> Runtime::prompt_of(const RowRequest& row, std::size_t index) const {
  std::vector<std::int64_t> ids = row.prompt_ids;
  if (ids.empty() && !row.text.empty()) {
    if (!tokenizer_) {
      throw InferenceError("this runtime has no tokenizer for the bundle; pass token ids, or set "
                           "one with Runtime::set_tokenizer");
    }
    ids = tokenizer_->encode(row.text);
  }
  if (ids.empty()) {
    throw InferenceError("prompt " + std::to_string(index) +
                         " is empty after tokenization; give it some text");
  }
  for (std::int64_t id : ids) {
    if (id < 0 || id >= manifest_.vocab_size) {
      throw InferenceError("prompt " + std::to_string(index) + " has token ids outside [0, " +
                           std::to_string(manifest_.vocab_size) + "); check them");
    }
  }
  return ids;
}

std::unique_ptr<Batch> Runtime::start(const std::vector<std::vector<std::int64_t>>& prompt_ids,
                                      const std::vector<std::string>& adapters,
                                      std::int64_t max_new_tokens) {
  return std::unique_ptr<Batch>(new Batch(*this, prompt_ids, adapters, max_new_tokens));
}

Batch::Batch(Runtime& runtime, const std::vector<std::vector<std::int64_t>>& prompt_ids,
             const std::vector<std::string>& adapters, std::int64_t max_new_tokens)
    : runtime_(runtime) {
  const Manifest& manifest = runtime.manifest_;
  if (prompt_ids.empty()) throw InferenceError("a request needs at least one prompt");
  if (adapters.size() != prompt_ids.size()) {
    throw InferenceError(std::to_string(prompt_ids.size()) + " prompts but " +
                         std::to_string(adapters.size()) + " adapters; give one per prompt");
  }
  std::set<std::string> named;
  for (const auto& name : adapters) {
    if (!name.empty()) named.insert(name);
  }
  if (!named.empty() && !manifest.runtime_mode()) {
    std::string list;
    for (const auto& name : named) list += (list.empty() ? "" : ", ") + name;
    std::string baked = manifest.adapters.merged_name
                            ? " (adapter '" + *manifest.adapters.merged_name + "' is merged into it)"
                            : "";
    throw InferenceError("adapter(s) " + list + " requested, but this " + manifest.mode +
                         "-mode bundle takes no adapters at run time" + baked +
                         "; drop --adapter, or export with --mode runtime");
  }
  lease_ = runtime.store_->acquire(adapters);
  prompt_side_ = std::make_unique<PromptSide>(manifest, lease_.adapters());
  batch_ = static_cast<std::int64_t>(prompt_ids.size());
  vocab_ = manifest.vocab_size;
  for (const auto& ids : prompt_ids) text_len_ = std::max(text_len_, static_cast<std::int64_t>(ids.size()));
  std::int64_t prefix = prompt_side_->prefix_len;
  std::int64_t prompt = prompt_side_->prompt_len;
  capacity_ = prefix + prompt + text_len_ + max_new_tokens;
  if (manifest.max_position_embeddings && *manifest.max_position_embeddings > 0 &&
      capacity_ > *manifest.max_position_embeddings) {
    throw InferenceError("prompt (" + std::to_string(prefix + prompt + text_len_) +
                         " positions) + max_new_tokens (" + std::to_string(max_new_tokens) +
                         ") exceeds the model's " + std::to_string(*manifest.max_position_embeddings) +
                         " positions; shorten the prompt or max_new_tokens");
  }
  input_ids_.assign(static_cast<std::size_t>(batch_ * text_len_), runtime.pad_token_id());
  mask_.assign(static_cast<std::size_t>(batch_ * capacity_), 0);
  for (std::int64_t b = 0; b < batch_; ++b) {
    std::int64_t* mask_row = mask_.data() + b * capacity_;
    std::copy_n(prompt_side_->prefix_mask.begin() + b * prefix, prefix, mask_row);
    std::copy_n(prompt_side_->prompt_mask.begin() + b * prompt, prompt, mask_row + prefix);
    const auto& ids = prompt_ids[static_cast<std::size_t>(b)];
    auto len = static_cast<std::int64_t>(ids.size());
    std::copy(ids.begin(), ids.end(), input_ids_.begin() + b * text_len_ + (text_len_ - len));
    std::fill_n(mask_row + capacity_ - max_new_tokens - len, len, 1);
  }
  state_ = runtime.backend_->new_state();
  past_len_ = prefix;
}

Batch::~Batch() = default;

const std::vector<float>& Batch::prefill() {
  if (step_ != 0) throw InferenceError("prefill runs once, as the first step of a batch");
  run(input_ids_, prompt_side_->prompt_len + text_len_);
  return logits_;
}

const std::vector<float>& Batch::decode(const std::vector<std::int64_t>& tokens) {
  if (step_ == 0) throw InferenceError("call prefill before decode");
  if (static_cast<std::int64_t>(tokens.size()) != batch_) {
    throw InferenceError("decode needs one token per row (" + std::to_string(batch_) + ")");
  }
  if (past_len_ >= capacity_) {
    throw InferenceError("the batch reached its max_new_tokens; start a new batch to continue");
  }
  run(tokens, 1);
  return logits_;
}

void Batch::run(const std::vector<std::int64_t>& step_ids, std::int64_t step_len) {
  std::int64_t total = past_len_ + step_len;
  std::vector<std::int64_t> step_mask(static_cast<std::size_t>(batch_ * total));
  std::vector<std::int64_t> positions(static_cast<std::size_t>(batch_ * step_len));
  for (std::int64_t b = 0; b < batch_; ++b) {
    const std::int64_t* row = mask_.data() + b * capacity_;
    std::copy_n(row, total, step_mask.begin() + b * total);
    std::int64_t count = 0;
    for (std::int64_t i = 0; i < total; ++i) {
      count += row[i];
      if (i >= past_len_) positions[static_cast<std::size_t>(b * step_len + i - past_len_)] = row[i] ? count - 1 : 1;
    }
  }
  StepInputs in;
  in.batch = batch_;
  in.seq = static_cast<std::int64_t>(step_ids.size()) / batch_;
  in.input_ids = step_ids.data();
  in.attention_mask = step_mask.data();
  in.mask_len = total;
  in.position_ids = positions.data();
  in.position_len = step_len;
  in.adapter_ids = lease_.slots().data();
  prompt_side_->feeds(step_, in.extra);
  runtime_.backend_->step(*state_, in, logits_);
  past_len_ = total;
  ++step_;
  if (past_len_ < capacity_) {
    for (std::int64_t b = 0; b < batch_; ++b) mask_[static_cast<std::size_t>(b * capacity_ + past_len_)] = 1;
  }
}

GenerationResult Runtime::generate(const std::vector<RowRequest>& rows, const StreamCallback& stream) {
  if (rows.empty()) throw InferenceError("a request needs at least one prompt");
  std::vector<std::vector<std::int64_t>> prompts;
  std::vector<std::string> adapters;
  std::int64_t max_new = 0;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    rows[i].options.validate();
    prompts.push_back(prompt_of(rows[i], i));
    adapters.push_back(rows[i].adapter);
    max_new = std::max(max_new, rows[i].options.max_new_tokens);
  }
  auto batch = start(prompts, adapters, max_new);

  struct RowState {
    std::set<std::int64_t> eos;
    std::set<std::int64_t> stop;
    std::mt19937_64 rng;
    std::vector<std::int64_t> tokens;
    std::string reason;
  };
  std::vector<RowState> state(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const SamplingOptions& options = rows[i].options;
    if (!options.ignore_eos) state[i].eos.insert(manifest_.tokenizer.eos_token_ids.begin(), manifest_.tokenizer.eos_token_ids.end());
    state[i].stop.insert(options.stop_token_ids.begin(), options.stop_token_ids.end());
    state[i].rng.seed(options.seed ? *options.seed : std::random_device{}());
    if (options.max_new_tokens == 0) state[i].reason = "length";
  }
  auto all_finished = [&] {
    return std::all_of(state.begin(), state.end(), [](const RowState& r) { return !r.reason.empty(); });
  };

  GenerationResult result;
  auto clock = std::chrono::steady_clock::now();
  std::vector<std::int64_t> step_ids(rows.size());
  while (!all_finished()) {
    const std::vector<float>& logits = result.steps == 0 ? batch->prefill() : batch->decode(step_ids);
    if (result.steps == 0) {
      result.prefill_seconds = seconds_since(clock);
      clock = std::chrono::steady_clock::now();
    }
    ++result.steps;
    std::fill(step_ids.begin(), step_ids.end(), pad_token_id());
    for (std::size_t b = 0; b < rows.size(); ++b) {
      RowState& row = state[b];
      if (!row.reason.empty()) continue;
      std::int64_t token = detail::choose(logits.data() + static_cast<std::ptrdiff_t>(b) * manifest_.vocab_size,
                                          manifest_.vocab_size, rows[b].options, row.rng);
      row.tokens.push_back(token);
      if (row.eos.count(token)) {
        row.reason = "eos";
      } else if (row.stop.count(token)) {
        row.reason = "stop_token";
      } else if (static_cast<std::int64_t>(row.tokens.size()) >= rows[b].options.max_new_tokens) {
        row.reason = "length";
      }
      step_ids[b] = token;
      if (stream) stream(TokenEvent{b, token, !row.reason.empty()});
    }
  }
  result.decode_seconds = result.steps > 1 ? seconds_since(clock) : 0.0;
  for (std::size_t b = 0; b < rows.size(); ++b) {
    RowResult row{prompts[b], state[b].tokens, "", state[b].reason.empty() ? "length" : state[b].reason};
    if (tokenizer_) row.text = tokenizer_->decode(row.token_ids);
    result.rows.push_back(std::move(row));
  }
  return result;
}

}  // namespace peft_export
