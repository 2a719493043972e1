// Port-forward streams: each HTTP/2 stream is one forwarded connection (TCP)
// or one flow of datagrams (UDP) to a port inside the container's network
// namespace. The socket is created inside that namespace (setns around
// socket() only: the session's own sockets never move), then used from here.
// A failure ends that stream alone; every other stream goes on.
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/event.h"
#include "common/log.h"
#include "session/session_internal.h"
#include "session/session_netns.h"

namespace shimlet::session {
namespace {

constexpr size_t kChunk = 64 * 1024;
constexpr size_t kSockBufHigh = 1u << 20;  // bytes from the client not yet written to the socket
constexpr int kUdpIdleSeconds = 120;

class Forward : public StreamHandler {
 public:
  Forward(Session& s, int32_t stream, uint16_t port, bool udp) : s_(s), stream_(stream), port_(port), udp_(udp) {}
  ~Forward() override {
    s_.add_bytes(static_cast<uint64_t>(bytes_in_), static_cast<uint64_t>(bytes_out_));  // the session's end record
    stop();
  }

  void start() {
    log::audit("portforward.open", {{"port", port_}, {"proto", udp_ ? "udp" : "tcp"}, {"stream", stream_}});
    if (udp_) return start_udp();
    connect();
  }

  void on_data(const uint8_t* data, size_t len) override {
    if (failed_ || (udp_ && !sock_)) {
      s_.conn().consume(stream_, len);
      return;
    }
    if (udp_) {
      // Datagrams are framed as u16 length + payload so boundaries survive.
      dgram_in_.append(reinterpret_cast<const char*>(data), len);
      size_t off = 0;
      while (dgram_in_.size() - off >= 2) {
        size_t n = static_cast<uint8_t>(dgram_in_[off]) << 8 | static_cast<uint8_t>(dgram_in_[off + 1]);
        if (dgram_in_.size() - off - 2 < n) break;
        ssize_t w = ::send(sock_.get(), dgram_in_.data() + off + 2, n, MSG_NOSIGNAL);
        (void)w;  // UDP: a dropped datagram is what the application expects
        off += 2 + n;
        bytes_in_ += n;
      }
      dgram_in_.erase(0, off);
      s_.conn().consume(stream_, len);
      touch();
      return;
    }
    // Straight to the socket when it is connected and nothing waits ahead
    // (no copy for the common case).
    if (out_.empty() && sock_ && ev_write_ && !shut_wr_) {
      ssize_t n;
      do n = ::send(sock_.get(), data, len, MSG_NOSIGNAL);
      while (n < 0 && errno == EINTR);
      if (n > 0) {
        bytes_in_ += n;
        s_.conn().consume(stream_, static_cast<size_t>(n));
        data += n;
        len -= static_cast<size_t>(n);
        if (len == 0) return;
      }
      // An error shows again on flush_out's send, which handles it.
    }
    // Held while the connection is still being made (bounded: the window is
    // returned only once bytes reach the socket).
    out_.append(reinterpret_cast<const char*>(data), len);
    owed_ += len;
    flush_out();
  }

  void on_remote_end() override {
    remote_ended_ = true;
    if (udp_) return finish_udp();
    flush_out();
  }

  void on_drain() override { resume(); }

  void on_close(uint32_t code) override {
    if (!closed_) {
      log::audit("portforward.close", {{"port", port_},
                                       {"stream", stream_},
                                       {"bytes_in", bytes_in_},
                                       {"bytes_out", bytes_out_},
                                       {"reset", code != 0}});
    }
    closed_ = true;
    if (code != 0) reset_sock();
    stop();
  }

  // The connection is gone mid-stream (the client died or quit): as a reset.
  void abort(const std::string&) override {
    reset_sock();
    stop();
  }
  void container_exited() override {
    // reset() may close the stream at once and the session then destroys
    // this handler: clean up first, touch nothing after.
    stop();
    s_.conn().reset(stream_, NGHTTP2_CANCEL);
  }
  bool done() const override { return closed_; }

