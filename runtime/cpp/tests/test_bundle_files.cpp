// Manifest parsing and safetensors validation: every malformed input fails with the fix.
#include <unistd.h>

#include "fixtures.hpp"
#include "peft_export/adapter.hpp"
#include "peft_export/adapter_store.hpp"
#include "peft_export/backend.hpp"
#include "peft_export/errors.hpp"
#include "peft_export/manifest.hpp"
#include "peft_export/safetensors.hpp"

using peft_export::BundleError;
using fixtures::Json;

TEST(valid_manifest_parses) {
  auto manifest = peft_export::parse_manifest(fixtures::manifest().dump());
  CHECK(manifest.runtime_mode());
  CHECK(manifest.adapters.slots == 3);
  CHECK(manifest.adapters.r_max == 2);
  CHECK(manifest.graph.input("lora.m.A") != nullptr);
  CHECK(manifest.graph.input("input_ids")->shape[0].name == "batch");
  CHECK(manifest.graph.input("lora.m.A")->shape[1].size == 2);
  CHECK(manifest.tokenizer.file.value_or("") == "tokenizer.json");
}

TEST(manifest_rejections_name_field_and_fix) {
  auto reject = [](Json doc, const char* part) {
    CHECK_THROWS(peft_export::parse_manifest(doc.dump()), BundleError, part);
  };
  Json doc = fixtures::manifest();
  reject(Json{{"schema_version", 2}}, "upgrade peft-export");
  reject(Json::array(), "top level must be an object");
  Json missing = doc;
  missing.erase("kv");
  reject(missing, "manifest.kv is missing; re-export");
  Json negative = doc;
  negative["vocab_size"] = -1;
  reject(negative, "vocab_size must not be negative");
  Json boolean = doc;
  boolean["opset"] = true;
  reject(boolean, "manifest.opset must be an integer");
  Json mode = doc;
  mode["mode"] = "fused";
  reject(mode, "expected one of merged, runtime");
  Json dtype = doc;
  dtype["kv"]["dtype"] = "float8";
  reject(dtype, "unsupported dtype 'float8'");
  Json escape = doc;
  escape["graph"]["file"] = "../../etc/passwd";
  reject(escape, "escapes the bundle");
  Json absolute = doc;
  absolute["adapters"]["installed"]["x"] = {{"file", "/tmp/x.safetensors"}, {"method", "lora"}};
  reject(absolute, "escapes the bundle");
  Json module = doc;
  module["adapters"]["modules"][0]["in_features"] = "4";
  reject(module, "adapters.modules[0].in_features must be an integer");
  CHECK_THROWS(peft_export::parse_manifest("{not json"), BundleError, "not valid JSON");
}

TEST(load_manifest_needs_a_bundle_folder) {
  CHECK_THROWS(peft_export::load_manifest("/nonexistent/bundle"), BundleError, "not a bundle directory");
  auto dir = check::temp_dir("empty");
  CHECK_THROWS(peft_export::load_manifest(dir), BundleError, "no manifest.json");
}

namespace {

// The fixture manifest with a quantization record in `format`, served at level 4.
Json quantized_manifest(const char* format) {
  Json doc = fixtures::manifest();
  doc["quantization"] = {
      {"bits", 4},
      {"block_size", 32},
      {"format", format},
      {"accuracy_level", 4},
      {"modules",
       {{"m", {{"source", "rtn"}, {"bits", 4}, {"weight", "m.qweight"}, {"scales", "m.scales"},
               {"zero_points", ""}}},
        {"lm_head", {{"source", "gguf:Q8_0"}, {"bits", 8}, {"weight", "lm_head.qweight"},
                     {"scales", "lm_head.scales"}}}}},
      {"kept", {{"embed", "--quant-skip"}}}};
  return doc;
}

}  // namespace

