// The Kubernetes HTTP/1.1 front door (session/session_k8s.h): admit_k8s() checks
// one request head (routes the Kubernetes API and CRI streaming URL shapes,
// negotiates the streaming protocol, verifies the ticket against the query),
// run by the pre-authentication gate; the door then serves the admitted
// request: exec over WebSocket channels (v5/v4.channel.k8s.io) with the exec
// engine, or the byte stream handed to the SPDY side (session_spdy.h).
#include "session/session_k8s.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <http_parser.h>
#include <time.h>
#include <wslay/wslay.h>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/error.h"
#include "common/event.h"
#include "common/log.h"
#include "session/session_exec.h"
#include "session/session_http1.h"
#include "session/session_spdy.h"

namespace shimlet::session {
namespace {

using namespace http1;

constexpr int kKeepaliveIntervalS = 30;       // our PINGs; kubectl pings every 5 s
constexpr int kIdleLimitS = 90;               // nothing at all from the client for this long: gone
constexpr int kLingerMs = 2000;               // after our Close: wait this long for the peer's
constexpr size_t kOutLowWater = 256u << 10;   // write callback (resume output) below this
constexpr size_t kInBufferHigh = 256u << 10;  // bufferevent stops reading the socket above this
constexpr uint64_t kMaxWsMessage = 1u << 20;  // a client message (stdin chunk, SPDY bytes) larger: close 1009

class Http1Door : public Context, public FrontDoor, public ExecSink, public SpdyTransport {
 public:
  Http1Door(event_base* base, Config cfg, nsenter::Container ctr, int conn_fd, SSL* ssl, int report_fd)
      : Context(base, std::move(cfg), std::move(ctr), conn_fd, -1, report_fd) {
    if (ssl) {
      set_peer_cert(ssl);
      // The gate kept its idle connections' buffers small; this one is busy now.
      SSL_clear_mode(ssl, SSL_MODE_RELEASE_BUFFERS);
      bev_ = bufferevent_openssl_socket_new(base, conn_fd, ssl, BUFFEREVENT_SSL_OPEN, BEV_OPT_CLOSE_ON_FREE);
      if (!bev_) throw Error("bufferevent_openssl_socket_new failed");
      bufferevent_openssl_set_allow_dirty_shutdown(bev_, 1);
    } else {
      // The CRI listener (docs/design.md "CRI proxy"): plain HTTP on loopback.
      bev_ = bufferevent_socket_new(base, conn_fd, BEV_OPT_CLOSE_ON_FREE);
      if (!bev_) throw Error("bufferevent_socket_new failed");
    }
    bufferevent_setcb(bev_, on_read_cb, on_write_cb, on_event_cb, this);
    bufferevent_setwatermark(bev_, EV_READ, 0, kInBufferHigh);
    bufferevent_setwatermark(bev_, EV_WRITE, kOutLowWater, 0);
    bufferevent_enable(bev_, EV_READ | EV_WRITE);
    deadline_ = new_timer(base, on_deadline_cb, this);
    kick_ = new_event(base, -1, 0, on_kick_cb, this);
  }

  // The admitted request (docs/design.md "Pre-authentication gate"): its
  // ticket's jti was consumed by the gate; early: bytes after its head.
  void start(K8sAdmission a, std::string early, int64_t accepted_unix) {
    adopt(*a.claims, accepted_unix);
    if (!early.empty()) evbuffer_add(bufferevent_get_input(bev_), early.data(), early.size());
    try {
      handle(std::move(a));
    } catch (const std::exception& e) {
      log::error("request failed", {{"error", e.what()}});
      if (!sent_101_) return refuse(500, e.what());
      // After the 101: no HTTP status any more; end the stream with an error.
      if (engine_ && !engine_->done()) engine_->abort(std::string("internal error: ") + e.what());
      if (ws_)
        ws_close(WSLAY_CODE_INTERNAL_SERVER_ERROR, "internal error");
      else
        linger(std::string("internal error: ") + e.what());
    }
    if (mode_ != Mode::Closing && evbuffer_get_length(bufferevent_get_input(bev_)) > 0)
      event_active(kick_.get(), 0, 0);  // bytes that came with the request head
  }

