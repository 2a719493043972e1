// The Kubernetes front door of shimlet-session (docs/design.md "Kubernetes
// streaming"): a TLS connection that negotiated ALPN http/1.1 or none carries
// exactly one HTTP/1.1 request, an upgrade to WebSocket (exec over
// v5/v4.channel.k8s.io here; the port-forward SPDY tunnel via
// session_spdy.h) or to SPDY/3.1 (session_spdy.h).
#pragma once
#include <event2/event.h>
#include <openssl/ssl.h>

#include <memory>

#include "shim/session_context.h"

namespace shimlet::session {

// Takes ownership of conn_fd and ssl (TLS handshake already done).
std::unique_ptr<FrontDoor> make_http1_front_door(event_base* base, Config cfg, nsenter::Container ctr, int conn_fd,
                                                 int shim_fd, SSL* ssl);

}  // namespace shimlet::session
