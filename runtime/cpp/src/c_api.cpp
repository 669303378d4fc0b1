#include "peft_export/c_api.h"

#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>

#include "peft_export/runtime.hpp"

struct peft_export_runtime {
  std::unique_ptr<peft_export::Runtime> runtime;
};

namespace {

using Json = nlohmann::json;
thread_local std::string last_error;

char* copy_out(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (out != nullptr) std::memcpy(out, text.c_str(), text.size() + 1);
  return out;
}

template <typename Fn>
auto guarded(Fn&& fn, decltype(fn()) failure) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::exception& exc) {
    last_error = exc.what();
  } catch (...) {
    last_error = "unknown error";
  }
  return failure;
}

Json parse(const char* text, const char* what) {
  if (text == nullptr || *text == '\0') return Json::object();
  Json value = Json::parse(text, nullptr, false);
  if (value.is_discarded() || !value.is_object()) {
    throw peft_export::InferenceError(std::string(what) + " is not a JSON object");
  }
  return value;
}

peft_export::RowRequest row_request(const Json& row) {
  peft_export::RowRequest request;
  request.prompt_ids = row.value("prompt_ids", std::vector<std::int64_t>{});
  request.text = row.value("text", std::string());
  if (row.contains("adapter") && !row["adapter"].is_null()) request.adapter = row["adapter"].get<std::string>();
  peft_export::SamplingOptions& options = request.options;
  options.max_new_tokens = row.value("max_new_tokens", options.max_new_tokens);
  options.temperature = row.value("temperature", options.temperature);
  options.top_k = row.value("top_k", options.top_k);
  options.top_p = row.value("top_p", options.top_p);
  if (row.contains("seed") && !row["seed"].is_null()) options.seed = row["seed"].get<std::uint64_t>();
  options.stop_token_ids = row.value("stop_token_ids", std::vector<std::int64_t>{});
  options.ignore_eos = row.value("ignore_eos", false);
  return request;
}

// options.quant_accuracy: -1 (or null, absent) for the bundle's own level, else 0 to 4;
// checked here since converting an out-of-range JSON number to int is not defined.
int quant_accuracy(const Json& options) {
  auto it = options.find("quant_accuracy");
  if (it == options.end() || it->is_null()) return -1;
  if (it->is_number_integer()) {
    auto level = it->get<std::int64_t>();
    if (level >= -1 && level <= 4) return static_cast<int>(level);
  }
  throw peft_export::InferenceError("options: quant_accuracy is " + it->dump().substr(0, 40) +
                                    "; use 0 to 4, or -1 (null) for the bundle's own level");
}

Json store_state(peft_export::AdapterStore& store) {
  return Json{{"held", store.held()}, {"resident", store.resident()}, {"swaps", store.swaps()},
              {"slots", store.slots()}};
}

}  // namespace

extern "C" {

peft_export_runtime* peft_export_open(const char* bundle_dir, const char* options_json) {
  return guarded(
      [&]() -> peft_export_runtime* {
        Json json = parse(options_json, "options");
        peft_export::RuntimeOptions options;
        options.backend = json.value("backend", options.backend);
        auto& backend = options.backend_options;
        backend.threads = json.value("threads", backend.threads);
        backend.denormals_as_zero = json.value("denormals_as_zero", backend.denormals_as_zero);
        backend.optimization = json.value("optimization", backend.optimization);
        backend.huge_pages = json.value("huge_pages", backend.huge_pages);
        backend.engine = json.value("engine", backend.engine);
        backend.plugin_library = json.value("plugin_library", std::string());
        backend.multilora_library = json.value("multilora_library", std::string());
        backend.quant_accuracy = quant_accuracy(json);
        options.slots = json.value("slots", 0);
        auto handle = std::make_unique<peft_export_runtime>();
        handle->runtime = std::make_unique<peft_export::Runtime>(bundle_dir ? bundle_dir : "", options);
        return handle.release();
      },
      nullptr);
}

void peft_export_close(peft_export_runtime* runtime) { delete runtime; }

char* peft_export_generate(peft_export_runtime* runtime, const char* request_json) {
  return guarded(
      [&]() -> char* {
        if (runtime == nullptr) throw peft_export::InferenceError("runtime handle is null");
        Json json = parse(request_json, "request");
        std::vector<peft_export::RowRequest> rows;
        for (const Json& row : json.value("rows", Json::array())) rows.push_back(row_request(row));
        auto result = runtime->runtime->generate(rows);
        Json out{{"rows", Json::array()},
                 {"prefill_seconds", result.prefill_seconds},
                 {"decode_seconds", result.decode_seconds},
                 {"steps", result.steps}};
        for (const auto& row : result.rows) {
          out["rows"].push_back({{"prompt_ids", row.prompt_ids},
                                 {"token_ids", row.token_ids},
                                 {"text", row.text},
                                 {"finish_reason", row.finish_reason}});
        }
        return copy_out(out.dump(-1, ' ', false, Json::error_handler_t::replace));
      },
      nullptr);
}

char* peft_export_adapters(peft_export_runtime* runtime, const char* op, const char* name) {
  return guarded(
      [&]() -> char* {
        if (runtime == nullptr || op == nullptr) throw peft_export::InferenceError("null argument");
        peft_export::AdapterStore& store = runtime->runtime->adapters();
        std::string action = op;
        std::string adapter = name ? name : "";
        Json out = Json::object();
        if (action == "load") {
          store.load(adapter);
        } else if (action == "drop") {
          out["dropped"] = store.drop(adapter);
        } else if (action != "status") {
          throw peft_export::InferenceError("unknown adapter operation '" + action +
                                            "'; use load, drop or status");
        }
        out.update(store_state(store));
        return copy_out(out.dump());
      },
      nullptr);
}

const char* peft_export_last_error(void) { return last_error.c_str(); }

void peft_export_free(char* text) { std::free(text); }

}  // extern "C"
