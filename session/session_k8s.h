// The Kubernetes front door of shimlet-session (docs/design.md "Kubernetes
// streaming"): a TLS connection that negotiated ALPN http/1.1 or none carries
// exactly one HTTP/1.1 request, an upgrade to WebSocket (exec over
// v5/v4.channel.k8s.io here; the port-forward SPDY tunnel via
// session_spdy.h) or to SPDY/3.1 (session_spdy.h).
#pragma once
#include <event2/event.h>
#include <openssl/ssl.h>

#include <memory>
#include <optional>
#include <string>

#include "proto/http1.h"
#include "session/session_context.h"
#include "session/session_exec.h"
#include "session/session_http1.h"

namespace shimlet::session {

// The front door's checks of one request head, in the order of
// docs/design.md "HTTP/1.1 front door details": route (404, 501 attach),
// protocol negotiation (400), ticket present (401), ticket verified (403),
// the Kubernetes names and query against the claims (404, 400, 403). All of
// it comes before the jti is consumed, so the pre-authentication gate runs
// it before any session exists (a refusal uses no ticket up).
struct K8sAdmission {
  int status = 0;  // refused: the HTTP status and one line
  std::string why;
  std::string method;
  std::string path;  // loggable (a CRI path's ticket replaced)
  http1::Verb verb = http1::Verb::Exec;
  http1::Negotiation negotiation;
  std::optional<ticket::Claims> claims;  // set when admitted
  ExecSpec spec;                         // exec: argv, stdin, tty, which output streams
};
// cri_listener: the request came to the shim's CRI listener (plain HTTP on
// loopback, docs/design.md "CRI proxy"): only the CRI shapes /exec/<ticket>
// and /portforward/<ticket> (404 otherwise); cfg then trusts the node key only.
K8sAdmission admit_k8s(const proto::http1::Request& r, const Config& cfg, const std::string& peer_jkt,
                       bool cri_listener = false);
// The HTTP/1.1 answer to a refused request: status line, a one-line text
// body, Connection: close.
std::string k8s_refusal(int status, const std::string& why);

// The door for an admitted request whose jti is consumed (the gate's): takes
// ownership of conn_fd and ssl (TLS handshake done, the request head read; a
// null ssl: the CRI listener's plain HTTP);
// early: bytes that came after the head (the upgraded protocol's);
// accepted_unix: when the connection was accepted; report_fd: the session's
// own control socket (its end report, shim/session_proto.h), -1: none.
std::unique_ptr<FrontDoor> make_http1_front_door(event_base* base, Config cfg, nsenter::Container ctr, int conn_fd,
                                                 SSL* ssl, K8sAdmission admission, std::string early,
                                                 int64_t accepted_unix, int report_fd);

}  // namespace shimlet::session
