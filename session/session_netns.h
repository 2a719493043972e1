// TCP connections into the container's network namespace, shared by the
// native port-forward (session_forward.cc) and the Kubernetes SPDY
// port-forward (session_spdy.cc). The socket is created inside the
// container's namespace (setns around socket() only: the session itself never
// moves) and used from here. Internal to shimlet-session.
#pragma once
#include <event2/event.h>
#include <sys/socket.h>

#include <cstdint>
#include <functional>
#include <string>

#include "common/event.h"
#include "common/fd.h"
#include "session/session_context.h"

namespace shimlet::session {

// A non-blocking, close-on-exec socket in the container's network namespace
// (ours when the container shares it). Throws with context on failure.
Fd socket_in_netns(const Context& ctx, int family, int type);

// 127.0.0.1:port (AF_INET) or [::1]:port (AF_INET6).
sockaddr_storage loopback_addr(int family, uint16_t port, socklen_t& len);

// Connects to 127.0.0.1:port, then [::1]:port (as kubelet does), inside the
// container's network namespace, without blocking the loop. done() is always
// called later from the loop (never from inside start()), exactly once,
// unless the connector is destroyed first: with the connected socket, or
// with an invalid Fd and one clear line. start() throws only when libevent
// cannot make an event (no memory).
class LoopbackConnector {
 public:
  using Done = std::function<void(Fd sock, const std::string& error)>;
  LoopbackConnector(Context& ctx, uint16_t port, Done done, int timeout_s = 10);
  ~LoopbackConnector();
  LoopbackConnector(const LoopbackConnector&) = delete;
  LoopbackConnector& operator=(const LoopbackConnector&) = delete;
  void start();

 private:
  static void on_event(evutil_socket_t fd, short what, void* arg);
  void attempt(int family);
  void failed(int err);
  void finish(Fd sock, const std::string& error);

  Context& ctx_;
  uint16_t port_;
  Done done_;
  int timeout_s_;
  int family_ = 0;
  Fd sock_;
  EventPtr ev_;
  std::string error_;  // a result decided synchronously, delivered from the loop
  bool finished_ = false;
};

}  // namespace shimlet::session
