// Kubernetes streaming over SPDY/3.1 (docs/design.md "Kubernetes
// streaming"): exec (v4..v2.channel.k8s.io, channel.k8s.io) and port-forward
// (portforward.k8s.io, also inside the WebSocket tunnel), following what
// kubelet's streaming server does, as kubectl (client-go + spdystream)
// expects it:
//  * every client SYN_STREAM gets a SYN_REPLY at once (the client creates the
//    next stream only after the reply, waiting 30 s);
//  * exec: streams are told apart by the "streamtype" header; the command
//    starts once every expected stream exists; at the end stdout/stderr get
//    FIN after their output, then the status goes on the error stream (v4:
//    a metav1.Status JSON; older protocols: the error text, nothing on
//    success) with FIN; the client then resets/closes and hangs up;
//  * port-forward: per "requestid" an error and a data stream; the data
//    stream carries the bytes, a failure is text on the error stream (then
//    FIN on both) and never ends the session.
#include "session/session_spdy.h"

#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "common/error.h"
#include "common/event.h"
#include "common/log.h"
#include "proto/spdy.h"
#include "session/session_netns.h"

namespace shimlet::session {
namespace {

namespace spdy = proto::spdy;

constexpr size_t kOutHighWater = 1u << 20;   // transport queue above this: producers pause
constexpr size_t kSockHighWater = 1u << 20;  // client bytes not yet taken by a target socket: stop reading
constexpr size_t kReadChunk = 32u << 10;     // spdystream keeps each DATA frame whole in memory
constexpr int kStreamWaitS = 30;             // kubelet's default stream creation timeout
constexpr int kLingerS = 30;                 // after the exec's status: wait for the client to hang up
constexpr size_t kMaxResizeBuffer = 4096;
constexpr size_t kMaxRequestIdLength = 64;

// Common to both endpoints: the SPDY connection, the transport and teardown.
class SpdyBase : public SpdyEndpoint, public spdy::ServerConn::Handler {
 public:
  SpdyBase(Context& ctx, SpdyTransport& out, SpdyStart start)
      : ctx_(ctx), out_(out), start_(std::move(start)), conn_(*this, [this](const uint8_t* d, size_t n) {
          if (!closing_) out_.send(d, n);
        }) {}

  void on_bytes(const uint8_t* data, size_t len) override {
    if (closing_) return;
    conn_.feed(data, len);
    after_input();
  }

  void on_error(const std::string& why) override {
    log::warn("spdy protocol error: closing", {{"error", why}, {"protocol", start_.protocol}});
    log::audit("k8s.spdy.error", {{"error", why}});
    shutdown_all("protocol error: " + why);
    close_transport();
  }

 protected:
  virtual void after_input() {}
  // Stop every process / socket; the transport stays for the caller to close.
  virtual void shutdown_all(const std::string& why) = 0;

  void close_transport() {
    if (closing_) return;
    closing_ = true;
    out_.close();
  }

  Context& ctx_;
  SpdyTransport& out_;
  SpdyStart start_;
  spdy::ServerConn conn_;
  bool closing_ = false;  // we closed the transport, or it is gone: send nothing more
};

// ------------------------------------------------------------------ exec

class SpdyExec : public SpdyBase, public ExecSink {
 public:
  SpdyExec(Context& ctx, SpdyTransport& out, SpdyStart start) : SpdyBase(ctx, out, std::move(start)) {
    v4_ = start_.protocol == "v4.channel.k8s.io";
    bool resize_capable = v4_ || start_.protocol == "v3.channel.k8s.io";
    // What kubectl creates (client-go remotecommand): error, then stdin with
    // -i, stdout unless stdout=false, stderr without a tty, resize with a tty (v3+).
    expected_ = {"error"};
    if (start_.exec.stdout_) expected_.insert("stdout");
    if (start_.exec.stdin_) expected_.insert("stdin");
    if (start_.exec.stderr_ && !start_.exec.tty) expected_.insert("stderr");
    if (start_.exec.tty && resize_capable) expected_.insert("resize");
    wait_ = new_timer(ctx_.base(), on_timer, this);
    timeval tv{kStreamWaitS, 0};
    evtimer_add(wait_.get(), &tv);
  }

  ~SpdyExec() override {
    engine_.reset();  // kills whatever still runs
    wait_.reset();
  }

