// `shimctl port-forward`: local listeners (TCP and UDP) or our own
// stdin/stdout, each forwarded connection/flow one HTTP/2 stream over a single
// TLS connection to the shim (docs/design.md "Port-forward").
//
// Memory is bounded end to end: we only return flow-control window
// (consume()) for bytes written to the local socket, so a slow local reader
// stops the shim; and we stop reading a local socket while its stream's
// outbound queue, or the whole connection's, is above its limit.
//
// Objects are never destroyed from inside an H2Conn callback (which can run
// deep inside one of our own calls into H2Conn): finished tunnels and flows go
// to a graveyard emptied from a deferred event.
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

#include "client/client.h"
#include "client/net.h"
#include "client/terminal.h"
#include "common/fd.h"
#include "proto/frames.h"
#include "proto/h2.h"
#include "proto/tls.h"

namespace shimlet::client {

// ---------------------------------------------------------------- arguments

namespace {

// Strict decimal port: digits only, at most 5, value in [min, 65535].
std::optional<uint16_t> port_number(const std::string& s, unsigned min) {
  if (s.empty() || s.size() > 5 || s.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  unsigned long v = std::stoul(s);
  if (v < min || v > 65535) return std::nullopt;
  return static_cast<uint16_t>(v);
}

bool is_ip_literal(const std::string& a) {
  in6_addr buf;
  return inet_pton(AF_INET, a.c_str(), &buf) == 1 || inet_pton(AF_INET6, a.c_str(), &buf) == 1;
}

}  // namespace

PortSpec parse_port_spec(const std::string& arg) {
  auto bad = [&](const std::string& why) {
    return UsageError("port-forward: bad port '" + arg + "': " + why +
                      " (want [LOCAL:]REMOTE[/udp], e.g. 8080:80, :80, 53/udp)");
  };
  std::string s = arg;
  PortSpec p;
  if (auto slash = s.find('/'); slash != std::string::npos) {
    std::string proto = s.substr(slash + 1);
    if (proto == "udp")
      p.udp = true;
    else if (proto != "tcp")
      throw bad("protocol must be tcp or udp");
    s.resize(slash);
  }
  auto colon = s.find(':');
  if (colon == std::string::npos) {
    auto r = port_number(s, 1);
    if (!r) throw bad("REMOTE must be a port number 1-65535");
    p.local = p.remote = *r;
    return p;
  }
  std::string local = s.substr(0, colon), remote = s.substr(colon + 1);
  if (remote.find(':') != std::string::npos) throw bad("too many ':'");
  auto r = port_number(remote, 1);
  if (!r) throw bad("REMOTE must be a port number 1-65535");
  p.remote = *r;
  if (!local.empty()) {
    auto l = port_number(local, 0);
    if (!l) throw bad("LOCAL must be a port number 0-65535 (0 or empty: any free port)");
    p.local = *l;
  }
  return p;
}

void parse_port_forward(PortForwardOptions& pf, const std::vector<std::string>& positional) {
  if (positional.empty()) throw UsageError("port-forward: missing TARGET");
  pf.target = positional[0];
  if (pf.target.empty()) throw UsageError("port-forward: TARGET is empty");
  if (positional.size() < 2)
    throw UsageError("port-forward: name at least one port, as in 'shimctl port-forward " + pf.target + " 8080:80'");
  pf.ports.clear();
  for (size_t i = 1; i < positional.size(); ++i) pf.ports.push_back(parse_port_spec(positional[i]));
  if (pf.stdio) {
    if (pf.ports.size() != 1)
      throw UsageError("port-forward: --stdio forwards exactly one REMOTE port (got " +
                       std::to_string(pf.ports.size()) + ")");
    if (positional[1].find(':') != std::string::npos)
      throw UsageError("port-forward: --stdio takes REMOTE only (no LOCAL: part): '" + positional[1] + "'");
    if (pf.ports[0].udp) throw UsageError("port-forward: --stdio forwards a TCP port (a byte stream), not UDP");
    if (!pf.addresses.empty()) throw UsageError("port-forward: --address does not apply to --stdio");
    pf.ports[0].local = 0;
    return;
  }
  std::vector<std::string> addrs;
  for (const std::string& a : pf.addresses) {
    if (a.empty()) throw UsageError("port-forward: empty --address item");
    if (a != "localhost" && !is_ip_literal(a))
      throw UsageError("port-forward: --address '" + a + "' is not 'localhost' or an IP address");
    if (std::find(addrs.begin(), addrs.end(), a) == addrs.end()) addrs.push_back(a);
  }
  if (addrs.empty()) addrs.push_back("localhost");
  pf.addresses = std::move(addrs);
}

// ---------------------------------------------------------------- forwarding

namespace {

constexpr uint32_t kStreamWindow = 8u << 20;       // per stream: > a fast link's bandwidth-delay product
constexpr uint32_t kConnectionWindow = 32u << 20;  // what the shim may have in flight to us in total
constexpr size_t kStreamHigh = 1u << 20;           // stop reading a local socket above this queued
constexpr size_t kSessionHigh = 32u << 20;         // ... or when the whole connection queues this much
constexpr size_t kChunk = 64u << 10;
constexpr size_t kMaxErrorBody = 4096;
constexpr size_t kMaxTunnels = 4096;         // concurrent local connections (beyond: stop accepting)
constexpr size_t kMaxUdpFlows = 256;         // per UDP listener
constexpr size_t kUdpFlowHigh = 256u << 10;  // queued datagram bytes per flow before we drop
constexpr int kUdpIdleS = 60;                // the shim expires its side after 120 s
constexpr int kConnectTimeoutS = 10;
constexpr int kQuitGraceMs = 1000;

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

// With 1000 forwarded connections we hold > 1024 fds: lift the soft limit.
void raise_nofile() {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

class Forwarder;

// Something that owns one HTTP/2 stream (a TCP tunnel or a UDP flow).
struct StreamUser {
  virtual ~StreamUser() = default;
  virtual void on_status(int status) = 0;
  virtual void on_data(const uint8_t* data, size_t len) = 0;
  virtual void on_remote_end() = 0;
  virtual void on_close(uint32_t code) = 0;
  virtual void resume() {}
  // The connection to the shim is gone: close the local side now.
  virtual void abandon() = 0;
  int32_t stream = -1;
};

struct Listener {
  Fd fd;
  Event ev;
  uint16_t remote = 0;
  bool udp = false;
  std::string where;  // "127.0.0.1:8080"
};

class Forwarder : public proto::H2Conn::Handler {
 public:
  // No TLS context for the shim's local socket (grant.local_socket).
  Forwarder(const Grant& g, const PortForwardOptions& pf, const proto::Identity& id)
      : grant_(g), pf_(pf), ctx_(g.local_socket.empty() ? proto::make_client_ctx(id) : nullptr) {
    base_.reset(event_base_new());
    if (!base_) throw Error("event_base_new failed");
    defer_ev_.reset(evtimer_new(
        base_.get(), [](evutil_socket_t, short, void* self) { static_cast<Forwarder*>(self)->deferred(); }, this));
  }
  ~Forwarder() override {
    users_.clear();
    graveyard_.clear();
    listeners_.clear();
    conn_.reset();  // before the base
  }

  int run() {
    for (int sig : {SIGINT, SIGTERM}) {
      signals_.emplace_back(evsignal_new(
          base_.get(), sig, [](evutil_socket_t, short, void* self) { static_cast<Forwarder*>(self)->quit(0, ""); },
          this));
      event_add(signals_.back().get(), nullptr);
    }
    start_connect();
    event_base_dispatch(base_.get());
    return exit_code_;
  }

  // ---- used by tunnels and flows ----
  proto::H2Conn& conn() { return *conn_; }
  event_base* base() { return base_.get(); }
  bool usable() const { return conn_ && !conn_->closed() && !quitting_; }
  bool over_budget() const { return conn_ && conn_->total_outbound() > kSessionHigh; }
  void pause(StreamUser* u) { paused_.insert(u); }
  void unpause(StreamUser* u) { paused_.erase(u); }
  const Grant& grant() const { return grant_; }

  int32_t open_stream(StreamUser* u, const std::string& path) {
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

  template <typename T>
  T* adopt(std::unique_ptr<T> u) {
    T* p = u.get();
    users_[p] = std::move(u);
    return p;
  }
  // u is finished: destroy it once the current callbacks have unwound.
  void retire(StreamUser* u) {
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
  size_t tunnel_count() const { return users_.size(); }
  // --stdio: the one tunnel is done (both directions, or failed).
  void stdio_done(int code) { quit(code, ""); }

  void quit(int code, const std::string& msg) {
    if (quitting_) return;
    quitting_ = true;
    exit_code_ = code;
    if (!msg.empty()) say(2, msg);
    // Stop accepting; the listeners themselves live as long as their flows.
    for (auto& l : listeners_) event_del(l->ev.get());
    if (conn_ && !conn_->closed()) {
      shutdown_pending_ = true;  // GOAWAY from the deferred event, outside H2Conn callbacks
      grace_ev_.reset(evtimer_new(
          base_.get(), [](evutil_socket_t, short, void* self) { static_cast<Forwarder*>(self)->stop_loop(); }, this));
      timeval tv{0, kQuitGraceMs * 1000};
      event_add(grace_ev_.get(), &tv);
      defer();
    } else {
      stop_loop_deferred_ = true;
      defer();
    }
  }

 private:
  // ---- connection setup ----
  void start_connect() {
    ShimLink link = connect_shim(base_.get(), grant_);
    sock_ = std::move(link.fd);
    bridge_ = std::move(link.bridge);
    connect_ev_.reset(event_new(base_.get(), sock_.get(), EV_WRITE, &Forwarder::on_connect_cb, this));
    timeval tv{kConnectTimeoutS, 0};
    event_add(connect_ev_.get(), &tv);
  }

  static void on_connect_cb(evutil_socket_t fd, short what, void* self) {
    auto* f = static_cast<Forwarder*>(self);
    if (what & EV_TIMEOUT)
      return f->quit(kOwnErrorExit, "error: timed out connecting to shim at " + f->grant_.address());
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err)
      return f->quit(kOwnErrorExit, "error: cannot connect to shim at " + f->grant_.address() + ": " + strerror(err));
    SSL* ssl = nullptr;  // the local socket: HTTP/2 without TLS
    if (f->ctx_ && !(ssl = SSL_new(f->ctx_.get())))
      return f->quit(kOwnErrorExit, "error: SSL_new: " + proto::ssl_error_string());
    proto::H2Settings st;
    st.stream_window = kStreamWindow;
    st.connection_window = kConnectionWindow;
    st.handshake_timeout_s = kConnectTimeoutS;
    st.ping_interval_s = f->pf_.ping_interval_s;  // keeps idle forwards up (and notices a dead peer)
    st.total_high_water = kSessionHigh;
    f->conn_ =
        std::make_unique<proto::H2Conn>(f->base_.get(), f->sock_.release(), ssl, proto::H2Conn::Role::Client, f, st);
  }

  std::string on_connected(SSL* ssl) override {
    if (std::string e = ssl ? proto::check_pin(ssl, grant_.pin) : ""; !e.empty()) {
      pin_error_ = e;
      return e;
    }
    conn_ready_ = true;
    open_pending_ = true;  // the HTTP/2 session exists only once this returns
    defer();
    return "";
  }

  // Authenticates the connection before we listen: a bad ticket or a gone
  // container is reported at once, and the ticket's short lifetime only has
  // to cover connect + handshake (later streams reuse the accepted ticket).
  void send_open() {
    proto::Headers h = {{":method", "POST"},
                        {":scheme", "https"},
                        {":authority", grant_.endpoint},
                        {":path", proto::kPortForwardOpenPath},
                        {"authorization", "Bearer " + grant_.ticket},
                        {"user-agent", "shimctl"}};
    open_id_ = conn_->request(h, /*has_body=*/false);
    if (open_id_ < 0) quit(kOwnErrorExit, "error: cannot submit the port-forward request to the shim");
  }

  void opened() {
    if (quitting_) return;
    if (open_status_ != 200) return quit(kOwnErrorExit, "error: " + error_message(open_body_, open_status_));
    if (pf_.stdio) return start_stdio();
    try {
      bind_all();
    } catch (const std::exception& e) {
      return quit(kOwnErrorExit, std::string("error: ") + e.what());
    }
  }

  void start_stdio();

  // ---- listeners ----
  void bind_all() {
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

  static uint16_t local_port(int fd) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
    return ss.ss_family == AF_INET ? ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port)
                                   : ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
  }

  std::unique_ptr<Listener> bind_one(const std::string& ip, uint16_t port, const PortSpec& p, std::string& err) {
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
    l->ev.reset(event_new(base_.get(), l->fd.get(), EV_READ | EV_PERSIST,
                          p.udp ? &Forwarder::on_udp_cb : &Forwarder::on_accept_cb, this));
    if (p.udp) udp_[l.get()];
    event_add(l->ev.get(), nullptr);
    return l;
  }

  static void on_accept_cb(evutil_socket_t fd, short, void* self) {
    auto* f = static_cast<Forwarder*>(self);
    for (auto& l : f->listeners_)
      if (l->fd.get() == fd) return f->accept_on(*l);
  }
  void accept_on(Listener& l);
  void pause_accept(bool retry_timer) {
    accept_paused_ = true;
    for (auto& l : listeners_)
      if (!l->udp) event_del(l->ev.get());
    if (retry_timer) {
      if (!accept_retry_ev_)
        accept_retry_ev_.reset(evtimer_new(
            base_.get(), [](evutil_socket_t, short, void* self) { static_cast<Forwarder*>(self)->resume_accept(); },
            this));
      timeval tv{0, 100 * 1000};
      event_add(accept_retry_ev_.get(), &tv);
    }
  }
  void resume_accept() {
    if (!accept_paused_ || quitting_) return;
    accept_paused_ = false;
    for (auto& l : listeners_)
      if (!l->udp) event_add(l->ev.get(), nullptr);
  }

  static void on_udp_cb(evutil_socket_t fd, short, void* self) {
    auto* f = static_cast<Forwarder*>(self);
    for (auto& l : f->listeners_)
      if (l->fd.get() == fd) return f->udp_readable(*l);
  }
  void udp_readable(Listener& l);

 public:
  // UDP flows by local peer address, per listener.
  std::map<Listener*, std::unordered_map<std::string, StreamUser*>> udp_;

 private:
  // ---- H2Conn::Handler ----
  void on_headers(int32_t stream, const proto::Headers& h, bool) override {
    const std::string* st = proto::find_header(h, ":status");
    int code = st ? atoi(st->c_str()) : 0;
    if (code < 200) return;  // informational / trailers
    if (stream == open_id_) {
      open_status_ = code;
      return;
    }
    if (auto it = by_stream_.find(stream); it != by_stream_.end()) it->second->on_status(code);
  }
  void on_data(int32_t stream, const uint8_t* data, size_t len) override {
    if (auto it = by_stream_.find(stream); it != by_stream_.end()) return it->second->on_data(data, len);
    if (stream == open_id_ && open_body_.size() < kMaxErrorBody)
      open_body_.append(reinterpret_cast<const char*>(data), std::min(len, kMaxErrorBody - open_body_.size()));
    conn_->consume(stream, len);  // nobody wants it: keep the connection window open
  }
  void on_remote_end(int32_t stream) override {
    if (stream == open_id_) {
      opened_pending_ = true;
      return defer();
    }
    if (auto it = by_stream_.find(stream); it != by_stream_.end()) it->second->on_remote_end();
  }
  void on_stream_close(int32_t stream, uint32_t code) override {
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
  void on_drain(int32_t stream) override {
    if (stream != 0)
      if (auto it = by_stream_.find(stream); it != by_stream_.end() && !over_budget()) it->second->resume();
    // Streams paused by the connection-wide limit go on once it has room.
    if (!over_budget() && !paused_.empty()) {
      std::vector<StreamUser*> all(paused_.begin(), paused_.end());
      for (StreamUser* u : all)
        if (users_.count(u)) u->resume();
    }
  }
  void on_closed(const std::string& why) override {
    if (!conn_ready_) {
      if (!pin_error_.empty()) return quit(kOwnErrorExit, "error: " + pin_error_);
      return quit(kOwnErrorExit, "error: cannot connect to shim at " + grant_.address() + ": " + why);
    }
    abandon_pending_ = true;
    if (!quitting_) quit(kOwnErrorExit, "error: lost connection to the shim: " + why);
    stop_loop_deferred_ = true;
    defer();
  }

  // ---- deferred work (never inside H2Conn callbacks) ----
  void defer() {
    timeval zero{0, 0};
    event_add(defer_ev_.get(), &zero);
  }
  void deferred() {
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
  void stop_loop() { event_base_loopbreak(base_.get()); }

  const Grant& grant_;
  const PortForwardOptions& pf_;
  proto::SslCtx ctx_;
  EventBase base_;
  TunnelBridgePtr bridge_;  // proxy mode: the pump into the master's tunnel (before base_ goes)
  Fd sock_;
  Event connect_ev_, defer_ev_, grace_ev_, accept_retry_ev_;
  std::vector<Event> signals_;
  std::unique_ptr<proto::H2Conn> conn_;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::unordered_map<StreamUser*, std::unique_ptr<StreamUser>> users_;
  std::unordered_map<int32_t, StreamUser*> by_stream_;
  std::unordered_set<StreamUser*> paused_;
  std::vector<std::unique_ptr<StreamUser>> graveyard_;
  std::string pin_error_, open_body_;
  int32_t open_id_ = -1;
  int open_status_ = 0;
  int exit_code_ = 0;
  bool conn_ready_ = false, quitting_ = false, accept_paused_ = false;
  bool open_pending_ = false, opened_pending_ = false, abandon_pending_ = false, shutdown_pending_ = false;
  bool stop_loop_deferred_ = false;
};

// One forwarded TCP connection (or, with --stdio, our stdin/stdout).
class Tunnel : public StreamUser {
 public:
  // TCP: in and out are the accepted socket.
  Tunnel(Forwarder& f, Fd sock, uint16_t remote) : f_(f), sock_(std::move(sock)), remote_(remote) {
    in_fd_ = out_fd_ = sock_.get();
    init();
  }
  // --stdio: fd 0 and fd 1.
  Tunnel(Forwarder& f, uint16_t remote) : f_(f), remote_(remote), stdio_(true) {
    in_fd_ = 0;
    out_fd_ = 1;
    local_.emplace(false, true);
    in_pollable_ = pollable(0);
    init();
  }
  ~Tunnel() override {
    rd_ev_.reset();
    wr_ev_.reset();
    if (local_) local_->restore();
  }

  bool start() {
    if (f_.open_stream(this, proto::kPortForwardPrefix + std::to_string(remote_)) < 0) {
      report("the shim does not accept new streams");
      return false;
    }
    resume();
    return true;
  }

  void on_status(int status) override { status_ = status; }

  void on_data(const uint8_t* data, size_t len) override {
    if (status_ != 200) {
      if (err_body_.size() < kMaxErrorBody)
        err_body_.append(reinterpret_cast<const char*>(data), std::min(len, kMaxErrorBody - err_body_.size()));
      f_.conn().consume(stream, len);
      return;
    }
    if (out_dead_) {
      f_.conn().consume(stream, len);
      return;
    }
    // Straight to the local socket when nothing waits ahead of it: no copy
    // for the common case. What it does not take waits in out_; an error
    // shows again on flush_local's write and is handled there.
    if (evbuffer_get_length(out_.get()) == 0 && !dead_) {
      ssize_t n;
      do n = ::write(out_fd_, data, len);
      while (n < 0 && errno == EINTR);
      if (n > 0) {
        f_.conn().consume(stream, static_cast<size_t>(n));
        data += n;
        len -= static_cast<size_t>(n);
      }
    }
    if (len) evbuffer_add(out_.get(), data, len);
    flush_local();
  }

  void on_remote_end() override {
    if (status_ != 200) {
      fail(error_message(err_body_, status_), /*reset_stream=*/true);
      return;
    }
    remote_end_ = true;
    flush_local();
  }

  void on_close(uint32_t code) override {
    stream_closed_ = true;
    if (dead_) return;
    if (status_ != 200) return fail(status_ ? error_message(err_body_, status_) : reset_reason(code), false);
    if (code != 0 && !(in_eof_ && remote_end_)) return fail(reset_reason(code), false);
    if (!in_eof_) {
      // The shim closed the stream after its END_STREAM (RST_STREAM NO_ERROR):
      // whatever our client still sends has nowhere to go.
      in_eof_ = true;
      reading_ = false;
      f_.unpause(this);
      rd_ev_.reset();
    }
    // Clean end of both directions: finish writing what we hold, then close.
    maybe_done();
  }

  void resume() override {
    if (dead_ || in_eof_ || reading_) return;
    f_.unpause(this);
    reading_ = true;
    if (in_pollable_)
      event_add(rd_ev_.get(), nullptr);
    else
      event_active(rd_ev_.get(), EV_READ, 0);
  }

  void abandon() override {
    if (dead_) return;
    dead_ = true;
    rst_local();
    if (stdio_) f_.stdio_done(kOwnErrorExit);
    f_.retire(this);
  }

 private:
  void init() {
    out_.reset(evbuffer_new());
    rd_ev_.reset(event_new(
        f_.base(), in_pollable_ ? in_fd_ : -1, in_pollable_ ? EV_READ | EV_PERSIST : 0,
        [](evutil_socket_t, short, void* self) { static_cast<Tunnel*>(self)->read_local(); }, this));
    wr_ev_.reset(event_new(
        f_.base(), out_fd_, EV_WRITE,
        [](evutil_socket_t, short, void* self) { static_cast<Tunnel*>(self)->flush_local(); }, this));
  }

  void pause() {
    if (!reading_) return;
    reading_ = false;
    if (in_pollable_) event_del(rd_ev_.get());
    f_.pause(this);
  }

  void read_local() {
    if (dead_ || in_eof_ || !reading_) return;
    for (int round = 0; round < 16; ++round) {
      if (!f_.usable()) return pause();  // quitting: stop polling this socket
      if (f_.conn().outbound(stream) >= kStreamHigh || f_.over_budget()) return pause();  // on_drain resumes
      char buf[kChunk];
      ssize_t n = ::read(in_fd_, buf, sizeof buf);
      if (n > 0) {
        f_.conn().send(stream, buf, static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) return;
      if (n < 0 && !stdio_) {
        // The local client reset its connection: so do we, on this stream only.
        dead_ = true;
        if (!stream_closed_) f_.conn().reset(stream, NGHTTP2_CANCEL);
        rst_local();
        f_.retire(this);
        return;
      }
      // EOF (an unreadable stdin counts as EOF): carry the half-close.
      in_eof_ = true;
      reading_ = false;
      rd_ev_.reset();
      if (!stream_closed_) f_.conn().end(stream);
      return maybe_done();
    }
    if (!in_pollable_) event_active(rd_ev_.get(), EV_READ, 0);
  }

  // Writes what the shim sent; returns window for exactly what was written.
  void flush_local() {
    if (dead_) return;
    while (size_t len = evbuffer_get_length(out_.get())) {
      int n = evbuffer_write_atmost(out_.get(), out_fd_, static_cast<ev_ssize_t>(std::min(len, kChunk * 4)));
      if (n > 0) {
        f_.conn().consume(stream, static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) {
        event_add(wr_ev_.get(), nullptr);
        return;
      }
      // Our local reader is gone: nobody can take this stream's data.
      int e = n < 0 ? errno : EIO;
      out_dead_ = true;
      evbuffer_drain(out_.get(), len);
      f_.conn().consume(stream, len);
      if (stdio_) {
        say(2, std::string("error: cannot write to stdout: ") + strerror(e));
        dead_ = true;
        if (!stream_closed_) f_.conn().reset(stream, NGHTTP2_CANCEL);
        f_.stdio_done(kOwnErrorExit);
        f_.retire(this);
        return;
      }
      dead_ = true;
      if (!stream_closed_) f_.conn().reset(stream, NGHTTP2_CANCEL);
      rst_local();
      f_.retire(this);
      return;
    }
    if (remote_end_ && !out_shut_) {
      out_shut_ = true;
      if (stdio_) {
        // Our reader sees EOF; fd 1 stays valid (/dev/null) for anything else.
        Fd null(::open("/dev/null", O_WRONLY | O_CLOEXEC));
        if (null) dup2(null.get(), 1);
      } else {
        ::shutdown(sock_.get(), SHUT_WR);  // the container's side ended: half-close toward the client
      }
    }
    maybe_done();
  }

  void maybe_done() {
    if (dead_ || !stream_closed_ || !out_shut_ || !in_eof_) return;
    dead_ = true;
    if (stdio_) f_.stdio_done(0);
    f_.retire(this);  // closes the socket (both directions already ended)
  }

  void report(const std::string& why) { say(2, "error: forwarding to port " + std::to_string(remote_) + ": " + why); }

  // This connection failed (refused, or reset in the container): say so,
  // reset the local connection, and let every other one go on.
  void fail(const std::string& why, bool reset_stream) {
    if (dead_) return;
    dead_ = true;
    report(why);
    if (reset_stream && !stream_closed_ && f_.usable()) f_.conn().reset(stream, NGHTTP2_CANCEL);
    rst_local();
    if (stdio_) f_.stdio_done(kOwnErrorExit);
    f_.retire(this);
  }

  // RST instead of FIN: the local client must not mistake a failure for a clean end.
  void rst_local() {
    if (!sock_) return;
    linger lg{1, 0};
    setsockopt(sock_.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    rd_ev_.reset();
    wr_ev_.reset();
    sock_.reset();
  }

  Forwarder& f_;
  Fd sock_;
  uint16_t remote_;
  bool stdio_ = false;
  std::optional<LocalStdio> local_;
  int in_fd_ = -1, out_fd_ = -1;
  bool in_pollable_ = true;
  Event rd_ev_, wr_ev_;
  EvBuffer out_;
  std::string err_body_;
  int status_ = 0;
  bool reading_ = false, in_eof_ = false, remote_end_ = false, out_shut_ = false, out_dead_ = false;
  bool stream_closed_ = false, dead_ = false;
};

// One UDP flow: the datagrams of one local peer address, framed as
// u16-big-endian length + payload in both directions.
class UdpFlow : public StreamUser {
 public:
  UdpFlow(Forwarder& f, Listener& l, const sockaddr_storage& peer, socklen_t plen, std::string key)
      : f_(f), l_(l), peer_(peer), plen_(plen), key_(std::move(key)) {
    idle_.reset(evtimer_new(
        f_.base(), [](evutil_socket_t, short, void* self) { static_cast<UdpFlow*>(self)->expire(); }, this));
  }

  bool start() {
    if (f_.open_stream(this, proto::kPortForwardPrefix + std::to_string(l_.remote) + "/udp") < 0) return false;
    touch();
    return true;
  }

  void send_datagram(const char* data, size_t n) {
    if (ending_ || !f_.usable()) return;
    // UDP may drop: a flow whose queue is full loses datagrams, never memory.
    if (f_.conn().outbound(stream) > kUdpFlowHigh || f_.over_budget()) return;
    char h[2] = {static_cast<char>(n >> 8), static_cast<char>(n & 0xff)};
    std::string framed(h, 2);
    framed.append(data, n);
    f_.conn().send(stream, framed.data(), framed.size());
    touch();
  }

  void on_status(int status) override { status_ = status; }

  void on_data(const uint8_t* data, size_t len) override {
    if (status_ != 200) {
      if (err_body_.size() < kMaxErrorBody)
        err_body_.append(reinterpret_cast<const char*>(data), std::min(len, kMaxErrorBody - err_body_.size()));
      f_.conn().consume(stream, len);
      return;
    }
    in_.append(reinterpret_cast<const char*>(data), len);
    size_t off = 0;
    while (in_.size() - off >= 2) {
      size_t n = static_cast<uint8_t>(in_[off]) << 8 | static_cast<uint8_t>(in_[off + 1]);
      if (in_.size() - off - 2 < n) break;
      // A full local socket buffer drops the datagram, as UDP would.
      (void)::sendto(l_.fd.get(), in_.data() + off + 2, n, MSG_DONTWAIT, reinterpret_cast<sockaddr*>(&peer_), plen_);
      off += 2 + n;
    }
    in_.erase(0, off);  // at most one partial frame (< 64 KiB + 2) stays
    f_.conn().consume(stream, len);
    touch();
  }

  void on_remote_end() override {
    if (status_ != 200) return fail(error_message(err_body_, status_));
    // The shim expired or closed its side: end ours; a new datagram opens a new flow.
    forget();
    if (!ending_) {
      ending_ = true;
      f_.conn().end(stream);
    }
  }

  void on_close(uint32_t code) override {
    if (dead_) return;
    if (status_ != 200) return fail(status_ ? error_message(err_body_, status_) : reset_reason(code));
    if (code != 0 && !ending_)
      say(2, "error: forwarding to port " + std::to_string(l_.remote) + "/udp for " + addr_string(peer_) + ": " +
                 reset_reason(code));
    dead_ = true;
    forget();
    f_.retire(this);
  }

  void abandon() override {
    dead_ = true;
    forget();
    f_.retire(this);
  }

 private:
  void touch() {
    timeval tv{kUdpIdleS, 0};
    evtimer_add(idle_.get(), &tv);
  }
  void expire() {
    forget();
    if (!ending_ && f_.usable()) {
      ending_ = true;
      f_.conn().end(stream);  // the stream closes when the shim ends its side too
    }
  }
  void forget() {
    auto& m = f_.udp_[&l_];
    if (auto it = m.find(key_); it != m.end() && it->second == this) m.erase(it);
  }
  void fail(const std::string& why) {
    if (dead_) return;
    dead_ = true;
    say(2, "error: forwarding to port " + std::to_string(l_.remote) + "/udp: " + why);
    forget();
    f_.retire(this);
  }

  Forwarder& f_;
  Listener& l_;
  sockaddr_storage peer_;
  socklen_t plen_;
  std::string key_, in_, err_body_;
  Event idle_;
  int status_ = 0;
  bool ending_ = false, dead_ = false;
};

void Forwarder::start_stdio() {
  auto t = adopt(std::make_unique<Tunnel>(*this, pf_.ports[0].remote));
  if (!t->start()) quit(kOwnErrorExit, "");
}

void Forwarder::accept_on(Listener& l) {
  for (int i = 0; i < 64; ++i) {
    if (tunnel_count() >= kMaxTunnels) return pause_accept(false);  // retire() resumes
    Fd c(accept4(l.fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!c) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        say(2, std::string("error: accepting on ") + l.where + ": " + strerror(errno));
        return pause_accept(true);
      }
      return;  // EAGAIN, or a connection that went away before accept
    }
    int one = 1;
    setsockopt(c.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    say(1, "Handling connection for " + std::to_string(local_port(l.fd.get())));
    auto t = adopt(std::make_unique<Tunnel>(*this, std::move(c), l.remote));
    if (!t->start()) {
      t->abandon();
      return;
    }
  }
}

void Forwarder::udp_readable(Listener& l) {
  auto& flows = udp_[&l];
  for (int i = 0; i < 64; ++i) {
    sockaddr_storage peer{};
    socklen_t plen = sizeof peer;
    static char buf[65536];
    ssize_t n = recvfrom(l.fd.get(), buf, sizeof buf, MSG_TRUNC, reinterpret_cast<sockaddr*>(&peer), &plen);
    if (n < 0) return;                             // EAGAIN (or an ICMP error for an earlier reply: nothing to do)
    if (static_cast<size_t>(n) > 65535) continue;  // cannot be framed (u16 length); IPv4/6 UDP payloads fit
    if (!usable()) return;
    std::string key(reinterpret_cast<char*>(&peer), plen);
    UdpFlow* flow = nullptr;
    if (auto it = flows.find(key); it != flows.end()) {
      flow = static_cast<UdpFlow*>(it->second);
    } else {
      if (flows.size() >= kMaxUdpFlows) continue;  // drop: bounded state per listener
      flow = adopt(std::make_unique<UdpFlow>(*this, l, peer, plen, key));
      if (!flow->start()) {
        flow->abandon();
        continue;
      }
      flows[key] = flow;
    }
    flow->send_datagram(buf, static_cast<size_t>(n));
  }
}

}  // namespace

int run_port_forward(const Grant& grant, const PortForwardOptions& pf, const proto::Identity& client) {
  signal(SIGPIPE, SIG_IGN);  // EPIPE is handled where it happens
  raise_nofile();
  Forwarder f(grant, pf, client);
  return f.run();
}

}  // namespace shimlet::client
