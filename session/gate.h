// The pre-authentication gate (docs/design.md "Pre-authentication gate"):
// one event-driven process per shim that owns every unauthenticated TCP
// connection, so that an unauthenticated peer costs no process, no zygote
// and no namespace handle, only a few bytes to kilobytes of this process.
//
// It is shimlet-session started as `--gate IDLE_S` with the shim's TCP
// listening socket on fd 3 and the control socket on fd 4 (shim/gate_proto.h),
// fds 5.. as for a session. Per connection, in order:
//   accept (limits: session/preauth.h, the idlest connection dropped first) ->
//   the first byte: an SSL object (buffers released while idle) ->
//   TLS 1.3 handshake (none on the CRI listener) -> ALPN h2: the client preface and the first request's
//   HEADERS (proto/h2_first.h); http/1.1 or none: the request head
//   (proto/http1.h) and the Kubernetes door's checks (admit_k8s) ->
//   the ticket verified (signature, aud, verb, lifetime, node, cnf.jkt) ->
//   the shim asked to consume the jti and reserve a session ('S') ->
//   fork: the parent returns from run() and serves the connection as its
//   session (with the zygote the gate placed, which must stay its child:
//   the zygote forks the command with CLONE_PARENT), the child goes on as
//   the gate ('G'), drops its copy of the connection without writing to it
//   and places a new zygote at once.
// Everything must happen within preauth_timeout_ms of the accept. Refusals
// are answered here with the door's usual response and audit line (rate
// limited: a flood gets counted, not logged line by line), then closed.
#pragma once
#include <openssl/ssl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "common/fd.h"
#include "session/session_context.h"
#include "session/session_k8s.h"
#include "ticket/ticket.h"

namespace shimlet::session {

struct GateOptions {
  int idle_s = 60;   // exit after this long without a connection
  bool warm = true;  // keep a zygote placed for the next exec (warm_idle_s > 0)
  // The shim's CRI listener (docs/design.md "CRI proxy"), -1: none. Its
  // connections are plain HTTP/1.1 (no TLS step): the request head, then
  // admit_k8s for the CRI shapes only with node-key tickets; the same table,
  // limits, deadline and counters as the TLS port's (cri_accepted besides).
  int cri_fd = -1;
};

// A connection the gate admitted: the process that gets it from run() is
// now its session. Owns conn and ssl.
struct Admitted {
  Fd conn;
  SSL* ssl = nullptr;  // TLS established; null from the CRI listener (plain HTTP/1.1)
  bool h2 = true;      // ALPN h2: the native door; else the Kubernetes HTTP/1.1 door
  // h2: every plaintext byte read (replayed into the session's HTTP/2
  // connection); HTTP/1.1: the bytes that came after the request head.
  std::string early;
  std::string sent;                 // h2: what the gate wrote (the server preface)
  std::string token;                // h2: the first request's ticket
  ticket::Claims claims;            // the accepted ticket (jti consumed)
  std::optional<K8sAdmission> k8s;  // HTTP/1.1: the checked request
  int64_t accepted_unix = 0;
  Admitted() = default;
  Admitted(Admitted&& o) noexcept;
  Admitted& operator=(Admitted&&) = delete;
  ~Admitted();
};

class Gate {
 public:
  // cfg: shim.json (with the preauth_* limits); tls: the server context.
  Gate(const Config& cfg, const nsenter::Container& ctr, SSL_CTX* tls, GateOptions opt);
  ~Gate();
  Gate(const Gate&) = delete;
  Gate& operator=(const Gate&) = delete;
  // Serves until a connection is admitted (returned: this process is its
  // session, every other connection's fd and the gate's own fds are closed)
  // or the gate is done (nullopt: idle, SIGTERM, the shim or the container
  // gone). Throws only on setup errors.
  std::optional<Admitted> run();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace shimlet::session
