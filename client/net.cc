#include "client/net.h"

#include <errno.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>

#include "client/client.h"
#include "common/clock.h"
#include "common/error.h"
#include "masterclient/masterclient.h"

namespace shimlet::client {

std::pair<std::string, std::string> split_endpoint(const std::string& ep) {
  std::string host, port;
  if (!ep.empty() && ep[0] == '[') {
    auto close = ep.find(']');
    if (close == std::string::npos || close + 1 >= ep.size() || ep[close + 1] != ':')
      throw Error("bad shim endpoint '" + ep + "'");
    host = ep.substr(1, close - 1);
    port = ep.substr(close + 2);
  } else {
    auto colon = ep.rfind(':');
    if (colon == std::string::npos) throw Error("bad shim endpoint '" + ep + "' (want host:port)");
    host = ep.substr(0, colon);
    port = ep.substr(colon + 1);
  }
  if (host.empty() || port.empty()) throw Error("bad shim endpoint '" + ep + "'");
  return {host, port};
}

Fd start_connect(const std::string& endpoint) {
  auto [host, port] = split_endpoint(endpoint);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0)
    throw Error("cannot resolve shim endpoint " + endpoint + ": " + gai_strerror(rc));
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> guard(res, freeaddrinfo);
  Fd sock(socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!sock) throw sys_error("socket");
  int one = 1;
  setsockopt(sock.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // interactive keystrokes, small requests
  if (connect(sock.get(), res->ai_addr, res->ai_addrlen) < 0 && errno != EINPROGRESS)
    throw sys_error("cannot connect to shim at " + endpoint);
  return sock;
}

Fd connect_local(const std::string& path, int timeout_ms) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos || slash + 1 == path.size()) throw Error("bad local socket path: " + path);
  // sun_path holds 107 bytes; a state dir may be deeper: connect through the directory's fd.
  Fd dir(::open(slash ? path.substr(0, slash).c_str() : "/", O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!dir) throw sys_error("cannot connect to shim at " + path);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::string via = "/proc/self/fd/" + std::to_string(dir.get()) + "/" + path.substr(slash + 1);
  if (via.size() >= sizeof sa.sun_path) throw Error("cannot connect to shim at " + path + ": name too long");
  memcpy(sa.sun_path, via.c_str(), via.size() + 1);
  Fd sock(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!sock) throw sys_error("socket");
  // A unix connect only waits while the shim's backlog is full; bounded by SO_SNDTIMEO.
  timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  setsockopt(sock.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  int r;
  do r = connect(sock.get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  while (r < 0 && errno == EINTR);
  if (r < 0) throw sys_error("cannot connect to shim at " + path);
  timeval none{0, 0};
  setsockopt(sock.get(), SOL_SOCKET, SO_SNDTIMEO, &none, sizeof none);
  set_nonblocking(sock.get());
  return sock;
}

}  // namespace shimlet::client

// ---------------------------------------------------------------- shim link (direct or through the master)

namespace shimlet::client {
namespace {

constexpr size_t kBridgeHigh = 1u << 20;  // stop reading one side while the other has this much queued
constexpr int kTunnelTimeoutMs = 10000;   // connect + TLS + upgrade answer from the master

// A connected TCP socket to endpoint within timeout_ms, or Error with the reason.
Fd connect_direct(const std::string& endpoint, int timeout_ms) {
  Fd s = start_connect(endpoint);
  Deadline deadline(timeout_ms);
  for (;;) {
    int left = deadline.left_ms();
    if (left <= 0) throw Error("no answer within " + std::to_string(timeout_ms) + " ms");
    pollfd p{s.get(), POLLOUT, 0};
    int r = ::poll(&p, 1, left);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw sys_error("poll");
    if (r == 0) continue;
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(s.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) throw Error(strerror(err));
    return s;
  }
}

}  // namespace

// Splices a socketpair end and the master's TLS tunnel with bounded queues.
// Written by hand on bufferevents because it is a dozen lines: libevent has no
// ready-made splice between two bufferevents.
class TunnelBridge {
 public:
  TunnelBridge(event_base* base, masterclient::Upgraded up, Fd pair_end) {
    tls_.reset(
        bufferevent_openssl_socket_new(base, up.sock.get(), up.ssl.get(), BUFFEREVENT_SSL_OPEN, BEV_OPT_CLOSE_ON_FREE));
    if (!tls_) throw Error("bufferevent_openssl_socket_new failed");
    up.sock.release();  // owned by tls_ now (fd and SSL)
    up.ssl.release();
    bufferevent_openssl_set_allow_dirty_shutdown(tls_.get(), 1);
    local_.reset(bufferevent_socket_new(base, pair_end.get(), BEV_OPT_CLOSE_ON_FREE));
    if (!local_) throw Error("bufferevent_socket_new failed");
    pair_end.release();
    // The shim's first bytes may have arrived with the 101 answer.
    if (!up.leftover.empty() && bufferevent_write(local_.get(), up.leftover.data(), up.leftover.size()) < 0)
      throw Error("bufferevent_write failed");
    for (bufferevent* b : {tls_.get(), local_.get()}) {
      bufferevent_setcb(b, &TunnelBridge::on_read, &TunnelBridge::on_write, &TunnelBridge::on_event, this);
      bufferevent_setwatermark(b, EV_WRITE, kBridgeHigh / 2, 0);
      bufferevent_enable(b, EV_READ | EV_WRITE);
    }
  }
  ~TunnelBridge() { close(); }
  TunnelBridge(const TunnelBridge&) = delete;
  TunnelBridge& operator=(const TunnelBridge&) = delete;

 private:
  bufferevent* other(bufferevent* b) const { return b == tls_.get() ? local_.get() : tls_.get(); }
  bool& eof_of(bufferevent* b) { return b == tls_.get() ? tls_eof_ : local_eof_; }

  void close() {
    tls_.reset();
    local_.reset();
  }

  static void on_read(bufferevent* b, void* self) {
    auto* t = static_cast<TunnelBridge*>(self);
    bufferevent* o = t->other(b);
    if (!o) return;
    evbuffer_add_buffer(bufferevent_get_output(o), bufferevent_get_input(b));
    if (evbuffer_get_length(bufferevent_get_output(o)) >= kBridgeHigh) bufferevent_disable(b, EV_READ);
  }

  static void on_write(bufferevent* b, void* self) {
    auto* t = static_cast<TunnelBridge*>(self);
    bufferevent* o = t->other(b);
    if (!o) return;
    // Below the low watermark: the side feeding b may read again.
    if (!t->eof_of(o)) bufferevent_enable(o, EV_READ);
    t->maybe_finish(o);
  }

  static void on_event(bufferevent* b, short what, void* self) {
    auto* t = static_cast<TunnelBridge*>(self);
    if (!(what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))) return;
    t->eof_of(b) = true;
    bufferevent_disable(b, EV_READ);
    on_read(b, self);  // whatever arrived before the end
    t->maybe_finish(b);
  }

  // Source b ended: once its data is out on the other side, pass the end on.
  void maybe_finish(bufferevent* b) {
    if (!eof_of(b)) return;
    bufferevent* o = other(b);
    if (!o || evbuffer_get_length(bufferevent_get_output(o)) > 0) return;
    if (b == tls_.get()) {
      // The master (or the shim behind it) closed: half-close toward HTTP/2.
      ::shutdown(bufferevent_getfd(local_.get()), SHUT_WR);
    } else {
      // HTTP/2 side done: TLS has no half-close, end the tunnel.
      close();
    }
  }

  BufferEventPtr tls_, local_;
  bool tls_eof_ = false, local_eof_ = false;
};

void TunnelBridgeFree::operator()(TunnelBridge* b) const { std::default_delete<TunnelBridge>()(b); }

namespace {

ShimLink open_tunnel(event_base* base, const Grant& g) {
  masterclient::Upgraded up = master_targets(master_settings(*g.inv), kTunnelTimeoutMs, g.master)
                                  .upgrade("POST", g.tunnel_path, "shimlet-tunnel");
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) throw sys_error("socketpair");
  ShimLink link;
  link.fd = Fd(sv[0]);
  link.bridge.reset(new TunnelBridge(base, std::move(up), Fd(sv[1])));
  link.tunneled = true;
  return link;
}

}  // namespace

ShimLink connect_shim(event_base* base, const Grant& g) {
  ShimLink link;
  if (!g.local_socket.empty()) {
    link.fd = connect_local(g.local_socket, kDirectConnectTimeoutMs);
    return link;
  }
  if (g.tunnel_path.empty() || !g.inv) {
    link.fd = start_connect(g.endpoint);  // local mode: the caller waits for the connect
    return link;
  }
  std::string direct_error;
  if (g.proxy != ProxyMode::Always) {
    try {
      link.fd = connect_direct(g.endpoint, kDirectConnectTimeoutMs);
      return link;
    } catch (const Error& e) {
      direct_error = e.what();
    }
  }
  try {
    return open_tunnel(base, g);
  } catch (const Error& e) {
    if (direct_error.empty())
      throw Error(std::string("cannot open a tunnel to the shim through the master: ") + e.what());
    throw Error("cannot connect to shim at " + g.endpoint + " (" + direct_error +
                ") nor through the master's tunnel: " + e.what());
  }
}

}  // namespace shimlet::client
