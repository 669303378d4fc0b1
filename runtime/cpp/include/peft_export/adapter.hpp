// Adapters held in host memory, validated against the bundle they will run in.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "peft_export/dtype.hpp"
#include "peft_export/manifest.hpp"

namespace peft_export {

// A tensor in host memory, converted to the dtype of the graph input it feeds.
struct HostTensor {
  DType dtype = DType::kFloat32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> data;
};

// One runtime-mode adapter file, fully read and checked: every tensor names a graph input of
// this bundle, fits its shape (rank <= r_max, lengths <= the manifest's maxima) and is finite,
// the file was made for this bundle's base weights, and its bytes hash to the sha256 the
// manifest records for it (when it records one).
struct HostAdapter {
  std::string name;
  std::string method;
  std::filesystem::path file;
  std::map<std::string, HostTensor> tensors;
  std::string sha256;  // of the file's bytes as read: with `name`, the adapter's identity
  std::vector<std::string> labels;  // encoder bundles: its head's id2label, in id order

  bool has_lora() const;
  // LoRA-family banks or (encoder bundles) a task head: the adapter needs a bank slot.
  bool has_banks() const;
  std::int64_t prefix_len() const;    // virtual tokens entering as past KV (0: none)
  std::int64_t prompt_len() const;    // prompt embeddings put before the text (0: none)
  std::int64_t adaption_len() const;  // AdaptionPrompt length (0: none)
  std::size_t nbytes() const;
};

// Reads and validates an adapter file for the bundle described by `manifest`.
HostAdapter read_adapter(const Manifest& manifest, const std::string& name,
                         const std::filesystem::path& file);

}  // namespace peft_export