  ~Http1Door() override {
    // Order: the handlers first (they kill processes and may still talk to
    // the transport), then the transport.
    engine_.reset();
    spdy_.reset();
    if (ws_) wslay_event_context_free(ws_);
    deadline_.reset();
    kick_.reset();
    keepalive_.reset();
    if (bev_) bufferevent_free(bev_);
  }

  // FrontDoor
  void terminate(const std::string& why) override { transport_gone(why); }
  void container_exited() override {
    log::info("container exited");
    if (spdy_) return spdy_->container_exited();
    // An exec ends by itself when its processes are gone; before a request
    // was served there is nothing left to serve.
    if (!engine_) end("container exited");
  }
  int exit_code() const override { return 0; }

  // ExecSink (WebSocket channels)
  void on_started(pid_t) override {}
  void on_output(int fd, const char* data, size_t len) override { send_channel(static_cast<uint8_t>(fd), data, len); }
  size_t out_queued() const override { return outbound(); }
  void on_stdin_consumed(size_t) override {
    if (input_paused_ && engine_ && engine_->stdin_queued() < ExecEngine::kStdinHighWater / 2) resume_input();
  }
  void on_exit(const ExecResult& r) override {
    if (!r.error.empty()) {
      // Shown to the user (kubectl prints stderr; with a tty everything is
      // stdout), on a stream the client asked for; the status has it too.
      std::string line = "shimlet: " + r.error + "\r\n";
      if (tty_ ? stdout_ : stderr_) send_channel(tty_ ? 1 : 2, line.data(), line.size());
    }
    std::string st = status_json(r).dump();
    send_channel(3, st.data(), st.size());
    ws_close(WSLAY_CODE_NORMAL_CLOSURE, "");
  }

  // SpdyTransport
  void send(const uint8_t* data, size_t len) override {
    if (ending_) return;
    if (!sent_101_) {
      pending_.append(reinterpret_cast<const char*>(data), len);
      return;
    }
    if (ws_) {
      wslay_event_msg m{WSLAY_BINARY_FRAME, data, len};
      wslay_event_queue_msg(ws_, &m);
      ws_flush();
    } else {
      evbuffer_add(bufferevent_get_output(bev_), data, len);
    }
  }
  size_t queued() const override { return outbound(); }
  void close() override {
    if (ws_)
      ws_close(WSLAY_CODE_NORMAL_CLOSURE, "");
    else
      linger("closed by the SPDY endpoint");
  }

 private:
  enum class Mode { Starting, WsExec, WsSpdy, RawSpdy, Closing };

  size_t outbound() const {
    size_t n = evbuffer_get_length(bufferevent_get_output(bev_));
    if (ws_) n += wslay_event_get_queued_msg_length(ws_);
    return n;
  }

  // ---------------------------------------------------------------- request

  static void on_read_cb(bufferevent*, void* arg) { static_cast<Http1Door*>(arg)->on_read(); }
  static void on_write_cb(bufferevent*, void* arg) { static_cast<Http1Door*>(arg)->on_write(); }
  static void on_event_cb(bufferevent*, short what, void* arg) { static_cast<Http1Door*>(arg)->on_event(what); }
  static void on_kick_cb(evutil_socket_t, short, void* arg) { static_cast<Http1Door*>(arg)->on_read(); }
  static void on_deadline_cb(evutil_socket_t, short, void* arg) {
    static_cast<Http1Door*>(arg)->end("closing timed out");  // linger over
  }

