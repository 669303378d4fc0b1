#include "huge_pages.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>

namespace peft_export::huge_pages {
namespace {

// Bytes per madvise call: short calls keep each stall short, and a failure (no free huge page)
// costs one chunk, not the range.
constexpr std::uintptr_t kChunk = kHugePage;
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

std::vector<Range> new_ranges(std::vector<Range> before, const std::vector<Range>& after) {
  std::sort(before.begin(), before.end());
  std::vector<Range> pieces;
  for (const auto& [lo, hi] : after) {
    std::uintptr_t start = lo;
    for (const auto& [old_lo, old_hi] : before) {
      if (old_hi <= start || old_lo >= hi) continue;
      if (old_lo > start) pieces.emplace_back(start, old_lo);
      start = std::max(start, old_hi);
    }
    if (start < hi) pieces.emplace_back(start, hi);
  }
  return pieces;
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

DeferredCollapse::DeferredCollapse(std::vector<Range> ranges)
    : thread_([this, ranges = std::move(ranges)] {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [this] { return go_ || cancelled_; });
        if (cancelled_) return;
        lock.unlock();
        accepted_ = collapse(ranges);
      }) {}

DeferredCollapse::~DeferredCollapse() {
  {
    std::lock_guard lock(mutex_);
    cancelled_ = !go_;
  }
  wake_.notify_one();
  if (thread_.joinable()) thread_.join();
}

void DeferredCollapse::begin() {
  {
    std::lock_guard lock(mutex_);
    if (go_) return;
    go_ = true;
  }
  wake_.notify_one();
}

std::uint64_t DeferredCollapse::finish() {
  begin();
  if (thread_.joinable()) thread_.join();
  return accepted_;
}

}  // namespace peft_export::huge_pages