TEST(quantization_parses) {
  CHECK(!peft_export::parse_manifest(fixtures::manifest().dump()).quantization);
  Json null_quant = fixtures::manifest();
  null_quant["quantization"] = nullptr;
  CHECK(!peft_export::parse_manifest(null_quant.dump()).quantization);
  auto manifest = peft_export::parse_manifest(quantized_manifest("qdq").dump());
  CHECK(manifest.quantization.has_value());
  const auto& quant = *manifest.quantization;
  CHECK(quant.bits == 4 && quant.block_size == 32);
  CHECK(quant.format == "qdq" && quant.accuracy_level == 4);
  CHECK(quant.modules.at("lm_head").bits == 8);
  CHECK(quant.modules.at("lm_head").zero_points.empty());
  CHECK(quant.modules.at("m").weight == "m.qweight");
  CHECK(quant.kept.at("embed") == "--quant-skip");
  Json no_level = quantized_manifest("matmulnbits");
  no_level["quantization"].erase("accuracy_level");
  CHECK(peft_export::parse_manifest(no_level.dump()).quantization->accuracy_level == 0);
}

TEST(quantization_rejections_name_the_field) {
  auto reject = [](const char* key, Json value, const char* part) {
    Json doc = quantized_manifest("qdq");
    doc["quantization"][key] = std::move(value);
    CHECK_THROWS(peft_export::parse_manifest(doc.dump()), BundleError, part);
  };
  reject("format", "int4",
         "manifest.quantization.format is 'int4', expected one of qdq, matmulnbits; re-export");
  reject("format", 4, "manifest.quantization.format must be a string");
  reject("accuracy_level", 7, "manifest.quantization.accuracy_level is 7, expected 0 to 4");
  reject("accuracy_level", -1, "manifest.quantization.accuracy_level must not be negative");
  reject("accuracy_level", 1ll << 40, "accuracy_level is 1099511627776, expected 0 to 4");
  reject("accuracy_level", 18446744073709551615ull, "accuracy_level is too large");
  reject("accuracy_level", 1.5, "manifest.quantization.accuracy_level must be an integer");
  reject("accuracy_level", true, "manifest.quantization.accuracy_level must be an integer");
  reject("bits", "4", "manifest.quantization.bits must be an integer");
  reject("bits", 16, "manifest.quantization.bits is 16, expected 2 to 8");
  reject("block_size", 0, "manifest.quantization.block_size must be positive");
  reject("modules", Json::array(), "manifest.quantization.modules must be an object");
  reject("modules", {{"m", {{"source", "rtn"}, {"bits", 4}}}},
         "manifest.quantization.modules.m.weight is missing");
  reject("modules", {{"m", {{"source", "rtn"}, {"bits", 64}, {"weight", "w"}, {"scales", "s"}}}},
         "manifest.quantization.modules.m.bits is 64, expected 2 to 8");
  reject("kept", {{"embed", 3}}, "manifest.quantization.kept.embed must be a string");
  Json missing = quantized_manifest("qdq");
  missing["quantization"].erase("format");
  CHECK_THROWS(peft_export::parse_manifest(missing.dump()), BundleError,
               "manifest.quantization.format is missing; re-export");
  Json list = fixtures::manifest();
  list["quantization"] = Json::array();
  CHECK_THROWS(peft_export::parse_manifest(list.dump()), BundleError,
               "manifest.quantization must be an object");
}

