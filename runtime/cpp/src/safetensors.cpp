#include "peft_export/safetensors.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <tuple>

#include "peft_export/errors.hpp"

namespace peft_export {
namespace {

using Json = nlohmann::json;
constexpr std::int64_t kMaxDim = std::int64_t{1} << 40;

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& problem) {
  throw BundleError(path.string() + ": " + problem);
}

std::uint64_t read_u64_le(const unsigned char* bytes) {
  std::uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | bytes[i];
  return value;
}

bool has_non_finite(DType dtype, const std::vector<std::byte>& data) {
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16 &&
      dtype != DType::kFloat64) {
    return false;
  }
  std::size_t count = data.size() / dtype_size(dtype);
  if (dtype == DType::kFloat64) {
    for (std::size_t i = 0; i < count; ++i) {
      double value = 0;
      std::memcpy(&value, data.data() + i * 8, 8);
      if (!std::isfinite(value)) return true;
    }
    return false;
  }
  std::vector<float> values(count);
  to_float(dtype, data.data(), count, values.data());
  return std::any_of(values.begin(), values.end(), [](float v) { return !std::isfinite(v); });
}

SafetensorInfo parse_entry(const std::filesystem::path& path, const std::string& name,
                           const Json& entry, std::uint64_t data_len) {
  std::string quoted = "tensor '" + name + "'";
  if (!entry.is_object()) fail(path, quoted + " has a malformed header entry; re-create the file");
  SafetensorInfo info;
  info.name = name;
  auto dtype = entry.find("dtype");
  if (dtype == entry.end() || !dtype->is_string()) fail(path, quoted + " has no dtype");
  try {
    info.dtype = dtype_from_safetensors(dtype->get<std::string>());
  } catch (const BundleError&) {
    fail(path, quoted + " has unsupported dtype '" + dtype->get<std::string>() + "'");
  }
  auto shape = entry.find("shape");
  if (shape == entry.end() || !shape->is_array()) fail(path, quoted + " has an invalid shape");
  std::uint64_t count = 1;
  for (const Json& dim : *shape) {
    if (!dim.is_number_integer() || dim.get<std::int64_t>() < 0 ||
        dim.get<std::int64_t>() >= kMaxDim) {
      fail(path, quoted + " has an invalid shape");
    }
    info.shape.push_back(dim.get<std::int64_t>());
    if (__builtin_mul_overflow(count, static_cast<std::uint64_t>(dim.get<std::int64_t>()), &count)) {
      fail(path, quoted + " has an invalid shape (too many elements)");
    }
  }
  auto offsets = entry.find("data_offsets");
  if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
      !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
    fail(path, quoted + " points outside the file (truncated?)");
  }
  info.begin = (*offsets)[0].get<std::uint64_t>();
  info.end = (*offsets)[1].get<std::uint64_t>();
  if (info.begin > info.end || info.end > data_len) {
    fail(path, quoted + " points outside the file (truncated?)");
  }
  std::uint64_t nbytes = 0;
  if (__builtin_mul_overflow(count, static_cast<std::uint64_t>(dtype_size(info.dtype)), &nbytes) ||
      nbytes != info.nbytes()) {
    fail(path, quoted + " byte size does not match dtype and shape");
  }
  return info;
}

}  // namespace

SafetensorsFile::SafetensorsFile(std::filesystem::path path) : path_(std::move(path)) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path_, ec)) fail(path_, "file not found");
  std::uint64_t size = std::filesystem::file_size(path_, ec);
  if (ec) fail(path_, "cannot be read");
  std::ifstream in(path_, std::ios::binary);
  unsigned char prefix[8] = {};
  if (size < 8 || !in.read(reinterpret_cast<char*>(prefix), 8)) {
    fail(path_, "truncated safetensors file (no header); re-create it");
  }
  std::uint64_t header_len = read_u64_le(prefix);
  if (header_len > std::min(kMaxHeaderBytes, size - 8)) {
    fail(path_, "safetensors header length " + std::to_string(header_len) + " is invalid");
  }
  std::string raw(header_len, '\0');
  if (!in.read(raw.data(), static_cast<std::streamsize>(header_len))) {
    fail(path_, "truncated safetensors header; re-create it");
  }
  Json header = Json::parse(raw, nullptr, false);
  if (header.is_discarded()) fail(path_, "safetensors header is not valid JSON; re-create it");
  if (!header.is_object()) fail(path_, "safetensors header is not an object");
  data_start_ = 8 + header_len;
  std::uint64_t data_len = size - data_start_;
  std::vector<std::tuple<std::uint64_t, std::uint64_t, std::string>> spans;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (entry.is_null()) continue;
      if (!entry.is_object()) fail(path_, "safetensors __metadata__ must map strings to strings");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) fail(path_, "safetensors __metadata__ must map strings to strings");
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    SafetensorInfo info = parse_entry(path_, name, entry, data_len);
    spans.emplace_back(info.begin, info.end, name);
    tensors_[name] = std::move(info);
  }
  std::sort(spans.begin(), spans.end());
  for (std::size_t i = 1; i < spans.size(); ++i) {
    if (std::get<0>(spans[i]) < std::get<1>(spans[i - 1])) {
      fail(path_, "tensors '" + std::get<2>(spans[i - 1]) + "' and '" + std::get<2>(spans[i]) +
                      "' overlap");
    }
  }
}

const SafetensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

std::vector<std::byte> SafetensorsFile::read(const std::string& name) const {
  const SafetensorInfo* info = find(name);
  if (info == nullptr) fail(path_, "has no tensor '" + name + "'");
  std::vector<std::byte> data(info->nbytes());
  std::ifstream in(path_, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(data_start_ + info->begin));
  if (!in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data.size()))) {
    fail(path_, "tensor '" + name + "' is truncated");
  }
  if (has_non_finite(info->dtype, data)) {
    fail(path_, "tensor '" + name + "' contains NaN or Inf; fix the adapter");
  }
  return data;
}

}  // namespace peft_export
