#include "peft_export/adapter_store.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "huge_pages.hpp"
#include "peft_export/errors.hpp"
#include "peft_export/safetensors.hpp"

namespace peft_export {
namespace {

bool split_bank(const std::string& name, std::string& module, std::string& part) {
  if (name.rfind("lora.", 0) != 0) return false;
  std::size_t dot = name.rfind('.');
  if (dot <= 5) return false;
  module = name.substr(5, dot - 5);
  part = name.substr(dot + 1);
  return part == "A" || part == "B" || part == "out_scale" || part == "in_scale" ||
         part == "bias_scale";
}

constexpr std::size_t kBankAlign = 64;  // each bank starts on a cache line

[[noreturn]] void too_large(const std::string& what) {
  throw BundleError("manifest.json: " + what + " overflows 64-bit sizes; the manifest is "
                    "damaged: re-export the bundle (or load it with fewer slots)");
}

// slots x (the slot's dimensions) x the dtype's size, refusing any product that overflows:
// every factor comes from manifest.json (or the caller's slot count).
std::size_t bank_bytes(const BankSpec& spec) {
  std::uint64_t bytes = dtype_size(spec.dtype);
  for (std::int64_t dim : spec.shape) {
    if (dim < 0 || __builtin_mul_overflow(bytes, static_cast<std::uint64_t>(dim), &bytes)) {
      too_large("bank " + spec.name + " (slots x r_max x features)");
    }
  }
  return static_cast<std::size_t>(bytes);
}

// All banks, each rounded up to kBankAlign, as allocate_block lays them out.
std::size_t aligned_total(const std::vector<std::size_t>& nbytes) {
  std::size_t total = 0;
  for (std::size_t bytes : nbytes) {
    std::size_t padded = 0;
    if (__builtin_add_overflow(bytes, kBankAlign - 1, &padded) ||
        __builtin_add_overflow(total, padded / kBankAlign * kBankAlign, &total)) {
      too_large("the sum of the adapter banks");
    }
  }
  return total;
}

// Banks larger than half this machine's memory (a huge adapters.slots, r_max or feature
// count in a manifest) are refused: filling them would take the machine down instead.
void check_bank_memory(int slots, std::size_t total) {
  long pages = sysconf(_SC_PHYS_PAGES);
  long page_size = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page_size <= 0) return;
  double have = static_cast<double>(pages) * static_cast<double>(page_size);
  if (static_cast<double>(total) > have / 2) {
    char text[160];
    std::snprintf(text, sizeof text,
                  "%d adapter slots need %.1f GiB of banks, more than half of this machine's "
                  "%.1f GiB; ",
                  slots, static_cast<double>(total) / (1 << 30), have / (1 << 30));
    throw InferenceError(std::string(text) + "load the bundle with fewer slots, or re-export it "
                         "with a smaller --slots");
  }
}

// A head bank [slots, ...] of an encoder graph: every dimension but the slots is fixed.
BankSpec head_spec(const TensorSpec& input, int slots) {
  BankSpec spec{input.name, "head", input.dtype, {slots}};
  for (std::size_t i = 1; i < input.shape.size(); ++i) {
    if (!input.shape[i].is_fixed()) {
      throw BundleError("manifest.json: head bank '" + input.name +
                        "' has a dynamic dimension; re-export the bundle");
    }
    spec.shape.push_back(input.shape[i].size);
  }
  if (input.shape.empty()) {
    throw BundleError("manifest.json: head bank '" + input.name + "' has no slot dimension; "
                      "re-export the bundle");
  }
  return spec;
}

}  // namespace

