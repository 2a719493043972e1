// The exec stream (docs/design.md "Native protocol"): TLS 1.3 + HTTP/2 client
// (nghttp2) on a libevent loop, local stdio <-> frames, with flow control end
// to end: we only WINDOW_UPDATE what reached our stdout/stderr, and stop
// reading stdin while the request body queue is full.
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <ctime>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "client/client.h"
#include "client/net.h"
#include "client/terminal.h"
#include "common/fd.h"
#include "proto/frames.h"
#include "proto/h2.h"
#include "proto/tls.h"

namespace shimlet::client {
namespace {

constexpr uint32_t kStreamWindow = 4u << 20;       // SETTINGS_INITIAL_WINDOW_SIZE
constexpr uint32_t kConnectionWindow = 16u << 20;  // connection-level receive window
constexpr size_t kStdinChunk = 64 << 10;           // one STDIN frame per read
constexpr size_t kUploadHigh = 1 << 20;            // stop reading stdin above this many queued request bytes
constexpr size_t kMaxErrorBody = 64 << 10;         // error responses are one JSON line
constexpr int kOutPipeSize = 1 << 20;              // our stdout/stderr pipes grow to this (start_stdio)
constexpr int kConnectTimeoutS = 10;               // TCP connect + TLS handshake
constexpr int kFinishGraceMs = 500;                // after STATUS: time to flush our END_STREAM

class ExecClient : public proto::H2Conn::Handler {
 public:
  // Makes this run's identity and fills grant.ticket (local mode).
  using Minter = std::function<void(Grant& grant, proto::Identity& id)>;

  // With an identity and a complete grant (master mode)...
  ExecClient(const Grant& g, const ExecOptions& ex, const proto::Identity& id)
      : grant_(g), ex_(ex), ctx_(proto::make_client_ctx(id)) {
    init();
  }
  // ...or with a minter that runs once the ClientHello is out (or, at the
  // latest, when the shim asks for our certificate), so that the key
  // generation and the ticket's signature overlap the shim's side. The TLS
  // context, too, is made after the TCP connect has started (run()).
  ExecClient(const Grant& g, const ExecOptions& ex, Minter mint) : grant_(g), ex_(ex), mint_(std::move(mint)) {
    init();
  }
  void init() {
    // Output frames cut by the transport go on in pieces, not copied whole.
    decoder_.set_output_pieces(true);
    base_ = new_event_base();
    out_[0] = new_evbuffer();
    out_[1] = new_evbuffer();
    // Every timer up front: they are armed inside callbacks, where nothing
    // may throw (common/error.h).
    mint_ev_ = new_timer(
        base_.get(),
        [](evutil_socket_t, short, void* self) {
          auto* c = static_cast<ExecClient*>(self);
          if (!c->ensure_minted()) c->fail_now(c->mint_error_);
        },
        this);
    start_ev_ = new_timer(
        base_.get(), [](evutil_socket_t, short, void* self) { static_cast<ExecClient*>(self)->start_exec(); }, this);
    grace_ev_ = new_timer(
        base_.get(), [](evutil_socket_t, short, void* self) { static_cast<ExecClient*>(self)->grace_over(); }, this);
    pump_ev_ = new_timer(
        base_.get(), [](evutil_socket_t, short, void* self) { static_cast<ExecClient*>(self)->pump(); }, this);
  }
  ~ExecClient() override {
    // Everything was written (GOAWAY included): say goodbye properly so the
    // session logs a clean close rather than a truncated connection.
    if (conn_ && net_closed_ && conn_ready_ && conn_->ssl()) SSL_shutdown(conn_->ssl());
    conn_.reset();  // before the events and the base it uses
  }

