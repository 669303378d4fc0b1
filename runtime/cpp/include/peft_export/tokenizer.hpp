// The optional tokenizer hook: the runtime itself works on token ids.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace peft_export {

// Implement this to pass text prompts and get text back (e.g. around HF tokenizers).
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<std::int64_t> encode(const std::string& text) const = 0;
  // Decodes generated ids, skipping special tokens.
  virtual std::string decode(const std::vector<std::int64_t>& ids) const = 0;
};

// The built-in tokenizer for byte-level BPE tokenizer.json files (GPT-2, Llama 3, SmolLM2,
// Qwen2 style). Throws BundleError for other tokenizer kinds; plug in your own then.
std::shared_ptr<Tokenizer> load_byte_level_bpe(const std::filesystem::path& tokenizer_json);

}  // namespace peft_export
