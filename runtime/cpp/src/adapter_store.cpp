#include "peft_export/adapter_store.hpp"

#include <algorithm>
#include <cstring>
#include <set>

#include "peft_export/errors.hpp"

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

}  // namespace

AdapterBanks::AdapterBanks(const Manifest& manifest) : slots_(manifest.adapters.slots) {
  const AdapterLayout& layout = manifest.adapters;
  for (const TensorSpec& input : manifest.graph.inputs) {
    std::string module_path;
    std::string part;
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
    data_.emplace_back(static_cast<std::size_t>(element_count(spec.shape)) *
                       dtype_size(spec.dtype));
    specs_.push_back(std::move(spec));
  }
  for (int slot = 0; slot < slots_; ++slot) {
    for (std::size_t bank = 0; bank < specs_.size(); ++bank) reset_slot(bank, slot);
  }
}

std::size_t AdapterBanks::slot_bytes(std::size_t bank) const {
  return slots_ == 0 ? 0 : data_[bank].size() / static_cast<std::size_t>(slots_);
}

void AdapterBanks::reset_slot(std::size_t bank, int slot) {
  const BankSpec& spec = specs_[bank];
  std::byte* base = data_[bank].data() + slot_bytes(bank) * static_cast<std::size_t>(slot);
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
    std::byte* base = data_[bank].data() + slot_bytes(bank) * static_cast<std::size_t>(slot);
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

AdapterStore::Lease::Lease(Lease&& other) noexcept
    : store_(other.store_),
      slots_(std::move(other.slots_)),
      adapters_(std::move(other.adapters_)),
      held_(std::move(other.held_)) {
  other.store_ = nullptr;
}

AdapterStore::Lease& AdapterStore::Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    release();
    store_ = other.store_;
    slots_ = std::move(other.slots_);
    adapters_ = std::move(other.adapters_);
    held_ = std::move(other.held_);
    other.store_ = nullptr;
  }
  return *this;
}

AdapterStore::Lease::~Lease() { release(); }

void AdapterStore::Lease::release() {
  if (store_ != nullptr) store_->release(held_);
  store_ = nullptr;
  held_.clear();
}

AdapterStore::AdapterStore(const Manifest& manifest, std::filesystem::path bundle_dir,
                           AdapterBanks* banks)
    : manifest_(manifest), bundle_dir_(std::move(bundle_dir)), banks_(banks) {
  slots_.resize(banks_ != nullptr ? static_cast<std::size_t>(std::max(banks_->slots(), 1)) : 1);
  for (const auto& [name, installed] : manifest_.adapters.installed) {
    files_[name] = installed.file;
  }
}

std::vector<std::string> AdapterStore::available() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::string> names;
  for (const auto& [name, file] : files_) names.push_back(name);
  return names;
}

void AdapterStore::add(const std::string& name, const std::filesystem::path& file) {
  if (name.empty()) throw InferenceError("an adapter needs a non-empty name");
  HostAdapter adapter = read_adapter(manifest_, name, file);
  std::lock_guard<std::mutex> lock(mutex_);
  // A new version of a served adapter: running requests keep the old slot (detached).
  for (Slot& slot : slots_) {
    if (slot.name == name) slot.name.clear();
  }
  files_[name] = std::filesystem::absolute(file);
  host_[name] = std::make_shared<const HostAdapter>(std::move(adapter));
  ++stats_.loads;
}

void AdapterStore::load(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  load_locked(name);
}

std::shared_ptr<const HostAdapter> AdapterStore::load_locked(const std::string& name) {
  auto cached = host_.find(name);
  if (cached != host_.end()) return cached->second;
  auto file = files_.find(name);
  if (file == files_.end()) {
    std::string known;
    for (const auto& [known_name, path] : files_) known += (known.empty() ? "" : ", ") + known_name;
    throw InferenceError("unknown adapter '" + name + "' (available: " +
                         (known.empty() ? std::string("none") : known) +
                         "); add it with 'peft-export adapters add' or AdapterStore::add");
  }
  // Bundle-relative files must stay inside the bundle; added files are taken as given.
  std::filesystem::path path =
      file->second.is_relative() ? confined_path(bundle_dir_, file->second.string()) : file->second;
  auto adapter = std::make_shared<const HostAdapter>(read_adapter(manifest_, name, path));
  host_[name] = adapter;
  ++stats_.loads;
  return adapter;
}

void AdapterStore::unload(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  host_.erase(name);
  for (Slot& slot : slots_) {
    if (slot.name == name) {
      slot.name.clear();
      slot.pinned = false;
    }
  }
}

