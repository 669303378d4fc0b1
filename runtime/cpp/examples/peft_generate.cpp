// peft-generate: generate from a bundle with the C++ runtime.
//
//   peft-generate BUNDLE [--adapter NAME]... (--ids 1,2,3 | --text "...")... [options]
//
// Each --ids / --text adds a row; --adapter is given once for all rows or once per row
// ("" or "-" for the base model). Prints each row's generated ids (and text when the bundle
// has a byte-level BPE tokenizer), or one JSON object with --json.
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "peft_export/runtime.hpp"

namespace {

const char* kUsage =
    "usage: peft-generate BUNDLE [--adapter NAME]... (--ids 1,2,3 | --text TEXT)...\n"
    "       [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]\n"
    "       [--ignore-eos] [--threads N] [--backend ort|tensorrt] [--engine FILE]\n"
    "       [--plugin LIB] [--multilora-library LIB] [--quant-accuracy L] [--slots N]\n"
    "       [--json]\n";

std::vector<std::int64_t> parse_ids(const std::string& text) {
  std::vector<std::int64_t> ids;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    if (!item.empty()) ids.push_back(std::stoll(item));
  }
  return ids;
}

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buffer[8];
      std::snprintf(buffer, sizeof buffer, "\\u%04x", c);
      out += buffer;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string json_ids(const std::vector<std::int64_t>& ids) {
  std::string out = "[";
  for (std::size_t i = 0; i < ids.size(); ++i) out += (i ? ", " : "") + std::to_string(ids[i]);
  return out + "]";
}

int run(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cerr << kUsage;
    return argc < 2 ? 2 : 0;
  }
  std::string bundle = argv[1];
  std::vector<peft_export::RowRequest> rows;
  std::vector<std::string> adapters;
  peft_export::SamplingOptions options;
  peft_export::RuntimeOptions runtime_options;
  bool json = false;
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw peft_export::InferenceError(arg + " needs a value; see --help");
      return argv[++i];
    };
    if (arg == "--ids") {
      rows.push_back({parse_ids(value()), "", "", {}});
    } else if (arg == "--text") {
      rows.push_back({{}, value(), "", {}});
    } else if (arg == "--adapter") {
      std::string name = value();
      adapters.push_back(name == "-" ? "" : name);
    } else if (arg == "--max-new-tokens") {
      options.max_new_tokens = std::stoll(value());
    } else if (arg == "--temperature") {
      options.temperature = std::stod(value());
    } else if (arg == "--top-k") {
      options.top_k = std::stoll(value());
    } else if (arg == "--top-p") {
      options.top_p = std::stod(value());
    } else if (arg == "--seed") {
      options.seed = std::stoull(value());
    } else if (arg == "--ignore-eos") {
      options.ignore_eos = true;
    } else if (arg == "--threads") {
      runtime_options.backend_options.threads = std::stoi(value());
    } else if (arg == "--backend") {
      runtime_options.backend = value();
    } else if (arg == "--engine") {
      runtime_options.backend_options.engine = value();
    } else if (arg == "--plugin") {
      runtime_options.backend_options.plugin_library = value();
    } else if (arg == "--multilora-library") {
      runtime_options.backend_options.multilora_library = value();
    } else if (arg == "--quant-accuracy") {
      runtime_options.backend_options.quant_accuracy = std::stoi(value());
    } else if (arg == "--slots") {
      runtime_options.slots = std::stoi(value());
    } else if (arg == "--json") {
      json = true;
    } else {
      throw peft_export::InferenceError("unknown argument '" + arg + "'; see --help");
    }
  }
  if (rows.empty()) throw peft_export::InferenceError("give a prompt with --ids or --text");
  if (!adapters.empty() && adapters.size() != 1 && adapters.size() != rows.size()) {
    throw peft_export::InferenceError("give --adapter once for all rows or once per row");
  }
  for (std::size_t i = 0; i < rows.size(); ++i) {
    rows[i].options = options;
    if (!adapters.empty()) rows[i].adapter = adapters.size() == 1 ? adapters[0] : adapters[i];
  }
  peft_export::Runtime runtime(bundle, runtime_options);
  peft_export::GenerationResult result = runtime.generate(rows);
  if (json) {
    std::cout << "{\"rows\": [";
    for (std::size_t i = 0; i < result.rows.size(); ++i) {
      const auto& row = result.rows[i];
      std::cout << (i ? ", " : "") << "{\"prompt_ids\": " << json_ids(row.prompt_ids)
                << ", \"token_ids\": " << json_ids(row.token_ids)
                << ", \"text\": " << json_string(row.text)
                << ", \"finish_reason\": " << json_string(row.finish_reason) << "}";
    }
    std::cout << "], \"prefill_seconds\": " << result.prefill_seconds
              << ", \"decode_seconds\": " << result.decode_seconds
              << ", \"steps\": " << result.steps << "}\n";
    return 0;
  }
  for (const auto& row : result.rows) {
    for (std::size_t i = 0; i < row.token_ids.size(); ++i) {
      std::cout << (i ? " " : "") << row.token_ids[i];
    }
    std::cout << "\n";
    if (runtime.tokenizer() != nullptr) std::cout << row.text << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const peft_export::Error& exc) {
    std::cerr << "error: " << exc.what() << "\n";
    return 2;
  } catch (const std::exception& exc) {
    std::cerr << "error: " << exc.what() << "\n";
    return 2;
  }
}
