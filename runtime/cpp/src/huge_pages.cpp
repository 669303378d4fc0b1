#include "huge_pages.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>

namespace peft_export::huge_pages {
namespace {

constexpr std::uintptr_t kHugePage = std::uintptr_t{2} << 20;
// Bytes per madvise call: a failure (no free huge page) costs one chunk, not the range.
constexpr std::uintptr_t kChunk = std::uintptr_t{64} << 20;
constexpr int kMadvCollapse = 25;  // Linux >= 6.1; older kernels answer EINVAL

}  // namespace

std::vector<Range> anonymous_ranges() {
  std::vector<Range> ranges;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    std::istringstream fields(line);
    std::string span, perms, offset, device, inode, path;
    fields >> span >> perms >> offset >> device >> inode;
    std::getline(fields >> std::ws, path);
    const bool anonymous = path.empty() || path == "[heap]" || path.rfind("[anon:", 0) == 0;
    const auto dash = span.find('-');
    if (perms != "rw-p" || inode != "0" || !anonymous || dash == std::string::npos) continue;
    ranges.emplace_back(std::stoull(span.substr(0, dash), nullptr, 16),
                        std::stoull(span.substr(dash + 1), nullptr, 16));
  }
  return ranges;
}

std::vector<Range> changed_ranges(const std::vector<Range>& before, const std::vector<Range>& after) {
  std::vector<Range> changed;
  for (const Range& range : after) {
    if (std::find(before.begin(), before.end(), range) == before.end()) changed.push_back(range);
  }
  return changed;
}

std::uint64_t collapse(const std::vector<Range>& ranges) {
  std::uint64_t accepted = 0;
  for (const auto& [lo, hi] : ranges) {
    const std::uintptr_t start = (lo + kHugePage - 1) / kHugePage * kHugePage;
    const std::uintptr_t end = hi / kHugePage * kHugePage;
    for (std::uintptr_t chunk = start; chunk < end; chunk += kChunk) {
      const std::uintptr_t size = std::min(kChunk, end - chunk);
      if (madvise(reinterpret_cast<void*>(chunk), size, kMadvCollapse) == 0) accepted += size;
    }
  }
  return accepted;
}

}  // namespace peft_export::huge_pages
