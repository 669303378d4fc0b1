// peft-encode: classify, tag, answer or embed token ids with an encoder bundle (C ABI).
//
//   peft-encode BUNDLE [--adapter NAME]... --ids 2,12,9,3 [--types 0,0,0,0]... [options]
//
// Each --ids adds a row (token ids with the special tokens: tokenize with the bundle's
// tokenizer.json); --types gives the last row's token_type_ids. --adapter is given once for
// all rows or once per row ("-" for the base model). Prints one line per row as
// `peft-export run` does for encoder bundles (label and score, a label per token, the answer
// span, or the vector), or one JSON object per row with --json.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "peft_export/c_api.h"

namespace {

using Json = nlohmann::ordered_json;  // keys keep their order (scores follow the labels)

const char* kUsage =
    "usage: peft-encode BUNDLE [--adapter NAME]... (--ids 2,12,3 [--types 0,0,0])...\n"
    "       [--threads N] [--slots N] [--multilora-library LIB] [--json]\n";

struct Failure {
  std::string message;
};

std::vector<std::int64_t> parse_ids(const std::string& text) {
  std::vector<std::int64_t> ids;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    if (item.empty()) continue;
    std::size_t used = 0;
    long long value = 0;
    try {
      value = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size()) throw Failure{"'" + item + "' is not a token id; pass e.g. 2,12,3"};
    ids.push_back(value);
  }
  return ids;
}

std::string fixed(double value, int digits) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.*f", digits, value);
  return buffer;
}

// The text line `peft-export run` prints for one row of each task.
std::string line(const std::string& task, const Json& row, const std::vector<std::int64_t>& ids) {
  if (task == "sequence-classification") {
    return row["label"].get<std::string>() + " (" + fixed(row["score"].get<double>(), 3) + ")";
  }
  if (task == "token-classification") {
    std::string out;
    for (const Json& tag : row["tags"]) {
      auto position = tag["position"].get<std::size_t>();
      out += (out.empty() ? "" : " ") + std::to_string(ids.at(position)) + "/" +
             tag["label"].get<std::string>();
    }
    return out;
  }
  if (task == "question-answering") {
    const Json& answer = row["answer"];
    return "tokens " + std::to_string(answer["start"].get<std::int64_t>()) + ".." +
           std::to_string(answer["end"].get<std::int64_t>()) + " (" +
           fixed(answer["score"].get<double>(), 3) + ")";
  }
  std::string out = "[";
  for (const Json& value : row["embedding"]) {
    out += (out.size() > 1 ? ", " : "") + fixed(value.get<double>(), 6);
  }
  return out + "]";
}

int run(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cerr << kUsage;
    return argc < 2 ? 2 : 0;
  }
  std::string bundle = argv[1];
  Json rows = Json::array();
  std::vector<std::string> adapters;
  Json options = Json::object();
  bool as_json = false;
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Failure{arg + " needs a value; see --help"};
      return argv[++i];
    };
    if (arg == "--ids") {
      rows.push_back({{"input_ids", parse_ids(value())}});
    } else if (arg == "--types") {
      if (rows.empty()) throw Failure{"--types follows the --ids of its row"};
      rows.back()["token_type_ids"] = parse_ids(value());
    } else if (arg == "--adapter") {
      adapters.push_back(value());
    } else if (arg == "--threads") {
      options["threads"] = std::stoi(value());
    } else if (arg == "--slots") {
      options["slots"] = std::stoi(value());
    } else if (arg == "--multilora-library") {
      options["multilora_library"] = value();
    } else if (arg == "--json") {
      as_json = true;
    } else {
      throw Failure{"unknown argument '" + arg + "'; see --help"};
    }
  }
  if (rows.empty()) throw Failure{"give a row's token ids with --ids"};
  if (!adapters.empty() && adapters.size() != 1 && adapters.size() != rows.size()) {
    throw Failure{"give --adapter once for all rows or once per row"};
  }
  for (std::size_t i = 0; i < rows.size() && !adapters.empty(); ++i) {
    const std::string& name = adapters.size() == 1 ? adapters[0] : adapters[i];
    rows[i]["adapter"] = name == "-" ? Json() : Json(name);
  }
  peft_export_runtime* runtime = peft_export_open(bundle.c_str(), options.dump().c_str());
  if (runtime == nullptr) throw Failure{peft_export_last_error()};
  char* text = peft_export_encode(runtime, Json{{"rows", rows}}.dump().c_str());
  std::string error = text == nullptr ? peft_export_last_error() : "";
  peft_export_close(runtime);
  if (text == nullptr) throw Failure{error};
  Json result = Json::parse(text);
  peft_export_free(text);
  const std::string task = result["task"].get<std::string>();
  for (std::size_t i = 0; i < rows.size(); ++i) {
    Json& row = result["rows"][i];
    if (as_json) {
      Json record{{"input_ids", rows[i]["input_ids"]}, {"adapter", row["adapter"]}, {"task", task}};
      row.erase("outputs");
      record["result"] = row;
      std::cout << record.dump() << "\n";
    } else {
      std::cout << "[" << i << "] "
                << line(task, row, rows[i]["input_ids"].get<std::vector<std::int64_t>>()) << "\n";
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Failure& failure) {
    std::cerr << "error: " << failure.message << "\n";
  } catch (const std::exception& exc) {
    std::cerr << "error: " << exc.what() << "\n";
  }
  return 2;
}
