// ONNX Runtime pieces both ORT paths share: dtype mapping, the process's environment, the
// session options every session starts from, and the MultiLoRA CPU kernel (private header).
#pragma once

#include <onnxruntime_cxx_api.h>

#include <exception>
#include <string>

#include "peft_export/adapter_store.hpp"
#include "peft_export/backend.hpp"
#include "peft_export/dtype.hpp"
#include "peft_export/manifest.hpp"

namespace peft_export::ort {

ONNXTensorElementDataType ort_type(DType dtype);
// Throws InferenceError naming `name` for a type the runtime does not handle.
DType from_ort_type(ONNXTensorElementDataType type, const std::string& name);
Ort::Env& shared_env();
// An ONNX Runtime message cut to its first line (at most 300 characters), for our errors.
std::string first_line(const std::exception& exc);
// Optimization level, threads (0: the cores this process may use) and denormal flushing.
Ort::SessionOptions session_options(const BackendOptions& options);
// Registers options.multilora_library; refused for bundles without fp32 LoRA banks.
void register_multilora(Ort::SessionOptions& so, const Manifest& manifest,
                        const AdapterBanks* banks, const BackendOptions& options);

}  // namespace peft_export::ort