  // SpdyEndpoint
  void on_drain() override {
    if (engine_ && !exited_) engine_->resume_output();
  }
  void on_transport_closed() override {
    closing_ = true;
    shutdown_all("client disconnected");
  }
  void container_exited() override {}  // the command dies with the pid namespace; its exit is reported
  bool input_paused() const override {
    return engine_ && !exited_ && engine_->stdin_queued() >= ExecEngine::kStdinHighWater;
  }

  // ServerConn::Handler
  void on_syn_stream(uint32_t id, const spdy::Headers& h, bool fin) override {
    const std::string* t = spdy::find(h, "streamtype");
    std::string type = t ? *t : "";
    if (type != "error" && type != "stdin" && type != "stdout" && type != "stderr" && type != "resize") {
      log::warn("spdy exec: unknown stream type", {{"streamtype", type}, {"stream", id}});
      return conn_.reset(id, spdy::kProtocolError);
    }
    if (ids_.count(type)) {
      log::warn("spdy exec: duplicate stream", {{"streamtype", type}, {"stream", id}});
      return conn_.reset(id, spdy::kProtocolError);
    }
    ids_[type] = id;
    types_[id] = type;
    conn_.reply(id);
    if (fin) on_fin(id);
    maybe_start();
  }

  void on_data(uint32_t id, const uint8_t* data, size_t len) override {
    auto it = types_.find(id);
    if (it == types_.end()) return conn_.consumed(id, len);
    if (it->second == "stdin") {
      if (exited_) return conn_.consumed(id, len);
      if (!engine_) {
        // Before the command runs (kubectl sends stdin only after creating
        // every stream, but a client may be early): held, bounded.
        if (early_stdin_.size() + len > ExecEngine::kStdinHighWater)
          return fatal("too much stdin before the command started");
        early_stdin_.append(reinterpret_cast<const char*>(data), len);
        return;
      }
      engine_->write_stdin(data, len);
      return;
    }
    if (it->second == "resize") {
      resize_buf_.append(reinterpret_cast<const char*>(data), len);
      conn_.consumed(id, len);
      parse_resizes();
      return;
    }
    conn_.consumed(id, len);  // nothing is expected from the client on error/stdout/stderr
  }

  void on_fin(uint32_t id) override {
    auto it = types_.find(id);
    if (it == types_.end() || it->second != "stdin") return;
    stdin_closed_ = true;
    if (engine_ && !exited_) engine_->close_stdin();
  }

  void on_reset(uint32_t id, uint32_t) override {
    auto it = types_.find(id);
    if (it == types_.end()) return;
    // The client gave up a stream: output for it is dropped; stdin ends.
    if (it->second == "stdin") on_fin(id);
    ids_.erase(it->second);
    types_.erase(it);
    if (exited_) maybe_hang_up();
  }

  void on_goaway(uint32_t, uint32_t) override {
    if (exited_) maybe_hang_up();
  }

  // ExecSink
  void on_started(pid_t) override {}
  void on_output(int fd, const char* data, size_t len) override {
    auto it = ids_.find(fd == 2 ? "stderr" : "stdout");
    if (it == ids_.end() || closing_) return;
    conn_.data(it->second, data, len);
  }
  size_t out_queued() const override { return closing_ ? 0 : out_.queued(); }
  void on_stdin_consumed(size_t n) override {
    auto it = ids_.find("stdin");
    if (it != ids_.end() && !closing_) conn_.consumed(it->second, n);
    if (paused_ && engine_ && engine_->stdin_queued() < ExecEngine::kStdinHighWater / 2) {
      paused_ = false;
      if (start_.resume_input) start_.resume_input();
    }
  }
  void on_exit(const ExecResult& r) override {
    exited_ = true;
    if (closing_) return;
    if (!r.error.empty()) {
      // Shown to the user (kubectl prints stderr; with a tty everything is stdout).
      std::string line = "shimlet: " + r.error + "\r\n";
      on_output(start_.exec.tty ? 1 : 2, line.data(), line.size());
    }
    for (const char* t : {"stdout", "stderr", "stdin", "resize"}) {
      auto it = ids_.find(t);
      if (it != ids_.end()) conn_.fin(it->second);
    }
    if (auto it = ids_.find("error"); it != ids_.end()) {
      std::string st = status_text(r);
      if (!st.empty()) conn_.data(it->second, st.data(), st.size());
      conn_.fin(it->second);
    }
    // Like kubelet: the client hangs up once it has read everything; if it
    // does not, we do after kLingerS.
    timeval tv{kLingerS, 0};
    evtimer_add(wait_.get(), &tv);
    maybe_hang_up();
  }

