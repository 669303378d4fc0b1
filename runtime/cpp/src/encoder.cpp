#include "peft_export/encoder.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include "encoder_session.hpp"
#include "peft_export/errors.hpp"

namespace peft_export {
namespace {

constexpr const char* kInputIds = "input_ids";
constexpr const char* kAttentionMask = "attention_mask";
constexpr const char* kTokenTypeIds = "token_type_ids";
constexpr const char* kAdapterIds = "adapter_ids";
constexpr const char* kPromptEmbeds = "prompt_embeds";

// softmax in double, as numpy computes the Python runtime's scores.
std::vector<float> softmax(const float* logits, std::size_t count) {
  std::vector<float> out(count);
  if (count == 0) return out;
  double top = *std::max_element(logits, logits + count);
  double sum = 0.0;
  std::vector<double> exps(count);
  for (std::size_t i = 0; i < count; ++i) sum += exps[i] = std::exp(logits[i] - top);
  for (std::size_t i = 0; i < count; ++i) out[i] = static_cast<float>(exps[i] / sum);
  return out;
}

// Tasks whose outputs have a token-position dimension after the batch.
bool per_token(const std::string& task) {
  return task == "token-classification" || task == "question-answering";
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& name : names) out += (out.empty() ? "" : ", ") + name;
  return out.empty() ? "none installed" : out;
}

}  // namespace

std::vector<float> EncoderResult::scores(std::int64_t position) const {
  auto it = outputs.find("logits");
  if (it == outputs.end()) throw InferenceError("this row has no logits; its task is not labelled");
  const RowTensor& logits = it->second;
  std::int64_t width = logits.shape.back();
  std::int64_t positions = logits.shape.size() == 2 ? logits.shape[0] : 1;
  if (position < 0 || position >= positions) {
    throw InferenceError("position " + std::to_string(position) + " is outside the row's " +
                         std::to_string(positions) + " tokens");
  }
  return softmax(logits.values.data() + position * width, static_cast<std::size_t>(width));
}

Prediction EncoderResult::best(std::int64_t position) const {
  std::vector<float> probs = scores(position);
  auto top = std::max_element(probs.begin(), probs.end());
  auto id = static_cast<std::int64_t>(top - probs.begin());
  std::string label = id < static_cast<std::int64_t>(labels.size())
                          ? labels[static_cast<std::size_t>(id)]
                          : std::to_string(id);
  return Prediction{id, label, *top};
}

AnswerSpan EncoderResult::answer(const std::vector<std::int64_t>& allowed,
                                 std::int64_t max_tokens) const {
  auto start = outputs.find("start_logits");
  auto end = outputs.find("end_logits");
  if (start == outputs.end() || end == outputs.end()) {
    throw InferenceError("this row has no start/end logits; its task is not question answering");
  }
  const std::vector<float>& starts = start->second.values;
  if (!allowed.empty() && allowed.size() != starts.size()) {
    throw InferenceError("the allowed positions (" + std::to_string(allowed.size()) +
                         ") do not match the row's " + std::to_string(starts.size()) + " tokens");
  }
  std::vector<std::int64_t> positions;
  std::vector<float> start_logits;
  std::vector<float> end_logits;
  for (std::size_t i = 0; i < starts.size(); ++i) {
    if (!allowed.empty() && allowed[i] == 0) continue;
    positions.push_back(static_cast<std::int64_t>(i));
    start_logits.push_back(starts[i]);
    end_logits.push_back(end->second.values[i]);
  }
  if (positions.empty()) return AnswerSpan{};
  std::vector<float> ps = softmax(start_logits.data(), start_logits.size());
  std::vector<float> pe = softmax(end_logits.data(), end_logits.size());
  AnswerSpan best{positions[0], positions[0], -1.0f};
  for (std::size_t i = 0; i < ps.size(); ++i) {
    for (std::size_t j = i; j < pe.size() && static_cast<std::int64_t>(j - i) < max_tokens; ++j) {
      float score = ps[i] * pe[j];
      if (score > best.score) best = AnswerSpan{positions[i], positions[j], score};
    }
  }
  return best;
}