  void resume() {
    if (paused_ && ev_read_ && !sock_eof_) {
      paused_ = false;
      event_add(ev_read_, nullptr);
    }
  }

 private:
  void connect() {
    // Connected or not, the connector reports from the loop, never from inside start().
    connector_ = std::make_unique<LoopbackConnector>(s_, port_, [this](Fd sock, const std::string& error) {
      auto keep = std::move(connector_);  // destroyed when this callback returns
      if (!sock) return fail(502, error);
      sock_ = std::move(sock);
      connected();
    });
    connector_->start();
  }

  void fail(int status, const std::string& why) {
    failed_ = true;
    log::audit("portforward.error", {{"port", port_}, {"stream", stream_}, {"error", why}});
    s_.conn().respond_simple(stream_, status, "application/json", nlohmann::json{{"error", why}}.dump() + "\n");
  }

  void connected() {
    // Checked creation (common/event.h); the raw members are freed in stop().
    try {
      ev_read_ = new_event(s_.base(), sock_.get(), EV_READ | EV_PERSIST, on_readable, this).release();
      ev_write_ = new_event(s_.base(), sock_.get(), EV_WRITE, on_writable, this).release();
    } catch (const std::exception& e) {  // called from the loop: nothing throws into libevent
      return fail(500, e.what());
    }
    s_.conn().respond(stream_, {{":status", "200"}});
    event_add(ev_read_, nullptr);
    flush_out();
  }

  void start_udp() {
    try {
      sock_ = socket_in_netns(s_, AF_INET, SOCK_DGRAM);
      socklen_t len;
      sockaddr_storage ss = loopback_addr(AF_INET, port_, len);
      if (::connect(sock_.get(), reinterpret_cast<sockaddr*>(&ss), len) < 0) throw sys_error("connect udp");
      ev_read_ = new_event(s_.base(), sock_.get(), EV_READ | EV_PERSIST, on_readable, this).release();
      ev_idle_ = new_timer(s_.base(), on_idle, this).release();
    } catch (const std::exception& e) {
      return fail(502, e.what());
    }
    s_.conn().respond(stream_, {{":status", "200"}});
    event_add(ev_read_, nullptr);
    touch();
  }

  void touch() {
    if (!ev_idle_) return;
    timeval tv{kUdpIdleSeconds, 0};
    evtimer_add(ev_idle_, &tv);
  }

  static void on_idle(evutil_socket_t, short, void* arg) {
    auto* self = static_cast<Forward*>(arg);
    log::info("udp flow idle: closing", {{"port", self->port_}, {"stream", self->stream_}});
    self->finish_udp();
  }

  void finish_udp() {
    if (sock_eof_) return;
    sock_eof_ = true;
    if (ev_read_) event_del(ev_read_);
    s_.conn().end(stream_);
  }

  static void on_readable(evutil_socket_t, short, void* arg) { static_cast<Forward*>(arg)->read_sock(); }

  void read_sock() {
    for (int rounds = 0; rounds < 16; rounds++) {
      if (s_.conn().outbound(stream_) > s_.conn().settings().out_high_water || s_.over_budget()) {
        paused_ = true;
        event_del(ev_read_);
        return;
      }
      char buf[kChunk];
      ssize_t n = ::recv(sock_.get(), buf, sizeof buf, 0);
      if (n > 0) {
        if (udp_) {
          char h[2] = {static_cast<char>(n >> 8), static_cast<char>(n & 0xff)};
          s_.conn().send(stream_, h, 2);
          touch();
        }
        s_.conn().send(stream_, buf, static_cast<size_t>(n));
        bytes_out_ += n;
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || (udp_ && errno == ECONNREFUSED))) return;
      if (n < 0) {
        // Reset by the container's side: end this stream only.
        log::info("forwarded connection error", {{"port", port_}, {"stream", stream_}, {"error", strerror(errno)}});
        stop();  // before reset(): it may destroy this handler
        s_.conn().reset(stream_, NGHTTP2_CONNECT_ERROR);
        return;
      }
      // EOF from the container's side: half-close toward the client.
      sock_eof_ = true;
      event_del(ev_read_);
      s_.conn().end(stream_);
      return;
    }
  }

