// Huge-page collapse of a session's memory: which mappings it picks, and that it keeps them.
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "check.hpp"
#include "huge_pages.hpp"

namespace hp = peft_export::huge_pages;

namespace {

bool covered(const std::vector<hp::Range>& ranges, std::uintptr_t lo, std::uintptr_t hi) {
  return std::any_of(ranges.begin(), ranges.end(),
                     [&](const hp::Range& r) { return r.first <= lo && hi <= r.second; });
}

}  // namespace

TEST(new_ranges_are_memory_mapped_since) {
  const std::vector<hp::Range> before = {{0, 100}, {200, 300}, {400, 500}};
  const std::vector<hp::Range> after = {{0, 100}, {150, 350}, {400, 500}, {600, 700}};
  CHECK((hp::new_ranges(before, after) == std::vector<hp::Range>{{150, 200}, {300, 350}, {600, 700}}));
  CHECK(hp::new_ranges(before, before).empty());
}

TEST(a_new_mapping_is_new_and_keeps_its_bytes_when_collapsed) {
  const auto before = hp::anonymous_ranges();
  const std::size_t size = std::size_t{8} << 20;
  void* raw = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(raw != MAP_FAILED);
  auto* bytes = static_cast<unsigned char*>(raw);
  for (std::size_t i = 0; i < size; ++i) bytes[i] = static_cast<unsigned char>(i * 31 + 7);
  const auto lo = reinterpret_cast<std::uintptr_t>(raw);
  const auto fresh = hp::new_ranges(before, hp::anonymous_ranges());
  CHECK(covered(fresh, lo, lo + size));
  hp::collapse(fresh);
  bool same = true;
  for (std::size_t i = 0; i < size; ++i) same &= bytes[i] == static_cast<unsigned char>(i * 31 + 7);
  CHECK(same);
  munmap(raw, size);
}

TEST(a_deferred_collapse_waits_for_begin_and_can_be_dropped_before_it) {
  const auto before = hp::anonymous_ranges();
  const std::size_t size = std::size_t{8} << 20;
  void* raw = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(raw != MAP_FAILED);
  std::memset(raw, 5, size);
  const auto fresh = hp::new_ranges(before, hp::anonymous_ranges());
  { hp::DeferredCollapse dropped(fresh); }
  hp::DeferredCollapse deferred(fresh);
  deferred.begin();
  deferred.begin();
  const std::uint64_t accepted = deferred.finish();
  CHECK(accepted == hp::collapse(fresh));  // both succeed, or THP is off for both
  CHECK(deferred.finish() == accepted);
  const auto* bytes = static_cast<const unsigned char*>(raw);
  CHECK(std::all_of(bytes, bytes + size, [](unsigned char b) { return b == 5; }));
  munmap(raw, size);
}

TEST(file_backed_and_read_only_mappings_are_not_anonymous) {
  void* raw = mmap(nullptr, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  const auto lo = reinterpret_cast<std::uintptr_t>(raw);
  CHECK(!covered(hp::anonymous_ranges(), lo, lo + 4096));
  munmap(raw, 4096);
}

TEST(ranges_without_a_whole_huge_page_are_left_alone) {
  CHECK(hp::collapse({{4096, hp::kHugePage + 4096}}) == 0);
}

int main() { return check::run_all(); }