Encoder::Encoder(const std::filesystem::path& bundle_dir, EncoderOptions options)
    : bundle_dir_(bundle_dir), manifest_(load_manifest(bundle_dir)) {
  if (!manifest_.encoder) {
    throw InferenceError(bundle_dir.string() + " is a decoder (generation) bundle; open it with "
                         "peft_export::Runtime (C ABI: peft_export_generate, program: "
                         "peft-generate)");
  }
  if (manifest_.runtime_mode()) {
    banks_ = std::make_unique<AdapterBanks>(manifest_, options.slots, bundle_dir_);
    if (banks_->specs().empty()) banks_.reset();
  }
  store_ = std::make_unique<AdapterStore>(manifest_, bundle_dir_, banks_.get());
  session_ = make_ort_encoder_session(bundle_dir_, manifest_, banks_.get(), options.backend_options);
  std::set<std::string> fed{kInputIds, kAttentionMask, kTokenTypeIds, kAdapterIds, kPromptEmbeds};
  if (banks_) {
    for (const BankSpec& spec : banks_->specs()) fed.insert(spec.name);
  }
  for (const std::string& name : session_->inputs()) {
    if (!fed.count(name)) {
      throw InferenceError("graph input '" + name + "' is not fed by the C++ runtime; serve this "
                           "bundle with the Python runtime (peft_export.runtime.load_bundle)");
    }
  }
}

Encoder::~Encoder() = default;

std::string Encoder::canonical(const std::string& adapter) const {
  if (adapter.empty() || manifest_.runtime_mode()) return adapter;
  const auto& merged = manifest_.adapters.merged_name;
  if (merged && *merged == adapter) return "";
  throw InferenceError("this merged bundle serves only " +
                       (merged ? "'" + *merged + "'" : std::string("the base model")) +
                       ", not '" + adapter +
                       "'; export a runtime bundle to serve several adapters");
}

std::vector<std::string> Encoder::labels_of(const std::string& adapter,
                                            const HostAdapter* host) const {
  const EncoderInfo& encoder = info();
  if (!encoder.labelled()) return {};
  if (host != nullptr && !host->labels.empty()) return host->labels;
  if (adapter.empty() && !encoder.base_head && encoder.max_labels > 0) {
    std::vector<std::string> names;
    for (const auto& [name, entry] : manifest_.adapters.installed) names.push_back(name);
    throw InferenceError("the base model has no trained head for this task; name an adapter (" +
                         joined(names) + ")");
  }
  return encoder.labels;
}

std::vector<std::string> Encoder::labels(const std::string& adapter) {
  std::string name = canonical(adapter);
  if (name.empty()) return labels_of(name, nullptr);
  auto host = store_->load(name);
  return labels_of(name, host.get());
}

void Encoder::check_row(const EncoderRow& row, std::size_t index, std::int64_t prompt_len) const {
  std::string which = "row " + std::to_string(index);
  auto length = static_cast<std::int64_t>(row.input_ids.size());
  if (length == 0) throw InferenceError(which + " has no token ids; give it some");
  if (length + prompt_len > info().max_length) {
    throw InferenceError(which + " has " + std::to_string(length) + " tokens" +
                         (prompt_len ? " + " + std::to_string(prompt_len) + " prompt tokens" : "") +
                         ", more than the model's " + std::to_string(info().max_length) +
                         "; truncate it");
  }
  for (std::int64_t id : row.input_ids) {
    if (id < 0 || id >= manifest_.vocab_size) {
      throw InferenceError(which + " has token ids outside [0, " +
                           std::to_string(manifest_.vocab_size) + "); check them");
    }
  }
  if (!row.attention_mask.empty()) {
    if (row.attention_mask.size() != row.input_ids.size()) {
      throw InferenceError(which + ": attention_mask has " +
                           std::to_string(row.attention_mask.size()) + " entries for " +
                           std::to_string(length) + " tokens; give one per token");
    }
    for (std::int64_t bit : row.attention_mask) {
      if (bit != 0 && bit != 1) throw InferenceError(which + ": attention_mask must hold 0 or 1");
    }
  }
  if (!row.token_type_ids.empty()) {
    if (row.token_type_ids.size() != row.input_ids.size()) {
      throw InferenceError(which + ": token_type_ids has " +
                           std::to_string(row.token_type_ids.size()) + " entries for " +
                           std::to_string(length) + " tokens; give one per token");
    }
    for (std::int64_t type : row.token_type_ids) {
      if (type < 0) throw InferenceError(which + ": token_type_ids must be 0 or more");
    }
  }
}