  // Runs to completion; returns the exit code, message() is the line to print.
  int run() {
    start_connect();
    if (timeout_ms_ > 0) {
      timeout_ev_ = new_timer(
          base_.get(),
          [](evutil_socket_t, short, void* self) {
            auto* c = static_cast<ExecClient*>(self);
            if (c->got_status_) return;
            // Closing the connection (our destructor) makes the session kill
            // every process of the exec.
            c->cap_->timed_out = true;
            c->end_now(kOwnErrorExit, "error: timed out");
          },
          this);
      timeval tv{timeout_ms_ / 1000, (timeout_ms_ % 1000) * 1000};
      event_add(timeout_ev_.get(), &tv);
    }
    if (cancel_fd_ >= 0) {
      cancel_ev_ = new_event(
          base_.get(), cancel_fd_, EV_READ,
          [](evutil_socket_t, short, void* self) {
            auto* c = static_cast<ExecClient*>(self);
            if (c->got_status_) return;
            c->cap_->cancelled = true;
            c->end_now(kOwnErrorExit, "error: cancelled");
          },
          this);
      event_add(cancel_ev_.get(), nullptr);
    }
    if (!ctx_ && grant_.local_socket.empty()) {
      // OpenSSL's first fetches and DRBG seeding happen here, while the
      // kernel completes the connect and the shim starts its session.
      ctx_ = proto::make_client_ctx_deferred();
      SSL_CTX_set_cert_cb(ctx_.get(), &ExecClient::cert_cb, this);
    }
    event_base_dispatch(base_.get());
    return exit_code_;
  }
  const std::string& message() const { return message_; }

  // Capture mode (run_captured_exec): no local stdio, output into cap.
  void capture(CapturedExec* cap, size_t max_output, int timeout_ms, int cancel_fd) {
    cap_ = cap;
    cap_max_ = max_output;
    timeout_ms_ = timeout_ms;
    cancel_fd_ = cancel_fd;
  }
  bool request_sent() const { return stream_ > 0; }
  int http_status() const { return http_status_; }
  bool got_status() const { return got_status_; }
  int status_code() const { return status_code_; }
  const std::string& status_error() const { return status_error_; }

 private:
  // ---- connection setup ----
  void start_connect() {
    ShimLink link = connect_shim(base_.get(), grant_);
    sock_ = std::move(link.fd);
    bridge_ = std::move(link.bridge);
    connect_ev_ = new_event(base_.get(), sock_.get(), EV_WRITE, &ExecClient::on_connect_cb, this);
    timeval tv{kConnectTimeoutS, 0};
    event_add(connect_ev_.get(), &tv);
  }

  static void on_connect_cb(evutil_socket_t fd, short what, void* self) {
    auto* c = static_cast<ExecClient*>(self);
    if (what & EV_TIMEOUT) return c->fail_now("timed out connecting to shim at " + c->grant_.address());
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) return c->fail_now("cannot connect to shim at " + c->grant_.address() + ": " + strerror(err));
    SSL* ssl = nullptr;  // the local socket: HTTP/2 without TLS
    if (c->ctx_ && !(ssl = SSL_new(c->ctx_.get()))) return c->fail_now("SSL_new: " + openssl_error());
    // H2Conn owns fd and ssl from here; it runs the handshake (bounded) and HTTP/2.
    proto::H2Settings st;
    st.stream_window = kStreamWindow;
    st.connection_window = kConnectionWindow;
    st.handshake_timeout_s = kConnectTimeoutS;
    proto::H2Conn::Handover hand;
    if ((c->pass_stdio_ = !ssl && c->can_pass_stdio()))
      hand.pass_fds = c->ex_.stdin_ ? std::vector<int>{0, 1, 2} : std::vector<int>{1, 2};
    c->conn_ = std::make_unique<proto::H2Conn>(c->base_.get(), c->sock_.release(), ssl, proto::H2Conn::Role::Client, c,
                                               st, std::move(hand));
    if (c->mint_) {
      // Runs after the ClientHello is written: libevent runs the socket's
      // write event before timers that expire in the same loop turn.
      timeval zero{0, 0};
      event_add(c->mint_ev_.get(), &zero);
    }
  }

  // Root's local socket (docs/design.md "Local socket"): the command may get
  // our own stdio, as runc exec gives it, so nothing is copied through the
  // session. Not with a tty (the pty is the shim's), not in capture mode, not
  // through the master's tunnel, and never a terminal: a container process
  // holding a host terminal could push input into it (TIOCSTI); those are
  // copied as before.
  bool can_pass_stdio() const {
    if (cap_ || ex_.tty || bridge_ || grant_.local_socket.empty()) return false;
    for (int fd : {0, 1, 2}) {
      if (fd == 0 && !ex_.stdin_) continue;
      if (fcntl(fd, F_GETFD) < 0 || isatty(fd)) return false;
    }
    return true;
  }