 private:
  void after_input() override {
    if (engine_ && input_paused()) paused_ = true;
    if (exited_) maybe_hang_up();
  }

  void shutdown_all(const std::string& why) override {
    if (engine_ && !exited_) engine_->abort(why);
    exited_ = true;
  }

  void fatal(const std::string& why) {
    log::warn("spdy exec: " + why);
    shutdown_all(why);
    conn_.goaway(spdy::kGoAwayProtocolError);
    close_transport();
  }

  void maybe_hang_up() {
    if (closing_) return;
    if (conn_.open_streams() == 0 || conn_.peer_went_away()) close_transport();
  }

  static void on_timer(evutil_socket_t, short, void* arg) {
    auto* self = static_cast<SpdyExec*>(arg);
    if (self->closing_) return;
    if (self->exited_) {
      log::info("spdy exec: client did not hang up after the status: closing");
      return self->close_transport();
    }
    if (!self->engine_) {
      std::string missing;
      for (auto& t : self->expected_)
        if (!self->ids_.count(t)) missing += (missing.empty() ? "" : ",") + t;
      log::audit("exec.refused", {{"error", "streams not created in time"}, {"missing", missing}});
      self->fatal("streams not created within " + std::to_string(kStreamWaitS) + " s: " + missing);
    }
  }

  void maybe_start() {
    if (engine_ || exited_) return;
    for (auto& t : expected_)
      if (!ids_.count(t)) return;
    evtimer_del(wait_.get());
    engine_ = std::make_unique<ExecEngine>(ctx_, *this);
    try {
      engine_->start(start_.exec, start_.claims);
    } catch (const std::exception& e) {
      log::error("spdy exec: cannot start", {{"error", e.what()}});
      ExecResult r;
      r.exit_code = 126;
      r.error = std::string("internal error: ") + e.what();
      if (!exited_) on_exit(r);
      return;
    }
    if (exited_) return;  // could not start: on_exit() already ran
    if (!early_stdin_.empty()) {
      engine_->write_stdin(reinterpret_cast<const uint8_t*>(early_stdin_.data()), early_stdin_.size());
      early_stdin_.clear();
    }
    if (stdin_closed_) engine_->close_stdin();
    apply_pending_resize();
  }

  // kubectl writes one JSON object per resize: {"Width":W,"Height":H}.
  void parse_resizes() {
    for (;;) {
      size_t end = resize_buf_.find('}');
      if (end == std::string::npos) break;
      std::string obj = resize_buf_.substr(0, end + 1);
      resize_buf_.erase(0, end + 1);
      auto j = nlohmann::json::parse(obj, nullptr, false);
      if (j.is_discarded() || !j.is_object()) {
        log::warn("spdy exec: bad resize message ignored");
        continue;
      }
      auto dim = [&](const char* k) -> int {
        auto it = j.find(k);
        if (it == j.end() || !it->is_number_unsigned()) return -1;
        auto v = it->get<uint64_t>();
        return v > 0 && v <= 65535 ? static_cast<int>(v) : -1;
      };
      int w = dim("Width"), h = dim("Height");
      if (w < 0 || h < 0) continue;
      pending_resize_ = {static_cast<uint16_t>(w), static_cast<uint16_t>(h)};
      apply_pending_resize();
    }
    if (resize_buf_.size() > kMaxResizeBuffer) resize_buf_.clear();  // junk without a '}': dropped, bounded
  }

  void apply_pending_resize() {
    if (!pending_resize_) return;
    if (!engine_) {
      start_.exec.cols = pending_resize_->first;
      start_.exec.rows = pending_resize_->second;
    } else if (!exited_) {
      engine_->resize(pending_resize_->first, pending_resize_->second);
    }
    if (engine_) pending_resize_.reset();
  }

  std::string status_text(const ExecResult& r) const {
    bool ok = r.exit_code == 0 && r.error.empty();
    std::string msg = r.error.empty()
                          ? "command terminated with non-zero exit code: exit status " + std::to_string(r.exit_code)
                          : r.error;
    if (!v4_) return ok ? "" : msg;  // v1..v3: the error text only (kubectl exits 1 with it)
    if (ok) return nlohmann::json{{"metadata", nlohmann::json::object()}, {"status", "Success"}}.dump();
    return nlohmann::json{
        {"metadata", nlohmann::json::object()},
        {"status", "Failure"},
        {"message", msg},
        {"reason", "NonZeroExitCode"},
        {"details", {{"causes", {{{"reason", "ExitCode"}, {"message", std::to_string(r.exit_code)}}}}}}}
        .dump();
  }

