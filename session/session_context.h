// What every front door of a session (native HTTP/2, Kubernetes HTTP/1.1) and
// every request handler (exec, port-forward, SPDY) share: the loop, the
// config, the container, and ticket verification + single-use consumption.
// Internal to shimlet-session (not a public header).
#pragma once
#include <event2/event.h>
#include <openssl/ssl.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/fd.h"
#include "nsenter/nsenter.h"
#include "session/session_isolation.h"
#include "ticket/ticket.h"

namespace shimlet::session {

// shim.json "recording" (docs/recording.md "On the node"), read by
// parse_recording_settings (session_recording.h).
struct RecordingSettings {
  std::string dir, root;                  // the container's spool, the node's recording root ("" = cannot record)
  std::string local = "none";             // tickets signed with local.key: "none" | "tty" | "all"
  bool fail_closed = true;                // their disk-full policy
  uint64_t max_bytes = 256ull << 20;      // per recording, when the ticket names none
  uint64_t spool_max_bytes = 1ull << 30;  // the node's whole outbox
};

struct Config {
  std::string id;    // container id (tickets' aud)
  std::string node;  // this node's name (hook master.node); empty: no master, not checked
  pid_t pid = 0;     // container init (host pid)
  std::string bundle;
  // Kubernetes names of this container (the registration's; hook names_from).
  // Empty (a shim.json written before they existed): requests are not checked.
  std::string ns, pod, container;
  std::vector<ticket::TrustedKey> keys;
  int64_t max_ticket_lifetime_s = 300;
  int64_t clock_leeway_s = 5;
  int drain_timeout_ms = 2000;
  std::string tls_cert, tls_key;
  // Outbox for the session's end record (shim.json "ends_dir", set by the hook
  // only when a master is configured); empty: no record is written.
  std::string ends_dir;
  Isolation isolation;  // per-session cgroup, SELinux label, Landlock (session/session_isolation.h)
  // The pre-authentication gate's bounds (docs/design.md "Pre-authentication gate").
  int preauth_timeout_ms = 5000;
  size_t preauth_max_connections = 4096;
  size_t preauth_max_per_source = 2048;
  size_t preauth_max_memory = 32u << 20;
  RecordingSettings recording;
};
Config load_config(const std::string& path);

// Outcome of a ticket check: claims, or an HTTP status and one clear line.
struct AuthResult {
  std::optional<ticket::Claims> claims;
  int status = 0;
  std::string why;
};
// Signature, aud, verb, lifetime, node and cnf.jkt (against peer_jkt, the
// TLS client certificate's key; "" without one). Does not consume the jti.
// Shared by the gate (before any session exists) and the sessions.
AuthResult verify_ticket(const Config& cfg, const std::string& token, const std::string& verb,
                         const std::string& peer_jkt);
// "ip:port", or "unix:pid=P,uid=U" for the local socket: the audit `peer`.
std::string peer_of(int fd);

class Context {
 public:
  // shim_fd: the session's replay cache round trips to the shim, -1: none
  // (a gate-admitted session: the gate consumed its ticket); report_fd: where
  // its end report goes (shim/session_proto.h), -1: none. Both are fd 4, the
  // session's control socket, on the local socket.
  Context(event_base* base, Config cfg, nsenter::Container ctr, int conn_fd, int shim_fd, int report_fd);
  // Writes the session's end record (docs/design.md "Session end records")
  // when a ticket was accepted and cfg.ends_dir is set, then sends the shim
  // its end report (result and bytes: shim/session_proto.h). Every front
  // door's handlers are destroyed before this base, so their byte counts are in.
  virtual ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  event_base* base() const { return base_; }
  const Config& config() const { return cfg_; }
  const nsenter::Container& container() const { return ctr_; }
  const std::string& sid() const { return sid_; }
  const std::string& peer() const { return peer_; }
  // Our own network namespace (to return to after creating a socket inside the container's).
  int own_netns() const { return own_netns_.get(); }
  // Records the TLS client certificate's key (cnf.jkt checks) after the handshake.
  void set_peer_cert(SSL* ssl);
  const std::string& peer_jkt() const { return peer_jkt_; }

  // Signature, aud, verb, lifetime and cnf.jkt against the client
  // certificate. Does not consume the jti.
  AuthResult verify_ticket(const std::string& token, const std::string& verb) const;
  // Asks the shim's replay cache to consume the ticket's jti (fail closed):
  // nullopt once consumed, else the refusal (403 replayed; 503 cache full or
  // the shim unreachable).
  std::optional<AuthResult> consume_jti(const ticket::Claims& c);
  // verify_ticket + consume_jti + audit context (user, jti): a ticket's one use.
  AuthResult authenticate_once(const std::string& token, const std::string& verb);
  // The ticket's jti was consumed before this session existed (the gate's
  // admission): what consume_jti and authenticate_once do after the shim's
  // 'A' (end record, audit context, the warm placement given back for a
  // non-exec verb). accepted_unix: when the connection was accepted.
  void adopt(const ticket::Claims& c, int64_t accepted_unix);

  // For the end record: application bytes client->container (stdin,
  // forwarded) and container->client (stdout+stderr, forwarded).
  void add_bytes(uint64_t in, uint64_t out) {
    end_bytes_in_ += in;
    end_bytes_out_ += out;
  }
  // The command wrote to the client's own stdio (local socket, passed fds):
  // the byte counts cover only what the session copied, so the record says so.
  void note_stdio_client() { end_stdio_client_ = true; }
  // The exec's status (exit_code is 128+signal when signal != 0).
  void note_exit(int exit_code, int signal, const std::string& error) {
    end_exit_ = exit_code;
    end_signal_ = signal;
    if (!error.empty()) end_error_ = error;
  }
  // Why the session ended abnormally (client gone, killed).
  void note_error(const std::string& error) {
    if (end_error_.empty()) end_error_ = error;
  }
  // The exec's recording for the end record ("recording": id, bytes, complete, ...).
  void note_recording(nlohmann::json r) { end_recording_ = std::move(r); }

 protected:
  event_base* base_;
  Config cfg_;
  nsenter::Container ctr_;
  int shim_fd_;
  int report_fd_;
  std::string sid_, peer_, peer_jkt_;
  Fd own_netns_;

 private:
  nlohmann::json end_record() const;
  void accepted(const ticket::Claims& c);  // a ticket's first use on this connection
  void write_open_record();
  void write_end_record();
  void report_end() const;
  std::optional<ticket::Claims> end_claims_;  // the accepted ticket (first one of the connection)
  Fd open_record_;  // flock()ed provisional record (spool::write_open) until the end record is written
  int64_t start_unix_ = 0;
  uint64_t end_bytes_in_ = 0, end_bytes_out_ = 0;
  bool end_stdio_client_ = false;
  std::optional<int> end_exit_;
  int end_signal_ = 0;
  std::string end_error_;
  nlohmann::json end_recording_;
};

// What main() drives once TLS is up: the native HTTP/2 Session (ALPN h2) or
// the Kubernetes HTTP/1.1 front door (session_k8s.h).
struct FrontDoor {
  virtual ~FrontDoor() = default;
  // SIGTERM from the shim: kill everything, end the loop.
  virtual void terminate(const std::string& why) = 0;
  // The container's init exited.
  virtual void container_exited() = 0;
  virtual int exit_code() const = 0;
};

}  // namespace shimlet::session
