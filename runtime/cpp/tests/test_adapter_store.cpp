// Adapter store semantics: load, LRU eviction, pins while serving, drop, waiting, threads.
#include <atomic>
#include <cstring>
#include <thread>

#include "fixtures.hpp"
#include "peft_export/adapter_store.hpp"
#include "peft_export/errors.hpp"

using peft_export::AdapterBanks;
using peft_export::AdapterStore;
using peft_export::InferenceError;

namespace {

struct Store {
  std::filesystem::path dir;
  peft_export::Manifest manifest;
  AdapterBanks banks;
  AdapterStore store;
  explicit Store(const std::string& name, int slots = 3, double wait = 0.2)
      : dir(fixtures::lora_bundle(name, slots)),
        manifest(peft_export::load_manifest(dir)),
        banks(manifest),
        store(manifest, dir, &banks, wait) {}

  float a_value(int slot) {
    float value = 0;
    std::memcpy(&value, static_cast<const std::byte*>(banks.data(0)) + banks.slot_bytes(0) * static_cast<std::size_t>(slot), 4);
    return value;
  }
};

}  // namespace

TEST(slot_zero_is_the_base_model) {
  Store s("base");
  CHECK(s.banks.slots() == 3);
  CHECK(s.banks.specs().size() == 3);
  for (int slot = 0; slot < 3; ++slot) CHECK(s.a_value(slot) == 0.0f);
  float scale = 0;
  std::memcpy(&scale, s.banks.data(2), 4);
  CHECK(scale == 1.0f);
  auto lease = s.store.acquire({"", ""});
  CHECK(lease.slots() == std::vector<std::int64_t>({0, 0}));
}

TEST(adapters_are_placed_and_lru_evicted) {
  Store s("lru");
  { auto lease = s.store.acquire({"a", "", "a"});
    CHECK(lease.slots() == std::vector<std::int64_t>({1, 0, 1}));
    CHECK(s.a_value(1) == 1.0f); }
  { auto lease = s.store.acquire({"b"}); CHECK(lease.slots()[0] == 2); }
  { auto lease = s.store.acquire({"a"}); CHECK(lease.slots()[0] == 1); }  // a is now most recent
  { auto lease = s.store.acquire({"c"}); CHECK(lease.slots()[0] == 2); }  // evicts b
  CHECK(s.a_value(2) == 3.0f);
  auto resident = s.store.resident();
  CHECK(resident.size() == 2 && resident["a"] == 1 && resident["c"] == 2);
  CHECK(s.store.swaps() == 3);
  CHECK(s.store.held() == std::vector<std::string>({"a", "b", "c"}));
}

TEST(pinned_slots_survive_swaps_while_serving) {
  Store s("pins");
  auto serving = s.store.acquire({"a"});
  for (const char* other : {"b", "c", "d", "e"}) {
    auto lease = s.store.acquire({other});
    CHECK(lease.slots()[0] == 2);
  }
  CHECK(s.a_value(1) == 1.0f);  // never overwritten while in use
  CHECK(!s.store.drop("a"));     // refused while a request uses it
  CHECK_THROWS(s.store.acquire({"b", "c", "d"}), InferenceError, "3 different adapters but the banks hold 2");
  CHECK_THROWS(s.store.acquire({"b"}).slots().size() + s.store.acquire({"c"}).slots().size(), InferenceError,
               "stayed in use");
}

TEST(waiting_request_proceeds_when_a_slot_is_released) {
  Store s("wait", 2, 5.0);
  auto holder = std::make_unique<AdapterStore::Lease>(s.store.acquire({"a"}));
  std::atomic<bool> done{false};
  std::thread waiter([&] {
    auto lease = s.store.acquire({"b"});
    CHECK(lease.slots()[0] == 1);
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(!done);
  holder.reset();
  waiter.join();
  CHECK(done);
}

TEST(drop_frees_the_slot_first_in_lru_order) {
  Store s("drop");
  { auto lease = s.store.acquire({"a", "b"}); }
  CHECK(s.store.drop("b"));
  CHECK(s.store.held() == std::vector<std::string>({"a"}));
  { auto lease = s.store.acquire({"c"}); CHECK(lease.slots()[0] == 2); }
  CHECK(s.store.resident().count("a") == 1);
  CHECK_THROWS(s.store.load("zzz"), InferenceError, "unknown adapter 'zzz'");
}

TEST(adapters_added_to_the_bundle_while_serving_are_found) {
  Store s("refresh");
  auto doc = fixtures::Json::parse(std::ifstream(s.dir / "manifest.json"));
  check::write_file(s.dir / "adapters/new.safetensors", fixtures::lora_file("new", 9.0f));
  doc["adapters"]["installed"]["new"] = {{"file", "adapters/new.safetensors"}, {"method", "lora"}};
  check::write_file(s.dir / "manifest.json", doc.dump());
  auto lease = s.store.acquire({"new"});
  CHECK(s.a_value(static_cast<int>(lease.slots()[0])) == 9.0f);
}

TEST(concurrent_requests_keep_their_slots) {
  Store s("threads", 4, 10.0);
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  const char* names[] = {"a", "b", "c", "d", "e"};
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        int which = (t + i) % 5;
        auto lease = s.store.acquire({names[which]});
        float expected = static_cast<float>(which + 1);
        if (s.a_value(static_cast<int>(lease.slots()[0])) != expected) ++wrong;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  CHECK(wrong == 0);
}

TEST(replaced_adapter_is_read_again_while_a_running_request_keeps_the_old) {
  Store s("replace");
  fixtures::record_hashes(s.dir);
  auto running = s.store.acquire({"a"});
  const int old_slot = static_cast<int>(running.slots()[0]);
  CHECK(s.a_value(old_slot) == 1.0f);
  fixtures::replace_adapter(s.dir, "a", 7.0f);
  int new_slot = -1;
  {
    auto lease = s.store.acquire({"a"});
    new_slot = static_cast<int>(lease.slots()[0]);
    CHECK(new_slot != old_slot);
    CHECK(s.a_value(new_slot) == 7.0f);
    CHECK(s.a_value(old_slot) == 1.0f);  // the running request's weights are untouched
    CHECK(lease.adapters()[0]->sha256 != running.adapters()[0]->sha256);
  }
  CHECK(s.store.resident() == (std::map<std::string, int>{{"a", new_slot}}));
  running = AdapterStore::Lease();  // the last request on the old copy ends: its slot is freed
  { auto lease = s.store.acquire({"a"}); CHECK(lease.slots()[0] == new_slot); }
  { auto lease = s.store.acquire({"b"}); CHECK(lease.slots()[0] == old_slot); }
  CHECK(s.store.resident() == (std::map<std::string, int>{{"a", new_slot}, {"b", old_slot}}));
}

TEST(adapter_file_changed_under_the_bundle_is_refused_before_a_slot_is_written) {
  Store s("changed");
  fixtures::record_hashes(s.dir);
  check::write_file(s.dir / "adapters/a.safetensors", fixtures::lora_file("a", 5.0f));
  CHECK_THROWS(s.store.acquire({"a"}), peft_export::BundleError,
               "the file changed under the bundle");
  for (int slot = 0; slot < 3; ++slot) CHECK(s.a_value(slot) == 0.0f);
  CHECK(s.store.resident().empty() && s.store.held().empty());
}

int main() { return check::run_all(); }