  bool v4_ = false;
  std::set<std::string> expected_;
  std::map<std::string, uint32_t> ids_;  // streamtype -> stream id
  std::map<uint32_t, std::string> types_;
  std::unique_ptr<ExecEngine> engine_;
  EventPtr wait_;
  std::string early_stdin_, resize_buf_;
  std::optional<std::pair<uint16_t, uint16_t>> pending_resize_;
  bool exited_ = false, stdin_closed_ = false, paused_ = false;
};

// ----------------------------------------------------------- port-forward

class SpdyForward : public SpdyBase {
 public:
  SpdyForward(Context& ctx, SpdyTransport& out, SpdyStart start) : SpdyBase(ctx, out, std::move(start)) {}
  ~SpdyForward() override { pairs_.clear(); }

  // SpdyEndpoint
  void on_drain() override {
    // The transport took our backlog: read the target sockets again.
    for (auto& [rid, p] : pairs_) p->resume_read();
  }
  void on_transport_closed() override {
    closing_ = true;
    shutdown_all("client disconnected");
  }
  void container_exited() override {
    if (closing_) return;
    log::info("container exited: ending the port-forward session");
    for (auto& [rid, p] : pairs_) {
      if (p->error_id) conn_.reset(p->error_id, spdy::kCancel);
      if (p->data_id) conn_.reset(p->data_id, spdy::kCancel);
    }
    shutdown_all("container exited");
    conn_.goaway();
    close_transport();
  }
  bool input_paused() const override {
    for (auto& [rid, p] : pairs_)
      if (p->to_sock.size() > kSockHighWater) return true;
    return false;
  }

  // ServerConn::Handler
  void on_syn_stream(uint32_t id, const spdy::Headers& h, bool fin) override {
    const std::string* type = spdy::find(h, "streamtype");
    const std::string* port_s = spdy::find(h, "port");
    const std::string* rid = spdy::find(h, "requestid");
    std::string why;
    unsigned long port = 0;
    if (!type || (*type != "error" && *type != "data"))
      why = "stream type must be error or data";
    else if (!rid || rid->empty() || rid->size() > kMaxRequestIdLength)
      why = "missing or oversized requestid";
    else if (!port_s || port_s->empty() || port_s->size() > 5 ||
             port_s->find_first_not_of("0123456789") != std::string::npos || (port = std::stoul(*port_s)) == 0 ||
             port > 65535)
      why = "bad port";
    if (!why.empty()) {
      log::warn("spdy port-forward: stream refused", {{"stream", id}, {"error", why}});
      return conn_.reset(id, spdy::kProtocolError);
    }
    auto& slot = pairs_[*rid];
    if (!slot) slot = std::make_unique<Pair>(*this, *rid, static_cast<uint16_t>(port));
    Pair& p = *slot;
    uint32_t& mine = *type == "error" ? p.error_id : p.data_id;
    if (mine || p.port != port) {
      log::warn("spdy port-forward: duplicate or mismatched stream", {{"stream", id}, {"requestid", *rid}});
      conn_.reset(id, spdy::kProtocolError);
      if (!p.error_id && !p.data_id) pairs_.erase(*rid);
      return;
    }
    mine = id;
    streams_[id] = *rid;
    conn_.reply(id);
    if (fin) on_fin(id);
    if (p.error_id && p.data_id) {
      p.begin();
    } else {
      p.arm_wait();
    }
  }

  void on_data(uint32_t id, const uint8_t* data, size_t len) override {
    Pair* p = pair_of(id);
    if (!p || id != p->data_id) return conn_.consumed(id, len);  // nothing is read from the error stream
    p->from_client(data, len);
  }

  void on_fin(uint32_t id) override {
    Pair* p = pair_of(id);
    if (p && id == p->data_id) p->client_fin();
  }

  void on_reset(uint32_t id, uint32_t) override {
    Pair* p = pair_of(id);
    streams_.erase(id);
    if (!p) return;
    if (id == p->data_id) {
      p->data_id = 0;
      p->close("reset by the client");
    } else {
      p->error_id = 0;
    }
  }