  // Makes identity and ticket once; false (mint_error_ set) when that failed.
  bool ensure_minted() {
    if (mint_ && !minted_) {
      minted_ = true;
      try {
        mint_(grant_, id_);
      } catch (const std::exception& e) {
        mint_error_ = e.what();
      }
    }
    return mint_error_.empty();
  }

  // The shim asked for our certificate: it must exist now.
  static int cert_cb(SSL* ssl, void* self) {
    auto* c = static_cast<ExecClient*>(self);
    if (!c->ensure_minted()) return 0;
    try {
      proto::use_client_identity(ssl, c->id_);
    } catch (const std::exception& e) {
      c->mint_error_ = e.what();
      return 0;
    }
    return 1;
  }

  std::optional<std::string> on_connected(SSL* ssl) override {
    if (!ensure_minted()) return mint_error_;
    if (auto e = ssl ? proto::pin_mismatch(ssl, grant_.pin) : std::nullopt) {
      pin_error_ = *e;
      return *e;
    }
    conn_ready_ = true;
    // The HTTP/2 session exists only once this returns: submit from the loop.
    timeval zero{0, 0};
    event_add(start_ev_.get(), &zero);
    return std::nullopt;
  }

  void start_exec() {
    if (finishing_) return;
    try {
      // With passed stdio, ours starts only if the shim does not use it (on_headers).
      if (!pass_stdio_) start_stdio();
      nlohmann::json spec = {{"command", ex_.command}, {"stdin", ex_.stdin_}, {"tty", ex_.tty}};
      if (pass_stdio_) spec["stdio"] = proto::kStdioClient;
      if (ex_.tty) {
        size_ = local_winsize();
        spec["cols"] = size_.cols;
        spec["rows"] = size_.rows;
        if (const char* term = getenv("TERM"); term && *term) spec["term"] = term;
      }
      proto::Headers h = {{":method", "POST"},
                          {":scheme", "https"},
                          {":authority", grant_.endpoint},
                          {":path", proto::kExecPath},
                          {"authorization", "Bearer " + grant_.ticket},
                          {proto::kExecHeader, spec.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)},
                          {"user-agent", "shimctl"}};
      // request() already tries to send: a request nghttp2 cannot send (its
      // header block over the limit: a very long command line) is closed
      // inside it, before its id is ours (on_stream_close).
      submitting_ = true;
      stream_ = conn_->request(h, /*has_body=*/true);
      submitting_ = false;
      if (stream_ < 0) return fail_now("cannot submit the exec request to the shim");
      if (stream_closed_) return;
      if (!pending_.empty()) {
        conn_->send(stream_, pending_.data(), pending_.size());
        pending_.clear();
      }
    } catch (const std::exception& e) {
      return fail_now(e.what());
    }
    pump();
  }

  // ---- local stdio ----
  void start_stdio() {
    if (cap_) return;  // no terminal, no stdin: the ticket says stdin false
    stdio_.emplace(ex_.tty, ex_.stdin_);
    // Output piped on (`| wc`, `| tar x`): a pipe of the session's own size
    // (1 MiB, session_exec.cc) takes whole frames per write instead of
    // filling after one, so fewer writes wait in out_ (a copy and fresh
    // heap pages) and the reader wakes less often. Best effort: pipes only,
    // never shrunk; the pipe stays that size after us (it is bounded).
    for (int fd : {1, 2})
      if (int cur = fcntl(fd, F_GETPIPE_SZ); cur > 0 && cur < kOutPipeSize) (void)fcntl(fd, F_SETPIPE_SZ, kOutPipeSize);
    for (int i = 0; i < 2; ++i)
      out_ev_[i] = new_event(base_.get(), i + 1, EV_WRITE, &ExecClient::on_out_writable_cb, this);
    if (ex_.stdin_) {
      stdin_pollable_ = pollable(0);
      // Non-pollable stdin (regular file, /dev/null) is always ready: we
      // activate the event by hand instead of waiting on it.
      stdin_ev_ = new_event(base_.get(), stdin_pollable_ ? 0 : -1, stdin_pollable_ ? EV_READ | EV_PERSIST : 0,
                            &ExecClient::on_stdin_cb, this);
      resume_stdin();
    }
    if (ex_.tty) {
      winch_ev_ = new_event(base_.get(), SIGWINCH, EV_SIGNAL | EV_PERSIST, &ExecClient::on_winch_cb, this);
      event_add(winch_ev_.get(), nullptr);
    }
  }

