#include "json_fields.hpp"

#include <utility>

namespace peft_export::detail {

Fields::Fields(const Json& object, std::string where, std::string file)
    : object_(object), where_(std::move(where)), file_(std::move(file)) {
  if (!object_.is_object()) {
    throw BundleError(file_ + ": " + where_ + " must be an object; re-export the bundle");
  }
}

const Json* Fields::find(const std::string& key) const {
  auto it = object_.find(key);
  return it == object_.end() ? nullptr : &*it;
}

const Json& Fields::required(const std::string& key) const {
  const Json* value = find(key);
  if (value == nullptr) fail(key, "is missing; re-export the bundle");
  return *value;
}

void Fields::fail(const std::string& key, const std::string& problem) const {
  throw BundleError(file_ + ": " + at(key) + " " + problem);
}

std::string Fields::str(const std::string& key) const {
  const Json& value = required(key);
  if (!value.is_string()) fail(key, "must be a string");
  return value.get<std::string>();
}

std::optional<std::string> Fields::opt_str(const std::string& key) const {
  const Json* value = find(key);
  if (value == nullptr || value->is_null()) return std::nullopt;
  if (!value->is_string()) fail(key, "must be a string or null");
  return value->get<std::string>();
}

std::int64_t Fields::integer(const std::string& key) const {
  return non_negative_integer(required(key), at(key), file_);
}

std::optional<std::int64_t> Fields::opt_integer(const std::string& key) const {
  const Json* value = find(key);
  if (value == nullptr || value->is_null()) return std::nullopt;
  return non_negative_integer(*value, at(key), file_);
}

bool Fields::boolean(const std::string& key, bool fallback) const {
  const Json* value = find(key);
  if (value == nullptr) return fallback;
  if (!value->is_boolean()) fail(key, "must be true or false");
  return value->get<bool>();
}

void check_json_depth(const std::string& text, const std::string& what, const std::string& fix) {
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) {
        throw BundleError(what + " nests JSON deeper than " + std::to_string(kMaxJsonDepth) +
                          " levels; " + fix);
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
}

std::int64_t non_negative_integer(const Json& value, const std::string& where,
                                  const std::string& file) {
  if (value.is_number_unsigned()) {
    auto unsigned_value = value.get<std::uint64_t>();
    if (unsigned_value > static_cast<std::uint64_t>(INT64_MAX)) {
      throw BundleError(file + ": " + where + " is too large");
    }
    return static_cast<std::int64_t>(unsigned_value);
  }
  if (!value.is_number_integer()) throw BundleError(file + ": " + where + " must be an integer");
  auto signed_value = value.get<std::int64_t>();
  if (signed_value < 0) throw BundleError(file + ": " + where + " must not be negative");
  return signed_value;
}

}  // namespace peft_export::detail