 private:
  struct Pair {
    Pair(SpdyForward& f, std::string rid, uint16_t port) : f(f), rid(std::move(rid)), port(port) {}
    ~Pair() {
      ev_read.reset();
      ev_write.reset();
      ev_wait.reset();
      f.ctx_.add_bytes(static_cast<uint64_t>(bytes_in), static_cast<uint64_t>(bytes_out));  // session end record
    }

    void arm_wait() {
      if (!ev_wait) ev_wait = new_timer(f.ctx_.base(), on_wait, this);
      timeval tv{kStreamWaitS, 0};
      evtimer_add(ev_wait.get(), &tv);
    }
    static void on_wait(evutil_socket_t, short, void* arg) {
      auto* p = static_cast<Pair*>(arg);
      log::warn("spdy port-forward: the stream pair was not completed in time", {{"requestid", p->rid}});
      uint32_t lone = p->error_id ? p->error_id : p->data_id;
      p->f.conn_.reset(lone, spdy::kRefusedStream);
      p->f.forget(p->rid);  // destroys p
    }

    void begin() {
      if (ev_wait) evtimer_del(ev_wait.get());
      if (!f.port_allowed(port)) {
        return fail("port " + std::to_string(port) + " is not allowed by the ticket");
      }
      log::audit("portforward.open", {{"port", port}, {"requestid", rid}, {"transport", "spdy"}});
      opened = true;
      connector = std::make_unique<LoopbackConnector>(f.ctx_, port, [this](Fd s, const std::string& error) {
        auto keep = std::move(connector);  // destroyed when this callback returns
        // Not told on the error stream: kubectl (client-go since 1.23) ends
        // the whole port-forward session on any error text, and a port that
        // refuses now may listen a moment later. The client's connection
        // just closes (FIN, no data), the reason goes to our log and audit.
        if (!s)
          return fail("error forwarding port " + std::to_string(port) + " to pod " + f.ctx_.config().id + ": " + error,
                      false);
        sock = std::move(s);
        try {
          ev_read = new_event(f.ctx_.base(), sock.get(), EV_READ | EV_PERSIST, on_readable, this);
          ev_write = new_event(f.ctx_.base(), sock.get(), EV_WRITE, on_writable, this);
        } catch (const std::exception& e) {  // called from the loop: nothing throws into libevent
          return fail(e.what(), false);
        }
        event_add(ev_read.get(), nullptr);
        flush();
      });
      connector->start();
    }

    // A failure of this pair only: FIN on both, and the session goes on. With
    // tell_client the text goes on its error stream first (what kubelet does;
    // kubectl then ends the session, so only for refusals by policy).
    void fail(const std::string& why, bool tell_client = true) {
      log::audit("portforward.error", {{"port", port}, {"requestid", rid}, {"error", why}});
      if (error_id) {
        if (tell_client) f.conn_.data(error_id, why.data(), why.size());
        f.conn_.fin(error_id);
      }
      if (data_id) f.conn_.fin(data_id);
      f.forget(rid);  // destroys this
    }

    void from_client(const uint8_t* d, size_t n) {
      if (dead) return f.conn_.consumed(data_id, n);
      to_sock.append(reinterpret_cast<const char*>(d), n);
      owed += n;
      flush();
    }

    void client_fin() {
      client_eof = true;
      flush();
    }

    static void on_writable(evutil_socket_t, short, void* arg) {
      auto* p = static_cast<Pair*>(arg);
      SpdyForward& f = p->f;  // flush() may destroy p
      bool was_high = p->to_sock.size() > kSockHighWater;
      p->flush();
      // Input was paused for this socket: let the front door read again.
      if (was_high && !f.closing_ && !f.input_paused() && f.start_.resume_input) f.start_.resume_input();
    }

    void flush() {
      if (!sock) return;  // not connected yet: held (bounded by input_paused())
      while (!to_sock.empty() && !dead) {
        ssize_t n = ::send(sock.get(), to_sock.data(), to_sock.size(), MSG_NOSIGNAL);
        if (n > 0) {
          to_sock.erase(0, static_cast<size_t>(n));
          bytes_in += n;
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) {
          event_add(ev_write.get(), nullptr);
          break;
        }
        // The target closed or reset: end the pair (FIN both; never error
        // text here: kubectl 1.32 tears the whole session down on it).
        log::info("spdy port-forward: write to the target failed", {{"port", port}, {"error", strerror(errno)}});
        to_sock.clear();
        return target_done();
      }
      if (owed && to_sock.size() < kSockHighWater && data_id) {
        f.conn_.consumed(data_id, owed);
        owed = 0;
      }
      if (to_sock.empty() && client_eof && !shut_wr && !dead) {
        shut_wr = true;
        ::shutdown(sock.get(), SHUT_WR);  // carry the client's half-close
      }
    }

