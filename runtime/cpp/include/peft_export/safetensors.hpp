// A small header-checked safetensors reader (never trusts sizes or offsets in the file).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "peft_export/dtype.hpp"

namespace peft_export {

struct SafetensorInfo {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  // byte offsets relative to the data section
  std::uint64_t end = 0;
  std::uint64_t nbytes() const { return end - begin; }
};

// The validated header of one file: every tensor's dtype, shape and byte range is checked
// (inside the file, size matches dtype x shape, no overlaps) before any data is read, so a
// hostile or truncated file fails with BundleError instead of a crash or a huge allocation.
//
// The file is opened once and every byte comes through that one descriptor: header, tensor
// data and the hash. A file replaced by rename meanwhile ('adapters add --replace') cannot
// pair one file's offsets with another file's bytes. One thread at a time.
class SafetensorsFile {
 public:
  static constexpr std::uint64_t kMaxHeaderBytes = 100ull * 1024 * 1024;

  explicit SafetensorsFile(std::filesystem::path path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::map<std::string, SafetensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const SafetensorInfo* find(const std::string& name) const;

  // One tensor's bytes; floating tensors containing NaN or Inf are refused. The first call
  // reads the whole data section (it is checked against the header's ranges already).
  std::vector<std::byte> read(const std::string& name);
  // sha256 (64 lowercase hex digits) of the bytes read: header and whole data section, that
  // is, of the file as manifest.json records it.
  std::string sha256();

 private:
  void parse_header();
  void read_data();

  std::filesystem::path path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
  std::uint64_t data_start_ = 0;
  std::string head_;                // the 8-byte length and the header, as read
  std::vector<std::byte> data_;     // the data section, once read
  bool data_read_ = false;
  std::map<std::string, SafetensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace peft_export
