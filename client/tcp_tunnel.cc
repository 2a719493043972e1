// One forwarded TCP connection, or with --stdio our stdin/stdout
// (client/forwarder.h): bytes both ways over one HTTP/2 stream, half-closes
// carried, a failure reset on its own connection only.
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

#include "client/forwarder.h"
#include "client/terminal.h"
#include "proto/frames.h"

namespace shimlet::client::pf {
namespace {

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

  void on_data(const uint8_t* data, size_t len) override {
    if (took_error_body(f_.conn(), data, len)) return;
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
    out_ = new_evbuffer();
    rd_ev_ = new_event(
        f_.base(), in_pollable_ ? in_fd_ : -1, in_pollable_ ? EV_READ | EV_PERSIST : 0,
        [](evutil_socket_t, short, void* self) { static_cast<Tunnel*>(self)->read_local(); }, this);
    wr_ev_ = new_event(
        f_.base(), out_fd_, EV_WRITE,
        [](evutil_socket_t, short, void* self) { static_cast<Tunnel*>(self)->flush_local(); }, this);
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
  EventPtr rd_ev_, wr_ev_;
  EvBufferPtr out_;
  bool reading_ = false, in_eof_ = false, remote_end_ = false, out_shut_ = false, out_dead_ = false;
  bool stream_closed_ = false, dead_ = false;
};

}  // namespace

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

}  // namespace shimlet::client::pf
