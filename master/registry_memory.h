// The in-memory registry: the embedded default for one master (no
// --etcd-servers). A lease per container, kept by this process's monotonic
// clock; nothing is persisted, so after a restart every shim re-registers
// within one renew interval (docs/master-api.md "Node API"). Writes answer at
// once; it is never unavailable.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "master/registry.h"

namespace shimlet::master {

class MemoryRegistry final : public Registry {
 public:
  explicit MemoryRegistry(int64_t lease_ms, size_t max_entries = 100000) : lease_ms_(lease_ms), max_(max_entries) {}

  // The registry's logic at an explicit time (the interface calls them with
  // monotonic_ms(); tests with their own clock).
  PutResult put_at(const std::string& node, const std::string& id, Registration r, int64_t now_ms,
                   const std::string& peer_ip = "");
  PutResult remove_at(const std::string& node, const std::string& id, int64_t now_ms);

  int64_t lease_ms() const override { return lease_ms_; }
  void put(const std::string& node, const std::string& id, Registration r, const std::string& peer_ip,
           Done done) override {
    done(put_at(node, id, std::move(r), monotonic_ms(), peer_ip));
  }
  void remove(const std::string& node, const std::string& id, Done done) override {
    done(remove_at(node, id, monotonic_ms()));
  }
  // Drops entries whose lease lapsed at now_ms and returns them.
  std::vector<Registration> expire(int64_t now_ms) override;
  std::optional<std::string> unavailable(int64_t) const override { return std::nullopt; }
  const Entries& entries() const override { return entries_; }

 private:
  int64_t lease_ms_;
  size_t max_;
  Entries entries_;
};

}  // namespace shimlet::master
