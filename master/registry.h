// The master's registry of running containers: shims (through the hook)
// register each container and renew a lease by re-registering; entries whose
// lease lapses disappear. Nothing is persisted: after a restart every shim
// re-registers within one renew interval, so the master is whole again within
// one lease period.
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace shimlet::master {

// design.md registration.json + the node that registered it + lease.
struct Registration {
  std::string id, bundle, runtime_root, namespace_, pod, container, endpoint, pin, created, node;
  int64_t pid = 0, shim_pid = 0;
  std::map<std::string, std::string> annotations;
  int64_t expires_ms = 0;     // lease expiry (monotonic ms)
  int64_t registered_ms = 0;  // first registration (monotonic ms)
};

// Parses and validates a registration body (≤ 64 KiB JSON). Throws
// shimlet::Error with one clear line.
Registration parse_registration(std::string_view json);

// "system:node:NAME" -> NAME; nullopt for any other user.
std::optional<std::string> node_of_user(std::string_view user);

// Valid names: container ids, nodes, namespaces, pods, containers.
bool valid_id(std::string_view s);    // [A-Za-z0-9][A-Za-z0-9_.-]{0,127}
bool valid_name(std::string_view s);  // 1..253 chars, no '/', no control chars, not "." or ".."

struct PutResult {
  int code = 200;     // 200 renewed, 201 created, 400/403/409 refused
  std::string error;  // when refused
  int64_t expires_ms = 0;
};

class Registry {
 public:
  explicit Registry(int64_t lease_ms, size_t max_entries = 100000) : lease_ms_(lease_ms), max_(max_entries) {}
  int64_t lease_ms() const { return lease_ms_; }

  // `node` is the authenticated node name (from the credential), `id` the
  // container id from the URL path. A node may only register containers that
  // say they are on it, and may not take over another node's live entry.
  // An unspecified endpoint host (0.0.0.0, [::]) is replaced by peer_ip.
  PutResult put(const std::string& node, const std::string& id, Registration r, int64_t now_ms,
                const std::string& peer_ip = "");
  // 200 removed, 404 unknown, 403 another node's.
  PutResult remove(const std::string& node, const std::string& id, int64_t now_ms);
  // The node that registered `id` (lease lapsed or not, until expire() drops
  // it), or nullopt when it is not registered.
  std::optional<std::string> owner(const std::string& id) const;
  // Drops entries whose lease lapsed; returns them (for the audit log).
  std::vector<Registration> expire(int64_t now_ms);
  size_t size() const;

  // Live entries, optionally only one namespace ("" = all).
  std::vector<Registration> list(const std::string& ns, int64_t now_ms) const;
  // The container to exec into: by name, else the pod's
  // kubectl.kubernetes.io/default-container annotation, else the first.
  struct Found {
    std::optional<Registration> registration;  // nullopt: status and error say why
    int status = 200;                          // 404 no such pod, 400 no such container in it (as kubelet)
    std::string error;                         // Kubernetes' wording
  };
  Found find(const std::string& ns, const std::string& pod, const std::string& container, int64_t now_ms) const;

  // Kubernetes shapes: PodList for a namespace ("" = all), Pod or nullopt.
  nlohmann::json pod_list_json(const std::string& ns, int64_t now_ms) const;
  std::optional<nlohmann::json> pod_json(const std::string& ns, const std::string& pod, int64_t now_ms) const;

 private:
  std::vector<Registration> pod_containers(const std::string& ns, const std::string& pod, int64_t now_ms) const;
  static nlohmann::json to_pod(const std::vector<Registration>& cs);

  int64_t lease_ms_;
  size_t max_;
  mutable std::mutex mu_;
  std::map<std::string, Registration> by_id_;
};

}  // namespace shimlet::master
