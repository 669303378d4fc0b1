// ONNX Runtime backend through the ORT C++ API (CPU execution provider).
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cstring>
#include <mutex>

#include "huge_pages.hpp"
#include "ort_session.hpp"
#include "peft_export/backend.hpp"
#include "peft_export/errors.hpp"

namespace peft_export {
namespace {

using ort::first_line;
using ort::from_ort_type;
using ort::ort_type;
using ort::register_multilora;
using ort::session_options;
using ort::shared_env;

// ONNX Runtime fuses block-wise DequantizeLinear -> MatMul into MatMulNBits at this level.
constexpr const char* kQdqAccuracyKey = "session.qdq_matmulnbits_accuracy_level";

// The MatMulNBits accuracy level to serve `manifest` at, or -1 for a float bundle.
// Written-out MatMulNBits nodes keep the level they were exported with: this runtime does not
// edit graphs (the Python runtime rewrites them).
int quant_accuracy_level(const Manifest& manifest, int requested) {
  if (requested < -1 || requested > 4) {
    throw InferenceError("quant_accuracy " + std::to_string(requested) +
                         " is not a MatMulNBits accuracy level; use 0 to 4, or -1 for the "
                         "bundle's own");
  }
  if (!manifest.quantization) return -1;
  const Quantization& quant = *manifest.quantization;
  if (requested == -1) return quant.accuracy_level;
  if (quant.format == "matmulnbits" && requested != quant.accuracy_level) {
    throw InferenceError("quant_accuracy " + std::to_string(requested) +
                         " differs from the level " + std::to_string(quant.accuracy_level) +
                         " this bundle's MatMulNBits nodes carry, which the C++ runtime cannot "
                         "change; use quant_accuracy -1, or re-export with --quant-accuracy " +
                         std::to_string(requested) + " (or --quant-format qdq)");
  }
  return requested;
}

class OrtState final : public KVState {
 public:
  std::int64_t past_len() const override { return past_len_; }
  std::vector<Ort::Value> past;  // 2 per layer (key, value); empty before the first step
  std::int64_t past_len_ = 0;
};

enum class Source { kInputIds, kMask, kPositions, kAdapterIds, kPast, kBank, kExtra };

struct InputSlot {
  std::string name;
  Source source = Source::kExtra;
  DType dtype = DType::kFloat32;
  std::size_t index = 0;  // past: 2 * layer + (value ? 1 : 0); bank: bank number
};

class OrtBackend final : public Backend {
 public:
  OrtBackend(const std::filesystem::path& graph, const Manifest& manifest, AdapterBanks* banks,
             const BackendOptions& options, int quant_level)
      : manifest_(manifest), banks_(banks), memory_(Ort::MemoryInfo::CreateCpu(
                                                OrtArenaAllocator, OrtMemTypeDefault)) {
    Ort::SessionOptions so = session_options(options);
    if (quant_level >= 0) so.AddConfigEntry(kQdqAccuracyKey, std::to_string(quant_level).c_str());
    if (!options.multilora_library.empty()) register_multilora(so, manifest, banks, options);
    const auto before =
        options.huge_pages ? huge_pages::anonymous_ranges() : std::vector<huge_pages::Range>{};
    try {
      session_ = std::make_unique<Ort::Session>(shared_env(), graph.c_str(), so);
    } catch (const Ort::Exception& exc) {
      throw InferenceError(graph.string() + ": ONNX Runtime could not load the graph (" +
                           first_line(exc) +
                           "); re-export the bundle with this onnxruntime version installed");
    }
    describe_inputs();
    describe_outputs();
    if (options.huge_pages) {
      // Begun after the first run (see DeferredCollapse); created last, nothing throws after it.
      collapse_ = std::make_unique<huge_pages::DeferredCollapse>(
          huge_pages::new_ranges(before, huge_pages::anonymous_ranges()));
    }
  }

  OrtBackend(const OrtBackend&) = delete;
  OrtBackend& operator=(const OrtBackend&) = delete;

  std::string name() const override { return "ort"; }

  std::unique_ptr<KVState> new_state() override { return std::make_unique<OrtState>(); }

