// Pieces shared by shimctl's verbs (exec, port-forward): endpoint parsing
// and the non-blocking connect to a shim (libevent RAII: common/event.h;
// server-provided text on our terminal: common/text.h). Internal to client/.
#pragma once
#include <event2/buffer.h>
#include <event2/event.h>

#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "common/event.h"
#include "common/fd.h"
#include "common/text.h"

namespace shimlet::client {

// "host:port" or "[v6]:port" (registration "endpoint") -> {host, port}; throws Error.
std::pair<std::string, std::string> split_endpoint(const std::string& ep);
struct Grant;
// A byte pump between a socketpair end (what the HTTP/2 code sees as its
// socket) and the TLS tunnel through the master (client/net.cc).
class TunnelBridge;
struct TunnelBridgeFree {
  void operator()(TunnelBridge* b) const;
};
using TunnelBridgePtr = std::unique_ptr<TunnelBridge, TunnelBridgeFree>;

// The connection to the shim, already connected: a TCP socket to
// grant.endpoint, or (master mode) one end of a socketpair whose other end
// the bridge splices into the master's tunnel. Direct first (bounded by
// kDirectConnectTimeoutMs) unless grant.proxy is Always; the tunnel when the
// direct connect fails. Keep the bridge alive as long as the fd. Throws Error
// naming what failed (both attempts when both did).
struct ShimLink {
  Fd fd;
  TunnelBridgePtr bridge;
  bool tunneled = false;
};
ShimLink connect_shim(event_base* base, const Grant& grant);

// A connected unix stream socket to path (the shim's local socket),
// non-blocking, within timeout_ms. Throws Error naming the path.
Fd connect_local(const std::string& path, int timeout_ms);

// Resolves the endpoint and starts a non-blocking TCP connect (TCP_NODELAY);
// wait for EV_WRITE and check SO_ERROR. Throws Error with the endpoint named.
Fd start_connect(const std::string& endpoint);

}  // namespace shimlet::client