  void resume_stdin() {
    if (!stdin_ev_ || stdin_done_ || stdin_reading_) return;
    stdin_reading_ = true;
    if (stdin_pollable_)
      event_add(stdin_ev_.get(), nullptr);
    else
      event_active(stdin_ev_.get(), EV_READ, 0);
  }
  void pause_stdin() {
    if (!stdin_reading_) return;
    stdin_reading_ = false;
    if (stdin_pollable_) event_del(stdin_ev_.get());
  }

  static void on_stdin_cb(evutil_socket_t, short, void* self) { static_cast<ExecClient*>(self)->read_stdin(); }
  void read_stdin() {
    if (!stdin_reading_ || stdin_done_ || finishing_) return;
    char buf[kStdinChunk];
    ssize_t n = read(0, buf, sizeof buf);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) {
      // EOF (or a hung-up tty): tell the command; the stream stays open for RESIZE.
      pause_stdin();
      stdin_done_ = true;
      send_frame(proto::FrameType::StdinEof, {});
    } else {
      send_frame(proto::FrameType::Stdin, std::string_view(buf, static_cast<size_t>(n)));
      if (conn_->outbound(stream_) > kUploadHigh)
        pause_stdin();  // on_drain resumes
      else if (!stdin_pollable_)
        event_active(stdin_ev_.get(), EV_READ, 0);
    }
    pump();
  }

  void on_drain(int32_t stream) override {
    if (stream == stream_) resume_stdin();
  }

  static void on_winch_cb(evutil_socket_t, short, void* self) {
    auto* c = static_cast<ExecClient*>(self);
    WinSize ws = local_winsize();
    if (ws == c->size_ || c->finishing_) return;
    c->size_ = ws;
    c->send_frame(proto::FrameType::Resize, proto::resize_payload(ws.cols, ws.rows));
    c->pump();
  }

  void send_frame(proto::FrameType t, std::string_view payload) {
    std::string f;
    proto::append_frame(f, t, payload);
    if (stream_ < 0) {
      pending_ += f;
      return;
    }
    if (conn_ && !conn_->closed()) conn_->send(stream_, f.data(), f.size());
  }

  // Writes buffered output; returns the window for exactly what was written.
  void flush_outputs() {
    for (int i = 0; i < 2; ++i) {
      evbuffer* b = out_[i].get();
      while (size_t len = evbuffer_get_length(b)) {
        if (out_dead_[i]) {
          evbuffer_drain(b, len);
          consume(len);
          break;
        }
        int n = evbuffer_write_atmost(b, i + 1, -1);
        if (n > 0) {
          consume(static_cast<size_t>(n));
          continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
          event_add(out_ev_[i].get(), nullptr);
          break;
        }
        int e = n < 0 ? errno : EIO;
        if (i == 0) {
          // Like a local `cmd | head`: the reader is gone, so the command is
          // done for; the shell sees 128+SIGPIPE. Other errors are ours.
          if (e == EPIPE) return end_now(128 + SIGPIPE, "");
          return end_now(kOwnErrorExit, std::string("error: cannot write to stdout: ") + strerror(e));
        }
        out_dead_[i] = true;  // stderr gone: keep stdout and the exit code
      }
    }
  }
  static void on_out_writable_cb(evutil_socket_t, short, void* self) { static_cast<ExecClient*>(self)->pump(); }
  bool outputs_empty() const {
    return evbuffer_get_length(out_[0].get()) == 0 && evbuffer_get_length(out_[1].get()) == 0;
  }
  void consume(size_t n) {
    if (conn_ && stream_ > 0 && n) conn_->consume(stream_, n);
  }

  // ---- response ----
  void on_headers(int32_t stream, const proto::Headers& h, bool) override {
    if (stream != stream_) return;
    const std::string* st = proto::find_header(h, ":status");
    if (!st) return;
    int code = atoi(st->c_str());
    if (code >= 200 && http_status_ == 0) {
      http_status_ = code;
      if (code == 200 && pass_stdio_) {
        const std::string* how = proto::find_header(h, proto::kStdioHeader);
        // The command has our stdio: only STATUS follows. Else the usual frames.
        if (!how || *how != proto::kStdioClient) {
          pass_stdio_ = false;
          try {  // inside H2Conn's callback: nothing may throw out of it
            start_stdio();
          } catch (const std::exception& e) {
            finish(kOwnErrorExit, std::string("error: ") + e.what());
          }
        }
      }
    }
  }

  void on_data(int32_t stream, const uint8_t* data, size_t len) override {
    if (stream != stream_) return;
    on_body(std::string_view(reinterpret_cast<const char*>(data), len));
  }

  void on_body(std::string_view data) {
    if (http_status_ != 200) {
      if (error_body_.size() < kMaxErrorBody) error_body_.append(data.substr(0, kMaxErrorBody - error_body_.size()));
      consume(data.size());
      return;
    }
    size_t before = decoder_.buffered();
    size_t buffered_payload = 0;
    decoder_.decode(data, [&](proto::FrameType type, std::string_view payload) {
      if (got_status_) return false;  // nothing follows STATUS
      switch (type) {
        case proto::FrameType::Stdout:
        case proto::FrameType::Stderr: {
          int i = type == proto::FrameType::Stdout ? 0 : 1;
          if (cap_) {
            std::string& dst = i == 0 ? cap_->out : cap_->err;
            size_t room = cap_max_ - std::min(cap_max_, dst.size());
            if (payload.size() > room) (i == 0 ? cap_->out_truncated : cap_->err_truncated) = true;
            dst.append(payload.substr(0, std::min(room, payload.size())));
          } else if (!payload.empty() && !out_dead_[i]) {
            buffered_payload += write_output(i, payload);
          }
          break;
        }
        case proto::FrameType::Status:
          on_status(std::string(payload));
          break;
        default:
          finish(kOwnErrorExit, "error: shim sent an unexpected frame type " + std::to_string(static_cast<int>(type)));
      }
      return true;
    });
    if (!decoder_.error().empty()) finish(kOwnErrorExit, "error: bad frame from shim: " + decoder_.error());
    // Bytes fully parsed now, minus the payload that waits in our buffers.
    size_t parsed = data.size() + before - decoder_.buffered();
    consume(parsed - buffered_payload);
    if (buffered_payload) flush_outputs();  // plain writes: safe inside H2Conn's callback
  }

  // Output straight to our stdout/stderr while nothing waits before it (no
  // copy); what the fd does not take now is buffered. Returns the bytes
  // buffered. Errors are left to flush_outputs(), which retries and reports.
  size_t write_output(int i, std::string_view payload) {
    evbuffer* b = out_[i].get();
    if (evbuffer_get_length(b) == 0) {
      ssize_t n = ::write(i + 1, payload.data(), payload.size());
      if (n > 0) payload.remove_prefix(static_cast<size_t>(n));
    }
    evbuffer_add(b, payload.data(), payload.size());
    return payload.size();
  }

  void on_status(const std::string& payload) {
    nlohmann::json j = nlohmann::json::parse(payload, nullptr, false);
    auto code = j.is_object() ? j.find("exit_code") : j.end();
    if (!j.is_object() || code == j.end() || !code->is_number_integer() || code->get<int64_t>() < 0 ||
        code->get<int64_t>() > 255)
      return finish(kOwnErrorExit, "error: shim sent a malformed exit status: " + one_line(payload, 4096));
    got_status_ = true;
    status_code_ = static_cast<int>(code->get<int64_t>());
    std::string msg;
    if (auto e = j.find("error"); e != j.end() && e->is_string() && !e->get<std::string>().empty()) {
      status_error_ = one_line(e->get<std::string>(), 4096);
      msg = "error: " + status_error_;
    }
    // Killed by the shim for a session limit: a distinct exit code, so
    // scripts can tell it from the command's own status.
    if (auto k = j.find("killed"); k != j.end() && k->is_string()) {
      if (msg.empty()) msg = "error: session killed: " + one_line(k->get<std::string>(), 64) + " limit exceeded";
      return finish(kSessionKilledExit, msg);
    }
    finish(static_cast<int>(code->get<int64_t>()), msg);
  }

  void on_remote_end(int32_t stream) override {
    if (stream != stream_ || got_status_ || finishing_) return;
    if (http_status_ != 200) {
      nlohmann::json j = nlohmann::json::parse(error_body_, nullptr, false);
      std::string msg;
      if (j.is_object())
        if (auto e = j.find("error"); e != j.end() && e->is_string()) msg = e->get<std::string>();
      if (msg.empty()) msg = "shim answered HTTP " + std::to_string(http_status_);
      finish(kOwnErrorExit, "error: " + one_line(msg, 4096));
    } else {
      finish(kOwnErrorExit, "error: connection to shim lost (the stream ended without an exit status)");
    }
  }

  void on_stream_close(int32_t stream, uint32_t error_code) override {
    if (stream != stream_ && !submitting_) return;
    stream_closed_ = true;
    if (submitting_ && !finishing_)
      finish(kOwnErrorExit, "error: cannot send the exec request (" + std::string(nghttp2_http2_strerror(error_code)) +
                                "): its headers, with the command line, exceed " +
                                std::to_string(proto::H2Settings{}.max_header_list >> 10) + " KiB");
    if (!got_status_ && !finishing_)
      finish(kOwnErrorExit,
             "error: connection to shim lost (stream reset: " + std::string(nghttp2_http2_strerror(error_code)) + ")");
    // Done with this connection: GOAWAY, and on_closed once it is written.
    shutdown_pending_ = true;
  }

  void on_closed(const std::string& why) override {
    net_closed_ = true;
    if (!conn_ready_) {
      if (!mint_error_.empty()) return fail_now(mint_error_);
      if (!pin_error_.empty()) return fail_now(pin_error_);
      return fail_now("cannot connect to shim at " + grant_.address() + ": " + why);
    }
    if (!finishing_) finish(kOwnErrorExit, "error: connection to shim lost (" + why + ")");
    defer_pump();  // never tear down from inside H2Conn's own call stack
  }

  // ---- ending ----
  // Ends the exec with code/message once every byte of output is written.
  void finish(int code, std::string msg) {
    if (finishing_) return;
    finishing_ = true;
    exit_code_ = code;
    message_ = std::move(msg);
    pause_stdin();
    stdin_done_ = true;
    if (conn_ && stream_ > 0 && !stream_closed_ && !conn_->closed()) end_pending_ = true;
    timeval tv{0, kFinishGraceMs * 1000};
    event_add(grace_ev_.get(), &tv);
    defer_pump();
  }
  void grace_over() {
    grace_over_ = true;
    pump();
  }
  // Immediate end (setup failures, stdout errors): nothing more to drain.
  void fail_now(const std::string& msg) { end_now(kOwnErrorExit, "error: " + msg); }
  void end_now(int code, std::string msg) {
    finishing_ = true;
    exit_code_ = code;
    message_ = std::move(msg);
    event_base_loopbreak(base_.get());
  }

  // Callbacks from H2Conn run inside nghttp2; state changes that call back into
  // H2Conn wait for the next loop turn.
  void defer_pump() {
    timeval zero{0, 0};
    event_add(pump_ev_.get(), &zero);
  }

  void pump() {
    flush_outputs();
    if (!finishing_) return;
    if (conn_ && !conn_->closed()) {
      if (end_pending_) {
        end_pending_ = false;
        conn_->end(stream_);  // end the request body after STATUS (RESIZE could follow until then)
      }
      if (shutdown_pending_) {
        shutdown_pending_ = false;
        conn_->shutdown();
      }
    }
    if (!outputs_empty()) return;
    if (net_closed_ || !conn_ || conn_->closed() || grace_over_) event_base_loopbreak(base_.get());
  }

  Grant grant_;
  const ExecOptions& ex_;
  proto::SslCtx ctx_;
  Minter mint_;
  proto::Identity id_;  // made by mint_
  bool minted_ = false;
  std::string mint_error_;
  EventBasePtr base_;
  TunnelBridgePtr bridge_;  // proxy mode: the pump into the master's tunnel (before base_ goes)
  Fd sock_;
  EventPtr connect_ev_, mint_ev_, start_ev_, stdin_ev_, winch_ev_, grace_ev_, pump_ev_, timeout_ev_, cancel_ev_,
      out_ev_[2];
  std::unique_ptr<proto::H2Conn> conn_;
  EvBufferPtr out_[2];
  std::optional<LocalStdio> stdio_;
  proto::FrameDecoder decoder_;
  WinSize size_;
  std::string error_body_, message_, pin_error_, pending_, status_error_;
  CapturedExec* cap_ = nullptr;
  size_t cap_max_ = 0;
  int status_code_ = 0;  // STATUS exit_code (the command's, also when the shim killed it)
  int timeout_ms_ = 0, cancel_fd_ = -1;
  int32_t stream_ = -1;
  int http_status_ = 0;
  int exit_code_ = kOwnErrorExit;
  bool conn_ready_ = false, stdin_pollable_ = true, stdin_reading_ = false, stdin_done_ = false;
  bool got_status_ = false, stream_closed_ = false, finishing_ = false, grace_over_ = false, net_closed_ = false;
  bool end_pending_ = false, shutdown_pending_ = false;
  bool submitting_ = false;  // inside conn_->request(): its stream is ours before stream_ is set
  bool pass_stdio_ = false;  // our stdio fds went to the shim with the first bytes
  bool out_dead_[2] = {false, false};
};

}  // namespace

