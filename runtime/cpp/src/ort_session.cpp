// ONNX Runtime sessions as both ORT paths (decoder steps, encoder runs) open them.
#include "ort_session.hpp"

#include <sched.h>

#include <algorithm>

#include "peft_export/errors.hpp"

namespace peft_export::ort {
namespace {

int available_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return 1;
}

GraphOptimizationLevel optimization_level(const std::string& name) {
  if (name == "all") return ORT_ENABLE_ALL;
  if (name == "extended") return ORT_ENABLE_EXTENDED;
  if (name == "basic") return ORT_ENABLE_BASIC;
  if (name == "disabled") return ORT_DISABLE_ALL;
  throw InferenceError("unknown optimization level '" + name +
                       "'; use one of all, extended, basic, disabled");
}

}  // namespace

ONNXTensorElementDataType ort_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case DType::kFloat16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case DType::kBFloat16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
    case DType::kFloat64: return ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
    case DType::kInt64: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    case DType::kInt32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    case DType::kInt16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16;
    case DType::kInt8: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    case DType::kUInt8: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case DType::kBool: return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

DType from_ort_type(ONNXTensorElementDataType type, const std::string& name) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return DType::kFloat32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return DType::kFloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return DType::kInt64;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return DType::kInt32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return DType::kBool;
    default:
      throw InferenceError("graph tensor '" + name +
                           "' has a type the ORT backend does not handle; re-export with "
                           "--precision fp32 or fp16");
  }
}

Ort::Env& shared_env() {
  static Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "peft_export");
  return env;
}

std::string first_line(const std::exception& exc) {
  std::string text = exc.what();
  text = text.substr(0, text.find('\n'));
  return text.substr(0, 300);
}

namespace {

// ONNX Runtime's session optimizer turns Add + Add + LayerNormalization into its
// SkipLayerNormalization, whose CPU kernel measured slower than the ops it replaces (MiniLM
// batch 32: 981 vs 915 ms CPU time; runtime/README.md), so sessions keep the plain ops.
constexpr const char* kDisabledOptimizersKey = "optimization.disable_specified_optimizers";
constexpr const char* kDisabledOnCpu = "SkipLayerNormFusion";

}  // namespace

Ort::SessionOptions session_options(const BackendOptions& options) {
  Ort::SessionOptions so;
  so.SetGraphOptimizationLevel(optimization_level(options.optimization));
  so.SetIntraOpNumThreads(options.threads > 0 ? options.threads : available_cores());
  so.SetInterOpNumThreads(1);
  so.SetLogSeverityLevel(3);
  if (options.denormals_as_zero) so.AddConfigEntry("session.set_denormal_as_zero", "1");
  so.AddConfigEntry(kDisabledOptimizersKey, kDisabledOnCpu);
  return so;
}

// The MultiLoRA CPU kernel replaces the op's function body (ONNX Runtime prefers a registered
// kernel); it handles fp32 only, so other bundles are refused rather than silently ignored.
void register_multilora(Ort::SessionOptions& so, const Manifest& manifest,
                        const AdapterBanks* banks, const BackendOptions& options) {
  const std::filesystem::path& library = options.multilora_library;
  if (banks == nullptr || manifest.precision != "fp32") {
    throw InferenceError("multilora_library applies to fp32 bundles with LoRA banks; leave it "
                         "empty for this bundle");
  }
  std::error_code ec;
  if (!std::filesystem::is_regular_file(library, ec)) {
    throw InferenceError(library.string() +
                         ": no such file; build it with scripts/build_cpu_kernel.sh, or leave "
                         "multilora_library empty");
  }
  try {
    so.RegisterCustomOpsLibrary(library.c_str());
  } catch (const Ort::Exception& exc) {
    throw InferenceError(library.string() + ": ONNX Runtime could not load the MultiLoRA CPU "
                         "kernel (" + first_line(exc) + "); rebuild it");
  }
}

}  // namespace peft_export::ort