std::vector<EncoderResult> Encoder::run(const std::vector<EncoderRow>& rows) {
  if (rows.empty()) throw InferenceError("no rows given; pass at least one");
  // Rows are grouped by prompt length (absolute positions make a padded prompt differ from
  // PEFT's), then cut into graph calls of at most slots - 1 distinct adapters.
  std::map<std::int64_t, std::vector<std::size_t>> groups;
  std::map<std::string, bool> needs_slot;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    std::string name = canonical(rows[i].adapter);
    std::int64_t prompt_len = 0;
    if (!name.empty()) {
      auto host = store_->load(name);
      prompt_len = host->prompt_len();
      needs_slot[name] = host->has_banks();
    }
    check_row(rows[i], i, prompt_len);
    groups[prompt_len].push_back(i);
  }
  std::size_t capacity = static_cast<std::size_t>(std::max(store_->slots() - 1, 1));
  std::vector<EncoderResult> results(rows.size());
  for (const auto& [prompt_len, members] : groups) {
    std::vector<std::size_t> chunk;
    std::set<std::string> seen;
    for (std::size_t i : members) {
      std::string name = canonical(rows[i].adapter);
      if (!name.empty() && needs_slot[name] && !seen.count(name)) {
        if (seen.size() == capacity) {
          run_chunk(rows, chunk, results);
          chunk.clear();
          seen.clear();
        }
        seen.insert(name);
      }
      chunk.push_back(i);
    }
    run_chunk(rows, chunk, results);
  }
  return results;
}