namespace {

int run(ExecClient& c) {
  signal(SIGPIPE, SIG_IGN);  // EPIPE is handled where it happens
  return c.run();
}

int print_and_return(int code, std::string msg) {
  if (!msg.empty()) {
    msg += "\n";
    (void)!write(2, msg.data(), msg.size());
  }
  return code;
}

}  // namespace

int run_exec(const Grant& grant, const ExecOptions& ex, const proto::Identity& client) {
  int code;
  std::string msg;
  {
    ExecClient c(grant, ex, client);
    code = run(c);
    msg = c.message();
  }  // terminal and fd flags restored here, before we print
  return print_and_return(code, std::move(msg));
}

int run_local_exec(const Invocation& inv) {
  LocalExec le = local_exec_target(inv.state_dir, inv.ns, inv.exec);
  if (inv.local_tls) le.grant.local_socket.clear();
  // The local socket has no TLS and no certificate to verify (the one use of
  // OpenSSL's legacy cipher and digest name tables, client.cc): the ticket's
  // Ed25519 key and signature are fetched by name without them. Filling them
  // was most of the ticket's first fetch, on the request's path (measured:
  // shimctl CPU 2.70 -> 2.04 ms, mint 1.75 -> 1.31 ms, medians of 100).
  if (!le.grant.local_socket.empty())
    OPENSSL_init_crypto(OPENSSL_INIT_NO_ADD_ALL_CIPHERS | OPENSSL_INIT_NO_ADD_ALL_DIGESTS, nullptr);
  int code;
  std::string msg;
  {
    ExecClient c(le.grant, inv.exec, [&](Grant& g, proto::Identity& id) {
      // A fresh key per run: the ticket binds it (cnf.jkt), TLS proves it.
      // The local socket has no TLS: no key (the ticket has no cnf).
      if (g.local_socket.empty()) id = proto::generate_identity("shimctl");
      mint_local_exec_ticket(le, inv.exec, id, static_cast<int64_t>(std::time(nullptr)), inv.ticket_lifetime_s);
      g.ticket = le.grant.ticket;
    });
    code = run(c);
    msg = c.message();
  }
  return print_and_return(code, std::move(msg));
}

CapturedExec run_captured_exec(LocalExec& le, const ExecOptions& ex, size_t max_output, int timeout_ms, int cancel_fd) {
  CapturedExec r;
  if (le.grant.local_socket.empty()) {
    r.error = "the shim has no local socket (a shim started by an older hook)";
    return r;
  }
  try {
    ExecClient c(le.grant, ex, [&](Grant& g, proto::Identity& id) {
      mint_local_exec_ticket(le, ex, id, static_cast<int64_t>(std::time(nullptr)));
      g.ticket = le.grant.ticket;
    });
    c.capture(&r, max_output, timeout_ms, cancel_fd);
    c.run();
    r.request_sent = c.request_sent();
    r.http_status = c.http_status();
    r.status_received = c.got_status();
    r.status_error = c.status_error();
    if (r.status_received)
      r.exit_code = c.status_code();
    else if (!r.timed_out && !r.cancelled)
      r.error = c.message().empty() ? "the exec ended without a status" : c.message();
  } catch (const std::exception& e) {
    r.error = e.what();
  }
  return r;
}

}  // namespace shimlet::client