  void step(KVState& base_state, const StepInputs& in, std::vector<float>& last_logits) override {
    auto& state = static_cast<OrtState&>(base_state);
    std::vector<Ort::Value> values;
    values.reserve(inputs_.size());
    for (const InputSlot& slot : inputs_) values.push_back(input_value(slot, in, state));
    std::vector<Ort::Value> outputs;
    try {
      outputs = session_->Run(Ort::RunOptions{nullptr}, input_names_.data(), values.data(),
                              values.size(), output_names_.data(), output_names_.size());
    } catch (const Ort::Exception& exc) {
      throw InferenceError("ONNX Runtime failed to run a step (" + first_line(exc) +
                           "); the request's shapes may exceed what the graph supports");
    }
    if (collapse_) collapse_->begin();
    copy_last_logits(outputs[logits_index_], in.batch, last_logits);
    std::vector<Ort::Value> present;
    present.reserve(present_index_.size());
    for (std::size_t index : present_index_) present.push_back(std::move(outputs[index]));
    state.past = std::move(present);
    auto shape = state.past.front().GetTensorTypeAndShapeInfo().GetShape();
    state.past_len_ = shape.at(2);
  }

 private:
  Ort::Value tensor(DType dtype, const std::vector<std::int64_t>& shape, const void* data) {
    static std::int64_t empty_storage = 0;
    std::size_t bytes = static_cast<std::size_t>(element_count(shape)) * dtype_size(dtype);
    void* pointer = data != nullptr ? const_cast<void*>(data) : &empty_storage;
    return Ort::Value::CreateTensor(memory_, pointer, bytes, shape.data(), shape.size(),
                                    ort_type(dtype));
  }

  Ort::Value input_value(const InputSlot& slot, const StepInputs& in, OrtState& state) {
    switch (slot.source) {
      case Source::kInputIds:
        return tensor(DType::kInt64, {in.batch, in.seq}, in.input_ids);
      case Source::kMask:
        return tensor(DType::kInt64, {in.batch, in.mask_len}, in.attention_mask);
      case Source::kPositions:
        return tensor(DType::kInt64, {in.batch, in.position_len}, in.position_ids);
      case Source::kAdapterIds:
        if (in.adapter_ids == nullptr) throw InferenceError("adapter_ids missing for this step");
        return tensor(DType::kInt64, {in.batch}, in.adapter_ids);
      case Source::kBank: {
        const BankSpec& spec = banks_->specs()[slot.index];
        return tensor(spec.dtype, spec.shape, banks_->data(slot.index));
      }
      case Source::kPast: {
        if (!state.past.empty()) {
          Ort::Value& past = state.past[slot.index];
          auto info = past.GetTensorTypeAndShapeInfo();
          auto shape = info.GetShape();
          return tensor(slot.dtype, shape, past.GetTensorRawData());
        }
        auto seeded = in.extra.find(slot.name);
        if (seeded != in.extra.end()) {
          return tensor(seeded->second.dtype, seeded->second.shape, seeded->second.data);
        }
        return tensor(slot.dtype, {in.batch, manifest_.kv.num_kv_heads, 0, manifest_.kv.head_dim},
                      nullptr);
      }
      case Source::kExtra: {
        auto extra = in.extra.find(slot.name);
        if (extra == in.extra.end()) {
          throw InferenceError("graph input '" + slot.name +
                               "' is fed by nothing in this runtime; this bundle needs runtime "
                               "support the C++ runtime does not have");
        }
        return tensor(extra->second.dtype, extra->second.shape, extra->second.data);
      }
    }
    throw InferenceError("unreachable input source");
  }

  void copy_last_logits(const Ort::Value& logits, std::int64_t batch, std::vector<float>& out) {
    auto info = logits.GetTensorTypeAndShapeInfo();
    auto shape = info.GetShape();
    if (shape.size() != 3 || shape[0] != batch) {
      throw InferenceError("graph output 'logits' has an unexpected shape; re-export the bundle");
    }
    std::int64_t seq = shape[1];
    std::int64_t vocab = shape[2];
    out.resize(static_cast<std::size_t>(batch * vocab));
    const auto* base = static_cast<const std::byte*>(logits.GetTensorRawData());
    std::size_t item = dtype_size(logits_dtype_);
    for (std::int64_t row = 0; row < batch; ++row) {
      const std::byte* last = base + static_cast<std::size_t>((row * seq + seq - 1) * vocab) * item;
      to_float(logits_dtype_, last, static_cast<std::size_t>(vocab),
               out.data() + static_cast<std::size_t>(row * vocab));
    }
  }