TEST(quant_accuracy_is_checked_before_the_graph_is_read) {
  using peft_export::InferenceError;
  auto dir = check::temp_dir("quant_accuracy");  // no graph: a level that passes reaches its check
  auto backend = [&](const char* format, int level) {
    peft_export::BackendOptions options;
    options.quant_accuracy = level;
    auto doc = format ? quantized_manifest(format) : fixtures::manifest();
    peft_export::Manifest manifest = peft_export::parse_manifest(doc.dump());
    return peft_export::make_ort_backend(dir, manifest, nullptr, options);
  };
  CHECK_THROWS(backend("matmulnbits", 1), InferenceError,
               "quant_accuracy 1 differs from the level 4 this bundle's MatMulNBits nodes carry");
  CHECK_THROWS(backend("matmulnbits", 5), InferenceError, "quant_accuracy 5 is not a MatMulNBits");
  CHECK_THROWS(backend(nullptr, -2), InferenceError, "quant_accuracy -2 is not a MatMulNBits");
  for (int level : {-1, 4}) {
    CHECK_THROWS(backend("matmulnbits", level), InferenceError, "the bundle's graph is missing");
  }
  for (int level : {-1, 0, 1, 4}) {
    CHECK_THROWS(backend("qdq", level), InferenceError, "the bundle's graph is missing");
    CHECK_THROWS(backend(nullptr, level), InferenceError, "the bundle's graph is missing");
  }
}

TEST(symlink_escaping_the_bundle_is_refused) {
  auto dir = check::temp_dir("symlink");
  auto outside = check::temp_dir("outside");
  check::write_file(outside / "model.onnx", "x");
  std::filesystem::create_symlink(outside / "model.onnx", dir / "model.onnx");
  CHECK_THROWS(peft_export::confined_path(dir, "model.onnx"), BundleError, "resolves outside the bundle");
}

TEST(safetensors_valid_file_reads_back) {
  auto dir = check::temp_dir("st_valid");
  check::write_file(dir / "ok.safetensors", fixtures::lora_file("a", 0.5f));
  peft_export::SafetensorsFile file(dir / "ok.safetensors");
  CHECK(file.tensors().size() == 2);
  CHECK(file.metadata().at("format") == "peft-export-adapter");
  auto bytes = file.read("lora.m.A");
  float first = 0;
  std::memcpy(&first, bytes.data(), 4);
  CHECK(bytes.size() == 32 && first == 0.5f);
}

