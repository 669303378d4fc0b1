#include "peft_export/manifest.hpp"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <system_error>

#include "json_fields.hpp"
#include "peft_export/errors.hpp"

namespace peft_export {
namespace {

using detail::Fields;
using detail::Json;

constexpr const char* kFile = "manifest.json";
constexpr std::uintmax_t kMaxManifestBytes = 64ull * 1024 * 1024;
// Largest size field (vocabulary, features, rank, lengths, fixed graph dimensions): any real
// model is far below it, and a product of two such fields cannot overflow 64 bits. Products
// of more (adapter banks: slots x r_max x features) are checked where they are allocated.
constexpr std::int64_t kMaxSize = INT32_MAX;

int small_int(const Fields& fields, const std::string& key) {
  std::int64_t value = fields.integer(key);
  if (value > INT32_MAX) fields.fail(key, "is too large");
  return static_cast<int>(value);
}

std::int64_t bounded(const Fields& fields, const std::string& key, std::int64_t value) {
  if (value > kMaxSize) {
    fields.fail(key, "is " + std::to_string(value) + ", more than any model has (at most " +
                         std::to_string(kMaxSize) + "); re-export the bundle");
  }
  return value;
}

std::int64_t positive(const Fields& fields, const std::string& key) {
  std::int64_t value = bounded(fields, key, fields.integer(key));
  if (value == 0) fields.fail(key, "must be positive; re-export the bundle");
  return value;
}

std::int64_t opt_size(const Fields& fields, const std::string& key) {
  return bounded(fields, key, fields.opt_integer(key).value_or(0));
}

DType parse_dtype(const Fields& fields, const std::string& key) {
  std::string name = fields.str(key);
  try {
    return dtype_from_manifest(name);
  } catch (const BundleError&) {
    fields.fail(key, "has unsupported dtype '" + name + "'; re-export the bundle");
  }
}

const Json& list_field(const Fields& fields, const std::string& key) {
  const Json& value = fields.required(key);
  if (!value.is_array()) fields.fail(key, "must be a list");
  return value;
}

TensorSpec parse_tensor(const Json& value, const std::string& where) {
  Fields fields(value, where, kFile);
  TensorSpec spec;
  spec.name = fields.str("name");
  spec.dtype = parse_dtype(fields, "dtype");
  const Json& shape = list_field(fields, "shape");
  for (std::size_t i = 0; i < shape.size(); ++i) {
    std::string at = fields.at("shape") + "[" + std::to_string(i) + "]";
    Dim dim;
    if (shape[i].is_string()) {
      dim.name = shape[i].get<std::string>();
    } else {
      dim.size = detail::non_negative_integer(shape[i], at, kFile);
      if (dim.size > kMaxSize) {
        throw BundleError(std::string(kFile) + ": " + at + " is " + std::to_string(dim.size) +
                          ", more than any model has; re-export the bundle");
      }
    }
    spec.shape.push_back(std::move(dim));
  }
  return spec;
}

std::vector<TensorSpec> parse_tensors(const Fields& fields, const std::string& key) {
  const Json& list = list_field(fields, key);
  std::vector<TensorSpec> out;
  for (std::size_t i = 0; i < list.size(); ++i) {
    out.push_back(parse_tensor(list[i], fields.at(key) + "[" + std::to_string(i) + "]"));
  }
  return out;
}

GraphSpec parse_graph(const Json& value) {
  Fields fields(value, "manifest.graph", kFile);
  return GraphSpec{fields.str("file"), parse_tensors(fields, "inputs"),
                   parse_tensors(fields, "outputs")};
}

KVLayout parse_kv(const Json& value) {
  Fields fields(value, "manifest.kv", kFile);
  KVLayout kv;
  kv.num_layers = small_int(fields, "num_layers");
  kv.num_kv_heads = small_int(fields, "num_kv_heads");
  kv.head_dim = small_int(fields, "head_dim");
  kv.dtype = parse_dtype(fields, "dtype");
  return kv;
}

BaseModelInfo parse_base(const Json& value) {
  Fields fields(value, "manifest.base_model", kFile);
  const Json& config = fields.required("config");
  if (!config.is_object()) fields.fail("config", "must be an object");
  return BaseModelInfo{fields.str("source"), fields.str("architecture"), config.dump(),
                       fields.str("weights_sha256")};
}

std::vector<std::string> string_list(const Fields& fields, const std::string& key) {
  std::vector<std::string> out;
  if (fields.find(key) == nullptr) return out;
  const Json& list = list_field(fields, key);
  for (const Json& item : list) {
    if (!item.is_string()) fields.fail(key, "must be a list of strings");
    out.push_back(item.get<std::string>());
  }
  return out;
}

AdapterLayout parse_adapters(const Json& value) {
  Fields fields(value, "manifest.adapters", kFile);
  AdapterLayout layout;
  layout.methods = string_list(fields, "methods");
  layout.slots = fields.find("slots") ? small_int(fields, "slots") : 0;
  layout.r_max = opt_size(fields, "r_max");
  layout.prefix_max_len = opt_size(fields, "prefix_max_len");
  layout.prompt_max_len = opt_size(fields, "prompt_max_len");
  layout.adaption_max_len = opt_size(fields, "adaption_max_len");
  if (fields.find("modules") != nullptr) {
    const Json& modules = list_field(fields, "modules");
    for (std::size_t i = 0; i < modules.size(); ++i) {
      Fields module(modules[i], fields.at("modules") + "[" + std::to_string(i) + "]", kFile);
      layout.modules.push_back(ModuleSlot{module.str("path"), positive(module, "in_features"),
                                          positive(module, "out_features"),
                                          module.boolean("has_bias", false)});
    }
  }
  if (const Json* merged = fields.find("merged"); merged != nullptr && !merged->is_null()) {
    Fields merged_fields(*merged, fields.at("merged"), kFile);
    layout.merged_name = merged_fields.opt_str("name");
  }
  if (const Json* installed = fields.find("installed"); installed != nullptr) {
    if (!installed->is_object()) fields.fail("installed", "must be an object");
    for (const auto& [name, entry] : installed->items()) {
      Fields adapter(entry, fields.at("installed") + "." + name, kFile);
      layout.installed[name] =
          InstalledAdapter{adapter.str("file"), adapter.str("method"),
                           adapter.opt_integer("rank").value_or(0),
                           adapter.opt_str("sha256").value_or("")};
    }
  }
  return layout;
}

TokenizerInfo parse_tokenizer(const Json& value) {
  Fields fields(value, "manifest.tokenizer", kFile);
  TokenizerInfo info;
  const Json* file = fields.find("file");
  info.file = file == nullptr ? std::optional<std::string>("tokenizer.json")
                              : fields.opt_str("file");
  info.chat_template = fields.opt_str("chat_template");
  info.bos_token_id = fields.opt_integer("bos_token_id");
  info.pad_token_id = fields.opt_integer("pad_token_id");
  if (fields.find("eos_token_ids") != nullptr) {
    const Json& ids = list_field(fields, "eos_token_ids");
    for (std::size_t i = 0; i < ids.size(); ++i) {
      info.eos_token_ids.push_back(detail::non_negative_integer(
          ids[i], fields.at("eos_token_ids") + "[" + std::to_string(i) + "]", kFile));
    }
  }
  return info;
}

EngineRecord parse_engine(const Json& value, const std::string& where) {
  Fields fields(value, where, kFile);
  EngineRecord record;
  record.file = fields.str("file");
  record.backend = fields.str("backend");
  record.version = fields.str("version");
  record.precision = fields.str("precision");
  list_field(fields, "profiles");
  record.compute_capability = fields.opt_str("compute_capability");
  record.refittable = fields.boolean("refittable", false);
  record.lora_impl = fields.opt_str("lora_impl").value_or("onnx");
  record.onnx_sha256 = fields.opt_str("onnx_sha256").value_or("");
  return record;
}

std::string one_of(const Fields& fields, const std::string& key,
                   std::initializer_list<const char*> allowed) {
  std::string value = fields.str(key);
  std::string names;
  for (const char* option : allowed) {
    if (value == option) return value;
    names += names.empty() ? option : std::string(", ") + option;
  }
  fields.fail(key, "is '" + value + "', expected one of " + names + "; re-export the bundle");
}

// An integer field within [low, high]; the bounds are checked before narrowing to int.
int int_in(const Fields& fields, const std::string& key, int low, int high) {
  std::int64_t value = fields.integer(key);
  if (value < low || value > high) {
    fields.fail(key, "is " + std::to_string(value) + ", expected " + std::to_string(low) + " to " +
                         std::to_string(high) + "; re-export the bundle");
  }
  return static_cast<int>(value);
}

std::map<std::string, std::string> string_map(const Fields& fields, const std::string& key) {
  std::map<std::string, std::string> out;
  const Json* value = fields.find(key);
  if (value == nullptr) return out;
  if (!value->is_object()) fields.fail(key, "must be an object; re-export the bundle");
  for (const auto& [name, item] : value->items()) {
    if (!item.is_string()) fields.fail(key + "." + name, "must be a string; re-export the bundle");
    out[name] = item.get<std::string>();
  }
  return out;
}

// The widths ONNX Runtime's MatMulNBits and block-wise DequantizeLinear take.
constexpr int kMinQuantBits = 2;
constexpr int kMaxQuantBits = 8;
// ONNX Runtime's MatMulNBits accuracy levels: 0 (unset) to 4 (int8 activations).
constexpr int kMaxAccuracyLevel = 4;

std::optional<Quantization> parse_quantization(const Json* value) {
  if (value == nullptr || value->is_null()) return std::nullopt;
  Fields fields(*value, "manifest.quantization", kFile);
  Quantization quant;
  quant.bits = int_in(fields, "bits", kMinQuantBits, kMaxQuantBits);
  quant.block_size = positive(fields, "block_size");
  quant.format = one_of(fields, "format", {"qdq", "matmulnbits"});
  quant.accuracy_level =
      fields.find("accuracy_level") ? int_in(fields, "accuracy_level", 0, kMaxAccuracyLevel) : 0;
  if (const Json* modules = fields.find("modules")) {
    if (!modules->is_object()) fields.fail("modules", "must be an object; re-export the bundle");
    for (const auto& [path, entry] : modules->items()) {
      Fields module(entry, fields.at("modules") + "." + path, kFile);
      quant.modules[path] = QuantizedModule{
          module.str("source"), int_in(module, "bits", kMinQuantBits, kMaxQuantBits),
          module.str("weight"), module.str("scales"), module.opt_str("zero_points").value_or("")};
    }
  }
  quant.kept = string_map(fields, "kept");
  return quant;
}

std::optional<EncoderInfo> parse_encoder(const Json* value) {
  if (value == nullptr || value->is_null()) return std::nullopt;
  Fields fields(*value, "manifest.encoder", kFile);
  EncoderInfo info;
  info.task = one_of(fields, "task", {"sequence-classification", "token-classification",
                                      "question-answering", "feature-extraction"});
  info.outputs = string_list(fields, "outputs");
  if (info.outputs.empty()) fields.fail("outputs", "must name the graph's outputs; re-export the bundle");
  info.token_type_ids = fields.boolean("token_type_ids", false);
  if (fields.find("max_length") != nullptr) info.max_length = positive(fields, "max_length");
  if (const Json* pooling = fields.find("pooling"); pooling != nullptr && !pooling->is_null()) {
    Fields pool(*pooling, fields.at("pooling"), kFile);
    info.pooling = pool.opt_str("mode").value_or("");
    info.normalize = pool.boolean("normalize", false);
  }
  info.max_labels = opt_size(fields, "max_labels");
  info.labels = string_list(fields, "labels");
  info.base_head = fields.boolean("base_head", true);
  info.heads = string_list(fields, "heads");
  return info;
}

void check_paths(const Manifest& manifest) {
  std::vector<std::string> files{manifest.graph.file};
  for (const auto& [name, adapter] : manifest.adapters.installed) files.push_back(adapter.file);
  for (const auto& engine : manifest.engines) files.push_back(engine.file);
  if (manifest.tokenizer.file) files.push_back(*manifest.tokenizer.file);
  for (const auto& file : files) confined_path({}, file);
}

void check_consistency(const Manifest& manifest) {
  if (!manifest.runtime_mode()) return;
  const AdapterLayout& layout = manifest.adapters;
  if (!layout.modules.empty() && (layout.slots < 1 || layout.r_max < 1)) {
    throw BundleError(std::string(kFile) +
                      ": runtime mode with LoRA modules needs adapters.slots >= 1 and "
                      "adapters.r_max >= 1; re-export the bundle");
  }
}

}  // namespace

const TensorSpec* GraphSpec::input(const std::string& name) const {
  for (const auto& spec : inputs) {
    if (spec.name == name) return &spec;
  }
  return nullptr;
}

const TensorSpec* GraphSpec::output(const std::string& name) const {
  for (const auto& spec : outputs) {
    if (spec.name == name) return &spec;
  }
  return nullptr;
}

const ModuleSlot* AdapterLayout::module(const std::string& path) const {
  for (const auto& slot : modules) {
    if (slot.path == path) return &slot;
  }
  return nullptr;
}

Manifest parse_manifest(const std::string& json_text) {
  detail::check_json_depth(json_text, kFile, "re-export the bundle");
  Json data = Json::parse(json_text, nullptr, false);
  if (data.is_discarded()) {
    throw BundleError(std::string(kFile) + ": not valid JSON; re-export the bundle");
  }
  if (!data.is_object()) {
    throw BundleError(std::string(kFile) + ": top level must be an object; re-export the bundle");
  }
  Fields fields(data, "manifest", kFile);
  const Json* version = fields.find("schema_version");
  if (version == nullptr || !version->is_number_integer()) {
    throw BundleError(std::string(kFile) +
                      ": schema_version missing or not an integer; re-export");
  }
  auto schema = version->get<std::int64_t>();
  if (schema > kSchemaVersion) {
    throw BundleError(std::string(kFile) + ": schema_version " + std::to_string(schema) +
                      " is newer than this peft-export runtime understands (" +
                      std::to_string(kSchemaVersion) + "); upgrade peft-export");
  }
  if (schema < 1) {
    throw BundleError(std::string(kFile) + ": schema_version " + std::to_string(schema) +
                      " is invalid; re-export");
  }

  Manifest manifest;
  manifest.schema_version = static_cast<int>(schema);
  manifest.base_model = parse_base(fields.required("base_model"));
  manifest.mode = one_of(fields, "mode", {"merged", "runtime"});
  manifest.precision = one_of(fields, "precision", {"fp32", "fp16", "bf16"});
  manifest.opset = small_int(fields, "opset");
  manifest.graph = parse_graph(fields.required("graph"));
  manifest.kv = parse_kv(fields.required("kv"));
  manifest.vocab_size = positive(fields, "vocab_size");
  manifest.hidden_size = positive(fields, "hidden_size");
  if (const Json* adapters = fields.find("adapters")) manifest.adapters = parse_adapters(*adapters);
  if (const Json* tokenizer = fields.find("tokenizer")) {
    manifest.tokenizer = parse_tokenizer(*tokenizer);
  } else {
    manifest.tokenizer.file = "tokenizer.json";
  }
  if (const Json* generation = fields.find("generation")) {
    Fields gen(*generation, "manifest.generation", kFile);
    manifest.max_position_embeddings = gen.opt_integer("max_position_embeddings");
  }
  if (const Json* engines = fields.find("engines")) {
    if (!engines->is_array()) fields.fail("engines", "must be a list");
    for (std::size_t i = 0; i < engines->size(); ++i) {
      manifest.engines.push_back(
          parse_engine((*engines)[i], "manifest.engines[" + std::to_string(i) + "]"));
    }
  }
  if (const Json* producer = fields.find("producer")) {
    if (!producer->is_object()) fields.fail("producer", "must be an object");
    for (const auto& [key, value] : producer->items()) {
      if (!value.is_string()) fields.fail("producer." + key, "must be a string");
      manifest.producer[key] = value.get<std::string>();
    }
  }
  manifest.quantization = parse_quantization(fields.find("quantization"));
  manifest.encoder = parse_encoder(fields.find("encoder"));
  check_paths(manifest);
  check_consistency(manifest);
  return manifest;
}

Manifest load_manifest(const std::filesystem::path& bundle_dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(bundle_dir, ec)) {
    throw BundleError(bundle_dir.string() +
                      ": not a bundle directory; pass the folder written by 'export'");
  }
  std::filesystem::path path = confined_path(bundle_dir, kFile);
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw BundleError(bundle_dir.string() + ": no manifest.json; is this a peft-export bundle?");
  }
  if (std::filesystem::file_size(path, ec) > kMaxManifestBytes) {
    throw BundleError(path.string() + ": larger than 64 MiB; not a manifest");
  }
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in.good() && !in.eof()) throw BundleError(path.string() + ": cannot be read");
  return parse_manifest(text.str());
}

std::filesystem::path confined_path(const std::filesystem::path& bundle_dir,
                                    const std::string& relative) {
  std::filesystem::path pure(relative);
  bool escapes = relative.empty() || pure.is_absolute() || relative.find('\\') != std::string::npos;
  for (const auto& part : pure) escapes = escapes || part == "..";
  if (escapes) {
    throw BundleError("bundle path '" + relative +
                      "' escapes the bundle; paths must be relative and inside it");
  }
  if (bundle_dir.empty()) return pure;
  std::filesystem::path path = bundle_dir / pure;
  std::error_code ec;
  std::filesystem::path real_root = std::filesystem::weakly_canonical(bundle_dir, ec);
  std::filesystem::path real = std::filesystem::weakly_canonical(path, ec);
  auto [root_end, unused] = std::mismatch(real_root.begin(), real_root.end(), real.begin(), real.end());
  (void)unused;
  if (ec || root_end != real_root.end()) {
    throw BundleError("bundle path '" + relative +
                      "' resolves outside the bundle (symlink?); copy the file in");
  }
  return path;
}

}  // namespace peft_export
