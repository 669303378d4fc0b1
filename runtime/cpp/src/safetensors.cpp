#include "peft_export/safetensors.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <tuple>

#include "json_fields.hpp"
#include "peft_export/errors.hpp"
#include "sha256.hpp"

namespace peft_export {
namespace {

using Json = nlohmann::json;
constexpr std::int64_t kMaxDim = std::int64_t{1} << 40;

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& problem) {
  throw BundleError(path.string() + ": " + problem);
}

// Reads exactly `size` bytes at `offset` (pread: the descriptor's position is never shared).
bool read_at(int fd, void* out, std::uint64_t size, std::uint64_t offset) {
  auto* bytes = static_cast<char*>(out);
  while (size > 0) {
    ssize_t got = ::pread(fd, bytes, size, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    bytes += got;
    size -= static_cast<std::uint64_t>(got);
    offset += static_cast<std::uint64_t>(got);
  }
  return true;
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
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) fail(path_, errno == ENOENT ? "file not found" : "cannot be opened");
  try {
    parse_header();
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { ::close(fd_); }

void SafetensorsFile::parse_header() {
  struct stat file_info {};
  if (::fstat(fd_, &file_info) != 0 || !S_ISREG(file_info.st_mode)) {
    fail(path_, "is not a regular file");
  }
  size_ = static_cast<std::uint64_t>(file_info.st_size);
  unsigned char prefix[8] = {};
  if (size_ < 8 || !read_at(fd_, prefix, 8, 0)) {
    fail(path_, "truncated safetensors file (no header); re-create it");
  }
  std::uint64_t header_len = read_u64_le(prefix);
  if (header_len > std::min(kMaxHeaderBytes, size_ - 8)) {
    fail(path_, "safetensors header length " + std::to_string(header_len) + " is invalid");
  }
  std::string raw(header_len, '\0');
  if (!read_at(fd_, raw.data(), header_len, 8)) {
    fail(path_, "truncated safetensors header; re-create it");
  }
  head_.assign(reinterpret_cast<const char*>(prefix), 8);
  head_ += raw;
  detail::check_json_depth(raw, path_.string() + ": safetensors header", "re-create the file");
  Json header = Json::parse(raw, nullptr, false);
  if (header.is_discarded()) fail(path_, "safetensors header is not valid JSON; re-create it");
  if (!header.is_object()) fail(path_, "safetensors header is not an object");
  data_start_ = 8 + header_len;
  std::uint64_t data_len = size_ - data_start_;
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

void SafetensorsFile::read_data() {
  if (data_read_) return;
  std::vector<std::byte> data(size_ - data_start_);
  if (!read_at(fd_, data.data(), data.size(), data_start_)) {
    fail(path_, "tensor data is truncated (the file shrank while it was read)");
  }
  data_ = std::move(data);
  data_read_ = true;
}

std::vector<std::byte> SafetensorsFile::read(const std::string& name) {
  const SafetensorInfo* info = find(name);
  if (info == nullptr) fail(path_, "has no tensor '" + name + "'");
  read_data();
  auto begin = data_.begin() + static_cast<std::ptrdiff_t>(info->begin);
  std::vector<std::byte> data(begin, begin + static_cast<std::ptrdiff_t>(info->nbytes()));
  if (has_non_finite(info->dtype, data)) {
    fail(path_, "tensor '" + name + "' contains NaN or Inf; fix the adapter");
  }
  return data;
}

std::string SafetensorsFile::sha256() {
  read_data();
  detail::Sha256 hash;
  hash.update(head_.data(), head_.size());
  hash.update(data_.data(), data_.size());
  return hash.hex();
}

}  // namespace peft_export