TEST(safetensors_hostile_headers_are_refused) {
  auto dir = check::temp_dir("st_bad");
  auto reject = [&](const std::string& bytes, const char* part) {
    check::write_file(dir / "bad.safetensors", bytes);
    CHECK_THROWS(peft_export::SafetensorsFile(dir / "bad.safetensors"), BundleError, part);
  };
  std::string good = fixtures::lora_file("a", 1.0f);
  reject("", "no header");
  reject(good.substr(0, 20), "header length");
  std::string huge = good;
  huge[7] = '\x7f';
  reject(huge, "header length");
  reject(good.substr(0, good.size() - 4), "points outside the file");
  auto with_header = [](const std::string& header, std::size_t data_bytes) {
    std::uint64_t len = header.size();
    std::string out(8, '\0');
    std::memcpy(out.data(), &len, 8);
    return out + header + std::string(data_bytes, '\0');
  };
  reject(with_header("[1, 2]", 0), "not an object");
  reject(with_header("{\"t\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 4]}}", 8),
         "byte size does not match");
  reject(with_header("{\"t\": {\"dtype\": \"Q4\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4),
         "unsupported dtype");
  reject(with_header("{\"t\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4),
         "invalid shape");
  reject(with_header("{\"t\": {\"dtype\": \"F32\", \"shape\": [1099511627775, 1099511627775, 1099511627775], \"data_offsets\": [0, 4]}}", 4),
         "invalid shape");
  reject(with_header("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, "
                     "\"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}", 12),
         "overlap");
  reject(with_header("{\"__metadata__\": {\"k\": 1}}", 0), "__metadata__ must map strings");
  reject(with_header("{\"t\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 0]}}", 4),
         "points outside the file");
}

TEST(non_finite_weights_are_refused) {
  auto dir = check::temp_dir("st_nan");
  float nan = std::numeric_limits<float>::quiet_NaN();
  check::write_file(dir / "nan.safetensors",
                    fixtures::safetensors({{"t", {"F32", {2}, {1.0f, nan}}}}, {}));
  peft_export::SafetensorsFile file(dir / "nan.safetensors");
  CHECK_THROWS(file.read("t"), BundleError, "NaN or Inf");
}

TEST(adapter_files_must_fit_the_bundle) {
  auto dir = check::temp_dir("adapter_fit");
  auto manifest = peft_export::parse_manifest(fixtures::manifest().dump());
  auto reject = [&](const std::map<std::string, fixtures::Tensor>& tensors,
                    std::map<std::string, std::string> meta, const char* part) {
    check::write_file(dir / "x.safetensors", fixtures::safetensors(tensors, meta));
    CHECK_THROWS(peft_export::read_adapter(manifest, "x", dir / "x.safetensors"), BundleError, part);
  };
  fixtures::Tensor a{"F32", {2, 4}, std::vector<float>(8, 1.0f)};
  auto meta = fixtures::adapter_meta("x");
  reject({{"lora.m.A", {"F32", {3, 4}, std::vector<float>(12, 1.0f)}}}, meta, "bundle expects [2, 4]");
  reject({{"lora.other.A", a}}, meta, "has no input in this bundle's graph");
  auto other_base = meta;
  other_base["base_weights_sha256"] = "zzz";
  reject({{"lora.m.A", a}}, other_base, "other base weights");
  // LoRA-family files are gated on the inputs they fill, not on the manifest's method names
  // (which list lora, dora): a LoHa file fills A like a LoRA one (issue 21 item 4).
  auto loha = meta;
  loha["method"] = "loha";
  check::write_file(dir / "loha.safetensors", fixtures::safetensors({{"lora.m.A", a}}, loha));
  CHECK(peft_export::read_adapter(manifest, "loha", dir / "loha.safetensors").method == "loha");
  auto unknown = meta;
  unknown["method"] = "vera";
  reject({{"lora.m.A", a}}, unknown, "re-export the bundle with --methods including vera");
  auto format = meta;
  format.erase("format");
  reject({{"lora.m.A", a}}, format, "not a peft-export adapter file");
  check::write_file(dir / "ok.safetensors", fixtures::safetensors({{"lora.m.A", a}}, meta));
  auto adapter = peft_export::read_adapter(manifest, "ok", dir / "ok.safetensors");
  CHECK(adapter.has_lora() && adapter.method == "lora");
}

TEST(safetensors_header_and_bytes_come_from_one_open_file) {
  auto dir = check::temp_dir("st_one_open");
  check::write_file(dir / "x.safetensors", fixtures::lora_file("x", 0.5f));
  peft_export::SafetensorsFile file(dir / "x.safetensors");
  // Replaced by rename after the header was read, with other tensor offsets: the bytes read
  // must still be the first file's.
  fixtures::replace_file(
      dir / "x.safetensors",
      fixtures::safetensors({{"a.pad", {"F32", {4}, std::vector<float>(4, 7.0f)}},
                             {"lora.m.A", {"F32", {2, 4}, std::vector<float>(8, 8.0f)}}},
                            fixtures::adapter_meta("x")));
  auto bytes = file.read("lora.m.A");
  std::vector<float> values(8);
  std::memcpy(values.data(), bytes.data(), 32);
  CHECK(values == std::vector<float>(8, 0.5f));
  check::write_file(dir / "copy.safetensors", fixtures::lora_file("x", 0.5f));
  CHECK(file.sha256() == peft_export::SafetensorsFile(dir / "copy.safetensors").sha256());
}

TEST(adapter_whose_bytes_differ_from_the_manifest_hash_is_refused) {
  auto dir = check::temp_dir("adapter_hash");
  auto doc = fixtures::manifest();
  check::write_file(dir / "x.safetensors", fixtures::lora_file("x", 1.0f));
  check::write_file(dir / "same.safetensors", fixtures::lora_file("x", 1.0f));
  doc["adapters"]["installed"]["x"] = {
      {"file", "x.safetensors"}, {"method", "lora"},
      {"sha256", peft_export::SafetensorsFile(dir / "same.safetensors").sha256()}};
  auto manifest = peft_export::parse_manifest(doc.dump());
  CHECK(peft_export::read_adapter(manifest, "x", dir / "x.safetensors").sha256 ==
        manifest.adapters.installed.at("x").sha256);
  check::write_file(dir / "x.safetensors", fixtures::lora_file("x", 2.0f));
  CHECK_THROWS(peft_export::read_adapter(manifest, "x", dir / "x.safetensors"), BundleError,
               "x.safetensors: the file changed under the bundle");
}

// Crafted manifests: sizes that overflow or could never be allocated, and nesting that would
// exhaust the stack, are refused with one clean error (the sanitizer build runs these too).
TEST(crafted_manifest_sizes_are_refused_cleanly) {
  auto with = [](int slots, std::int64_t r_max, std::int64_t features) {
    Json doc = fixtures::manifest(slots);
    doc["adapters"]["r_max"] = r_max;
    doc["adapters"]["modules"][0]["in_features"] = features;
    return doc.dump();
  };
  Json graph = fixtures::manifest();
  graph["graph"]["inputs"][1]["shape"] = {"slots", std::int64_t{1} << 31, 4};
  CHECK_THROWS(peft_export::parse_manifest(graph.dump()), BundleError,
               "manifest.graph.inputs[1].shape[1] is 2147483648, more than any model has");
  CHECK_THROWS(peft_export::parse_manifest(with(3, std::int64_t{1} << 62, 4)), BundleError,
               "manifest.adapters.r_max is 4611686018427387904, more than any model has");
  CHECK_THROWS(peft_export::parse_manifest(with(3, 2, std::int64_t{1} << 40)), BundleError,
               "in_features is 1099511627776, more than any model has");
  const std::int64_t big = INT32_MAX;
  auto overflow = peft_export::parse_manifest(with(INT32_MAX, big, big));
  CHECK_THROWS(peft_export::AdapterBanks(overflow), BundleError,
               "(slots x r_max x features) overflows 64-bit sizes");
  auto huge = peft_export::parse_manifest(with(1 << 20, 1 << 16, 1 << 16));  // 16 PiB
  CHECK_THROWS(peft_export::AdapterBanks(huge), peft_export::InferenceError,
               "more than half of this machine's");
  auto fits = peft_export::parse_manifest(with(3, 2, 4));
  CHECK(peft_export::AdapterBanks(fits).slots() == 3);
}

TEST(deeply_nested_json_is_refused_before_parsing) {
  const std::size_t depth = 1000000;
  Json doc = fixtures::manifest();
  doc["base_model"]["config"] = Json::object();
  std::string text = doc.dump();
  std::string deep = std::string(depth, '[') + std::string(depth, ']');
  std::string marker = "\"config\":{}";
  text.replace(text.find(marker), marker.size(), "\"config\":{\"x\":" + deep + "}");
  CHECK_THROWS(peft_export::parse_manifest(text), BundleError,
               "manifest.json nests JSON deeper than 128 levels; re-export the bundle");
  // Brackets inside strings do not count; 100 levels of real nesting are fine.
  doc["base_model"]["config"] = {{"s", std::string(depth / 10, '[')}};
  Json nested = Json::object();
  for (int i = 0; i < 100; ++i) nested = Json{{"n", nested}};
  doc["base_model"]["config"]["n"] = nested;
  CHECK(peft_export::parse_manifest(doc.dump()).base_model.architecture == "llama");

  auto dir = check::temp_dir("st_deep");
  std::string header = "{\"__metadata__\":{\"k\":" + deep + "}}";
  std::uint64_t len = header.size();
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &len, 8);
  check::write_file(dir / "deep.safetensors", bytes + header);
  CHECK_THROWS(peft_export::SafetensorsFile(dir / "deep.safetensors"), BundleError,
               "deep.safetensors: safetensors header nests JSON deeper than 128 levels");
}

int main() { return check::run_all(); }