AdapterBanks::AdapterBanks(const Manifest& manifest, int slots,
                           const std::filesystem::path& bundle_dir)
    : slots_(slots > 0 ? slots : (manifest.adapters.slots > 0 ? manifest.adapters.slots : 2)) {
  if (slots_ < 2) {
    throw InferenceError("an adapter store needs at least 2 slots (slot 0 is the base)");
  }
  const AdapterLayout& layout = manifest.adapters;
  for (const TensorSpec& input : manifest.graph.inputs) {
    std::string module_path;
    std::string part;
    if (manifest.encoder && input.name.rfind("head.", 0) == 0) {
      specs_.push_back(head_spec(input, slots_));
      nbytes_.push_back(bank_bytes(specs_.back()));
      continue;
    }
    if (!split_bank(input.name, module_path, part)) continue;
    const ModuleSlot* module = layout.module(module_path);
    if (module == nullptr) {
      throw BundleError("manifest.json: graph input '" + input.name +
                        "' names a module missing from adapters.modules; re-export the bundle");
    }
    BankSpec spec{input.name, part, input.dtype, {slots_}};
    if (part == "A") spec.shape.insert(spec.shape.end(), {layout.r_max, module->in_features});
    if (part == "B") spec.shape.insert(spec.shape.end(), {module->out_features, layout.r_max});
    if (part == "out_scale" || part == "bias_scale") spec.shape.push_back(module->out_features);
    if (part == "in_scale") spec.shape.push_back(module->in_features);
    nbytes_.push_back(bank_bytes(spec));
    specs_.push_back(std::move(spec));
  }
  check_bank_memory(slots_, aligned_total(nbytes_));
  allocate_block();
  if (manifest.encoder) read_base_heads(bundle_dir);
  for (int slot = 0; slot < slots_; ++slot) {
    for (std::size_t bank = 0; bank < specs_.size(); ++bank) reset_slot(bank, slot);
  }
}

void AdapterBanks::Unmap::operator()(std::byte* mapping) const { munmap(mapping, length); }

// A slot write and a decode step each touch every bank (~20 MB for an all-linear rank-16
// SmolLM2 adapter, in hundreds of regions): on 4 KiB pages that is thousands of TLB misses,
// so the banks share one anonymous mapping, 2 MiB aligned and advised onto transparent huge
// pages (Linux; elsewhere, or with THP off, ordinary pages). Each bank starts on a cache line.
void AdapterBanks::allocate_block() {
  using huge_pages::kHugePage;
  std::size_t total = 0;  // aligned_total(nbytes_), checked before: no overflow here
  for (std::size_t bytes : nbytes_) {
    offset_.push_back(total);
    total += (bytes + kBankAlign - 1) / kBankAlign * kBankAlign;
  }
  const std::size_t length = total + kHugePage;
  void* mapping = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED) {
    throw InferenceError("cannot allocate " + std::to_string(total >> 20) +
                         " MiB of adapter banks; load the bundle with fewer slots");
  }
  block_ = std::unique_ptr<std::byte, Unmap>(static_cast<std::byte*>(mapping), Unmap{length});
  const auto address = reinterpret_cast<std::uintptr_t>(mapping);
  base_ = block_.get() + ((kHugePage - address % kHugePage) % kHugePage);
#ifdef MADV_HUGEPAGE
  madvise(base_, total, MADV_HUGEPAGE);  // a refusal (THP off) only costs speed
#endif
}

std::size_t AdapterBanks::slot_bytes(std::size_t bank) const {
  return slots_ == 0 ? 0 : nbytes_[bank] / static_cast<std::size_t>(slots_);
}

void AdapterBanks::reset_slot(std::size_t bank, int slot) {
  const BankSpec& spec = specs_[bank];
  std::byte* base = base_ + offset_[bank] + slot_bytes(bank) * static_cast<std::size_t>(slot);
  if (spec.part == "head") {
    auto head = base_heads_.find(bank);
    if (head == base_heads_.end()) {
      std::memset(base, 0, slot_bytes(bank));
    } else {
      std::memcpy(base, head->second.data(), head->second.size());
    }
    return;
  }
  if (spec.part == "A" || spec.part == "B") {
    std::memset(base, 0, slot_bytes(bank));
    return;
  }
  std::size_t count = slot_bytes(bank) / dtype_size(spec.dtype);
  std::vector<float> ones(count, 1.0f);
  from_float(spec.dtype, ones.data(), count, base);
}