void Encoder::run_chunk(const std::vector<EncoderRow>& rows, const std::vector<std::size_t>& chunk,
                        std::vector<EncoderResult>& results) {
  std::vector<std::string> names;
  for (std::size_t i : chunk) names.push_back(canonical(rows[i].adapter));
  AdapterStore::Lease lease = store_->acquire(names);
  const auto& hosts = lease.adapters();
  const std::int64_t batch = static_cast<std::int64_t>(chunk.size());
  std::int64_t prompt_len = 0;  // the same for every row of a chunk (run() groups them)
  for (const auto& host : hosts) prompt_len = std::max(prompt_len, host ? host->prompt_len() : 0);
  std::int64_t width = 0;
  for (std::size_t i : chunk) width = std::max(width, static_cast<std::int64_t>(rows[i].input_ids.size()));
  const std::int64_t mask_width = prompt_len + width;
  const std::int64_t pad = manifest_.tokenizer.pad_token_id.value_or(0);

  std::vector<std::int64_t> ids(static_cast<std::size_t>(batch * width), pad);
  std::vector<std::int64_t> types(static_cast<std::size_t>(batch * width), 0);
  std::vector<std::int64_t> mask(static_cast<std::size_t>(batch * mask_width), 0);
  for (std::int64_t b = 0; b < batch; ++b) {
    const EncoderRow& row = rows[chunk[static_cast<std::size_t>(b)]];
    auto length = static_cast<std::int64_t>(row.input_ids.size());
    std::copy_n(row.input_ids.begin(), length, ids.begin() + b * width);
    if (!row.token_type_ids.empty()) {
      std::copy_n(row.token_type_ids.begin(), length, types.begin() + b * width);
    }
    auto mask_row = mask.begin() + b * mask_width;
    std::fill_n(mask_row, prompt_len, 1);  // virtual tokens are attended, as PEFT does
    if (row.attention_mask.empty()) {
      std::fill_n(mask_row + prompt_len, length, 1);
    } else {
      std::copy_n(row.attention_mask.begin(), length, mask_row + prompt_len);
    }
  }
  std::map<std::string, TensorRef> feeds;
  feeds[kInputIds] = TensorRef{DType::kInt64, {batch, width}, ids.data()};
  feeds[kAttentionMask] = TensorRef{DType::kInt64, {batch, mask_width}, mask.data()};
  feeds[kTokenTypeIds] = TensorRef{DType::kInt64, {batch, width}, types.data()};
  feeds[kAdapterIds] = TensorRef{DType::kInt64, {batch}, lease.slots().data()};
  std::vector<std::byte> embeds;
  if (const TensorSpec* spec = manifest_.graph.input(kPromptEmbeds)) {
    std::size_t row_bytes = static_cast<std::size_t>(prompt_len * manifest_.hidden_size) *
                            dtype_size(spec->dtype);
    embeds.resize(static_cast<std::size_t>(batch) * row_bytes);
    for (std::int64_t b = 0; b < batch; ++b) {
      const auto& host = hosts[static_cast<std::size_t>(b)];
      if (!host) continue;
      auto it = host->tensors.find(kPromptEmbeds);
      if (it == host->tensors.end()) continue;
      std::memcpy(embeds.data() + static_cast<std::size_t>(b) * row_bytes, it->second.data.data(),
                  std::min(row_bytes, it->second.data.size()));
    }
    feeds[kPromptEmbeds] =
        TensorRef{spec->dtype, {batch, prompt_len, manifest_.hidden_size}, embeds.data()};
  }
  if (banks_) {
    for (std::size_t bank = 0; bank < banks_->specs().size(); ++bank) {
      const BankSpec& spec = banks_->specs()[bank];
      feeds[spec.name] = TensorRef{spec.dtype, spec.shape, banks_->data(bank)};
    }
  }
  std::map<std::string, RowTensor> outputs = session_->run(feeds, info().outputs);

  for (std::int64_t b = 0; b < batch; ++b) {
    std::size_t index = chunk[static_cast<std::size_t>(b)];
    const EncoderRow& row = rows[index];
    const HostAdapter* host = hosts[static_cast<std::size_t>(b)].get();
    EncoderResult& result = results[index];
    result.adapter = row.adapter;
    result.labels = labels_of(names[static_cast<std::size_t>(b)], host);
    auto length = static_cast<std::int64_t>(row.input_ids.size());
    for (const auto& [name, tensor] : outputs) {
      std::vector<std::int64_t> dims(tensor.shape.begin() + 1, tensor.shape.end());
      if (tensor.shape.empty() || tensor.shape[0] != batch) {
        throw InferenceError("graph output '" + name + "' is not [batch, ...]; re-export the bundle");
      }
      std::int64_t skip = 0;  // leading token positions that are not the row's
      std::int64_t keep_positions = 1;
      std::int64_t position_width = 1;
      if (per_token(task())) {
        if (dims.empty() || (dims[0] != width && dims[0] != mask_width)) {
          throw InferenceError("graph output '" + name + "' has no token dimension of the "
                               "batch's width; re-export the bundle");
        }
        skip = dims[0] - width;
        position_width = dims[0];
        keep_positions = length;
        dims[0] = length;
      }
      std::int64_t inner = 1;  // values per position
      for (std::size_t d = per_token(task()) ? 1 : 0; d < dims.size(); ++d) inner *= dims[d];
      std::int64_t keep_inner = inner;
      if (name == "logits" && info().labelled()) {
        auto own = static_cast<std::int64_t>(result.labels.size());
        if (own > inner) {
          throw InferenceError("adapter '" + row.adapter + "' has " + std::to_string(own) +
                               " labels but the graph's head bank holds " + std::to_string(inner) +
                               "; re-export the bundle with this adapter");
        }
        if (own > 0) keep_inner = own;
        dims.back() = keep_inner;
      }
      RowTensor slice{dims, {}};
      slice.values.reserve(static_cast<std::size_t>(keep_positions * keep_inner));
      const float* source = tensor.values.data() + b * position_width * inner;
      for (std::int64_t p = 0; p < keep_positions; ++p) {
        const float* at = source + (skip + p) * inner;
        slice.values.insert(slice.values.end(), at, at + keep_inner);
      }
      result.outputs[name] = std::move(slice);
    }
  }
}

}  // namespace peft_export
