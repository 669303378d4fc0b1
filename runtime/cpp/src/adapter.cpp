#include "peft_export/adapter.hpp"

#include <algorithm>
#include <iterator>
#include <nlohmann/json.hpp>

#include "peft_export/errors.hpp"
#include "peft_export/safetensors.hpp"

namespace peft_export {
namespace {

constexpr const char* kFormat = "peft-export-adapter";
constexpr const char* kVersion = "1";
constexpr const char* kLoraParts[] = {"A", "B", "out_scale", "in_scale", "bias_scale"};
constexpr const char* kLoraMethods[] = {"lora", "rslora", "dora", "adalora", "loha", "lokr", "ia3"};

struct Expected {
  DType dtype;
  std::vector<std::int64_t> shape;  // -1: a length bounded by `max_len`
  std::int64_t max_len = 0;
  const char* length_name = "";
  bool exact_dtype = false;  // LoRA banks: the file must already be in the bank dtype
};

bool is_lora_family(const std::string& method) {
  return std::any_of(std::begin(kLoraMethods), std::end(kLoraMethods),
                     [&](const char* known) { return method == known; });
}

[[noreturn]] void refuse(const std::filesystem::path& file, const std::string& problem) {
  throw BundleError(file.string() + ": " + problem);
}

bool starts_with(const std::string& text, const std::string& prefix) {
  return text.rfind(prefix, 0) == 0;
}

// Parses "prefix.{i}.{suffix}" with i < layers; returns -1 when the name does not match.
int layer_of(const std::string& name, const std::string& prefix, const std::string& suffix,
             int layers) {
  if (!starts_with(name, prefix) || name.size() <= prefix.size() + suffix.size() ||
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
    return -1;
  }
  std::string digits = name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
  if (digits.empty() || digits.size() > 6 ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return -1;
  }
  int layer = std::stoi(digits);
  return layer < layers ? layer : -1;
}

DType graph_dtype(const Manifest& manifest, const std::string& input, DType fallback) {
  const TensorSpec* spec = manifest.graph.input(input);
  return spec ? spec->dtype : fallback;
}

bool expected_lora(const Manifest& manifest, const std::string& name, Expected& out) {
  if (!starts_with(name, "lora.")) return false;
  std::string rest = name.substr(5);
  for (const char* part : kLoraParts) {
    std::string suffix = std::string(".") + part;
    if (rest.size() <= suffix.size() ||
        rest.compare(rest.size() - suffix.size(), suffix.size(), suffix) != 0) {
      continue;
    }
    const ModuleSlot* module = manifest.adapters.module(rest.substr(0, rest.size() - suffix.size()));
    const TensorSpec* input = manifest.graph.input(name);
    if (module == nullptr || input == nullptr) return false;
    std::string p = part;
    std::int64_t r = manifest.adapters.r_max;
    out.dtype = manifest.kv.dtype;  // banks hold the model dtype, as in the Python store
    out.exact_dtype = true;
    if (p == "A") out.shape = {r, module->in_features};
    if (p == "B") out.shape = {module->out_features, r};
    if (p == "out_scale" || p == "bias_scale") out.shape = {module->out_features};
    if (p == "in_scale") out.shape = {module->in_features};
    return true;
  }
  return false;
}

// An encoder's task head (`head.PATH.PARAM`): one slot of its head bank, [slots, ...fixed].
bool expected_head(const Manifest& manifest, const std::string& name, Expected& out) {
  if (!manifest.encoder || !starts_with(name, "head.")) return false;
  const TensorSpec* input = manifest.graph.input(name);
  if (input == nullptr || input->shape.empty()) return false;
  out.dtype = input->dtype;
  out.shape.clear();
  for (std::size_t i = 1; i < input->shape.size(); ++i) {
    if (!input->shape[i].is_fixed()) {
      throw BundleError("manifest.json: head bank '" + name +
                        "' has a dynamic dimension; re-export the bundle");
    }
    out.shape.push_back(input->shape[i].size);
  }
  return true;
}

// The `labels` metadata of an encoder adapter file: a JSON list of its head's labels.
std::vector<std::string> parse_labels(const std::filesystem::path& file, const std::string& text) {
  if (text.empty()) return {};
  auto value = nlohmann::json::parse(text, nullptr, false);
  bool list = !value.is_discarded() && value.is_array() &&
              std::all_of(value.begin(), value.end(), [](const auto& v) { return v.is_string(); });
  if (!list) refuse(file, "its labels metadata is not a JSON list of strings; re-export the bundle");
  return value.template get<std::vector<std::string>>();
}

bool expected_prompt_side(const Manifest& manifest, const std::string& name, Expected& out) {
  const KVLayout& kv = manifest.kv;
  const AdapterLayout& layout = manifest.adapters;
  if (name == "prompt_embeds" && layout.prompt_max_len > 0) {
    out = {graph_dtype(manifest, "prompt_embeds", kv.dtype), {-1, manifest.hidden_size},
           layout.prompt_max_len, "prompt length"};
    return true;
  }
  for (const char* suffix : {".key", ".value"}) {
    if (layout.prefix_max_len > 0 && layer_of(name, "prefix.", suffix, kv.num_layers) >= 0) {
      out = {kv.dtype, {kv.num_kv_heads, -1, kv.head_dim}, layout.prefix_max_len,
             "prefix length"};
      return true;
    }
    if (layout.adaption_max_len > 0 && layer_of(name, "adaption.", suffix, kv.num_layers) >= 0) {
      out = {graph_dtype(manifest, name, kv.dtype), {kv.num_kv_heads, -1, kv.head_dim},
             layout.adaption_max_len, "adaption length"};
      return true;
    }
  }
  if (layout.adaption_max_len > 0 && layer_of(name, "adaption.", ".gate", kv.num_layers) >= 0) {
    out = {graph_dtype(manifest, name, kv.dtype), {1}, 0, ""};
    return true;
  }
  return false;
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    text += (i ? ", " : "") + (shape[i] < 0 ? std::string("n") : std::to_string(shape[i]));
  }
  return text + "]";
}

void check_shape(const std::filesystem::path& file, const std::string& name,
                 const Expected& expected, const std::vector<std::int64_t>& shape) {
  bool fits = shape.size() == expected.shape.size();
  for (std::size_t i = 0; fits && i < shape.size(); ++i) {
    if (expected.shape[i] >= 0) {
      fits = shape[i] == expected.shape[i];
    } else if (shape[i] > expected.max_len || shape[i] < 1) {
      refuse(file, "tensor '" + name + "' has " + expected.length_name + " " +
                       std::to_string(shape[i]) + " but the bundle accepts 1.." +
                       std::to_string(expected.max_len) +
                       "; re-export the bundle with a larger maximum");
    }
  }
  if (!fits) {
    refuse(file, "tensor '" + name + "' has shape " + shape_text(shape) + ", the bundle expects " +
                     shape_text(expected.shape) + "; was it made for another base model?");
  }
}

std::vector<std::byte> convert(std::vector<std::byte> data, DType from, DType to,
                               std::size_t count) {
  if (from == to) return data;
  std::vector<float> values(count);
  to_float(from, data.data(), count, values.data());
  std::vector<std::byte> out(count * dtype_size(to));
  from_float(to, values.data(), count, out.data());
  return out;
}

bool is_float(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

}  // namespace

bool HostAdapter::has_lora() const {
  return std::any_of(tensors.begin(), tensors.end(),
                     [](const auto& entry) { return starts_with(entry.first, "lora."); });
}

bool HostAdapter::has_banks() const {
  return std::any_of(tensors.begin(), tensors.end(), [](const auto& entry) {
    return starts_with(entry.first, "lora.") || starts_with(entry.first, "head.");
  });
}

std::int64_t HostAdapter::prefix_len() const {
  auto it = tensors.find("prefix.0.key");
  return it == tensors.end() ? 0 : it->second.shape[1];
}

std::int64_t HostAdapter::prompt_len() const {
  auto it = tensors.find("prompt_embeds");
  return it == tensors.end() ? 0 : it->second.shape[0];
}

std::int64_t HostAdapter::adaption_len() const {
  std::int64_t len = 0;
  for (const auto& [tensor_name, tensor] : tensors) {
    if (starts_with(tensor_name, "adaption.") && tensor.shape.size() == 3) len = tensor.shape[1];
  }
  return len;
}

std::size_t HostAdapter::nbytes() const {
  std::size_t total = 0;
  for (const auto& [tensor_name, tensor] : tensors) total += tensor.data.size();
  return total;
}

HostAdapter read_adapter(const Manifest& manifest, const std::string& name,
                         const std::filesystem::path& file) {
  if (!manifest.runtime_mode()) {
    throw InferenceError("this bundle was exported in merged mode and takes no runtime adapters; "
                         "re-export with --mode runtime to serve adapter '" + name + "'");
  }
  SafetensorsFile st(file);
  const auto& meta = st.metadata();
  auto value = [&](const char* key) {
    auto it = meta.find(key);
    return it == meta.end() ? std::string() : it->second;
  };
  if (value("format") != kFormat || value("version") != kVersion) {
    refuse(file, "not a peft-export adapter file (metadata format/version); convert it with "
                 "'peft-export adapters add'");
  }
  std::string base_hash = value("base_weights_sha256");
  if (base_hash != manifest.base_model.weights_sha256) {
    refuse(file, "was made for other base weights (base_weights_sha256 differs from the bundle's); "
                 "re-create it with 'peft-export adapters add' for this bundle");
  }
  HostAdapter adapter{name, value("method"), file, {}, {}, {}};
  // LoRA-family adapters are gated on the inputs they fill (the tensor loop below), not on the
  // method names the manifest lists: an rsLoRA file fills the same banks as a LoRA one.
  const auto& methods = manifest.adapters.methods;
  if (!is_lora_family(adapter.method) &&
      std::find(methods.begin(), methods.end(), adapter.method) == methods.end()) {
    refuse(file, "method '" + adapter.method + "' is not one this bundle's graph accepts; "
                 "re-export the bundle with --methods including " + adapter.method);
  }
  std::int64_t prefix_len = -1;
  std::int64_t adaption_len = -1;
  for (const auto& [tensor_name, info] : st.tensors()) {
    Expected expected{};
    if (!expected_lora(manifest, tensor_name, expected) &&
        !expected_head(manifest, tensor_name, expected) &&
        !expected_prompt_side(manifest, tensor_name, expected)) {
      refuse(file, "tensor '" + tensor_name + "' has no input in this bundle's graph (a module "
                   "or scale it was not exported for); re-export with --target-modules or "
                   "--methods covering it");
    }
    if (!is_float(info.dtype)) refuse(file, "tensor '" + tensor_name + "' is not floating point");
    if (expected.exact_dtype && info.dtype != expected.dtype) {
      refuse(file, "tensor '" + tensor_name + "' is " + dtype_name(info.dtype) + ", the bank slot is " +
                       dtype_name(expected.dtype) + "; re-add the adapter for this bundle");
    }
    check_shape(file, tensor_name, expected, info.shape);
    std::int64_t& len = starts_with(tensor_name, "prefix.") ? prefix_len : adaption_len;
    if ((starts_with(tensor_name, "prefix.") || starts_with(tensor_name, "adaption.")) &&
        info.shape.size() == 3) {
      if (len >= 0 && len != info.shape[1]) {
        refuse(file, "prefix/adaption tensors disagree on their length; re-create the adapter");
      }
      len = info.shape[1];
    }
    auto count = static_cast<std::size_t>(element_count(info.shape));
    adapter.tensors[tensor_name] = HostTensor{
        expected.dtype, info.shape, convert(st.read(tensor_name), info.dtype, expected.dtype, count)};
  }
  if (prefix_len > 0) {
    for (int layer = 0; layer < manifest.kv.num_layers; ++layer) {
      for (const char* part : {".key", ".value"}) {
        if (!adapter.tensors.count("prefix." + std::to_string(layer) + part)) {
          refuse(file, "prefix tensors must cover every layer; re-create the adapter");
        }
      }
    }
  }
  if (adapter.tensors.empty()) refuse(file, "holds no tensors; re-create the adapter");
  if (manifest.encoder) adapter.labels = parse_labels(file, value("labels"));
  adapter.sha256 = st.sha256();
  auto entry = manifest.adapters.installed.find(name);
  if (entry != manifest.adapters.installed.end() && !entry->second.sha256.empty() &&
      entry->second.sha256 != adapter.sha256) {
    refuse(file, "the file changed under the bundle (its sha256 is not the one manifest.json "
                 "records); re-add the adapter with 'peft-export adapters add --replace'");
  }
  return adapter;
}

}  // namespace peft_export