  void on_read() {
    if (ending_) return;
    last_rx_ = monotonic_ms();
    evbuffer* in = bufferevent_get_input(bev_);
    switch (mode_) {
      case Mode::Starting:
        return;  // not yet: start() kicks once the protocol is chosen
      case Mode::WsExec:
      case Mode::WsSpdy:
        if (input_paused_) return;
        if (int rv = wslay_event_recv(ws_); rv != 0)
          return transport_gone("WebSocket receive failed (wslay error " + std::to_string(rv) + ")");
        ws_flush();
        if (!ending_ && !wslay_event_want_read(ws_) && !wslay_event_want_write(ws_)) end("WebSocket closed");
        return;
      case Mode::RawSpdy:
        while (!ending_ && !input_paused_ && evbuffer_get_length(in) > 0) {
          char buf[16384];
          int n = evbuffer_remove(in, buf, sizeof buf);
          if (n <= 0) break;
          spdy_->on_bytes(reinterpret_cast<uint8_t*>(buf), static_cast<size_t>(n));
          if (spdy_->input_paused()) pause_input();
        }
        return;
      case Mode::Closing:
        if (ws_) {
          wslay_event_recv(ws_);  // the peer's Close (and pings) while we linger
          ws_flush();
          if (wslay_event_get_close_received(ws_) && outbound() == 0) end("WebSocket closed");
        } else {
          evbuffer_drain(in, evbuffer_get_length(in));
        }
        return;
    }
  }

  void on_write() {
    if (ending_) return;
    if (mode_ == Mode::Closing) {
      if (outbound() > 0) return;
      if (!ws_ || wslay_event_get_close_received(ws_)) end(close_reason_);
      return;
    }
    if (engine_) engine_->resume_output();
    if (spdy_ && !ending_) {
      spdy_->on_drain();
      if (input_paused_ && !spdy_->input_paused()) resume_input();
    }
  }

  void on_event(short what) {
    if (ending_) return;
    if (what & BEV_EVENT_EOF) return transport_gone("connection closed by the client");
    if (what & (BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT)) {
      int err = EVUTIL_SOCKET_ERROR();
      return transport_gone(err ? std::string("connection error: ") + evutil_socket_error_to_string(err)
                                : "connection error");
    }
  }

  void handle(K8sAdmission a) {
    const ticket::Claims& c = *a.claims;
    const Negotiation& n = a.negotiation;
    const std::string verb = a.verb == Verb::Exec ? "exec" : "portforward";
    const ExecSpec& spec = a.spec;
    log::set_context({{"container", cfg_.id},
                      {"session", sid_},
                      {"peer", peer_},
                      {"user", c.sub},
                      {"jti", c.jti},
                      {"path", a.path}});
    log::audit("k8s.request", {{"method", a.method},
                               {"path", a.path},
                               {"verb", verb},
                               {"transport", n.transport == Transport::WebSocket ? "websocket" : "spdy"},
                               {"protocol", n.protocol}});
    claims_ = c;

    bool spdy = n.transport == Transport::Spdy || n.protocol == "SPDY/3.1+portforward.k8s.io";
    if (spdy) {
      SpdyStart s;
      s.kind = a.verb == Verb::Exec ? SpdyKind::Exec : SpdyKind::PortForward;
      s.protocol = n.transport == Transport::Spdy ? n.protocol : "portforward.k8s.io";
      s.websocket_tunnel = n.transport == Transport::WebSocket;
      s.claims = c;
      s.exec = spec;
      s.resume_input = [this] {
        if (input_paused_ && spdy_ && !spdy_->input_paused()) resume_input();
      };
      if (s.websocket_tunnel) start_ws();  // pending bytes of start_spdy() become binary messages
      spdy_ = start_spdy(*this, *this, std::move(s));
      if (!spdy_) {
        if (ws_) {
          wslay_event_context_free(ws_);
          ws_ = nullptr;
        }
        return refuse(501, "SPDY streaming is not available in this shim");
      }
      write_101(n);
      mode_ = n.transport == Transport::WebSocket ? Mode::WsSpdy : Mode::RawSpdy;
      if (!pending_.empty()) {
        std::string p = std::move(pending_);
        send(reinterpret_cast<const uint8_t*>(p.data()), p.size());
      }
      if (spdy_->input_paused()) pause_input();
      return;
    }

    // WebSocket exec.
    v5_ = n.protocol == "v5.channel.k8s.io";
    stdin_ = spec.stdin_;
    tty_ = spec.tty;
    stdout_ = spec.stdout_;
    stderr_ = spec.stderr_;
    start_ws();
    write_101(n);
    mode_ = Mode::WsExec;
    engine_ = std::make_unique<ExecEngine>(*this, *this);
    engine_->start(spec, *claims_);
  }

