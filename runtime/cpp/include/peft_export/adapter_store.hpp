// The adapter store: adapters in host memory, placed into the graph's bank slots on demand.
//
// Slot 0 always holds the base model. A request acquires a slot for each distinct adapter
// of its rows; a slot in use by a running request is never overwritten, so adapters can be
// loaded, swapped and evicted while other requests are being served. When every slot is
// taken, the least recently used slot that is neither pinned nor in use is reused.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "peft_export/adapter.hpp"
#include "peft_export/manifest.hpp"

namespace peft_export {

// One LoRA-family bank input of the graph: [slots, ...] in the graph's dtype.
struct BankSpec {
  std::string name;  // graph input, e.g. "lora.model.layers.0.self_attn.q_proj.A"
  std::string part;  // "A", "B", "out_scale", "in_scale" or "bias_scale"
  DType dtype = DType::kFloat32;
  std::vector<std::int64_t> shape;  // shape[0] == slots
};

// Host memory of every bank input. Backends bind these buffers once (ORT on CPU reads them
// in place) or mirror each slot when notified (device backends).
class AdapterBanks {
 public:
  using SlotListener = std::function<void(int slot)>;

  explicit AdapterBanks(const Manifest& manifest);

  int slots() const { return slots_; }
  const std::vector<BankSpec>& specs() const { return specs_; }
  void* data(std::size_t bank) { return data_[bank].data(); }
  const void* data(std::size_t bank) const { return data_[bank].data(); }
  std::size_t nbytes(std::size_t bank) const { return data_[bank].size(); }
  std::size_t slot_bytes(std::size_t bank) const;

  // Fills one slot with an adapter's tensors (nullptr: the base model's zeros and ones).
  void write_slot(int slot, const HostAdapter* adapter);
  void set_listener(SlotListener listener) { listener_ = std::move(listener); }

 private:
  void reset_slot(std::size_t bank, int slot);

  int slots_ = 0;
  std::vector<BankSpec> specs_;
  std::vector<std::vector<std::byte>> data_;
  SlotListener listener_;
};

struct AdapterStoreStats {
  std::size_t loads = 0;      // files read into host memory
  std::size_t placements = 0;  // slot writes
  std::size_t evictions = 0;   // resident adapters displaced from a slot
};

class AdapterStore {
 public:
  // Slots held by one request; releasing (destruction) lets them be reused.
  class Lease {
   public:
    Lease() = default;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&& other) noexcept;
    ~Lease();

    // Slot of each row, in request order (0 for rows without a LoRA-family adapter).
    const std::vector<std::int64_t>& slots() const { return slots_; }
    // The host adapter of each row (nullptr for rows without an adapter).
    const std::vector<std::shared_ptr<const HostAdapter>>& adapters() const { return adapters_; }

   private:
    friend class AdapterStore;
    void release();
    AdapterStore* store_ = nullptr;
    std::vector<std::int64_t> slots_;
    std::vector<std::shared_ptr<const HostAdapter>> adapters_;
    std::vector<int> held_;  // one entry per distinct slot taken
  };

  // `banks` may be null for bundles without LoRA-family banks (merged mode, prompt methods).
  AdapterStore(const Manifest& manifest, std::filesystem::path bundle_dir, AdapterBanks* banks);

  // Adapters this store can serve: the bundle's installed ones plus those added at run time.
  std::vector<std::string> available() const;
  // Registers an adapter file that is not in the manifest (validated when loaded).
  void add(const std::string& name, const std::filesystem::path& file);
  // Reads an adapter into host memory now (otherwise the first request does).
  void load(const std::string& name);
  // Drops an adapter from host memory and from its slot; refused while a request uses it.
  void unload(const std::string& name);
  // A pinned adapter is placed into a slot now and never evicted until unpinned.
  void pin(const std::string& name);
  void unpin(const std::string& name);

  std::vector<std::string> loaded() const;    // in host memory
  std::vector<std::string> resident() const;  // in a bank slot
  std::optional<int> slot_of(const std::string& name) const;
  AdapterStoreStats stats() const;

  // Slots for one request: `row_adapters[i]` names row i's adapter ("" for the base model).
  Lease acquire(const std::vector<std::string>& row_adapters);

 private:
  struct Slot {
    std::string name;  // "" when empty
    int users = 0;
    bool pinned = false;
    std::uint64_t last_used = 0;
  };

  std::shared_ptr<const HostAdapter> load_locked(const std::string& name);
  int place_locked(const std::string& name, const std::shared_ptr<const HostAdapter>& adapter,
                   const std::vector<std::string>& keep);
  void release(const std::vector<int>& slots);
  int find_slot_locked(const std::string& name) const;

  const Manifest& manifest_;
  std::filesystem::path bundle_dir_;
  AdapterBanks* banks_;
  mutable std::mutex mutex_;
  std::map<std::string, std::filesystem::path> files_;  // bundle-relative, or absolute if added
  std::map<std::string, std::shared_ptr<const HostAdapter>> host_;
  std::vector<Slot> slots_;
  std::uint64_t clock_ = 0;
  AdapterStoreStats stats_;
};

}  // namespace peft_export
