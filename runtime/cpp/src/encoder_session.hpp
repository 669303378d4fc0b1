// An encoder graph loaded in ONNX Runtime (private header; src/ort_encoder.cpp).
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "peft_export/backend.hpp"
#include "peft_export/encoder.hpp"

namespace peft_export {

class EncoderSession {
 public:
  virtual ~EncoderSession() = default;
  // The graph's input names, as the session reports them.
  virtual const std::vector<std::string>& inputs() const = 0;
  // One run: every input by name (host memory, borrowed for the call); returns `outputs`
  // as float32 [batch, ...] tensors.
  virtual std::map<std::string, RowTensor> run(const std::map<std::string, TensorRef>& feeds,
                                               const std::vector<std::string>& outputs) = 0;
};

std::unique_ptr<EncoderSession> make_ort_encoder_session(const std::filesystem::path& bundle_dir,
                                                         const Manifest& manifest,
                                                         const AdapterBanks* banks,
                                                         const BackendOptions& options);

}  // namespace peft_export
