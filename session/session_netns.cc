#include "session/session_netns.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "common/error.h"
#include "common/log.h"

namespace shimlet::session {
sockaddr_storage loopback_addr(int family, uint16_t port, socklen_t& len) {
  sockaddr_storage ss{};
  if (family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    len = sizeof(sockaddr_in);
  } else {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    a->sin6_addr = in6addr_loopback;
    len = sizeof(sockaddr_in6);
  }
  return ss;
}

Fd socket_in_netns(const Context& ctx, int family, int type) {
  // The forward's sockets carry the session's SELinux label (issue 5).
  selinux::ScopedSockCreate label(forward_socket_label(ctx.config().isolation, ctx.container()));
  int target = -1;
  for (auto& [kind, fd] : ctx.container().ns_fds)
    if (kind == "net") target = fd;
  if (target < 0) {  // the container shares our network namespace
    Fd fd(::socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd) throw sys_error("socket");
    return fd;
  }
  if (::setns(target, CLONE_NEWNET) < 0) throw sys_error("setns(container net)");
  Fd fd(::socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  int err = errno;
  if (::setns(ctx.own_netns(), CLONE_NEWNET) < 0) {
    // We cannot continue in the wrong namespace: every later socket would be misplaced.
    log::error("cannot return to the session's network namespace", {{"errno", strerror(errno)}});
    _exit(70);
  }
  if (!fd) throw sys_error("socket in the container's network namespace", err);
  return fd;
}

LoopbackConnector::LoopbackConnector(Context& ctx, uint16_t port, Done done, int timeout_s)
    : ctx_(ctx), port_(port), done_(std::move(done)), timeout_s_(timeout_s) {}

LoopbackConnector::~LoopbackConnector() = default;

void LoopbackConnector::start() { attempt(AF_INET); }

void LoopbackConnector::attempt(int family) {
  family_ = family;
  ev_.reset();
  try {
    sock_ = socket_in_netns(ctx_, family, SOCK_STREAM);
  } catch (const std::exception& e) {
    error_ = e.what();
    // Reported from the loop, as promised: a zero timeout.
    ev_ = new_timer(ctx_.base(), on_event, this);
    timeval tv{0, 0};
    evtimer_add(ev_.get(), &tv);
    return;
  }
  int one = 1;
  setsockopt(sock_.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // latency only: never a reason to fail
  socklen_t len;
  sockaddr_storage ss = loopback_addr(family, port_, len);
  int r = ::connect(sock_.get(), reinterpret_cast<sockaddr*>(&ss), len);
  if (r < 0 && errno != EINPROGRESS) {
    int err = errno;
    sock_.reset();
    if (family == AF_INET) return attempt(AF_INET6);
    error_ = "connect to [::1]:" + std::to_string(port_) + " in the container: " + strerror(err);
    ev_ = new_timer(ctx_.base(), on_event, this);
    timeval tv{0, 0};
    evtimer_add(ev_.get(), &tv);
    return;
  }
  // Connected at once or in progress: the socket becomes writable either way.
  ev_ = new_event(ctx_.base(), sock_.get(), EV_WRITE, on_event, this);
  timeval tv{timeout_s_, 0};
  event_add(ev_.get(), &tv);
}

void LoopbackConnector::on_event(evutil_socket_t, short what, void* arg) {
  auto* self = static_cast<LoopbackConnector*>(arg);
  if (!self->sock_) return self->finish(Fd(), self->error_);
  if (what & EV_TIMEOUT) return self->failed(ETIMEDOUT);
  int err = 0;
  socklen_t len = sizeof err;
  getsockopt(self->sock_.get(), SOL_SOCKET, SO_ERROR, &err, &len);
  if (err) return self->failed(err);
  self->finish(std::move(self->sock_), "");
}

void LoopbackConnector::failed(int err) {
  sock_.reset();
  if (family_ == AF_INET) {
    try {
      return attempt(AF_INET6);
    } catch (const std::exception& e) {  // called from the loop: nothing throws into libevent
      return finish(Fd(), e.what());
    }
  }
  finish(Fd(),
         "cannot connect to port " + std::to_string(port_) + " in the container (127.0.0.1 and ::1): " + strerror(err));
}

void LoopbackConnector::finish(Fd sock, const std::string& error) {
  if (finished_) return;
  finished_ = true;
  ev_.reset();
  // done_ may destroy this connector: move it out first, touch nothing after.
  Done d = std::move(done_);
  d(std::move(sock), error);
}

}  // namespace shimlet::session
