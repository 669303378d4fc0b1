// manifest.json of a bundle (docs/bundle-format.md), parsed strictly.
//
// Every field the runtime relies on is checked once, with an error naming the field and
// the fix, so that later code can trust the structure.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "peft_export/dtype.hpp"

namespace peft_export {

inline constexpr int kSchemaVersion = 1;

// A dimension is either a fixed size or a named dynamic dimension ("batch", "past", ...).
struct Dim {
  std::int64_t size = -1;
  std::string name;
  bool is_fixed() const { return size >= 0; }
};

struct TensorSpec {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<Dim> shape;
};

struct GraphSpec {
  std::string file;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  const TensorSpec* input(const std::string& name) const;
  const TensorSpec* output(const std::string& name) const;
};

struct KVLayout {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kFloat32;
};

struct ModuleSlot {
  std::string path;
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  bool has_bias = false;
};

struct InstalledAdapter {
  std::string file;
  std::string method;
  std::int64_t rank = 0;
  std::string sha256;
};

struct AdapterLayout {
  std::vector<std::string> methods;
  int slots = 0;
  std::int64_t r_max = 0;
  std::vector<ModuleSlot> modules;
  std::int64_t prefix_max_len = 0;
  std::int64_t prompt_max_len = 0;
  std::int64_t adaption_max_len = 0;
  std::optional<std::string> merged_name;
  std::map<std::string, InstalledAdapter> installed;
  const ModuleSlot* module(const std::string& path) const;
};

struct TokenizerInfo {
  std::optional<std::string> file;
  std::optional<std::string> chat_template;
  std::optional<std::int64_t> bos_token_id;
  std::vector<std::int64_t> eos_token_ids;
  std::optional<std::int64_t> pad_token_id;
};

struct EngineRecord {
  std::string file;
  std::string backend;
  std::string version;
  std::string precision;
  std::optional<std::string> compute_capability;
  bool refittable = false;
  std::string lora_impl = "onnx";
  std::string onnx_sha256;
};

// One linear layer of the base stored block-quantized (its graph tensors and origin).
struct QuantizedModule {
  std::string source;  // "rtn" (quantized at export) or "gguf:Q4_0" and the like (carried)
  int bits = 0;        // this layer's width: a layer carried from a GGUF keeps its own
  std::string weight;
  std::string scales;
  std::string zero_points;  // empty: the format's default zero point (symmetric)
};

// Weight-only block quantization of the base's linear layers (adapters stay float).
struct Quantization {
  int bits = 0;  // width of the layers quantized at export
  std::int64_t block_size = 0;
  // "qdq": block-wise DequantizeLinear -> MatMul, which ONNX Runtime fuses into MatMulNBits
  // at the session's accuracy level; "matmulnbits": MatMulNBits nodes with their own level
  std::string format;
  int accuracy_level = 0;  // ONNX Runtime's MatMulNBits compute level to serve at (0-4)
  std::map<std::string, QuantizedModule> modules;
  std::map<std::string, std::string> kept;  // layers left at full precision, and why
};

// Encoder (BERT-family) bundles: the task the graph computes and what turns its outputs into
// labels, spans or vectors (docs/bundle-format.md "Encoder bundles").
struct EncoderInfo {
  // "sequence-classification", "token-classification", "question-answering" or
  // "feature-extraction"
  std::string task;
  std::vector<std::string> outputs;  // graph outputs the runtime reads, in order
  bool token_type_ids = false;
  std::int64_t max_length = 512;  // longest input in tokens, prompt tokens included
  std::string pooling;            // feature-extraction: "mean", "cls" or "max" (in the graph)
  bool normalize = false;         // feature-extraction: embeddings are unit length
  std::int64_t max_labels = 0;    // labelled tasks: last dim of the logits (heads zero-padded)
  std::vector<std::string> labels;  // the base head's labels (merged: the merged adapter's)
  bool base_head = true;  // false: the base has no trained head, rows need an adapter's
  std::vector<std::string> heads;  // runtime mode: head-bank graph inputs (head.PATH.PARAM)

  bool labelled() const { return task == "sequence-classification" || task == "token-classification"; }
};

struct BaseModelInfo {
  std::string source;
  std::string architecture;
  std::string config_json;  // the HF config, re-serialized
  std::string weights_sha256;
};

struct Manifest {
  int schema_version = kSchemaVersion;
  BaseModelInfo base_model;
  std::string mode;       // "merged" | "runtime"
  std::string precision;  // "fp32" | "fp16" | "bf16"
  int opset = 0;
  GraphSpec graph;
  KVLayout kv;
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;
  AdapterLayout adapters;
  TokenizerInfo tokenizer;
  std::optional<std::int64_t> max_position_embeddings;
  std::vector<EngineRecord> engines;
  std::map<std::string, std::string> producer;
  std::optional<Quantization> quantization;  // absent: the base weights are float
  std::optional<EncoderInfo> encoder;  // set for encoder bundles (no KV cache, no generation)

  bool runtime_mode() const { return mode == "runtime"; }
};

// Parses manifest text; throws BundleError naming the offending field.
Manifest parse_manifest(const std::string& json_text);
// Reads and parses BUNDLE/manifest.json; throws BundleError when missing or malformed.
Manifest load_manifest(const std::filesystem::path& bundle_dir);
// Resolves a manifest-relative path inside the bundle, refusing absolute paths, `..`
// and symlinks that leave the bundle.
std::filesystem::path confined_path(const std::filesystem::path& bundle_dir,
                                    const std::string& relative);

}  // namespace peft_export
