// Encoder graphs on ONNX Runtime (CPU): one session run per batch, no KV cache.
#include <onnxruntime_cxx_api.h>

#include <algorithm>

#include "encoder_session.hpp"
#include "ort_session.hpp"
#include "peft_export/errors.hpp"

namespace peft_export {
namespace {

class OrtEncoderSession final : public EncoderSession {
 public:
  OrtEncoderSession(const std::filesystem::path& graph, const Manifest& manifest,
                    const AdapterBanks* banks, const BackendOptions& options)
      : memory_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    Ort::SessionOptions so = ort::session_options(options);
    if (!options.multilora_library.empty()) ort::register_multilora(so, manifest, banks, options);
    try {
      session_ = std::make_unique<Ort::Session>(ort::shared_env(), graph.c_str(), so);
    } catch (const Ort::Exception& exc) {
      throw InferenceError(graph.string() + ": ONNX Runtime could not load the graph (" +
                           ort::first_line(exc) +
                           "); re-export the bundle with this onnxruntime version installed");
    }
    Ort::AllocatorWithDefaultOptions allocator;
    for (std::size_t i = 0; i < session_->GetInputCount(); ++i) {
      inputs_.push_back(session_->GetInputNameAllocated(i, allocator).get());
    }
    for (std::size_t i = 0; i < session_->GetOutputCount(); ++i) {
      outputs_.push_back(session_->GetOutputNameAllocated(i, allocator).get());
    }
    for (const std::string& name : manifest.encoder->outputs) {
      if (std::find(outputs_.begin(), outputs_.end(), name) == outputs_.end()) {
        throw InferenceError(manifest.graph.file + ": the graph lacks output '" + name +
                             "', which the manifest promises; re-export the bundle");
      }
    }
  }

  const std::vector<std::string>& inputs() const override { return inputs_; }

  std::map<std::string, RowTensor> run(const std::map<std::string, TensorRef>& feeds,
                                       const std::vector<std::string>& outputs) override {
    std::vector<Ort::Value> values;
    std::vector<const char*> input_names;
    for (const std::string& name : inputs_) {
      auto feed = feeds.find(name);
      if (feed == feeds.end()) {
        throw InferenceError("graph input '" + name + "' is fed by nothing in this runtime");
      }
      values.push_back(tensor(feed->second));
      input_names.push_back(name.c_str());
    }
    std::vector<const char*> output_names;
    for (const std::string& name : outputs) output_names.push_back(name.c_str());
    std::vector<Ort::Value> results;
    try {
      results = session_->Run(Ort::RunOptions{nullptr}, input_names.data(), values.data(),
                              values.size(), output_names.data(), output_names.size());
    } catch (const Ort::Exception& exc) {
      throw InferenceError("ONNX Runtime failed to run the encoder (" + ort::first_line(exc) +
                           "); check the token ids and the row lengths");
    }
    std::map<std::string, RowTensor> out;
    for (std::size_t i = 0; i < outputs.size(); ++i) {
      auto info = results[i].GetTensorTypeAndShapeInfo();
      RowTensor value{info.GetShape(), {}};
      DType dtype = ort::from_ort_type(info.GetElementType(), outputs[i]);
      value.values.resize(info.GetElementCount());
      to_float(dtype, results[i].GetTensorRawData(), value.values.size(), value.values.data());
      out[outputs[i]] = std::move(value);
    }
    return out;
  }

 private:
  Ort::Value tensor(const TensorRef& ref) {
    static std::int64_t empty_storage = 0;
    std::size_t bytes = static_cast<std::size_t>(element_count(ref.shape)) * dtype_size(ref.dtype);
    void* pointer = bytes > 0 ? const_cast<void*>(ref.data) : &empty_storage;
    return Ort::Value::CreateTensor(memory_, pointer, bytes, ref.shape.data(), ref.shape.size(),
                                    ort::ort_type(ref.dtype));
  }

  Ort::MemoryInfo memory_;
  std::unique_ptr<Ort::Session> session_;
  std::vector<std::string> inputs_;
  std::vector<std::string> outputs_;
};

}  // namespace

std::unique_ptr<EncoderSession> make_ort_encoder_session(const std::filesystem::path& bundle_dir,
                                                         const Manifest& manifest,
                                                         const AdapterBanks* banks,
                                                         const BackendOptions& options) {
  std::filesystem::path graph = confined_path(bundle_dir, manifest.graph.file);
  std::error_code ec;
  if (!std::filesystem::is_regular_file(graph, ec)) {
    throw InferenceError(graph.string() + ": the bundle's graph is missing; re-export the bundle");
  }
  return std::make_unique<OrtEncoderSession>(graph, manifest, banks, options);
}

}  // namespace peft_export