  void describe_inputs() {
    std::map<std::string, std::size_t> bank_index;
    if (banks_ != nullptr) {
      for (std::size_t i = 0; i < banks_->specs().size(); ++i) {
        bank_index[banks_->specs()[i].name] = i;
      }
    }
    Ort::AllocatorWithDefaultOptions allocator;
    for (std::size_t i = 0; i < session_->GetInputCount(); ++i) {
      InputSlot slot;
      slot.name = session_->GetInputNameAllocated(i, allocator).get();
      auto type = session_->GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType();
      slot.dtype = from_ort_type(type, slot.name);
      int layer = -1;
      bool value = false;
      if (slot.name == "input_ids") {
        slot.source = Source::kInputIds;
      } else if (slot.name == "attention_mask") {
        slot.source = Source::kMask;
      } else if (slot.name == "position_ids") {
        slot.source = Source::kPositions;
      } else if (slot.name == "adapter_ids") {
        slot.source = Source::kAdapterIds;
      } else if (bank_index.count(slot.name)) {
        slot.source = Source::kBank;
        slot.index = bank_index[slot.name];
      } else if (parse_past(slot.name, layer, value)) {
        slot.source = Source::kPast;
        slot.index = static_cast<std::size_t>(2 * layer + (value ? 1 : 0));
      }
      inputs_.push_back(slot);
    }
    for (const InputSlot& slot : inputs_) input_names_.push_back(slot.name.c_str());
    for (const char* required : {"input_ids", "attention_mask", "position_ids"}) {
      if (std::none_of(inputs_.begin(), inputs_.end(),
                       [&](const InputSlot& s) { return s.name == required; })) {
        throw InferenceError(manifest_.graph.file + ": the graph lacks input '" + required +
                             "', which the manifest promises; re-export the bundle");
      }
    }
  }

  bool parse_past(const std::string& name, int& layer, bool& value) const {
    for (int i = 0; i < manifest_.kv.num_layers; ++i) {
      std::string prefix = "past_key_values." + std::to_string(i) + ".";
      if (name == prefix + "key" || name == prefix + "value") {
        layer = i;
        value = name == prefix + "value";
        return true;
      }
    }
    return false;
  }

  void describe_outputs() {
    Ort::AllocatorWithDefaultOptions allocator;
    std::map<std::string, std::size_t> index;
    for (std::size_t i = 0; i < session_->GetOutputCount(); ++i) {
      output_storage_.push_back(session_->GetOutputNameAllocated(i, allocator).get());
      index[output_storage_.back()] = i;
    }
    for (const std::string& name : output_storage_) output_names_.push_back(name.c_str());
    if (!index.count("logits")) {
      throw InferenceError(manifest_.graph.file + ": the graph lacks output 'logits'; re-export");
    }
    logits_index_ = index["logits"];
    logits_dtype_ = from_ort_type(
        session_->GetOutputTypeInfo(logits_index_).GetTensorTypeAndShapeInfo().GetElementType(),
        "logits");
    for (int layer = 0; layer < manifest_.kv.num_layers; ++layer) {
      for (const char* kind : {"key", "value"}) {
        std::string name = "present." + std::to_string(layer) + "." + kind;
        if (!index.count(name)) {
          throw InferenceError(manifest_.graph.file + ": the graph lacks output '" + name +
                               "'; re-export the bundle");
        }
        present_index_.push_back(index[name]);
      }
    }
  }

  const Manifest& manifest_;
  AdapterBanks* banks_;
  Ort::MemoryInfo memory_;
  std::unique_ptr<Ort::Session> session_;
  std::unique_ptr<huge_pages::DeferredCollapse> collapse_;
  std::vector<InputSlot> inputs_;
  std::vector<const char*> input_names_;
  std::vector<std::string> output_storage_;
  std::vector<const char*> output_names_;
  std::size_t logits_index_ = 0;
  DType logits_dtype_ = DType::kFloat32;
  std::vector<std::size_t> present_index_;
};

}  // namespace

std::unique_ptr<Backend> make_ort_backend(const std::filesystem::path& bundle_dir,
                                          const Manifest& manifest, AdapterBanks* banks,
                                          const BackendOptions& options) {
  if (manifest.precision == "bf16") {
    throw InferenceError("bf16 bundles do not run on ONNX Runtime's CPU kernels; re-export with "
                         "--precision fp32 (or fp16), or use the TensorRT backend");
  }
  int quant_level = quant_accuracy_level(manifest, options.quant_accuracy);
  std::filesystem::path graph = confined_path(bundle_dir, manifest.graph.file);
  std::error_code ec;
  if (!std::filesystem::is_regular_file(graph, ec)) {
    throw InferenceError(graph.string() + ": the bundle's graph is missing; re-export the bundle");
  }
  return std::make_unique<OrtBackend>(graph, manifest, banks, options, quant_level);
}

}  // namespace peft_export