  void write_101(const Negotiation& n) {
    std::string out = "HTTP/1.1 101 Switching Protocols\r\n";
    if (n.transport == Transport::WebSocket) {
      out += "Upgrade: websocket\r\nConnection: Upgrade\r\n";
      out += "Sec-WebSocket-Accept: " + ws_accept(n.ws_key) + "\r\n";
      out += "Sec-WebSocket-Protocol: " + n.protocol + "\r\n";
    } else {
      out += "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n";
      out += "X-Stream-Protocol-Version: " + n.protocol + "\r\n";
    }
    out += "\r\n";
    evbuffer_add(bufferevent_get_output(bev_), out.data(), out.size());
    sent_101_ = true;
    keepalive_ = new_event(base_, -1, EV_PERSIST, on_keepalive_cb, this);
    timeval tv{kKeepaliveIntervalS, 0};
    event_add(keepalive_.get(), &tv);
  }

  // An error before anything ran: one HTTP/1.1 response with a one-line body.
  void refuse(int status, const std::string& why) {
    log::audit("request.refused", {{"status", status}, {"reason", why}, {"stream", 0}});
    std::string out = k8s_refusal(status, why);
    evbuffer_add(bufferevent_get_output(bev_), out.data(), out.size());
    linger("refused: " + why);
  }

  // ---------------------------------------------------------------- WebSocket

  void start_ws() {
    wslay_event_callbacks cbs{};
    cbs.recv_callback = ws_recv_cb;
    cbs.send_callback = ws_send_cb;
    cbs.on_msg_recv_callback = ws_msg_cb;
    if (wslay_event_context_server_init(&ws_, &cbs, this) != 0) throw Error("wslay_event_context_server_init failed");
    wslay_event_config_set_max_recv_msg_length(ws_, kMaxWsMessage);
  }

  static ssize_t ws_recv_cb(wslay_event_context_ptr ctx, uint8_t* buf, size_t len, int, void* arg) {
    auto* self = static_cast<Http1Door*>(arg);
    evbuffer* in = bufferevent_get_input(self->bev_);
    // Paused (stdin backpressure): leave the bytes where they are.
    int n = self->input_paused_ ? 0 : evbuffer_remove(in, buf, len);
    if (n <= 0) {
      wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
      return -1;
    }
    return n;
  }

  static ssize_t ws_send_cb(wslay_event_context_ptr, const uint8_t* data, size_t len, int, void* arg) {
    auto* self = static_cast<Http1Door*>(arg);
    // Never blocks: bounded by the producers, which stop above the high-water mark.
    evbuffer_add(bufferevent_get_output(self->bev_), data, len);
    return static_cast<ssize_t>(len);
  }

  static void ws_msg_cb(wslay_event_context_ptr, const wslay_event_on_msg_recv_arg* m, void* arg) {
    static_cast<Http1Door*>(arg)->on_ws_message(*m);
  }

  void on_ws_message(const wslay_event_on_msg_recv_arg& m) {
    if (ending_) return;
    switch (m.opcode) {
      case WSLAY_BINARY_FRAME:
        if (mode_ == Mode::WsSpdy) {
          if (spdy_) spdy_->on_bytes(m.msg, m.msg_length);
          if (spdy_ && spdy_->input_paused()) pause_input();
          return;
        }
        if (mode_ == Mode::WsExec) return on_channel_message(m.msg, m.msg_length);
        return;
      case WSLAY_TEXT_FRAME:
        log::warn("text message from the client: the channel protocols are binary");
        if (engine_ && !engine_->done()) engine_->abort("protocol error: text message");
        if (spdy_) spdy_->on_transport_closed();
        ws_close(WSLAY_CODE_UNSUPPORTED_DATA, "text messages are not supported");
        return;
      case WSLAY_CONNECTION_CLOSE:
        // The client hung up: what still runs is killed (wslay answers the Close).
        if (engine_ && !engine_->done()) engine_->abort("WebSocket closed by client");
        if (spdy_ && mode_ != Mode::Closing) spdy_->on_transport_closed();
        close_reason_ = "WebSocket closed by client";
        mode_ = Mode::Closing;
        linger(close_reason_);
        return;
      default:
        return;  // ping (answered by wslay), pong
    }
  }

