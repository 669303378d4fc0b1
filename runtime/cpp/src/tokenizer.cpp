// Byte-level BPE from tokenizer.json (the GPT-2 family's scheme), for examples and tests.
//
// Encoding splits special (added) tokens first, then pre-tokenizes with the GPT-2 pattern
// (letters, digits and other symbols as runs with an optional leading space; non-ASCII
// code points count as letters), maps bytes to the byte-level alphabet and applies merges
// by rank. That matches HF tokenizers for ASCII text; callers needing full Unicode
// categories plug in their own Tokenizer.
#include <algorithm>
#include <climits>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "json_fields.hpp"
#include "peft_export/errors.hpp"
#include "peft_export/tokenizer.hpp"

namespace peft_export {
namespace {

using Json = nlohmann::json;

std::string utf8(std::uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
  return out;
}

// GPT-2's reversible map from bytes to printable code points.
std::vector<std::string> byte_alphabet() {
  std::vector<std::string> table(256);
  std::uint32_t next = 256;
  for (std::uint32_t b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
    table[b] = utf8(printable ? b : next++);
  }
  return table;
}

// Splits UTF-8 text into code-point strings.
std::vector<std::string> code_points(const std::string& text) {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < text.size();) {
    auto lead = static_cast<unsigned char>(text[i]);
    std::size_t len = lead < 0x80 ? 1 : lead < 0xe0 ? 2 : lead < 0xf0 ? 3 : 4;
    out.push_back(text.substr(i, std::min(len, text.size() - i)));
    i += len;
  }
  return out;
}

// Replaces each maximal invalid UTF-8 subpart with U+FFFD, like Rust's from_utf8_lossy
// (what HF tokenizers' byte-level decoder returns).
std::string utf8_lossy(const std::string& bytes) {
  static const std::string kReplacement = "\xef\xbf\xbd";
  std::string out;
  std::size_t i = 0;
  auto at = [&](std::size_t k) { return static_cast<unsigned char>(bytes[k]); };
  while (i < bytes.size()) {
    unsigned char lead = at(i);
    std::size_t need = 0;
    unsigned char low = 0x80;
    unsigned char high = 0xbf;
    if (lead < 0x80) {
      out += static_cast<char>(lead);
      ++i;
      continue;
    }
    if (lead >= 0xc2 && lead <= 0xdf) need = 1;
    if (lead >= 0xe0 && lead <= 0xef) need = 2;
    if (lead >= 0xf0 && lead <= 0xf4) need = 3;
    if (lead == 0xe0) low = 0xa0;
    if (lead == 0xed) high = 0x9f;
    if (lead == 0xf0) low = 0x90;
    if (lead == 0xf4) high = 0x8f;
    std::size_t k = 1;
    for (; need > 0 && k <= need && i + k < bytes.size(); ++k) {
      unsigned char c = at(i + k);
      bool ok = k == 1 ? (c >= low && c <= high) : (c >= 0x80 && c <= 0xbf);
      if (!ok) break;
    }
    if (need > 0 && k == need + 1) {
      out += bytes.substr(i, k);
    } else {
      out += kReplacement;
    }
    i += k;
  }
  return out;
}

enum class Kind { kLetter, kDigit, kSpace, kOther };

Kind kind_of(const std::string& cp) {
  auto c = static_cast<unsigned char>(cp[0]);
  if (c >= 0x80) return Kind::kLetter;
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return Kind::kLetter;
  if (c >= '0' && c <= '9') return Kind::kDigit;
  if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') return Kind::kSpace;
  return Kind::kOther;
}

// The GPT-2 pre-tokenizer pattern, hand-written:
// 's|'t|'re|'ve|'m|'ll|'d| ?L+| ?N+| ?[^\sLN]+|\s+(?!\S)|\s+
std::vector<std::string> pre_tokenize(const std::string& text) {
  std::vector<std::string> cps = code_points(text);
  std::vector<std::string> pieces;
  std::size_t i = 0;
  auto run = [&](std::size_t start, Kind kind) {
    std::size_t j = start;
    while (j < cps.size() && kind_of(cps[j]) == kind) ++j;
    return j;
  };
  while (i < cps.size()) {
    std::string piece;
    if (cps[i] == "'" && i + 1 < cps.size()) {
      static const char* suffixes[] = {"s", "t", "re", "ve", "m", "ll", "d"};
      bool matched = false;
      for (const char* suffix : suffixes) {
        std::string s = suffix;
        bool ok = true;
        for (std::size_t k = 0; ok && k < s.size(); ++k) {
          ok = ok && i + 1 + k < cps.size() && cps[i + 1 + k] == std::string(1, s[k]);
        }
        if (ok) {
          pieces.push_back("'" + s);
          i += 1 + s.size();
          matched = true;
          break;
        }
      }
      if (matched) continue;
    }
    std::size_t start = i;
    std::size_t body = (cps[i] == " " && i + 1 < cps.size() && kind_of(cps[i + 1]) != Kind::kSpace)
                           ? i + 1
                           : i;
    Kind kind = kind_of(cps[body]);
    std::size_t end;
    if (kind == Kind::kSpace) {
      end = run(i, Kind::kSpace);
      // \s+(?!\S): leave the last space for the next word when one follows.
      if (end < cps.size() && end - i > 1) --end;
    } else if (kind == Kind::kOther) {
      end = body;
      while (end < cps.size() && kind_of(cps[end]) == Kind::kOther) ++end;
    } else {
      end = run(body, kind);
    }
    for (std::size_t k = start; k < end; ++k) piece += cps[k];
    pieces.push_back(piece);
    i = end;
  }
  return pieces;
}

class ByteLevelBpe final : public Tokenizer {
 public:
  explicit ByteLevelBpe(const Json& doc) {
    const Json& model = doc.at("model");
    for (const auto& [token, id] : model.at("vocab").items()) {
      vocab_[token] = id.get<std::int64_t>();
      id_to_token_[id.get<std::int64_t>()] = token;
    }
    std::int64_t rank = 0;
    for (const Json& merge : model.value("merges", Json::array())) {
      std::string left;
      std::string right;
      if (merge.is_string()) {
        std::string text = merge.get<std::string>();
        std::size_t space = text.find(' ');
        left = text.substr(0, space);
        right = space == std::string::npos ? "" : text.substr(space + 1);
      } else {
        left = merge.at(0).get<std::string>();
        right = merge.at(1).get<std::string>();
      }
      ranks_[left + '\x01' + right] = rank++;
    }
    for (const Json& added : doc.value("added_tokens", Json::array())) {
      std::string content = added.at("content").get<std::string>();
      std::int64_t id = added.at("id").get<std::int64_t>();
      added_.emplace_back(content, id);
      id_to_token_[id] = content;
      if (added.value("special", false)) special_.insert({id, true});
    }
    std::sort(added_.begin(), added_.end(),
              [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
    alphabet_ = byte_alphabet();
    for (std::size_t b = 0; b < 256; ++b) byte_of_[alphabet_[b]] = static_cast<unsigned char>(b);
  }

  std::vector<std::int64_t> encode(const std::string& text) const override {
    std::vector<std::int64_t> ids;
    std::size_t start = 0;
    for (std::size_t i = 0; i <= text.size();) {
      const std::pair<std::string, std::int64_t>* hit = nullptr;
      for (const auto& added : added_) {
        if (!added.first.empty() && text.compare(i, added.first.size(), added.first) == 0) {
          hit = &added;
          break;
        }
      }
      if (hit == nullptr && i < text.size()) {
        ++i;
        continue;
      }
      encode_plain(text.substr(start, i - start), ids);
      if (hit == nullptr) break;
      ids.push_back(hit->second);
      i += hit->first.size();
      start = i;
    }
    return ids;
  }

  std::string decode(const std::vector<std::int64_t>& ids) const override {
    std::string out;
    for (std::int64_t id : ids) {
      auto token = id_to_token_.find(id);
      if (token == id_to_token_.end() || special_.count(id)) continue;
      for (const std::string& cp : code_points(token->second)) {
        auto byte = byte_of_.find(cp);
        out += byte == byte_of_.end() ? cp : std::string(1, static_cast<char>(byte->second));
      }
    }
    return utf8_lossy(out);
  }

 private:
  void encode_plain(const std::string& text, std::vector<std::int64_t>& ids) const {
    for (const std::string& piece : pre_tokenize(text)) {
      std::vector<std::string> symbols;
      for (char c : piece) symbols.push_back(alphabet_[static_cast<unsigned char>(c)]);
      while (symbols.size() > 1) {
        std::int64_t best = INT64_MAX;
        std::size_t at = 0;
        for (std::size_t k = 0; k + 1 < symbols.size(); ++k) {
          auto rank = ranks_.find(symbols[k] + '\x01' + symbols[k + 1]);
          if (rank != ranks_.end() && rank->second < best) {
            best = rank->second;
            at = k;
          }
        }
        if (best == INT64_MAX) break;
        symbols[at] += symbols[at + 1];
        symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(at) + 1);
      }
      for (const std::string& symbol : symbols) {
        auto id = vocab_.find(symbol);
        if (id == vocab_.end()) {
          throw InferenceError("the tokenizer has no token for '" + symbol +
                               "'; pass token ids instead of text");
        }
        ids.push_back(id->second);
      }
    }
  }

  std::unordered_map<std::string, std::int64_t> vocab_;
  std::unordered_map<std::int64_t, std::string> id_to_token_;
  std::unordered_map<std::string, std::int64_t> ranks_;
  std::vector<std::pair<std::string, std::int64_t>> added_;
  std::map<std::int64_t, bool> special_;
  std::vector<std::string> alphabet_;
  std::unordered_map<std::string, unsigned char> byte_of_;
};

bool is_byte_level(const Json& component) {
  if (!component.is_object()) return false;
  if (component.value("type", "") == "ByteLevel") return true;
  for (const char* key : {"pretokenizers", "decoders"}) {
    if (component.contains(key)) {
      for (const Json& part : component.at(key)) {
        if (is_byte_level(part)) return true;
      }
    }
  }
  return false;
}

}  // namespace

std::shared_ptr<Tokenizer> load_byte_level_bpe(const std::filesystem::path& tokenizer_json) {
  std::ifstream in(tokenizer_json, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  detail::check_json_depth(text.str(), tokenizer_json.string(),
                           "pass token ids or set your own Tokenizer");
  Json doc = Json::parse(text.str(), nullptr, false);
  if (doc.is_discarded() || !doc.is_object() || !doc.contains("model") ||
      doc["model"].value("type", "") != "BPE" || !is_byte_level(doc.value("decoder", Json()))) {
    throw BundleError(tokenizer_json.string() +
                      ": not a byte-level BPE tokenizer; pass token ids or set your own Tokenizer");
  }
  try {
    return std::make_shared<ByteLevelBpe>(doc);
  } catch (const Json::exception& exc) {
    throw BundleError(tokenizer_json.string() + ": malformed tokenizer.json (" + exc.what() + ")");
  }
}

}  // namespace peft_export