void AdapterBanks::write_slot(int slot, const HostAdapter* adapter) {
  if (slot < 0 || slot >= slots_) throw InferenceError("bank slot out of range");
  for (std::size_t bank = 0; bank < specs_.size(); ++bank) {
    const BankSpec& spec = specs_[bank];
    const HostTensor* tensor = nullptr;
    if (adapter != nullptr) {
      auto it = adapter->tensors.find(spec.name);
      if (it != adapter->tensors.end()) tensor = &it->second;
    }
    reset_slot(bank, slot);
    if (tensor == nullptr) continue;
    std::byte* base = base_ + offset_[bank] + slot_bytes(bank) * static_cast<std::size_t>(slot);
    std::size_t item = dtype_size(spec.dtype);
    if (spec.part == "B") {
      // [out, r] into [out, r_max]: each output row keeps its first r columns.
      auto rows = static_cast<std::size_t>(tensor->shape[0]);
      auto rank = static_cast<std::size_t>(tensor->shape[1]);
      auto r_max = static_cast<std::size_t>(spec.shape[2]);
      for (std::size_t row = 0; row < rows; ++row) {
        std::memcpy(base + row * r_max * item, tensor->data.data() + row * rank * item,
                    rank * item);
      }
    } else {
      // A [r, in] fills the first r rows of [r_max, in]; scales fill the whole slot.
      std::memcpy(base, tensor->data.data(), tensor->data.size());
    }
  }
  if (listener_) listener_(slot);
}

// adapters/_base_heads.safetensors: the base's own task head, which slot 0 holds and which a
// slot gets for each head tensor its adapter lacks (as the Python runtime does).
void AdapterBanks::read_base_heads(const std::filesystem::path& bundle_dir) {
  if (bundle_dir.empty()) return;
  std::filesystem::path path = confined_path(bundle_dir, "adapters/_base_heads.safetensors");
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return;
  SafetensorsFile file(path);
  for (std::size_t bank = 0; bank < specs_.size(); ++bank) {
    const BankSpec& spec = specs_[bank];
    const SafetensorInfo* info = spec.part == "head" ? file.find(spec.name) : nullptr;
    if (info == nullptr) continue;
    std::vector<std::int64_t> slot_shape(spec.shape.begin() + 1, spec.shape.end());
    if (info->shape != slot_shape) {
      throw BundleError(path.string() + ": " + spec.name + " does not fit the graph's head bank "
                        "slot; re-export the bundle");
    }
    auto count = static_cast<std::size_t>(element_count(info->shape));
    std::vector<float> values(count);
    to_float(info->dtype, file.read(spec.name).data(), count, values.data());
    std::vector<std::byte> bytes(count * dtype_size(spec.dtype));
    from_float(spec.dtype, values.data(), count, bytes.data());
    base_heads_[bank] = std::move(bytes);
    reset_slot(bank, 0);
  }
}

AdapterStore::Lease::Lease(Lease&& other) noexcept
    : store_(other.store_),
      ids_(std::move(other.ids_)),
      adapters_(std::move(other.adapters_)),
      pinned_(std::move(other.pinned_)) {
  other.store_ = nullptr;
}

AdapterStore::Lease& AdapterStore::Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    release();
    store_ = other.store_;
    ids_ = std::move(other.ids_);
    adapters_ = std::move(other.adapters_);
    pinned_ = std::move(other.pinned_);
    other.store_ = nullptr;
  }
  return *this;
}

AdapterStore::Lease::~Lease() { release(); }

void AdapterStore::Lease::release() {
  if (store_ != nullptr) store_->release(pinned_);
  store_ = nullptr;
  pinned_.clear();
}

AdapterStore::AdapterStore(const Manifest& manifest, std::filesystem::path bundle_dir,
                           AdapterBanks* banks, double wait_seconds)
    : manifest_(manifest), bundle_dir_(std::move(bundle_dir)), banks_(banks),
      wait_seconds_(wait_seconds) {
  int slots = banks_ != nullptr ? banks_->slots() : 1;
  held_in_.assign(static_cast<std::size_t>(slots), Identity{});
  pins_.assign(static_cast<std::size_t>(slots), 0);
  for (int slot = 1; slot < slots; ++slot) lru_.push_back(slot);
  std::error_code ec;
  manifest_stamp_ = std::filesystem::last_write_time(bundle_dir_ / "manifest.json", ec);
}

