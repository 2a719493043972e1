// shimlet-master's request handling: authentication, RBAC authorization,
// audit, the registry of shims and grants (tickets + redirect to the shim).
// Transport-independent (http.h feeds it); API in docs/master-api.md.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/clock.h"
#include "master/audit.h"
#include "master/authn.h"
#include "master/grant.h"
#include "master/http.h"
#include "master/metrics.h"
#include "master/rbac.h"
#include "master/recording_policy.h"
#include "master/recordings.h"
#include "master/registry.h"
#include "master/relay.h"
#include "proto/tls.h"
#include "ticket/ticket.h"

namespace shimlet::master {

struct Config {
  std::string bind_address = "0.0.0.0";
  uint16_t secure_port = 6443;
  std::string tls_cert_file, tls_private_key_file, client_ca_file, token_auth_file;
  std::vector<std::string> authorization_policy_files;  // files or directories of RBAC YAML
  std::string audit_log_path;                           // "" = no audit log, "-" = stdout
  std::string ticket_signing_key_file;                  // Ed25519 PEM
  std::string ticket_key_id = "master";
  std::string issuer = "shimlet-master";
  int64_t lease_duration_s = 60;
  int64_t ticket_lifetime_s = 60;
  std::string kube_version = "v1.32.4";  // /version gitVersion (kubectl's dispatcher picks its client by it)
  Limits limits;
  // Session recording (docs/recording.md): which execs the shims record, and
  // where the master keeps what the nodes upload ("" = none).
  std::string recording_policy_file, recording_dir;
  uint64_t recording_max_bytes = 1ull << 30;  // the largest recording the store accepts
};

// Wall seconds (the ticket clock; the lease clock is common/clock.h monotonic_ms).
int64_t wall_s();

class Master {
 public:
  // Loads tokens, client CA, policy, signing key, opens the audit log.
  // Throws shimlet::Error naming the file on any problem. `registry` null =
  // the in-memory one with cfg's lease (registry_memory.h).
  explicit Master(const Config& cfg, std::unique_ptr<Registry> registry = nullptr);
  // For tests: pieces supplied directly.
  Master(const Config& cfg, Authenticator authn, Policy policy, ticket::PrivateKey key, AuditLog audit,
         std::unique_ptr<Registry> registry = nullptr);

  // One request. Node registrations with an etcd registry answer later
  // (Response::deferred); everything else at once.
  Response handle(const Request& req);
  // Expires lapsed leases (audited); the server calls it periodically.
  void expire_leases();

  Registry& registry() { return *registry_; }
  const Config& config() const { return cfg_; }
  // Live kubectl exec/port-forward relays.
  size_t relays() const { return relays_.active(); }
  // The key the master's relay presents to shims (tickets it mints for kubectl are bound to it).
  const std::string& relay_jkt() const { return relay_jkt_; }

 private:
  // One request: who, and its audit event (filled while routing); its route
  // class and, for exec/port-forward, the verb (metrics).
  struct Ctx {
    Identity id;
    nlohmann::json ev = nlohmann::json::object();
    const char* handler = "other";
    std::string grant_verb;
    int64_t start_ns = 0;  // monotonic, when the request arrived (its latency, also for a deferred answer)
    bool audited = false;  // its request line is written (answer_later did it)
  };
  // Completes the request's audit event with the answer and writes it.
  void audit_request(Ctx& ctx, const Response& resp);
  // Runs `start`, which answers through its callback exactly once: at once
  // (in-memory registry) or later on the loop (etcd). Either way the audit
  // line is written with the answer; a later answer becomes a deferred response.
  using Answer = std::function<void(Ctx&, Response)>;
  Response answer_later(Ctx& ctx, std::function<void(Answer)> start);
  // Before a read of registry_->entries(): the 503 to answer (audited) when
  // they cannot be trusted now (an etcd registry whose copy is stale), else
  // nullopt.
  std::optional<Response> unreadable(Ctx& ctx);
  Response route(Ctx& ctx, const Request& req);
  Response pods(Ctx& ctx, const Request& req, const std::vector<std::string>& seg);
  Response stream(Ctx& ctx, const Request& req, const std::string& ns, const std::string& pod, const std::string& sub);
  Response grant(Ctx& ctx, const Request& req, const std::string& ns, const std::string& pod, const std::string& verb);
  // shimctl --proxy: raw tunnel to the pod's shim (master/tunnel.cc).
  Response tunnel(Ctx& ctx, const Request& req, const std::string& ns, const std::string& pod);
  // Answers an upgrade by handing the connection to a relay; `end` (the
  // session's audit fields) is completed with end time and bytes and written
  // as a session_end line when the relay closes. Shared by stream() and tunnel().
  Response relay_upgrade(RelayOptions opt, nlohmann::json end);
  Response node_put(Ctx& ctx, const Request& req, const std::string& node, const std::string& id);
  Response node_delete(Ctx& ctx, const Request& req, const std::string& node, const std::string& id);
  Response session_end(Ctx& ctx, const Request& req, const std::string& node, const std::string& sid);
  // Recorded sessions (master/sessions.cc).
  Response recording_upload(Ctx& ctx, const Request& req, const std::string& node, const std::string& id);
  Response sessions(Ctx& ctx, const Request& req, const std::string& ns, const std::vector<std::string>& rest);
  nlohmann::json recording_ref(const nlohmann::json& record) const;
  void apply_recording(Ctx& ctx, GrantRequest& gr, const std::string& ns) const;
  static std::string sessions_forbidden(const Attributes& a);
  // GET /metrics: RBAC `get` on the nonResourceURL /metrics.
  Response metrics(Ctx& ctx);
  // Counts a finished request (Metrics): route class, code, time, and the
  // grant or tunnel decision it made.
  void account(const Ctx& ctx, int code);
  Grant allow(Ctx& ctx, const GrantRequest& gr, const Registration& target);
  Response deny(Ctx& ctx, const std::string& reason);
  std::optional<Response> require_node(Ctx& ctx, const std::string& node);

  Config cfg_;
  Authenticator authn_;
  Policy policy_;
  ticket::PrivateKey key_;
  AuditLog audit_;
  std::unique_ptr<Registry> registry_;
  RecordingPolicy recording_policy_;
  RecordingStore recordings_;
  GrantConfig grant_cfg_;
  Metrics metrics_;
  proto::SslCtx relay_ctx_;  // TLS client context toward shims (fresh Ed25519 identity, ALPN http/1.1)
  std::string relay_jkt_;
  Relayer relays_;
};

}  // namespace shimlet::master
