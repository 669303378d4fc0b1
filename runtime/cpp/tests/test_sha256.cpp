// The runtime's SHA-256 against the published FIPS 180 example digests (the hash that
// checks an adapter file against manifest.json; the library keeps it private).
#include <algorithm>
#include <string>
#include <utility>

#include "check.hpp"
#include "sha256.hpp"

namespace {

std::string digest(const std::string& text, std::size_t chunk) {
  peft_export::detail::Sha256 hash;
  for (std::size_t at = 0; at < text.size(); at += chunk) {
    hash.update(text.data() + at, std::min(chunk, text.size() - at));
  }
  return hash.hex();
}

}  // namespace

TEST(published_digests_in_any_chunking) {
  const std::pair<std::string, std::string> cases[] = {
      {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
      {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
       "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
      {std::string(1000000, 'a'),
       "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"},
  };
  for (const auto& [text, want] : cases) {
    for (std::size_t chunk : {std::size_t{1}, std::size_t{7}, std::size_t{64}, std::size_t{1000}}) {
      CHECK(digest(text, chunk) == want);
    }
  }
}

int main() { return check::run_all(); }