std::shared_ptr<const HostAdapter> AdapterStore::load(const std::string& name) {
  Manifest manifest;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (manifest_changed_locked() || !manifest_.adapters.installed.count(name)) {
      refresh_manifest_locked();
    }
    auto held = host_.find(name);
    if (held != host_.end()) {
      auto entry = manifest_.adapters.installed.find(name);
      if (entry == manifest_.adapters.installed.end() || entry->second.sha256.empty() ||
          entry->second.sha256 == held->second->sha256) {
        return held->second;
      }
    }
    manifest = manifest_;
  }
  std::shared_ptr<const HostAdapter> adapter;
  try {
    adapter = read(manifest, name);
  } catch (const BundleError&) {
    // The bundle may have been replaced while the file was read: retry once with the manifest
    // that replaced it, fail as read when it records nothing new for this adapter.
    Manifest fresh;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      refresh_manifest_locked();
      fresh = manifest_;
    }
    auto before = manifest.adapters.installed.find(name);
    auto after = fresh.adapters.installed.find(name);
    if (after == fresh.adapters.installed.end() ||
        (before != manifest.adapters.installed.end() &&
         before->second.file == after->second.file &&
         before->second.sha256 == after->second.sha256)) {
      throw;
    }
    adapter = read(fresh, name);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  auto held = host_.find(name);
  if (held != host_.end() && held->second->sha256 == adapter->sha256) return held->second;
  auto current = manifest_.adapters.installed.find(name);
  if (current != manifest_.adapters.installed.end() && !current->second.sha256.empty() &&
      current->second.sha256 != adapter->sha256) {
    return adapter;  // superseded while it was read: this caller's request only
  }
  host_[name] = adapter;
  free_stale_locked(name);
  return adapter;
}

std::shared_ptr<const HostAdapter> AdapterStore::read(const Manifest& manifest,
                                                      const std::string& name) const {
  auto entry = manifest.adapters.installed.find(name);
  if (entry == manifest.adapters.installed.end()) {
    std::string known;
    for (const auto& [known_name, installed] : manifest.adapters.installed) {
      known += (known.empty() ? "" : ", ") + known_name;
    }
    throw InferenceError("unknown adapter '" + name + "' (installed: " +
                         (known.empty() ? std::string("none") : known) +
                         "); add it with 'peft-export adapters add " + bundle_dir_.string() + " " +
                         name + "=PATH'");
  }
  std::filesystem::path path = confined_path(bundle_dir_, entry->second.file);
  return std::make_shared<const HostAdapter>(read_adapter(manifest, name, path));
}

bool AdapterStore::manifest_changed_locked() const {
  std::error_code ec;
  return std::filesystem::last_write_time(bundle_dir_ / "manifest.json", ec) != manifest_stamp_;
}

void AdapterStore::refresh_manifest_locked() {
  std::error_code ec;
  auto stamp = std::filesystem::last_write_time(bundle_dir_ / "manifest.json", ec);
  Manifest fresh;
  try {
    fresh = load_manifest(bundle_dir_);
  } catch (const BundleError&) {
    return;
  }
  manifest_stamp_ = stamp;
  bool same_base = fresh.base_model.weights_sha256 == manifest_.base_model.weights_sha256;
  bool same_graph = fresh.graph.inputs.size() == manifest_.graph.inputs.size() &&
                    fresh.adapters.r_max == manifest_.adapters.r_max;
  if (same_base && same_graph) manifest_.adapters.installed = fresh.adapters.installed;
}

bool AdapterStore::drop(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<Identity> placed;
  for (const auto& [key, slot] : slot_of_) {
    if (key.first != name) continue;
    if (pins_[static_cast<std::size_t>(slot)] > 0) return false;
    placed.push_back(key);
  }
  for (const Identity& key : placed) free_locked(key);
  host_.erase(name);
  return true;
}

std::vector<std::string> AdapterStore::held() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::string> names;
  for (const auto& [name, adapter] : host_) names.push_back(name);
  return names;
}

std::map<std::string, int> AdapterStore::resident() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::map<std::string, int> out;
  for (const auto& [key, slot] : slot_of_) {
    if (current_locked(key)) out[key.first] = slot;
  }
  return out;
}

std::size_t AdapterStore::swaps() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return swaps_;
}

bool AdapterStore::can_place_locked(const std::vector<Identity>& wanted) const {
  std::size_t missing = 0;
  for (const auto& key : wanted) missing += slot_of_.count(key) ? 0 : 1;
  std::size_t free = 0;
  for (std::size_t slot = 1; slot < held_in_.size(); ++slot) {
    bool wanted_here = std::find(wanted.begin(), wanted.end(), held_in_[slot]) != wanted.end();
    if (pins_[slot] == 0 && !wanted_here) ++free;
  }
  return missing <= free;
}

bool AdapterStore::current_locked(const Identity& key) const {
  auto held = host_.find(key.first);
  return held != host_.end() && held->second->sha256 == key.second;
}

