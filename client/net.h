// Pieces shared by shimctl's verbs (exec, port-forward): libevent RAII,
// endpoint parsing, the non-blocking connect to a shim, and sanitizing
// server-provided text for the terminal. Internal to client/.
#pragma once
#include <event2/buffer.h>
#include <event2/event.h>

#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "common/fd.h"

namespace shimlet::client {

template <typename T, void (*F)(T*)>
struct Free {
  void operator()(T* p) const { F(p); }
};
using EventBase = std::unique_ptr<event_base, Free<event_base, event_base_free>>;
using Event = std::unique_ptr<event, Free<event, event_free>>;
using EvBuffer = std::unique_ptr<evbuffer, Free<evbuffer, evbuffer_free>>;

// Server-provided text on our terminal: one line, no control characters,
// at most max bytes, no trailing blanks.
std::string one_line(std::string_view s, size_t max);
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
