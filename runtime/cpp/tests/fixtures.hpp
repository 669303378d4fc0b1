// Hand-made manifests and safetensors files for the unit tests (no exporter needed).
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "check.hpp"
#include "peft_export/safetensors.hpp"

namespace fixtures {

using Json = nlohmann::json;

struct Tensor {
  std::string dtype = "F32";
  std::vector<std::int64_t> shape;
  std::vector<float> values;
};

// Serializes tensors (F32 only) and metadata into the safetensors layout.
inline std::string safetensors(const std::map<std::string, Tensor>& tensors,
                               const std::map<std::string, std::string>& metadata) {
  Json header = Json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string data;
  for (const auto& [name, tensor] : tensors) {
    std::size_t begin = data.size();
    data.append(reinterpret_cast<const char*>(tensor.values.data()), tensor.values.size() * 4);
    header[name] = {{"dtype", tensor.dtype}, {"shape", tensor.shape}, {"data_offsets", {begin, data.size()}}};
  }
  std::string text = header.dump();
  std::uint64_t len = text.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &len, 8);
  return out + text + data;
}

// A runtime-mode manifest with one LoRA module ("m", in 4, out 3, r_max 2) and `slots`.
inline Json manifest(int slots = 3) {
  Json inputs = Json::array();
  inputs.push_back({{"name", "input_ids"}, {"dtype", "int64"}, {"shape", {"batch", "seq"}}});
  inputs.push_back({{"name", "lora.m.A"}, {"dtype", "float32"}, {"shape", {"slots", 2, 4}}});
  inputs.push_back({{"name", "lora.m.B"}, {"dtype", "float32"}, {"shape", {"slots", 3, 2}}});
  inputs.push_back({{"name", "lora.m.out_scale"}, {"dtype", "float32"}, {"shape", {"slots", 3}}});
  return Json{
      {"schema_version", 1},
      {"base_model", {{"source", "tiny"}, {"architecture", "llama"}, {"config", Json::object()}, {"weights_sha256", "abc"}}},
      {"mode", "runtime"},
      {"precision", "fp32"},
      {"opset", 18},
      {"graph", {{"file", "model.onnx"}, {"inputs", inputs}, {"outputs", Json::array()}}},
      {"kv", {{"num_layers", 1}, {"num_kv_heads", 1}, {"head_dim", 4}, {"dtype", "float32"}}},
      {"vocab_size", 10},
      {"hidden_size", 4},
      {"adapters",
       {{"methods", {"lora", "dora"}},
        {"slots", slots},
        {"r_max", 2},
        {"modules", {{{"path", "m"}, {"in_features", 4}, {"out_features", 3}}}},
        {"installed", Json::object()}}},
  };
}

inline std::map<std::string, std::string> adapter_meta(const std::string& name) {
  return {{"format", "peft-export-adapter"}, {"version", "1"}, {"method", "lora"},
          {"name", name}, {"base_weights_sha256", "abc"}, {"rank", "2"}, {"source", "test"}};
}

// An adapter whose A is filled with `value` (B ones).
inline std::string lora_file(const std::string& name, float value) {
  return safetensors({{"lora.m.A", {"F32", {2, 4}, std::vector<float>(8, value)}},
                      {"lora.m.B", {"F32", {3, 2}, std::vector<float>(6, 1.0f)}}},
                     adapter_meta(name));
}

// Writes a bundle folder with the manifest and adapters "a".."e" installed.
inline std::filesystem::path lora_bundle(const std::string& name, int slots = 3) {
  auto dir = check::temp_dir(name);
  Json doc = manifest(slots);
  float value = 1.0f;
  for (const char* adapter : {"a", "b", "c", "d", "e"}) {
    std::string file = std::string("adapters/") + adapter + ".safetensors";
    check::write_file(dir / file, lora_file(adapter, value));
    doc["adapters"]["installed"][adapter] = {{"file", file}, {"method", "lora"}, {"rank", 2}};
    value += 1.0f;
  }
  check::write_file(dir / "manifest.json", doc.dump());
  return dir;
}

// Writes `bytes` next to `path` and renames it into place, as the bundle writer does.
inline void replace_file(const std::filesystem::path& path, const std::string& bytes) {
  auto staged = path.parent_path() / ("." + path.filename().string() + ".staged");
  check::write_file(staged, bytes);
  std::filesystem::rename(staged, path);
}

// Makes manifest.json record the sha256 of every installed adapter file, as exports do.
inline void record_hashes(const std::filesystem::path& dir) {
  Json doc = Json::parse(std::ifstream(dir / "manifest.json"));
  for (auto& [name, entry] : doc["adapters"]["installed"].items()) {
    entry["sha256"] = peft_export::SafetensorsFile(dir / entry["file"].get<std::string>()).sha256();
  }
  replace_file(dir / "manifest.json", doc.dump());
}

// 'peft-export adapters add --replace': adapter `name` gets A filled with `value`, and the
// manifest its new hash.
inline void replace_adapter(const std::filesystem::path& dir, const std::string& name,
                            float value) {
  replace_file(dir / "adapters" / (name + ".safetensors"), lora_file(name, value));
  record_hashes(dir);
}

}  // namespace fixtures
