// Strict typed access to JSON objects, with errors naming the field path (private header).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "peft_export/errors.hpp"

namespace peft_export::detail {

using Json = nlohmann::json;

// Reads typed fields of one JSON object; `where` names it in error messages.
class Fields {
 public:
  Fields(const Json& object, std::string where, std::string file);

  const Json* find(const std::string& key) const;
  const Json& required(const std::string& key) const;

  std::string str(const std::string& key) const;
  std::optional<std::string> opt_str(const std::string& key) const;
  std::int64_t integer(const std::string& key) const;
  std::optional<std::int64_t> opt_integer(const std::string& key) const;
  bool boolean(const std::string& key, bool fallback) const;

  std::string at(const std::string& key) const { return where_ + "." + key; }
  [[noreturn]] void fail(const std::string& key, const std::string& problem) const;

 private:
  const Json& object_;
  std::string where_;
  std::string file_;
};

// Deepest nesting of arrays and objects accepted in a bundle's JSON. Real manifests and
// safetensors headers stay under 10; nlohmann-json copies and dumps values recursively, so a
// hostile document nested a million levels deep would overflow the stack.
inline constexpr int kMaxJsonDepth = 128;

// Throws BundleError("WHAT nests JSON deeper than 128 levels; FIX") when `text` does: a scan
// of brackets outside strings, done before the text is parsed.
void check_json_depth(const std::string& text, const std::string& what, const std::string& fix);

// Checks that `value` is a non-negative integer (not a bool) and returns it.
std::int64_t non_negative_integer(const Json& value, const std::string& where,
                                  const std::string& file);

}  // namespace peft_export::detail
