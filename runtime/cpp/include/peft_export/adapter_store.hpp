// The adapter store: adapters in host memory, placed into the graph's bank slots on demand.
//
// Same behaviour as the Python runtime's AdapterStore (runtime/adapter_store.py): slot 0 is
// the base model and never written; a request pins (refcounts) the slot of each distinct
// adapter of its rows for its whole life, so a slot in use is never overwritten while other
// requests load, swap and evict adapters; a missing adapter goes to the first empty unpinned
// slot in LRU order, else evicts the least recently used unpinned one; a request that finds
// every usable slot pinned waits for others to finish (up to a timeout).
//
// A slot holds an adapter identity, its name and the sha256 of its file's bytes, never a bare
// name: after 'peft-export adapters add --replace' the next request reads the new file, a
// request still running keeps the slot of the old copy, and that slot is freed once no one
// pins it; a request that read the old copy while the new one was read places it under the
// old identity, so no later request is ever handed the old weights.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <list>
#include <mutex>
#include <condition_variable>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft_export/adapter.hpp"
#include "peft_export/manifest.hpp"

namespace peft_export {

// One bank input of the graph: [slots, ...] in the graph's dtype. LoRA-family banks, and in
// encoder bundles the task heads (`head.classifier.weight`: each slot an adapter's trained head,
// slot 0 the base's own, zero-padded to the bundle's largest label count).
struct BankSpec {
  std::string name;  // graph input, e.g. "lora.model.layers.0.self_attn.q_proj.A"
  std::string part;  // "A", "B", "out_scale", "in_scale", "bias_scale" or "head""
  DType dtype = DType::kFloat32;
  std::vector<std::int64_t> shape;  // shape[0] == slots
};

// Host memory of every bank input. Backends bind these buffers once (ORT on CPU reads them
// in place) or mirror each slot when notified (device backends).
class AdapterBanks {
 public:
  using SlotListener = std::function<void(int slot)>;

  // `slots` 0: the manifest's adapters.slots (at least 2: slot 0 is the base model). Encoder
  // bundles read their base heads from `bundle_dir`/adapters/_base_heads.safetensors (absent:
  // zeros, for a base without a trained head).
  explicit AdapterBanks(const Manifest& manifest, int slots = 0,
                        const std::filesystem::path& bundle_dir = {});

  int slots() const { return slots_; }
  const std::vector<BankSpec>& specs() const { return specs_; }
  void* data(std::size_t bank) { return base_ + offset_[bank]; }
  const void* data(std::size_t bank) const { return base_ + offset_[bank]; }
  std::size_t nbytes(std::size_t bank) const { return nbytes_[bank]; }
  std::size_t slot_bytes(std::size_t bank) const;

  // Fills one slot with an adapter's tensors (nullptr: the base model's zeros and ones).
  void write_slot(int slot, const HostAdapter* adapter);
  void set_listener(SlotListener listener) { listener_ = std::move(listener); }

 private:
  void allocate_block();
  void reset_slot(std::size_t bank, int slot);
  void read_base_heads(const std::filesystem::path& bundle_dir);

  struct Unmap {
    std::size_t length;
    void operator()(std::byte* mapping) const;
  };

  int slots_ = 0;
  std::vector<BankSpec> specs_;
  // Every bank is cut from one block on transparent huge pages (see adapter_store.cpp).
  std::unique_ptr<std::byte, Unmap> block_;
  std::byte* base_ = nullptr;
  std::vector<std::size_t> offset_;
  std::vector<std::size_t> nbytes_;
  std::map<std::size_t, std::vector<std::byte>> base_heads_;  // head bank -> slot 0's bytes
  SlotListener listener_;
};

class AdapterStore {
 public:
  static constexpr double kDefaultWaitSeconds = 60.0;

  // Slots pinned for one request; destruction releases them.
  class Lease {
   public:
    Lease() = default;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&& other) noexcept;
    ~Lease();

    // Slot of each row, in request order (0 for rows without a LoRA-family adapter).
    const std::vector<std::int64_t>& slots() const { return ids_; }
    // The host adapter of each row (nullptr for rows without an adapter).
    const std::vector<std::shared_ptr<const HostAdapter>>& adapters() const { return adapters_; }

   private:
    friend class AdapterStore;
    void release();
    AdapterStore* store_ = nullptr;
    std::vector<std::int64_t> ids_;
    std::vector<std::shared_ptr<const HostAdapter>> adapters_;
    std::vector<int> pinned_;  // one entry per distinct slot
  };

  // `banks` may be null for bundles without LoRA-family banks (merged mode, prompt methods).
  AdapterStore(const Manifest& manifest, std::filesystem::path bundle_dir, AdapterBanks* banks,
               double wait_seconds = kDefaultWaitSeconds);

  // Brings an adapter into host memory (validated); no slot is touched. manifest.json is read
  // again when it changed on disk (or names an unknown adapter), so adapters added to the
  // bundle while serving are found, and one replaced there is read again (its file checked
  // against the sha256 the manifest records). A copy read while a newer one replaced it is
  // returned to its caller only, never kept.
  std::shared_ptr<const HostAdapter> load(const std::string& name);
  // Forgets an adapter (host copy and slots); false while a request is using it.
  bool drop(const std::string& name);
  // Adapters in host memory, sorted (for multiplexing: which requests this replica serves).
  std::vector<std::string> held() const;
  // Adapters whose current copy is placed in a bank slot, with their slot.
  std::map<std::string, int> resident() const;
  // Slot writes so far (placements, including those that evicted another adapter).
  std::size_t swaps() const;
  int slots() const { return static_cast<int>(held_in_.size()); }

  // Pins a slot for every distinct LoRA-family adapter of the rows (placing it into the
  // least recently used unpinned slot if needed; "" rows and prompt-side adapters get slot
  // 0). Waits up to the store's timeout when other requests pin every slot it could use.
  Lease acquire(const std::vector<std::string>& row_adapters);

 private:
  using Identity = std::pair<std::string, std::string>;  // name, sha256 of its file's bytes

  std::shared_ptr<const HostAdapter> read(const Manifest& manifest, const std::string& name) const;
  bool can_place_locked(const std::vector<Identity>& wanted) const;
  int place_locked(const HostAdapter& adapter);
  bool current_locked(const Identity& key) const;
  void free_locked(const Identity& key);
  void free_stale_locked(const std::string& name);
  void release(const std::vector<int>& slots);
  bool manifest_changed_locked() const;
  void refresh_manifest_locked();

  Manifest manifest_;
  std::filesystem::path bundle_dir_;
  AdapterBanks* banks_;
  double wait_seconds_;
  mutable std::mutex mutex_;
  std::condition_variable released_;
  std::map<std::string, std::shared_ptr<const HostAdapter>> host_;
  std::filesystem::file_time_type manifest_stamp_;  // manifest.json's mtime when last read
  std::map<Identity, int> slot_of_;
  std::vector<Identity> held_in_;  // per slot, name "" when empty (slot 0: the base model)
  std::vector<int> pins_;             // per slot: requests using it
  std::list<int> lru_;                // slots 1.., least recently used first
  std::size_t swaps_ = 0;
};

}  // namespace peft_export