  void on_channel_message(const uint8_t* data, size_t len) {
    if (!engine_ || engine_->done()) return;
    ChannelMessage cm = decode_channel(data, len, v5_);
    switch (cm.kind) {
      case ChannelMessage::Kind::Stdin:
        if (!stdin_) return;  // not asked for: ignored, as the Kubernetes server does
        engine_->write_stdin(reinterpret_cast<const uint8_t*>(cm.data.data()), cm.data.size());
        if (engine_ && engine_->stdin_queued() > ExecEngine::kStdinHighWater) pause_input();
        return;
      case ChannelMessage::Kind::Resize:
        engine_->resize(cm.cols, cm.rows);
        return;
      case ChannelMessage::Kind::CloseStdin:
        engine_->close_stdin();
        return;
      case ChannelMessage::Kind::Bad:
        log::warn("bad channel message from the client (ignored)", {{"error", cm.why}});
        return;
      default:
        return;
    }
  }

  void send_channel(uint8_t ch, const char* data, size_t len) {
    if (!ws_ || ending_) return;
    std::string msg;
    msg.reserve(len + 1);
    msg += static_cast<char>(ch);
    msg.append(data, len);
    wslay_event_msg m{WSLAY_BINARY_FRAME, reinterpret_cast<const uint8_t*>(msg.data()), msg.size()};
    wslay_event_queue_msg(ws_, &m);  // copies the message
    ws_flush();
  }

  void ws_flush() {
    if (ws_ && wslay_event_want_write(ws_)) wslay_event_send(ws_);
  }

  void ws_close(uint16_t code, const std::string& reason) {
    if (!ws_) return linger(reason);
    wslay_event_queue_close(ws_, code, reinterpret_cast<const uint8_t*>(reason.data()), reason.size());
    ws_flush();
    close_reason_ = code == WSLAY_CODE_NORMAL_CLOSURE ? "exec finished" : reason;
    linger(close_reason_);
  }

  static void on_keepalive_cb(evutil_socket_t, short, void* arg) {
    auto* self = static_cast<Http1Door*>(arg);
    if (self->ending_) return;
    // A client gone without a FIN must not pin the session and its processes.
    if (monotonic_ms() - self->last_rx_ > kIdleLimitS * 1000)
      return self->transport_gone("client unresponsive for " + std::to_string(kIdleLimitS) + " s");
    if (self->ws_ && self->mode_ != Mode::Closing) {
      wslay_event_msg m{WSLAY_PING, nullptr, 0};
      wslay_event_queue_msg(self->ws_, &m);
      self->ws_flush();
    }
  }

  // ---------------------------------------------------------------- flow control, ending

  void pause_input() {
    if (input_paused_) return;
    input_paused_ = true;
    bufferevent_disable(bev_, EV_READ);
  }

  void resume_input() {
    if (!input_paused_) return;
    input_paused_ = false;
    bufferevent_enable(bev_, EV_READ);
    event_active(kick_.get(), 0, 0);  // bytes already buffered (from the loop, never re-entrantly)
  }

  // Our side is done: flush what is queued, wait (bounded) for the peer's
  // Close when WebSocket, then end.
  void linger(const std::string& why) {
    if (close_reason_.empty()) close_reason_ = why;
    mode_ = Mode::Closing;
    if (input_paused_) {
      input_paused_ = false;
      bufferevent_enable(bev_, EV_READ);
    }
    bufferevent_setwatermark(bev_, EV_WRITE, 0, 0);  // the write callback fires once all is written
    evtimer_del(deadline_.get());
    timeval tv{kLingerMs / 1000, (kLingerMs % 1000) * 1000};
    evtimer_add(deadline_.get(), &tv);
    if (outbound() == 0 && (!ws_ || wslay_event_get_close_received(ws_))) end(close_reason_);
  }