void AdapterStore::pin(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto adapter = load_locked(name);
  if (!adapter->has_lora()) return;
  int slot = find_slot_locked(name);
  if (slot < 0) slot = place_locked(name, adapter, {name});
  slots_[static_cast<std::size_t>(slot)].pinned = true;
}

void AdapterStore::unpin(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  int slot = find_slot_locked(name);
  if (slot >= 0) slots_[static_cast<std::size_t>(slot)].pinned = false;
}

std::vector<std::string> AdapterStore::loaded() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::string> names;
  for (const auto& [name, adapter] : host_) names.push_back(name);
  return names;
}

std::vector<std::string> AdapterStore::resident() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::string> names;
  for (const Slot& slot : slots_) {
    if (!slot.name.empty()) names.push_back(slot.name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::optional<int> AdapterStore::slot_of(const std::string& name) const {
  std::lock_guard<std::mutex> lock(mutex_);
  int slot = find_slot_locked(name);
  return slot < 0 ? std::nullopt : std::optional<int>(slot);
}

AdapterStoreStats AdapterStore::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

int AdapterStore::find_slot_locked(const std::string& name) const {
  for (std::size_t i = 1; i < slots_.size(); ++i) {
    if (slots_[i].name == name) return static_cast<int>(i);
  }
  return -1;
}

int AdapterStore::place_locked(const std::string& name,
                               const std::shared_ptr<const HostAdapter>& adapter,
                               const std::vector<std::string>& keep) {
  int chosen = -1;
  for (std::size_t i = 1; i < slots_.size() && chosen < 0; ++i) {
    if (slots_[i].name.empty() && slots_[i].users == 0) chosen = static_cast<int>(i);
  }
  if (chosen < 0) {
    for (std::size_t i = 1; i < slots_.size(); ++i) {
      const Slot& slot = slots_[i];
      bool needed = std::find(keep.begin(), keep.end(), slot.name) != keep.end();
      if (slot.users > 0 || slot.pinned || needed) continue;
      if (chosen < 0 || slot.last_used < slots_[static_cast<std::size_t>(chosen)].last_used) {
        chosen = static_cast<int>(i);
      }
    }
  }
  if (chosen < 0) {
    throw InferenceError(
        "all " + std::to_string(slots_.size() - 1) + " adapter slots are in use by running "
        "requests or pinned; retry when a request finishes, unpin an adapter, or re-export the "
        "bundle with more --slots");
  }
  Slot& slot = slots_[static_cast<std::size_t>(chosen)];
  if (!slot.name.empty()) ++stats_.evictions;
  slot.name.clear();
  banks_->write_slot(chosen, adapter.get());
  slot.name = name;
  slot.pinned = false;
  slot.last_used = ++clock_;
  ++stats_.placements;
  return chosen;
}

AdapterStore::Lease AdapterStore::acquire(const std::vector<std::string>& row_adapters) {
  std::lock_guard<std::mutex> lock(mutex_);
  Lease lease;
  lease.store_ = this;
  std::vector<std::string> distinct;
  for (const std::string& name : row_adapters) {
    if (!name.empty() && std::find(distinct.begin(), distinct.end(), name) == distinct.end()) {
      distinct.push_back(name);
    }
  }
  std::map<std::string, std::pair<int, std::shared_ptr<const HostAdapter>>> placed;
  try {
    for (const std::string& name : distinct) {
      auto adapter = load_locked(name);
      int slot = 0;
      if (adapter->has_lora()) {
        if (banks_ == nullptr) {
          throw InferenceError("adapter '" + name + "' has LoRA weights but this bundle's graph "
                               "has no adapter banks; re-export with --mode runtime");
        }
        slot = find_slot_locked(name);
        if (slot < 0) slot = place_locked(name, adapter, distinct);
        Slot& entry = slots_[static_cast<std::size_t>(slot)];
        ++entry.users;
        entry.last_used = ++clock_;
        lease.held_.push_back(slot);
      }
      placed[name] = {slot, adapter};
    }
  } catch (...) {
    for (int slot : lease.held_) --slots_[static_cast<std::size_t>(slot)].users;
    lease.held_.clear();
    lease.store_ = nullptr;
    throw;
  }
  for (const std::string& name : row_adapters) {
    if (name.empty()) {
      lease.slots_.push_back(0);
      lease.adapters_.push_back(nullptr);
    } else {
      lease.slots_.push_back(placed[name].first);
      lease.adapters_.push_back(placed[name].second);
    }
  }
  return lease;
}

void AdapterStore::release(const std::vector<int>& slots) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (int slot : slots) --slots_[static_cast<std::size_t>(slot)].users;
}

}  // namespace peft_export