void AdapterStore::free_locked(const Identity& key) {
  auto placed = slot_of_.find(key);
  int slot = placed->second;
  slot_of_.erase(placed);
  held_in_[static_cast<std::size_t>(slot)] = Identity{};
  lru_.remove(slot);
  lru_.push_front(slot);  // reused first
}

void AdapterStore::free_stale_locked(const std::string& name) {
  std::vector<Identity> stale;
  for (const auto& [key, slot] : slot_of_) {
    if (key.first == name && pins_[static_cast<std::size_t>(slot)] == 0 && !current_locked(key)) {
      stale.push_back(key);
    }
  }
  for (const Identity& key : stale) free_locked(key);
}

int AdapterStore::place_locked(const HostAdapter& adapter) {
  Identity key{adapter.name, adapter.sha256};
  auto placed = slot_of_.find(key);
  if (placed != slot_of_.end()) return placed->second;
  int chosen = -1;
  for (int slot : lru_) {
    if (pins_[static_cast<std::size_t>(slot)] > 0) continue;
    if (chosen < 0) chosen = slot;  // least recently used unpinned slot
    if (held_in_[static_cast<std::size_t>(slot)].first.empty()) {
      chosen = slot;  // an empty one is preferred
      break;
    }
  }
  Identity& held = held_in_[static_cast<std::size_t>(chosen)];
  if (!held.first.empty()) slot_of_.erase(held);
  held = Identity{};  // unnamed while written: a failed write leaves it empty
  banks_->write_slot(chosen, &adapter);
  held = key;
  slot_of_[key] = chosen;
  ++swaps_;
  return chosen;
}

AdapterStore::Lease AdapterStore::acquire(const std::vector<std::string>& row_adapters) {
  std::vector<std::string> named;
  for (const std::string& name : row_adapters) {
    if (!name.empty() && std::find(named.begin(), named.end(), name) == named.end()) {
      named.push_back(name);
    }
  }
  std::map<std::string, std::shared_ptr<const HostAdapter>> hosted;
  std::vector<Identity> wanted;  // LoRA-family adapters: they need a slot
  for (const std::string& name : named) {
    hosted[name] = load(name);
    if (hosted[name]->has_banks()) wanted.emplace_back(name, hosted[name]->sha256);
  }
  if (!wanted.empty() && banks_ == nullptr) {
    throw InferenceError("adapter '" + wanted.front().first + "' has LoRA weights but this "
                         "bundle's graph has no adapter banks; re-export with --mode runtime");
  }
  if (static_cast<int>(wanted.size()) > slots() - 1) {
    throw InferenceError("one request names " + std::to_string(wanted.size()) +
                         " different adapters but the banks hold " + std::to_string(slots() - 1) +
                         "; split the batch or load the bundle with more slots");
  }
  Lease lease;
  std::map<std::string, int> slot_of;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    auto deadline = std::chrono::steady_clock::now() +
                    std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                        std::chrono::duration<double>(wait_seconds_));
    while (!can_place_locked(wanted)) {
      if (released_.wait_until(lock, deadline) == std::cv_status::timeout &&
          !can_place_locked(wanted)) {
        throw InferenceError("all adapter slots stayed in use by other requests; retry, or load "
                             "the bundle with more slots");
      }
    }
    std::stable_partition(wanted.begin(), wanted.end(),
                          [&](const Identity& key) { return slot_of_.count(key) > 0; });
    for (const Identity& key : wanted) {
      int slot = place_locked(*hosted[key.first]);
      ++pins_[static_cast<std::size_t>(slot)];
      lru_.remove(slot);
      lru_.push_back(slot);
      slot_of[key.first] = slot;
      lease.pinned_.push_back(slot);
    }
    lease.store_ = this;
  }
  for (const std::string& name : row_adapters) {
    auto slot = slot_of.find(name);
    lease.ids_.push_back(slot == slot_of.end() ? 0 : slot->second);
    lease.adapters_.push_back(name.empty() ? nullptr : hosted[name]);
  }
  return lease;
}

void AdapterStore::release(const std::vector<int>& slots) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int slot : slots) {
      auto index = static_cast<std::size_t>(slot);
      --pins_[index];
      // The last request on an older copy's slot frees it (see load()).
      Identity held = held_in_[index];  // a copy: free_locked clears held_in_[index]
      if (pins_[index] == 0 && !held.first.empty() && !current_locked(held)) free_locked(held);
    }
  }
  released_.notify_all();
}

}  // namespace peft_export
