// Moves the memory an ONNX Runtime session allocated onto 2 MiB pages (Linux MADV_COLLAPSE),
// as the Python runtime does (runtime/huge_pages.py explains why): a CPU decode step streams
// every weight, and on 4 KiB pages that is a TLB miss every 4 KiB. Best effort, never fails.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace peft_export::huge_pages {

using Range = std::pair<std::uintptr_t, std::uintptr_t>;

// The transparent huge page size on x86-64 (and arm64 with 4 KiB base pages).
inline constexpr std::uintptr_t kHugePage = std::uintptr_t{2} << 20;

// Private writable anonymous mappings of this process (the heap included).
std::vector<Range> anonymous_ranges();

// The parts of `after` that no range of `before` covers: memory mapped since. Only these are
// collapsed, so other code's memory is left as it was.
std::vector<Range> new_ranges(std::vector<Range> before, const std::vector<Range>& after);

// Asks the kernel to back whole 2 MiB pages of `ranges` with huge pages; the bytes it accepted.
std::uint64_t collapse(const std::vector<Range>& ranges);

// collapse(ranges) on its own thread once begin() is called: after the session's first run,
// since the kernel stalls accesses to memory it is moving and a collapse started at load
// delayed the first token (runtime/huge_pages.py has the numbers). Destroyed before begin(),
// it collapses nothing; otherwise the destructor waits for the collapse to end.
class DeferredCollapse {
 public:
  explicit DeferredCollapse(std::vector<Range> ranges);
  ~DeferredCollapse();
  DeferredCollapse(const DeferredCollapse&) = delete;
  DeferredCollapse& operator=(const DeferredCollapse&) = delete;
  void begin();
  // Begins, waits for the collapse to end and gives the bytes the kernel accepted.
  std::uint64_t finish();

 private:
  std::mutex mutex_;
  std::condition_variable wake_;
  bool go_ = false;
  bool cancelled_ = false;
  std::uint64_t accepted_ = 0;
  std::thread thread_;
};

}  // namespace peft_export::huge_pages