    static void on_readable(evutil_socket_t, short, void* arg) { static_cast<Pair*>(arg)->read_sock(); }

    void read_sock() {
      for (int rounds = 0; rounds < 16 && !dead; rounds++) {
        if (f.out_.queued() > kOutHighWater) {
          paused = true;
          event_del(ev_read.get());
          return;
        }
        char buf[kReadChunk];
        ssize_t n = ::recv(sock.get(), buf, sizeof buf, 0);
        if (n > 0) {
          f.conn_.data(data_id, buf, static_cast<size_t>(n));
          bytes_out += n;
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (n < 0)
          log::info("spdy port-forward: target connection error", {{"port", port}, {"error", strerror(errno)}});
        return target_done();
      }
    }

    void resume_read() {
      if (paused && ev_read && !dead) {
        paused = false;
        event_add(ev_read.get(), nullptr);
      }
    }

    // The target's side ended (EOF or error): FIN the data and error streams
    // (what kubectl expects), stop reading; client bytes still in flight are
    // dropped once the socket is gone.
    void target_done() {
      dead = true;
      if (ev_read) event_del(ev_read.get());
      if (data_id) f.conn_.fin(data_id);
      if (error_id) f.conn_.fin(error_id);
      if (owed && data_id) f.conn_.consumed(data_id, owed);
      owed = 0;
      to_sock.clear();
      close("closed by the target");
    }

    void close(const std::string& why) {
      if (opened)
        log::audit(
            "portforward.close",
            {{"port", port}, {"requestid", rid}, {"bytes_in", bytes_in}, {"bytes_out", bytes_out}, {"why", why}});
      opened = false;
      f.forget(rid);  // destroys this
    }

    SpdyForward& f;
    std::string rid;
    uint16_t port;
    uint32_t error_id = 0, data_id = 0;
    std::unique_ptr<LoopbackConnector> connector;
    Fd sock;
    EventPtr ev_read, ev_write, ev_wait;
    std::string to_sock;
    size_t owed = 0;
    bool client_eof = false, shut_wr = false, dead = false, paused = false, opened = false;
    int64_t bytes_in = 0, bytes_out = 0;
  };

  Pair* pair_of(uint32_t id) {
    auto it = streams_.find(id);
    if (it == streams_.end()) return nullptr;
    auto p = pairs_.find(it->second);
    return p == pairs_.end() ? nullptr : p->second.get();
  }

  // Drops a pair (its streams stay known to ServerConn until the client ends them).
  void forget(const std::string& rid) {
    auto it = pairs_.find(rid);
    if (it == pairs_.end()) return;
    streams_.erase(it->second->error_id);
    streams_.erase(it->second->data_id);
    // Destroyed at the end of this function: callers touch nothing after.
    auto doomed = std::move(it->second);
    pairs_.erase(it);
  }

  bool port_allowed(uint16_t port) const {
    for (auto& p : start_.claims.ports)
      if (p.proto == "tcp" && (p.port == 0 || p.port == port)) return true;  // 0: any TCP port (design.md)
    return false;
  }

  void shutdown_all(const std::string&) override {
    // Sockets and events go; audit lines for open pairs.
    while (!pairs_.empty()) pairs_.begin()->second->close("session ended");
  }

  std::map<std::string, std::unique_ptr<Pair>> pairs_;  // by requestid
  std::map<uint32_t, std::string> streams_;             // stream id -> requestid
};

}  // namespace

std::unique_ptr<SpdyEndpoint> start_spdy(Context& ctx, SpdyTransport& out, SpdyStart start) {
  if (start.kind == SpdyKind::PortForward) {
    if (start.protocol != "portforward.k8s.io") return nullptr;
    log::info("spdy port-forward session", {{"protocol", start.protocol}, {"websocket", start.websocket_tunnel}});
    return std::make_unique<SpdyForward>(ctx, out, std::move(start));
  }
  static const std::set<std::string> kExec = {"v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
                                              "channel.k8s.io"};
  if (!kExec.count(start.protocol)) return nullptr;
  log::info("spdy exec session", {{"protocol", start.protocol}});
  return std::make_unique<SpdyExec>(ctx, out, std::move(start));
}

}  // namespace shimlet::session
