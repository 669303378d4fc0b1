#include "peft_export/c_api.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>

#include "peft_export/encoder.hpp"
#include "peft_export/runtime.hpp"

// A decoder bundle opens a Runtime, an encoder bundle an Encoder (the manifest says which).
struct peft_export_runtime {
  std::unique_ptr<peft_export::Runtime> runtime;
  std::unique_ptr<peft_export::Encoder> encoder;

  peft_export::AdapterStore& adapters() { return runtime ? runtime->adapters() : encoder->adapters(); }
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

std::vector<std::int64_t> int_list(const Json& row, const char* key) {
  auto it = row.find(key);
  if (it == row.end() || it->is_null()) return {};
  if (!it->is_array() || !std::all_of(it->begin(), it->end(), [](const Json& v) {
        return v.is_number_integer();
      })) {
    throw peft_export::InferenceError(std::string("request: ") + key + " must be a list of integers");
  }
  return it->get<std::vector<std::int64_t>>();
}

peft_export::EncoderRow encoder_row(const Json& row) {
  if (!row.is_object()) throw peft_export::InferenceError("request: each row must be an object");
  peft_export::EncoderRow out;
  out.input_ids = int_list(row, "input_ids");
  out.attention_mask = int_list(row, "attention_mask");
  out.token_type_ids = int_list(row, "token_type_ids");
  if (row.contains("adapter") && !row["adapter"].is_null()) out.adapter = row["adapter"].get<std::string>();
  return out;
}

// Keys in insertion order: a row's scores follow its labels' id order.
using Ordered = nlohmann::ordered_json;

// One row's result: its outputs, and the task's reading of them as the Python runtime gives
// it (classify: label, score, scores; tag: a label per token; answer: the best span).
Ordered encoder_result(const peft_export::Encoder& encoder, const peft_export::EncoderResult& row,
                    const Json& request, std::int64_t max_answer_tokens) {
  Ordered out{{"adapter", row.adapter.empty() ? Ordered() : Ordered(row.adapter)},
           {"labels", row.labels},
           {"outputs", Ordered::object()}};
  for (const auto& [name, tensor] : row.outputs) {
    out["outputs"][name] = {{"shape", tensor.shape}, {"values", tensor.values}};
  }
  const std::string& task = encoder.task();
  if (task == "sequence-classification") {
    peft_export::Prediction best = row.best();
    std::vector<float> probs = row.scores();
    Ordered scores = Ordered::object();
    for (std::size_t i = 0; i < probs.size() && i < row.labels.size(); ++i) scores[row.labels[i]] = probs[i];
    out["label"] = best.label;
    out["score"] = best.score;
    out["scores"] = scores;
  } else if (task == "token-classification") {
    Ordered tags = Ordered::array();
    std::int64_t positions = row.outputs.at("logits").shape.at(0);
    for (std::int64_t p = 0; p < positions; ++p) {
      peft_export::Prediction best = row.best(p);
      tags.push_back({{"position", p}, {"label", best.label}, {"score", best.score}});
    }
    out["tags"] = tags;
  } else if (task == "question-answering") {
    peft_export::AnswerSpan span = row.answer(int_list(request, "context_mask"), max_answer_tokens);
    out["answer"] = {{"start", span.start}, {"end", span.end}, {"score", span.score}};
  } else {
    out["embedding"] = row.outputs.at("embeddings").values;
  }
  return out;
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
        std::filesystem::path dir = bundle_dir ? bundle_dir : "";
        if (peft_export::load_manifest(dir).encoder) {
          if (options.backend != "ort") {
            throw peft_export::InferenceError("encoder bundles run on the 'ort' backend, not '" +
                                              options.backend + "'");
          }
          peft_export::EncoderOptions encoder_options{options.backend_options, options.slots};
          handle->encoder = std::make_unique<peft_export::Encoder>(dir, encoder_options);
        } else {
          handle->runtime = std::make_unique<peft_export::Runtime>(dir, options);
        }
        return handle.release();
      },
      nullptr);
}

void peft_export_close(peft_export_runtime* runtime) { delete runtime; }

char* peft_export_generate(peft_export_runtime* runtime, const char* request_json) {
  return guarded(
      [&]() -> char* {
        if (runtime == nullptr) throw peft_export::InferenceError("runtime handle is null");
        if (!runtime->runtime) {
          throw peft_export::InferenceError("this is an encoder (" + runtime->encoder->task() +
                                            ") bundle, which does not generate; call "
                                            "peft_export_encode");
        }
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
        peft_export::AdapterStore& store = runtime->adapters();
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

char* peft_export_encode(peft_export_runtime* runtime, const char* request_json) {
  return guarded(
      [&]() -> char* {
        if (runtime == nullptr) throw peft_export::InferenceError("runtime handle is null");
        if (!runtime->encoder) {
          throw peft_export::InferenceError("this is a decoder (generation) bundle; call "
                                            "peft_export_generate");
        }
        Json json = parse(request_json, "request");
        const Json& rows = json.contains("rows") ? json["rows"] : Json::array();
        if (!rows.is_array()) throw peft_export::InferenceError("request: rows must be a list");
        std::vector<peft_export::EncoderRow> requests;
        for (const Json& row : rows) requests.push_back(encoder_row(row));
        std::int64_t max_answer_tokens = json.value("max_answer_tokens", std::int64_t{30});
        auto start = std::chrono::steady_clock::now();
        auto results = runtime->encoder->run(requests);
        double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        Ordered out{{"task", runtime->encoder->task()}, {"rows", Ordered::array()},
                    {"seconds", seconds}};
        for (std::size_t i = 0; i < results.size(); ++i) {
          out["rows"].push_back(encoder_result(*runtime->encoder, results[i], rows[i], max_answer_tokens));
        }
        return copy_out(out.dump(-1, ' ', false, Ordered::error_handler_t::replace));
      },
      nullptr);
}

const char* peft_export_last_error(void) { return last_error.c_str(); }

void peft_export_free(char* text) { std::free(text); }

}  // extern "C"