  static void on_writable(evutil_socket_t, short, void* arg) { static_cast<Forward*>(arg)->flush_out(); }

  void flush_out() {
    if (!sock_ || !ev_write_) return;
    while (!out_.empty()) {
      ssize_t n = ::send(sock_.get(), out_.data(), out_.size(), MSG_NOSIGNAL);
      if (n > 0) {
        out_.erase(0, static_cast<size_t>(n));
        bytes_in_ += n;
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) {
        event_add(ev_write_, nullptr);
        break;
      }
      log::info("forwarded connection write error", {{"port", port_}, {"error", strerror(errno)}});
      stop();  // before reset(): it may destroy this handler
      s_.conn().reset(stream_, NGHTTP2_CONNECT_ERROR);
      return;
    }
    if (out_.size() < kSockBufHigh && owed_) {
      s_.conn().consume(stream_, owed_);
      owed_ = 0;
    }
    if (out_.empty() && remote_ended_ && !shut_wr_) {
      shut_wr_ = true;
      ::shutdown(sock_.get(), SHUT_WR);  // carry the client's half-close
    }
  }

  // The client's side failed (its local connection reset, its reader gone, or
  // the client itself): close with RST, not FIN, so the container's peer does
  // not take what it got so far for the whole stream (as the client does
  // toward its local peer for CONNECT_ERROR).
  void reset_sock() {
    if (!sock_ || udp_) return;
    linger lg{1, 0};
    setsockopt(sock_.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  }

  void stop() {
    connector_.reset();
    for (event** e : {&ev_read_, &ev_write_, &ev_idle_})
      if (*e) {
        event_free(*e);
        *e = nullptr;
      }
    sock_.reset();
  }

  Session& s_;
  int32_t stream_;
  uint16_t port_;
  bool udp_;
  Fd sock_;
  std::unique_ptr<LoopbackConnector> connector_;
  event *ev_read_ = nullptr, *ev_write_ = nullptr, *ev_idle_ = nullptr;
  std::string out_, dgram_in_;
  size_t owed_ = 0;
  bool remote_ended_ = false, shut_wr_ = false, sock_eof_ = false, paused_ = false, failed_ = false, closed_ = false;
  int64_t bytes_in_ = 0, bytes_out_ = 0;
};

}  // namespace

std::unique_ptr<StreamHandler> start_forward(Session& s, int32_t stream, const std::string& rest,
                                             const ticket::Claims& claims) {
  // rest: "PORT" or "PORT/udp" or "PORT/tcp"
  std::string port_s = rest, proto = "tcp";
  if (auto slash = rest.find('/'); slash != std::string::npos) {
    port_s = rest.substr(0, slash);
    proto = rest.substr(slash + 1);
  }
  if (port_s.empty() || port_s.size() > 5 || port_s.find_first_not_of("0123456789") != std::string::npos ||
      (proto != "tcp" && proto != "udp")) {
    s.refuse(stream, 400, "bad port-forward path: expected /v1/portforward/PORT[/udp]");
    return nullptr;
  }
  unsigned long port = std::stoul(port_s);
  if (port == 0 || port > 65535) {
    s.refuse(stream, 400, "port out of range: " + port_s);
    return nullptr;
  }
  bool allowed = false;
  for (auto& p : claims.ports)
    if (p.port == port && p.proto == proto) allowed = true;
  if (!allowed) {
    s.refuse(stream, 403, "ticket does not allow port " + port_s + "/" + proto);
    return nullptr;
  }
  auto f = std::make_unique<Forward>(s, stream, static_cast<uint16_t>(port), proto == "udp");
  f->start();
  return f;
}

void resume_forward(StreamHandler& h) {
  if (auto* f = dynamic_cast<Forward*>(&h)) f->resume();
}

}  // namespace shimlet::session
