// The forwarder (client/forwarder.h): the connection to the shim, the
// listeners, and the owner of every stream.
#include "client/forwarder.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "client/terminal.h"
#include "proto/frames.h"

namespace shimlet::client {
namespace pf {

void say(int fd, const std::string& line) {
  std::string l = line + "\n";
  (void)!::write(fd, l.data(), l.size());
}

std::string error_message(const std::string& body, int status) {
  nlohmann::json j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_object())
    if (auto e = j.find("error"); e != j.end() && e->is_string() && !e->get<std::string>().empty())
      return one_line(e->get<std::string>(), 1024);
  return "the shim answered HTTP " + std::to_string(status);
}

std::string reset_reason(uint32_t code) {
  switch (code) {
    case NGHTTP2_CONNECT_ERROR:
      return "connection reset in the container";
    case NGHTTP2_CANCEL:
      return "stream cancelled by the shim (is the container stopping?)";
    case NGHTTP2_REFUSED_STREAM:
      return "the shim refused the stream (too many streams)";
    default:
      return std::string("stream reset by the shim: ") + nghttp2_http2_strerror(code);
  }
}

std::string addr_string(const sockaddr_storage& ss) {
  char host[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    port = ntohs(a->sin_port);
    return std::string(host) + ":" + std::to_string(port);
  }
  auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
  inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
  port = ntohs(a->sin6_port);
  return "[" + std::string(host) + "]:" + std::to_string(port);
}

bool StreamUser::took_error_body(proto::H2Conn& conn, const uint8_t* data, size_t len) {
  if (status_ == 200) return false;
  if (err_body_.size() < kMaxErrorBody)
    err_body_.append(reinterpret_cast<const char*>(data), std::min(len, kMaxErrorBody - err_body_.size()));
  conn.consume(stream, len);
  return true;
}

Forwarder::Forwarder(const Grant& g, const PortForwardOptions& pf, const proto::Identity& id)
    : grant_(g), pf_(pf), ctx_(g.local_socket.empty() ? proto::make_client_ctx(id) : nullptr) {
  base_ = new_event_base();
  // Every timer up front: quit() and pause_accept() run inside callbacks,
  // where nothing may throw (common/error.h).
  defer_ev_ = new_timer(
      base_.get(), [](evutil_socket_t, short, void* self) { static_cast<Forwarder*>(self)->deferred(); }, this);
  grace_ev_ = new_timer(
      base_.get(), [](evutil_socket_t, short, void* self) { static_cast<Forwarder*>(self)->stop_loop(); }, this);
  accept_retry_ev_ = new_timer(
      base_.get(), [](evutil_socket_t, short, void* self) { static_cast<Forwarder*>(self)->resume_accept(); }, this);
}

Forwarder::~Forwarder() {
  users_.clear();
  graveyard_.clear();
  listeners_.clear();
  conn_.reset();  // before the base
}

int Forwarder::run() {
  for (int sig : {SIGINT, SIGTERM}) {
    signals_.push_back(new_event(
        base_.get(), sig, EV_SIGNAL | EV_PERSIST,
        [](evutil_socket_t, short, void* self) { static_cast<Forwarder*>(self)->quit(0, ""); }, this));
    event_add(signals_.back().get(), nullptr);
  }
  start_connect();
  event_base_dispatch(base_.get());
  return exit_code_;
}

int32_t Forwarder::open_stream(StreamUser* u, const std::string& path) {
  if (!usable()) return -1;
  proto::Headers h = {{":method", "POST"},
                      {":scheme", "https"},
                      {":authority", grant_.endpoint},
                      {":path", path},
                      {"authorization", "Bearer " + grant_.ticket},
                      {"user-agent", "shimctl"}};
  int32_t id = conn_->request(h, /*has_body=*/true);
  if (id > 0) {
    u->stream = id;
    by_stream_[id] = u;
  }
  return id;
}

void Forwarder::retire(StreamUser* u) {
  auto it = users_.find(u);
  if (it == users_.end()) return;
  if (u->stream > 0) {
    auto bs = by_stream_.find(u->stream);
    if (bs != by_stream_.end() && bs->second == u) by_stream_.erase(bs);
  }
  paused_.erase(u);
  graveyard_.push_back(std::move(it->second));
  users_.erase(it);
  defer();
  if (accept_paused_ && tunnel_count() < kMaxTunnels) resume_accept();
}

void Forwarder::quit(int code, const std::string& msg) {
  if (quitting_) return;
  quitting_ = true;
  exit_code_ = code;
  if (!msg.empty()) say(2, msg);
  // Stop accepting; the listeners themselves live as long as their flows.
  for (auto& l : listeners_) event_del(l->ev.get());
  if (conn_ && !conn_->closed()) {
    shutdown_pending_ = true;  // GOAWAY from the deferred event, outside H2Conn callbacks
    timeval tv{0, kQuitGraceMs * 1000};
    event_add(grace_ev_.get(), &tv);
    defer();
  } else {
    stop_loop_deferred_ = true;
    defer();
  }
}

void Forwarder::start_connect() {
  ShimLink link = connect_shim(base_.get(), grant_);
  sock_ = std::move(link.fd);
  bridge_ = std::move(link.bridge);
  connect_ev_ = new_event(base_.get(), sock_.get(), EV_WRITE, &Forwarder::on_connect_cb, this);
  timeval tv{kConnectTimeoutS, 0};
  event_add(connect_ev_.get(), &tv);
}

void Forwarder::on_connect_cb(evutil_socket_t fd, short what, void* self) {
  auto* f = static_cast<Forwarder*>(self);
  if (what & EV_TIMEOUT) return f->quit(kOwnErrorExit, "error: timed out connecting to shim at " + f->grant_.address());
  int err = 0;
  socklen_t len = sizeof err;
  getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
  if (err)
    return f->quit(kOwnErrorExit, "error: cannot connect to shim at " + f->grant_.address() + ": " + strerror(err));
  SSL* ssl = nullptr;  // the local socket: HTTP/2 without TLS
  if (f->ctx_ && !(ssl = SSL_new(f->ctx_.get()))) return f->quit(kOwnErrorExit, "error: SSL_new: " + openssl_error());
  proto::H2Settings st;
  st.stream_window = kStreamWindow;
  st.connection_window = kConnectionWindow;
  st.handshake_timeout_s = kConnectTimeoutS;
  st.ping_interval_s = f->pf_.ping_interval_s;  // keeps idle forwards up (and notices a dead peer)
  st.total_high_water = kSessionHigh;
  f->conn_ =
      std::make_unique<proto::H2Conn>(f->base_.get(), f->sock_.release(), ssl, proto::H2Conn::Role::Client, f, st);
}

std::optional<std::string> Forwarder::on_connected(SSL* ssl) {
  if (auto e = ssl ? proto::pin_mismatch(ssl, grant_.pin) : std::nullopt) {
    pin_error_ = *e;
    return *e;
  }
  conn_ready_ = true;
  open_pending_ = true;  // the HTTP/2 session exists only once this returns
  defer();
  return std::nullopt;
}

void Forwarder::send_open() {
  proto::Headers h = {{":method", "POST"},
                      {":scheme", "https"},
                      {":authority", grant_.endpoint},
                      {":path", proto::kPortForwardOpenPath},
                      {"authorization", "Bearer " + grant_.ticket},
                      {"user-agent", "shimctl"}};
  open_id_ = conn_->request(h, /*has_body=*/false);
  if (open_id_ < 0) quit(kOwnErrorExit, "error: cannot submit the port-forward request to the shim");
}

void Forwarder::opened() {
  if (quitting_) return;
  if (open_status_ != 200) return quit(kOwnErrorExit, "error: " + error_message(open_body_, open_status_));
  try {
    if (pf_.stdio) return start_stdio();
    bind_all();
  } catch (const std::exception& e) {
    return quit(kOwnErrorExit, std::string("error: ") + e.what());
  }
}

void Forwarder::bind_all() {
  for (const PortSpec& p : pf_.ports) {
    uint16_t port = p.local;
    std::vector<std::string> errors;
    size_t bound = 0;
    for (const std::string& a : pf_.addresses) {
      std::vector<std::pair<std::string, bool>> ips;  // ip, required
      if (a == "localhost")
        ips = {{"127.0.0.1", false}, {"::1", false}};
      else
        ips = {{a, true}};
      for (auto& [ip, required] : ips) {
        std::string err;
        auto l = bind_one(ip, port, p, err);
        if (!l) {
          if (required) throw Error("unable to listen on " + ip + " port " + std::to_string(port) + ": " + err);
          errors.push_back(ip + ": " + err);
          continue;
        }
        if (port == 0) port = local_port(l->fd.get());
        say(1, "Forwarding from " + l->where + " -> " + std::to_string(p.remote) + (p.udp ? "/udp" : ""));
        listeners_.push_back(std::move(l));
        ++bound;
      }
    }
    if (bound == 0) {
      std::string all;
      for (auto& e : errors) all += (all.empty() ? "" : "; ") + e;
      throw Error("unable to listen on port " + std::to_string(p.local) + ": " + all);
    }
  }
}

uint16_t Forwarder::local_port(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  return ss.ss_family == AF_INET ? ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port)
                                 : ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
}

