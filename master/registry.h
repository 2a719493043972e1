// The master's registry of running containers: shims (through the hook)
// register each container and renew a lease by re-registering; entries whose
// lease lapses disappear.
//
// Two implementations behind one interface (docs/design.md "Registry"):
//  * MemoryRegistry (master/registry_memory.h): this process's memory, a
//    lease per container; the one-machine default. Nothing is persisted:
//    after a restart every shim re-registers within one renew interval.
//  * EtcdRegistry (master/registry_etcd.h): etcd, one lease per node, any
//    number of masters; each master reads a watch-fed copy.
//
// Every call is made on the master's event loop thread. Writes (put, remove)
// answer through a callback, at once (memory) or later on the loop (etcd).
// Reads go to entries(), the live registrations as this master knows them,
// after unavailable() said they can be trusted; they never wait.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/clock.h"

namespace shimlet::master {

// design.md registration.json + the node that registered it + lease.
struct Registration {
  std::string id, bundle, runtime_root, namespace_, pod, container, endpoint, pin, created, node;
  int64_t pid = 0, shim_pid = 0;
  std::map<std::string, std::string> annotations;
  int64_t expires_ms = 0;  // lease expiry (monotonic ms); etcd: INT64_MAX (the node's etcd lease governs)
  // Order of first registration, only compared ("the most recent wins"):
  // monotonic ms (memory) or the etcd key's create revision (etcd).
  int64_t registered = 0;
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
  int code = 200;     // 200 renewed/removed, 201 created; 400/403/404/429/503 refused
  std::string error;  // when refused
  int64_t expires_ms = 0;
};

// The checks every registry makes on a PUT before it stores anything: the
// URL's id is the body's, a node registers only containers that say they are
// on it. Fills r.node, and replaces an unspecified endpoint host (0.0.0.0,
// [::]) by peer_ip. nullopt = go on; else the refusal.
std::optional<PutResult> prepare_put(const std::string& node, const std::string& id, Registration& r,
                                     const std::string& peer_ip);

// The live registrations one master knows, and the reads over them in
// Kubernetes' shapes. A plain data structure: the memory registry keeps it as
// the truth, the etcd registry as its watch-fed copy.
class Entries {
 public:
  void upsert(Registration r);
  bool erase(const std::string& id);
  void clear() { by_id_.clear(); }
  const Registration* get(const std::string& id) const;
  size_t size() const { return by_id_.size(); }
  const std::map<std::string, Registration>& all() const { return by_id_; }

  // The node that registered `id` (lease lapsed or not, until it is
  // dropped), or nullopt when it is not registered.
  std::optional<std::string> owner(const std::string& id) const;
  // Entries whose lease has not lapsed at now_ms, optionally only one
  // namespace ("" = all), sorted by namespace, pod, registration order.
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

  std::map<std::string, Registration> by_id_;
};

class Registry {
 public:
  using Done = std::function<void(PutResult)>;
  virtual ~Registry() = default;

  virtual int64_t lease_ms() const = 0;
  // Register or renew: `node` is the authenticated node (from the
  // credential), `id` the container id from the URL path. A node may only
  // register containers that say they are on it, and may not take over
  // another node's live entry. `done` is called exactly once, on the loop:
  // 201 created, 200 renewed, or a refusal.
  virtual void put(const std::string& node, const std::string& id, Registration r, const std::string& peer_ip,
                   Done done) = 0;
  // Unregister: 200 removed, 404 unknown, 403 another node's.
  virtual void remove(const std::string& node, const std::string& id, Done done) = 0;
  // Entries whose lease lapsed since the last call (for the audit log).
  virtual std::vector<Registration> expire(int64_t now_ms) = 0;
  // nullopt when entries() can be trusted at now_ms; else one line saying
  // why not (grants, pod lists and ownership checks then answer 503 with it).
  virtual std::optional<std::string> unavailable(int64_t now_ms) const = 0;
  virtual const Entries& entries() const = 0;
};

}  // namespace shimlet::master
