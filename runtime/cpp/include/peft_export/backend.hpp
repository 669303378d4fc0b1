// The backend interface: one loaded graph or engine that runs prefill and decode steps.
//
// The generation loop owns the per-step host inputs; a backend owns the KV cache of each
// running request (in a KVState it creates) and the device copies of the adapter banks.
// One backend serves many threads at once as long as each request uses its own KVState.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "peft_export/adapter_store.hpp"
#include "peft_export/dtype.hpp"
#include "peft_export/manifest.hpp"

namespace peft_export {

// A host tensor borrowed for one step.
struct TensorRef {
  DType dtype = DType::kFloat32;
  std::vector<std::int64_t> shape;
  const void* data = nullptr;
};

// The inputs of one step, all [batch, ...] in host memory.
struct StepInputs {
  std::int64_t batch = 0;
  std::int64_t seq = 0;  // new tokens this step
  const std::int64_t* input_ids = nullptr;       // [batch, seq]
  const std::int64_t* attention_mask = nullptr;  // [batch, past + prompt_len + seq]
  std::int64_t mask_len = 0;
  const std::int64_t* position_ids = nullptr;  // [batch, prompt_len + seq]
  std::int64_t position_len = 0;
  const std::int64_t* adapter_ids = nullptr;  // [batch], runtime mode only
  // Any other graph input by name (prompt_embeds, adaption.*); the first step may also set
  // past_key_values.* to seed the cache (prefix tuning).
  std::map<std::string, TensorRef> extra;
};

// Per-request state of a backend (the KV cache between steps).
class KVState {
 public:
  virtual ~KVState() = default;
  virtual std::int64_t past_len() const = 0;
};

struct BackendOptions {
  int threads = 0;                // intra-op threads; 0: the cores this process may use
  bool denormals_as_zero = true;  // same default as the Python runtime
  std::string optimization = "all";  // "all" | "extended" | "basic" | "disabled"
  // ONNX Runtime on the CPU: move the memory the session allocated (its weights) onto 2 MiB
  // pages once it is loaded (~1-2 s per GB); decode steps then miss the TLB far less
  bool huge_pages = true;
  std::string engine;                // TensorRT: engine file (default: the manifest's first)
  std::filesystem::path plugin_library;  // TensorRT: libpeft_multilora.so
  // ONNX Runtime: libpeft_multilora_ort.so, the MultiLoRA CPU kernel for fp32 runtime-adapter
  // bundles (empty: the op's ONNX function body runs)
  std::filesystem::path multilora_library;
  // ONNX Runtime, quantized bundles: the MatMulNBits accuracy level their MatMuls compute at,
  // -1 for the bundle's own (manifest quantization.accuracy_level); 4 quantizes activations
  // to int8 per block (fast), 1 computes in float32 on the dequantized weights (exact). A
  // "matmulnbits" bundle carries its level in its nodes and runs at that level only.
  int quant_accuracy = -1;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual std::unique_ptr<KVState> new_state() = 0;
  // Runs one step; writes the last position's logits of each row, as float, into
  // `last_logits` ([batch, vocab]) and keeps the new KV cache in `state`.
  virtual void step(KVState& state, const StepInputs& inputs, std::vector<float>& last_logits) = 0;
};

// ONNX Runtime on CPU; `banks` (may be null) are read in place at every step.
std::unique_ptr<Backend> make_ort_backend(const std::filesystem::path& bundle_dir,
                                          const Manifest& manifest, AdapterBanks* banks,
                                          const BackendOptions& options);

// TensorRT; throws InferenceError when this build has no TensorRT support.
std::unique_ptr<Backend> make_tensorrt_backend(const std::filesystem::path& bundle_dir,
                                               const Manifest& manifest, AdapterBanks* banks,
                                               const BackendOptions& options);

bool tensorrt_available();

}  // namespace peft_export