  // The client is gone: kill everything, send nothing more.
  void transport_gone(const std::string& why) {
    if (ending_) return;
    if (engine_ && !engine_->done()) engine_->abort(why);
    if (spdy_ && mode_ != Mode::Closing) spdy_->on_transport_closed();
    end(why);
  }

  void end(const std::string& why) {
    if (ending_) return;
    ending_ = true;
    log::info("connection closed", {{"reason", why}});
    event_base_loopexit(base_, nullptr);
  }

  static nlohmann::json status_json(const ExecResult& r) {
    if (r.exit_code == 0 && r.error.empty()) return {{"metadata", nlohmann::json::object()}, {"status", "Success"}};
    std::string msg = r.error.empty()
                          ? "command terminated with non-zero exit code: exit status " + std::to_string(r.exit_code)
                          : r.error;
    return {{"metadata", nlohmann::json::object()},
            {"status", "Failure"},
            {"message", msg},
            {"reason", "NonZeroExitCode"},
            {"details", {{"causes", {{{"reason", "ExitCode"}, {"message", std::to_string(r.exit_code)}}}}}}};
  }

  bufferevent* bev_ = nullptr;
  EventPtr deadline_, kick_, keepalive_;
  wslay_event_context_ptr ws_ = nullptr;
  Mode mode_ = Mode::Starting;
  std::optional<ticket::Claims> claims_;
  std::unique_ptr<ExecEngine> engine_;
  std::unique_ptr<SpdyEndpoint> spdy_;
  std::string pending_, close_reason_;
  bool v5_ = false, stdin_ = false, tty_ = false, stdout_ = true, stderr_ = true;
  bool sent_101_ = false, input_paused_ = false, ending_ = false;
  int64_t last_rx_ = monotonic_ms();  // the last bytes from the client
};

}  // namespace

std::unique_ptr<FrontDoor> make_http1_front_door(event_base* base, Config cfg, nsenter::Container ctr, int conn_fd,
                                                 SSL* ssl, K8sAdmission admission, std::string early,
                                                 int64_t accepted_unix, int report_fd) {
  auto door = std::make_unique<Http1Door>(base, std::move(cfg), std::move(ctr), conn_fd, ssl, report_fd);
  door->start(std::move(admission), std::move(early), accepted_unix);
  return door;
}

std::string k8s_refusal(int status, const std::string& why) {
  const char* phrase = http_status_str(static_cast<http_status>(status));
  std::string body = why + "\n";
  return "HTTP/1.1 " + std::to_string(status) + " " + phrase + "\r\n" + "Content-Type: text/plain; charset=utf-8\r\n" +
         "Content-Length: " + std::to_string(body.size()) + "\r\n" +
         "Cache-Control: no-cache, private\r\nConnection: close\r\n\r\n" + body;
}

K8sAdmission admit_k8s(const Request& r, const Config& cfg, const std::string& peer_jkt, bool cri_listener) {
  K8sAdmission a;
  a.method = r.method;
  a.path = loggable_path(r.path);
  auto refuse = [&a](int status, std::string why) {
    a.status = status;
    a.why = std::move(why);
    a.claims.reset();
    return a;
  };
  Route rt = route(r.path);
  if (rt.status) return refuse(rt.status, rt.why);
  // The CRI listener (plain HTTP) serves what shimlet-cri hands out, nothing else.
  if (cri_listener && rt.kube_api) return refuse(404, "only /exec/<ticket> and /portforward/<ticket> are served here");
  a.verb = rt.verb;
  a.negotiation = negotiate(r, rt.verb);
  if (a.negotiation.status) return refuse(a.negotiation.status, a.negotiation.why);
  const std::string verb = rt.verb == Verb::Exec ? "exec" : "portforward";

  std::string token = rt.token;
  if (rt.kube_api) {
    auto auth = r.header("authorization");
    if (!auth || auth->rfind("Bearer ", 0) != 0)
      return refuse(401, "missing ticket: send Authorization: Bearer <ticket>");
    token = auth->substr(7);
  }
  AuthResult v = verify_ticket(cfg, token, verb, peer_jkt);
  if (!v.claims) return refuse(v.status, v.why);
  a.claims = std::move(v.claims);
  const ticket::Claims& c = *a.claims;

  // This shim serves one container: a Kubernetes path naming another pod is
  // not ours (as the API server: 404). Checked after the ticket so an
  // unauthenticated caller learns nothing about the names. Names are
  // compared raw: valid Kubernetes names need no percent-encoding.
  if (rt.kube_api && !cfg.pod.empty() && (rt.ns != cfg.ns || rt.pod != cfg.pod))
    return refuse(404, "pods \"" + rt.pod + "\" not found in namespace " + rt.ns + " on this shim (it serves " +
                           cfg.ns + "/" + cfg.pod + ")");
  if (rt.verb != Verb::Exec) return a;
  ExecSpec& spec = a.spec;
  spec.argv = c.cmd;
  spec.stdin_ = c.stdin_;
  spec.tty = c.tty;
  spec.stderr_ = !c.tty;
  // No size until the client's first resize, as containerd/CRI-O (runc exec
  // without a console size): a command that reads it early sees 0 0, not ours.
  spec.cols = spec.rows = 0;
  if (!rt.kube_api) {
    // CRI shape: the ticket holds command/stdin/tty; shimlet-cri adds
    // stdout=false / stderr=false for streams the CRI Exec did not ask for
    // (not a claim: they only choose which output is shown).
    if (r.query.empty()) return a;
    auto q = parse_query(r.query);
    if (!q) return refuse(400, "malformed query string");
    for (auto& [k, v] : *q) {
      if (k != "stdout" && k != "stderr") continue;
      std::optional<bool> b = parse_bool(v);
      if (!b) return refuse(400, "query parameter " + k + " is not a boolean");
      (k == "stdout" ? spec.stdout_ : spec.stderr_) = *b && (k == "stdout" || !c.tty);
    }
    if (!spec.stdin_ && !spec.stdout_ && !spec.stderr_)
      return refuse(400, "you must specify at least 1 of stdin, stdout, stderr");
    return a;
  }
  // The query must ask for exactly what the ticket allows (command, stdin,
  // tty); stdout/stderr only choose which output is shown.
  auto q = parse_query(r.query);
  if (!q) return refuse(400, "malformed query string");
  std::vector<std::string> cmd;
  std::optional<std::string> container;
  bool want_stdin = false, want_tty = false, want_stdout = false, want_stderr = false;
  for (auto& [k, v] : *q) {
    if (k == "command") {
      cmd.push_back(v);
      continue;
    }
    if (k == "container") {
      container = v;
      continue;
    }
    if (k != "stdin" && k != "tty" && k != "stderr" && k != "stdout") continue;
    std::optional<bool> b = parse_bool(v);
    if (!b) return refuse(400, "query parameter " + k + " is not a boolean");
    if (k == "stdin") want_stdin = *b;
    if (k == "tty") want_tty = *b;
    if (k == "stdout") want_stdout = *b;
    if (k == "stderr") want_stderr = *b;
  }
  // As the API server for a container the pod does not have (400). An empty
  // container= means the pod's default: this one.
  if (container && !container->empty() && !cfg.container.empty() && *container != cfg.container && *container != cfg.id)
    return refuse(400, "container " + *container + " is not valid for pod " + rt.pod);
  // As the kubelet (remotecommand NewOptions): a tty has no stderr (merged
  // into stdout, the flag is dropped), and at least one stream.
  if (want_tty) want_stderr = false;
  if (!want_stdin && !want_stdout && !want_stderr)
    return refuse(400, "you must specify at least 1 of stdin, stdout, stderr");
  if (cmd.empty()) return refuse(400, "missing command (query parameter command)");
  if (cmd != c.cmd) return refuse(403, "ticket does not allow this command");
  if (want_stdin != c.stdin_ || want_tty != c.tty) return refuse(403, "ticket does not allow these stdin/tty flags");
  spec.stdout_ = want_stdout;
  spec.stderr_ = want_stderr;
  return a;
}

}  // namespace shimlet::session
