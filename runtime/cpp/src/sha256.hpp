// SHA-256 (FIPS 180-4), to check that a file read is the one manifest.json records
// (private header).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace peft_export::detail {

// Incremental SHA-256: update() with the bytes in order, then hex() once.
class Sha256 {
 public:
  Sha256();
  void update(const void* data, std::size_t size);
  // The digest as 64 lowercase hex digits (the form manifest.json records); ends the hash.
  std::string hex();

 private:
  void compress(const unsigned char* block);

  std::array<std::uint32_t, 8> state_;
  std::array<unsigned char, 64> buffer_{};
  std::size_t buffered_ = 0;
  std::uint64_t total_ = 0;  // bytes hashed so far
};

}  // namespace peft_export::detail
