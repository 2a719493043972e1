#include "master/registry_memory.h"

namespace shimlet::master {

PutResult MemoryRegistry::put_at(const std::string& node, const std::string& id, Registration r, int64_t now_ms,
                                 const std::string& peer_ip) {
  if (auto refused = prepare_put(node, id, r, peer_ip)) return *refused;
  const Registration* cur = entries_.get(id);
  if (cur && cur->expires_ms <= now_ms) {
    entries_.erase(id);
    cur = nullptr;
  }
  if (cur && cur->node != node) return {403, "container " + id + " is registered by node \"" + cur->node + "\"", 0};
  if (!cur && entries_.size() >= max_) return {429, "registry full", 0};
  r.expires_ms = now_ms + lease_ms_;
  r.registered = cur ? cur->registered : now_ms;
  const int code = cur ? 200 : 201;
  const int64_t exp = r.expires_ms;
  entries_.upsert(std::move(r));
  return {code, "", exp};
}

PutResult MemoryRegistry::remove_at(const std::string& node, const std::string& id, int64_t now_ms) {
  const Registration* cur = entries_.get(id);
  if (!cur || cur->expires_ms <= now_ms) return {404, "container " + id + " is not registered", 0};
  if (cur->node != node) return {403, "container " + id + " is registered by node \"" + cur->node + "\"", 0};
  entries_.erase(id);
  return {200, "", 0};
}

std::vector<Registration> MemoryRegistry::expire(int64_t now_ms) {
  std::vector<Registration> gone;
  for (const auto& [id, r] : entries_.all())
    if (r.expires_ms <= now_ms) gone.push_back(r);
  for (const auto& r : gone) entries_.erase(r.id);
  return gone;
}

}  // namespace shimlet::master