std::unique_ptr<Listener> Forwarder::bind_one(const std::string& ip, uint16_t port, const PortSpec& p,
                                              std::string& err) {
  sockaddr_storage ss{};
  socklen_t len;
  int family;
  if (inet_pton(AF_INET, ip.c_str(), &reinterpret_cast<sockaddr_in*>(&ss)->sin_addr) == 1) {
    family = AF_INET;
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    len = sizeof *a;
  } else {
    family = AF_INET6;
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    inet_pton(AF_INET6, ip.c_str(), &a->sin6_addr);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    len = sizeof *a;
  }
  auto l = std::make_unique<Listener>();
  l->remote = p.remote;
  l->udp = p.udp;
  l->fd.reset(socket(family, (p.udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!l->fd) {
    err = strerror(errno);
    return nullptr;
  }
  int one = 1;
  if (!p.udp) setsockopt(l->fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (family == AF_INET6) setsockopt(l->fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  if (bind(l->fd.get(), reinterpret_cast<sockaddr*>(&ss), len) < 0 || (!p.udp && listen(l->fd.get(), 512) < 0)) {
    err = strerror(errno);
    return nullptr;
  }
  len = sizeof ss;
  getsockname(l->fd.get(), reinterpret_cast<sockaddr*>(&ss), &len);
  l->where = addr_string(ss);
  l->ev = new_event(base_.get(), l->fd.get(), EV_READ | EV_PERSIST,
                    p.udp ? &Forwarder::on_udp_cb : &Forwarder::on_accept_cb, this);
  if (p.udp) udp_[l.get()];
  event_add(l->ev.get(), nullptr);
  return l;
}

void Forwarder::on_accept_cb(evutil_socket_t fd, short, void* self) {
  auto* f = static_cast<Forwarder*>(self);
  try {
    for (auto& l : f->listeners_)
      if (l->fd.get() == fd) return f->accept_on(*l);
  } catch (const std::exception& e) {  // libevent's callback: nothing may pass through it
    f->quit(kOwnErrorExit, std::string("error: ") + e.what());
  }
}

void Forwarder::pause_accept(bool retry_timer) {
  accept_paused_ = true;
  for (auto& l : listeners_)
    if (!l->udp) event_del(l->ev.get());
  if (retry_timer) {
    timeval tv{0, 100 * 1000};
    event_add(accept_retry_ev_.get(), &tv);
  }
}

void Forwarder::resume_accept() {
  if (!accept_paused_ || quitting_) return;
  accept_paused_ = false;
  for (auto& l : listeners_)
    if (!l->udp) event_add(l->ev.get(), nullptr);
}

void Forwarder::on_udp_cb(evutil_socket_t fd, short, void* self) {
  auto* f = static_cast<Forwarder*>(self);
  try {
    for (auto& l : f->listeners_)
      if (l->fd.get() == fd) return f->udp_readable(*l);
  } catch (const std::exception& e) {  // libevent's callback: nothing may pass through it
    f->quit(kOwnErrorExit, std::string("error: ") + e.what());
  }
}

void Forwarder::on_headers(int32_t stream, const proto::Headers& h, bool) {
  const std::string* st = proto::find_header(h, ":status");
  int code = st ? atoi(st->c_str()) : 0;
  if (code < 200) return;  // informational / trailers
  if (stream == open_id_) {
    open_status_ = code;
    return;
  }
  if (auto it = by_stream_.find(stream); it != by_stream_.end()) it->second->on_status(code);
}

void Forwarder::on_data(int32_t stream, const uint8_t* data, size_t len) {
  if (auto it = by_stream_.find(stream); it != by_stream_.end()) return it->second->on_data(data, len);
  if (stream == open_id_ && open_body_.size() < kMaxErrorBody)
    open_body_.append(reinterpret_cast<const char*>(data), std::min(len, kMaxErrorBody - open_body_.size()));
  conn_->consume(stream, len);  // nobody wants it: keep the connection window open
}

void Forwarder::on_remote_end(int32_t stream) {
  if (stream == open_id_) {
    opened_pending_ = true;
    return defer();
  }
  if (auto it = by_stream_.find(stream); it != by_stream_.end()) it->second->on_remote_end();
}

void Forwarder::on_stream_close(int32_t stream, uint32_t code) {
  if (stream == open_id_) {
    if (open_status_ == 0)
      quit(kOwnErrorExit, "error: the shim refused the port-forward session: " + reset_reason(code));
    return;
  }
  auto it = by_stream_.find(stream);
  if (it == by_stream_.end()) return;
  StreamUser* u = it->second;
  by_stream_.erase(it);
  u->on_close(code);
}

void Forwarder::on_drain(int32_t stream) {
  if (stream != 0)
    if (auto it = by_stream_.find(stream); it != by_stream_.end() && !over_budget()) it->second->resume();
  // Streams paused by the connection-wide limit go on once it has room.
  if (!over_budget() && !paused_.empty()) {
    std::vector<StreamUser*> all(paused_.begin(), paused_.end());
    for (StreamUser* u : all)
      if (users_.count(u)) u->resume();
  }
}

void Forwarder::on_closed(const std::string& why) {
  if (!conn_ready_) {
    if (!pin_error_.empty()) return quit(kOwnErrorExit, "error: " + pin_error_);
    return quit(kOwnErrorExit, "error: cannot connect to shim at " + grant_.address() + ": " + why);
  }
  abandon_pending_ = true;
  if (!quitting_) quit(kOwnErrorExit, "error: lost connection to the shim: " + why);
  stop_loop_deferred_ = true;
  defer();
}

void Forwarder::defer() {
  timeval zero{0, 0};
  event_add(defer_ev_.get(), &zero);
}

void Forwarder::deferred() {
  graveyard_.clear();
  if (open_pending_) {
    open_pending_ = false;
    if (!quitting_) send_open();
  }
  if (opened_pending_) {
    opened_pending_ = false;
    opened();
  }
  if (abandon_pending_) {
    abandon_pending_ = false;
    std::vector<StreamUser*> all;
    for (auto& [p, u] : users_) all.push_back(p);
    for (StreamUser* u : all) u->abandon();
    graveyard_.clear();
  }
  if (shutdown_pending_) {
    shutdown_pending_ = false;
    if (conn_ && !conn_->closed()) conn_->shutdown();
  }
  if (stop_loop_deferred_) stop_loop();
}

}  // namespace pf

namespace {

// With 1000 forwarded connections we hold > 1024 fds: lift the soft limit.
void raise_nofile() {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

}  // namespace

int run_port_forward(const Grant& grant, const PortForwardOptions& pf, const proto::Identity& client) {
  signal(SIGPIPE, SIG_IGN);  // EPIPE is handled where it happens
  raise_nofile();
  pf::Forwarder f(grant, pf, client);
  return f.run();
}

}  // namespace shimlet::client
