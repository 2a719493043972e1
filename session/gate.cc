#include "session/gate.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <map>
#include <nlohmann/json.hpp>

#include "common/base64.h"
#include "common/clock.h"
#include "common/error.h"
#include "common/log.h"
#include "common/openssl.h"
#include "common/pidfd.h"
#include "proto/frames.h"
#include "proto/h2_first.h"
#include "proto/http1.h"
#include "proto/tls.h"
#include "session/preauth.h"
#include "session/session_http1.h"
#include "session/session_isolation.h"
#include "shim/gate_proto.h"

namespace shimlet::session {
namespace {

constexpr int kListenFd = 3, kCtlFd = 4, kPidFd = 5;
// What an unauthenticated connection costs this process, by state: the
// gate's Private_Dirty growth per connection with a thousand bare ones
// (0.56 kB), two hundred stalled after their ClientHello (10 kB) and two
// hundred silent after a TLS+h2 handshake (31 kB), OpenSSL 3.0, nghttp2 1.52
// (docs/performance.md "Pre-authentication flood"). The preauth_max_memory
// bound counts these plus the plaintext buffered.
constexpr size_t kCostBare = 512;              // our record, the table's nodes
constexpr size_t kCostHandshake = 12u << 10;   // the SSL object mid-handshake (buffers released between flights)
constexpr size_t kCostEstablished = 8u << 10;  // the SSL object after it, buffers released, the peer certificate
constexpr size_t kCostH2Reader = 22u << 10;    // an nghttp2 server session (its frame buffer, HPACK tables)
constexpr size_t kCostH1Reader = 1u << 10;     // the HTTP/1.1 head reader
constexpr size_t kReadChunk = 16u << 10;       // one TLS record of plaintext: nothing stays pending in OpenSSL
constexpr int64_t kLingerMs = 1000;            // after a refusal: time for the answer to leave, the peer's FIN
constexpr int64_t kWarmDelayMs = 250;          // the first zygote after the gate starts (off its first handshake)
constexpr int64_t kCountersEveryMs = 1000;     // 'T' reports to the shim, at most this often
constexpr int64_t kSummaryEveryMs = 10000;     // the refusal summary line, at most this often
// Individual refusal audit lines: a token bucket per kind (requests, then
// connection-level refusals: TLS, protocol, deadline, drops).
constexpr double kAuditPerSecond = 10, kAuditBurst = 50;
constexpr uint64_t kSignalKey = 1, kListenKey = 2, kCtlKey = 3, kContainerKey = 4, kCriListenKey = 5,
                   kFirstConnKey = 16;

struct Bucket {
  double tokens = kAuditBurst;
  int64_t at = 0;
  bool take(int64_t now) {
    tokens = std::min(kAuditBurst, tokens + (now - at) * kAuditPerSecond / 1000.0);
    at = now;
    if (tokens < 1) return false;
    tokens -= 1;
    return true;
  }
};

}  // namespace

Admitted::Admitted(Admitted&& o) noexcept
    : conn(std::move(o.conn)),
      ssl(std::exchange(o.ssl, nullptr)),
      h2(o.h2),
      early(std::move(o.early)),
      sent(std::move(o.sent)),
      token(std::move(o.token)),
      claims(std::move(o.claims)),
      k8s(std::move(o.k8s)),
      accepted_unix(o.accepted_unix) {}

Admitted::~Admitted() { SSL_free(ssl); }

struct Gate::Impl {
  struct Conn {
    enum class St { Fresh, Handshake, Request, Closing };
    uint64_t id = 0;
    int fd = -1;
    SSL* ssl = nullptr;
    St st = St::Fresh;
    bool h2 = false;
    bool plain = false;  // from the CRI listener: HTTP/1.1 without TLS, CRI shapes only
    std::string peer, jkt;
    int64_t accepted_unix = 0, linger_until = 0;
    uint32_t events = 0;
    std::string in;    // h2: every plaintext byte read; HTTP/1.1: what followed the head
    std::string sent;  // h2: the server preface, written after the handshake
    size_t fed = 0;    // plaintext bytes read in the request phase
    std::unique_ptr<proto::H2FirstRequest> h2r;
    std::unique_ptr<proto::http1::RequestReader> h1r;
    std::string out;  // the refusal, plaintext still to write
    size_t out_off = 0;
    bool out_done = false;
  };

  const Config& cfg;
  // The CRI listener's view of cfg: the node key ("local") is its only
  // trusted key (shimlet-cri mints with it; nobody else hands out its URLs).
  Config cri_cfg;
  const nsenter::Container& ctr;
  SSL_CTX* tls;
  GateOptions opt;
  PreauthTable table;
  std::map<uint64_t, std::unique_ptr<Conn>> conns;
  Fd ep, sigfd;
  uint64_t next_id = kFirstConnKey;
  gate::GateCounters counters, reported;
  int64_t counters_due = 0, summary_at = 0, summarized_at = 0, warm_due = 0, last_activity = 0, accept_resume = 0;
  gate::GateCounters summarized;
  uint64_t unlogged = 0;
  Bucket request_audits, conn_audits;
  bool listening = false;

  Impl(const Config& c, const nsenter::Container& t, SSL_CTX* ctx, GateOptions o)
      : cfg(c),
        cri_cfg(c),
        ctr(t),
        tls(ctx),
        opt(o),
        table({c.preauth_max_connections, c.preauth_max_per_source, c.preauth_max_memory, c.preauth_timeout_ms}) {
    std::erase_if(cri_cfg.keys, [](const ticket::TrustedKey& k) { return k.kid != "local"; });
  }

  ~Impl() {
    for (auto& [id, c] : conns) {
      SSL_free(c->ssl);
      if (c->fd >= 0) ::close(c->fd);
    }
  }

  // ---------------------------------------------------------------- setup

  void setup() {
    sigset_t set;
    sigemptyset(&set);
    for (int s : {SIGTERM, SIGINT}) sigaddset(&set, s);
    if (sigprocmask(SIG_BLOCK, &set, nullptr) < 0) throw sys_error("sigprocmask");
    sigfd = Fd(signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
    if (!sigfd) throw sys_error("signalfd");
    ep = Fd(epoll_create1(EPOLL_CLOEXEC));
    if (!ep) throw sys_error("epoll_create1");
    add(sigfd.get(), kSignalKey, EPOLLIN);
    add(kCtlFd, kCtlKey, EPOLLIN);
    add(kPidFd, kContainerKey, EPOLLIN);
    set_nonblocking(kListenFd);
    if (opt.cri_fd >= 0) set_nonblocking(opt.cri_fd);
    listen_on(true);
    // Every held connection is an fd: the table's bound must fit the limit.
    rlimit rl{};
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        rl.rlim_cur < 64 + cfg.preauth_max_connections)
      log::warn("RLIMIT_NOFILE is below preauth_max_connections: accept fails earlier (EMFILE drops the idlest)",
                {{"nofile", rl.rlim_cur}, {"preauth_max_connections", cfg.preauth_max_connections}});
    last_activity = summary_at = summarized_at = monotonic_ms();
    log::set_context({{"container", cfg.id}});
    if (opt.warm) warm_due = last_activity + kWarmDelayMs;
    log::info("gate started", {{"preauth_timeout_ms", cfg.preauth_timeout_ms},
                               {"preauth_max_connections", cfg.preauth_max_connections},
                               {"preauth_max_per_source", cfg.preauth_max_per_source},
                               {"preauth_max_memory", cfg.preauth_max_memory}});
  }

  void add(int fd, uint64_t key, uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = key;
    if (epoll_ctl(ep.get(), EPOLL_CTL_ADD, fd, &ev) < 0) throw sys_error("epoll_ctl ADD");
  }

  void listen_on(bool on) {
    if (on == listening) return;
    for (auto [fd, key] : {std::pair{kListenFd, kListenKey}, std::pair{opt.cri_fd, kCriListenKey}}) {
      if (fd < 0) continue;
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = key;
      epoll_ctl(ep.get(), on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, fd, &ev);
    }
    listening = on;
  }

  void want(Conn& c, uint32_t events) {
    if (c.events == events) return;
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = c.id;
    epoll_ctl(ep.get(), EPOLL_CTL_MOD, c.fd, &ev);
    c.events = events;
  }

  // ---------------------------------------------------------------- logging

  void set_log_context(const Conn& c, const std::string& path = "") {
    nlohmann::json ctx = {{"container", cfg.id}, {"peer", c.peer}};
    if (!path.empty()) ctx["path"] = path;
    log::set_context(ctx);
  }

  // The audit line of a refusal, unless its kind's bucket is empty (then
  // counted for the summary).
  void audit_refusal(const Conn& c, int status, const std::string& why, bool request, int32_t stream = 0,
                     const std::string& path = "") {
    if (!(request ? request_audits : conn_audits).take(monotonic_ms())) {
      unlogged++;
      return;
    }
    set_log_context(c, path);
    log::audit("request.refused", {{"status", status}, {"reason", why}, {"stream", stream}});
    log::set_context({{"container", cfg.id}});
  }

  // At most every kSummaryEveryMs, when anything was refused since the last
  // summary: what happened to unauthenticated connections, in counts.
  void maybe_summarize(int64_t now, bool force) {
    if (!force && now - summary_at < kSummaryEveryMs) return;
    summary_at = now;
    const auto* a = reinterpret_cast<const uint64_t*>(&counters);
    const auto* b = reinterpret_cast<const uint64_t*>(&summarized);
    nlohmann::json refused = nlohmann::json::object();
    for (size_t i = 0; i < gate::kNumCounters; i++) {
      std::string name = gate::kCounterNames[i];
      if (name == "open" || name == "open_peak" || name == "accepted" || name == "admitted" || name == "cri_accepted")
        continue;
      if (a[i] != b[i]) refused[name] = a[i] - b[i];
    }
    if (refused.empty()) return;
    log::warn("unauthenticated connections refused", {{"since_s", (now - summarized_at) / 1000},
                                                      {"refused", refused},
                                                      {"not_logged_individually", unlogged},
                                                      {"accepted", counters.accepted - summarized.accepted},
                                                      {"open", counters.open},
                                                      {"open_peak", counters.open_peak}});
    summarized = counters;
    summarized_at = now;
    unlogged = 0;
  }

  // ---------------------------------------------------------------- counters

  void count_open() {
    counters.open = table.size();
    counters.open_peak = std::max(counters.open_peak, counters.open);
  }

  void report_counters(int64_t now, bool force) {
    if (!force && (now < counters_due || memcmp(&counters, &reported, sizeof counters) == 0)) return;
    char msg[1 + sizeof counters];
    msg[0] = gate::kCounters;
    memcpy(msg + 1, &counters, sizeof counters);
    (void)::send(kCtlFd, msg, sizeof msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    reported = counters;
    counters_due = now + kCountersEveryMs;
  }

  // ---------------------------------------------------------------- connections

  // From the TLS port, or (plain) the CRI listener.
  void accept_some(int64_t now, bool plain) {
    for (int i = 0; i < 64; i++) {
      sockaddr_storage ss{};
      socklen_t len = sizeof ss;
      int fd = ::accept4(plain ? opt.cri_fd : kListenFd, reinterpret_cast<sockaddr*>(&ss), &len,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        int err = errno;  // kept (common/error.h): what runs below may change errno
        if (err == EAGAIN || err == EINTR || err == ECONNABORTED) return;
        if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
          // Out of fds: the idlest connection gives its fd up; with none to
          // give, stop accepting for a moment (level-triggered epoll would spin).
          if (auto victim = table.idlest()) {
            drop(*victim, "no file descriptors left (RLIMIT_NOFILE): the idlest dropped", &counters.dropped_total);
            continue;
          }
          log::error("accept failed, pausing", {{"error", strerror(err)}});
          listen_on(false);
          accept_resume = now + 100;
          return;
        }
        log::error("accept failed", {{"error", strerror(err)}});
        return;
      }
      counters.accepted++;
      if (plain) counters.cri_accepted++;
      last_activity = now;
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // latency only: never a reason to refuse
      auto c = std::make_unique<Conn>();
      c->id = next_id++;
      c->fd = fd;
      c->plain = plain;
      c->peer = peer_of(fd);
      c->accepted_unix = time(nullptr);
      std::string source;
      if (ss.ss_family == AF_INET)
        source = PreauthTable::source_key(
            AF_INET, reinterpret_cast<const uint8_t*>(&reinterpret_cast<sockaddr_in*>(&ss)->sin_addr));
      else if (ss.ss_family == AF_INET6)
        source = PreauthTable::source_key(
            AF_INET6, reinterpret_cast<const uint8_t*>(&reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr));
      uint64_t id = c->id;
      c->events = EPOLLIN;
      add(fd, id, EPOLLIN);
      conns[id] = std::move(c);
      drop_all(table.add(id, source, now, kCostBare));
      count_open();
    }
  }

  void drop_all(const std::vector<PreauthTable::Victim>& victims) {
    for (const auto& v : victims) {
      switch (v.why) {
        case PreauthTable::Why::Total:
          drop(v.id,
               "too many unauthenticated connections (preauth_max_connections " +
                   std::to_string(cfg.preauth_max_connections) + "): the idlest dropped",
               &counters.dropped_total);
          break;
        case PreauthTable::Why::PerSource:
          drop(v.id,
               "too many unauthenticated connections from this address (preauth_max_per_source " +
                   std::to_string(cfg.preauth_max_per_source) + "): the idlest dropped",
               &counters.dropped_per_source);
          break;
        case PreauthTable::Why::Memory:
          drop(v.id,
               "unauthenticated connections use too much memory (preauth_max_memory " +
                   std::to_string(cfg.preauth_max_memory) + "): the idlest dropped",
               &counters.dropped_memory);
          break;
      }
    }
  }

  // Closes a connection without a word (dropped, timed out, gone), counted
  // and audited (rate limited).
  void drop(uint64_t id, const std::string& why, uint64_t* counter) {
    auto it = conns.find(id);
    if (it == conns.end()) return;
    (*counter)++;
    audit_refusal(*it->second, 0, why, false);
    close_conn(id);
  }

  void close_conn(uint64_t id) {
    auto it = conns.find(id);
    if (it == conns.end()) return;
    Conn& c = *it->second;
    epoll_ctl(ep.get(), EPOLL_CTL_DEL, c.fd, nullptr);
    ::close(c.fd);
    SSL_free(c.ssl);
    conns.erase(it);
    table.remove(id);
    count_open();
  }

  // Accounts c at what it costs now; the memory bound may drop others, never c.
  void set_cost(Conn& c) {
    size_t cost = kCostBare;
    if (c.st == Conn::St::Handshake) cost += kCostHandshake;
    if (c.st == Conn::St::Request || c.st == Conn::St::Closing) cost += kCostEstablished;
    if (c.h2r) cost += kCostH2Reader;
    if (c.h1r) cost += kCostH1Reader + c.fed;  // the head reader holds what it parsed
    cost += c.in.capacity() + c.out.capacity();
    drop_all(table.set_cost(c.id, cost));
  }

  // A refusal with an answer: written (bounded by kLingerMs), then closed.
  void answer(Conn& c, std::string out) {
    c.st = Conn::St::Closing;
    c.out = std::move(out);
    c.out_off = 0;
    c.in.clear();
    c.in.shrink_to_fit();
    c.h2r.reset();
    c.h1r.reset();
    c.linger_until = monotonic_ms() + kLingerMs;
    set_cost(c);
    flush(c);
  }

  // ---------------------------------------------------------------- the state machine

  // One readiness event. Returns the connection to admit, if its ticket was
  // accepted (the caller asks the shim and forks).
  std::optional<std::pair<uint64_t, AuthResult>> on_io(Conn& c, uint32_t events, int64_t now) {
    if (c.st == Conn::St::Closing) {
      uint64_t id = c.id;  // discard_input() may close (and free) c
      if (events & EPOLLIN) discard_input(c);
      if (conns.count(id)) flush(c);
      return std::nullopt;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
      table.progress(c.id, now);
      last_activity = now;
    }
    if (c.st == Conn::St::Fresh && c.plain) {
      // The CRI listener: no TLS, straight to the request head.
      c.st = Conn::St::Request;
      c.h1r = std::make_unique<proto::http1::RequestReader>(http1::kDoorLimits);
      set_cost(c);
      return read_request(c);
    }
    if (c.st == Conn::St::Fresh) {
      c.ssl = SSL_new(tls);
      if (!c.ssl) {
        drop(c.id, "SSL_new: " + openssl_error(), &counters.refused_protocol);
        return std::nullopt;
      }
      SSL_set_fd(c.ssl, c.fd);
      SSL_set_accept_state(c.ssl);
      SSL_set_mode(c.ssl, SSL_MODE_RELEASE_BUFFERS);
      c.st = Conn::St::Handshake;
      set_cost(c);
    }
    if (c.st == Conn::St::Handshake) {
      ERR_clear_error();
      errno = 0;
      int r = SSL_do_handshake(c.ssl);
      if (r != 1) {
        int e = SSL_get_error(c.ssl, r);
        if (e == SSL_ERROR_WANT_READ) return want(c, EPOLLIN), std::nullopt;
        if (e == SSL_ERROR_WANT_WRITE) return want(c, EPOLLIN | EPOLLOUT), std::nullopt;
        // The peer hung up: a bare EOF, or OpenSSL 3's "unexpected eof while
        // reading" (an SSL error unless SSL_OP_IGNORE_UNEXPECTED_EOF).
        bool eof = (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) ||
                   (e == SSL_ERROR_SSL && ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING);
        std::string why =
            eof ? std::string("TLS handshake failed: connection error: ") + (errno ? strerror(errno) : "unexpected EOF")
                : "TLS handshake failed: TLS error: " + openssl_error();
        drop(c.id, why, eof ? &counters.peer_closed : &counters.refused_protocol);
        return std::nullopt;
      }
      if (X509* cert = SSL_get0_peer_certificate(c.ssl)) c.jkt = proto::jkt_of_cert(cert);
      const unsigned char* alpn = nullptr;
      unsigned alpn_len = 0;
      SSL_get0_alpn_selected(c.ssl, &alpn, &alpn_len);
      c.h2 = alpn_len == 2 && memcmp(alpn, "h2", 2) == 0;
      c.st = Conn::St::Request;
      if (c.h2) {
        c.h2r = std::make_unique<proto::H2FirstRequest>();
        // A client may wait for our SETTINGS before its request (RFC 9113
        // 3.4): they go now (one small record; the socket buffer is empty).
        c.sent = c.h2r->server_preface();
        ERR_clear_error();
        if (SSL_write(c.ssl, c.sent.data(), static_cast<int>(c.sent.size())) != static_cast<int>(c.sent.size())) {
          drop(c.id, "TLS error: cannot write the server preface", &counters.refused_protocol);
          return std::nullopt;
        }
      } else {
        c.h1r = std::make_unique<proto::http1::RequestReader>(http1::kDoorLimits);
      }
      want(c, EPOLLIN);
      set_cost(c);
    }
    return read_request(c);
  }

  std::optional<std::pair<uint64_t, AuthResult>> read_request(Conn& c) {
    char buf[kReadChunk];
    for (;;) {
      ERR_clear_error();
      errno = 0;
      int r;
      if (c.plain) {
        ssize_t got = ::read(c.fd, buf, sizeof buf);
        if (got < 0 && (errno == EAGAIN || errno == EINTR)) return want(c, EPOLLIN), std::nullopt;
        if (got <= 0) {
          if (got == 0 || errno == ECONNRESET)
            drop(c.id, "connection closed by the client", &counters.peer_closed);
          else
            drop(c.id, std::string("connection error: ") + strerror(errno), &counters.refused_protocol);
          return std::nullopt;
        }
        r = static_cast<int>(got);
      } else {
        r = SSL_read(c.ssl, buf, sizeof buf);
      }
      if (r <= 0) {
        int e = SSL_get_error(c.ssl, r);
        if (e == SSL_ERROR_WANT_READ) return want(c, EPOLLIN), std::nullopt;
        if (e == SSL_ERROR_WANT_WRITE) return want(c, EPOLLIN | EPOLLOUT), std::nullopt;
        bool eof = e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0);
        if (eof) {
          drop(c.id, "connection closed by the client", &counters.peer_closed);
        } else {
          drop(c.id, "TLS error: " + openssl_error(), &counters.refused_protocol);
        }
        return std::nullopt;
      }
      size_t n = static_cast<size_t>(r);
      c.fed += n;
      if (c.h2) {
        c.in.append(buf, n);
        auto st = c.h2r->feed(reinterpret_cast<const uint8_t*>(buf), n);
        if (st == proto::H2FirstRequest::State::Error) {
          counters.refused_protocol++;
          audit_refusal(c, 0, c.h2r->error(), false);
          answer(c, c.h2r->goaway());
          return std::nullopt;
        }
        if (st == proto::H2FirstRequest::State::Request) return check_h2(c);
      } else {
        auto st = c.h1r->feed(buf, n);
        if (st == proto::http1::RequestReader::State::Error) {
          refuse_k8s(c, c.h1r->error_status(), c.h1r->error(), "");
          return std::nullopt;
        }
        if (st == proto::http1::RequestReader::State::Done) {
          c.in.assign(buf + c.h1r->consumed(), n - c.h1r->consumed());  // the upgraded protocol's first bytes
          return check_k8s(c);
        }
      }
      set_cost(c);
    }
  }

  // The door's usual answer to a refused request, counted (refused_request
  // unless said otherwise) and audited (rate limited).
  void refuse_h2(Conn& c, int status, const std::string& why, const std::string& path, uint64_t* counter = nullptr) {
    (*(counter ? counter : &counters.refused_request))++;
    audit_refusal(c, status, why, true, c.h2r->stream(), path);
    answer(c, c.h2r->refuse(status, "application/json", nlohmann::json{{"error", why}}.dump() + "\n"));
  }

  void refuse_k8s(Conn& c, int status, const std::string& why, const std::string& path, uint64_t* counter = nullptr) {
    (*(counter ? counter : &counters.refused_request))++;
    audit_refusal(c, status, why, true, 0, path);
    answer(c, k8s_refusal(status, why));
  }

  // The native door's checks of the first request, in Session::on_headers'
  // order up to the ticket's verification (docs/design.md "Native protocol").
  std::optional<std::pair<uint64_t, AuthResult>> check_h2(Conn& c) {
    const proto::Headers& h = c.h2r->headers();
    const std::string* method = proto::find_header(h, ":method");
    const std::string* path = proto::find_header(h, ":path");
    if (!method || !path) return refuse_h2(c, 400, "request without :method or :path", ""), std::nullopt;
    std::string verb;
    if (*path == proto::kExecPath) {
      if (*method != "POST") return refuse_h2(c, 405, "exec needs POST", *path), std::nullopt;
      verb = "exec";
    } else if (*path == proto::kPortForwardOpenPath || path->rfind(proto::kPortForwardPrefix, 0) == 0) {
      if (*method != "POST") return refuse_h2(c, 405, "port-forward needs POST", *path), std::nullopt;
      verb = "portforward";
    } else {
      return refuse_h2(c, 404, "no such endpoint: " + path->substr(0, 512), ""), std::nullopt;
    }
    const std::string* auth = proto::find_header(h, "authorization");
    if (!auth || auth->rfind("Bearer ", 0) != 0)
      return refuse_h2(c, 401, "missing ticket: send authorization: Bearer <ticket>", *path), std::nullopt;
    AuthResult r = verify_ticket(cfg, auth->substr(7), verb, c.jkt);
    if (!r.claims) return refuse_h2(c, r.status, r.why, *path), std::nullopt;
    return std::make_pair(c.id, std::move(r));
  }

  std::optional<std::pair<uint64_t, AuthResult>> check_k8s(Conn& c) {
    K8sAdmission a = c.plain ? admit_k8s(c.h1r->request(), cri_cfg, "", /*cri_listener=*/true)
                             : admit_k8s(c.h1r->request(), cfg, c.jkt);
    if (a.status) return refuse_k8s(c, a.status, a.why, a.path), std::nullopt;
    pending_k8s = std::move(a);
    AuthResult r;
    r.claims = *pending_k8s->claims;
    return std::make_pair(c.id, std::move(r));
  }
  std::optional<K8sAdmission> pending_k8s;

  void discard_input(Conn& c) {
    char buf[4096];
    for (;;) {
      ssize_t n = ::read(c.fd, buf, sizeof buf);
      if (n > 0) continue;
      if (n == 0) {  // the peer took our answer and closed: done
        if (c.out_done) close_conn(c.id);
        return;
      }
      if (errno != EAGAIN && errno != EINTR) close_conn(c.id);
      return;
    }
  }

  // Writes the answer; then a half-close, and the connection lingers for the
  // peer's FIN (closing with unread input would reset it and could lose the
  // answer), at most until linger_until.
  void flush(Conn& c) {
    while (c.out_off < c.out.size()) {
      ssize_t n;
      if (c.ssl) {
        ERR_clear_error();
        int r = SSL_write(c.ssl, c.out.data() + c.out_off, static_cast<int>(c.out.size() - c.out_off));
        if (r <= 0) {
          int e = SSL_get_error(c.ssl, r);
          if (e == SSL_ERROR_WANT_WRITE) return want(c, EPOLLIN | EPOLLOUT);
          if (e == SSL_ERROR_WANT_READ) return want(c, EPOLLIN);
          return close_conn(c.id);
        }
        n = r;
      } else {
        n = ::send(c.fd, c.out.data() + c.out_off, c.out.size() - c.out_off, MSG_NOSIGNAL);
        if (n < 0) {
          if (errno == EAGAIN) return want(c, EPOLLIN | EPOLLOUT);
          return close_conn(c.id);
        }
      }
      c.out_off += static_cast<size_t>(n);
    }
    if (!c.out_done) {
      c.out_done = true;
      ::shutdown(c.fd, SHUT_WR);
      want(c, EPOLLIN);
    }
  }

  // ---------------------------------------------------------------- admission

  // Asks the shim to consume the ticket's jti and reserve a session; on
  // 'A', forks. Returns the admitted connection in the parent (which is then
  // its session); nullopt in the gate.
  std::optional<Admitted> admit(uint64_t id, AuthResult r) {
    Conn& c = *conns.at(id);
    const ticket::Claims& cl = *r.claims;
    std::string path = c.h2 ? std::string(*proto::find_header(c.h2r->headers(), ":path")) : pending_k8s->path;
    auto refuse = [&](int status, const std::string& why, uint64_t* counter = nullptr) {
      if (c.h2)
        refuse_h2(c, status, why, path, counter);
      else
        refuse_k8s(c, status, why, path, counter);
      pending_k8s.reset();
      return std::nullopt;
    };
    char msg[gate::kAdmitSize];
    msg[0] = gate::kAdmit;
    std::string d = sha256(cl.jti);
    memcpy(msg + 1, d.data(), 32);
    // Kept until the last moment the ticket could still verify (exp + leeway).
    int64_t exp = cl.exp + cfg.clock_leeway_s;
    memcpy(msg + 33, &exp, 8);
    char reply = 0;
    if (::send(kCtlFd, msg, sizeof msg, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof msg))
      return refuse(503, std::string("replay check unavailable: ") + strerror(errno));
    pollfd p{kCtlFd, POLLIN, 0};
    int pr;
    do pr = ::poll(&p, 1, 2000);
    while (pr < 0 && errno == EINTR);
    // 'T' reports are one-way; the only datagram the shim sends is this reply
    // ('A' with the session's own control socket: shim/session_proto.h).
    int ctl_fd = -1;
    size_t nfds = 0;
    if (pr <= 0 || recv_fds_nothrow(kCtlFd, &reply, 1, {&ctl_fd, 1}, &nfds) != 1)
      return refuse(503, "replay check unavailable: the shim did not answer");
    Fd session_ctl(nfds == 1 ? ctl_fd : -1);
    if (reply == gate::kReplayed) return refuse(403, "ticket already used (replay refused)");
    if (reply == gate::kCacheFull) return refuse(503, "replay cache full: try again shortly");
    if (reply == gate::kLimit)
      return refuse(503, "too many sessions on this container (max_sessions): try again later",
                    &counters.refused_sessions);
    if (reply != gate::kAccepted) return refuse(503, "replay check unavailable: unexpected answer from the shim");
    pid_t self = getpid();
    auto unreserve = [&](const std::string& why) {
      char u[5] = {gate::kUnreserve};
      memcpy(u + 1, &self, 4);
      (void)::send(kCtlFd, u, sizeof u, MSG_NOSIGNAL);
      return refuse(503, "cannot start the session: " + why);
    };
    if (!session_ctl) return unreserve("the shim sent no control socket");
    counters.admitted++;
    pid_t child = ::fork();
    if (child < 0) {
      int e = errno;
      counters.admitted--;
      return unreserve(std::string("fork: ") + strerror(e));
    }
    if (child == 0) {
      session_ctl.reset();  // the session's, not the gate's
      take_over(id);
      return std::nullopt;
    }
    return become_session(id, std::move(r), std::move(session_ctl));
  }

  // The child: the gate from now on.
  void take_over(uint64_t handed) {
    pid_t me = getpid();
    Fd pidfd = open_pidfd(me);
    char msg[5] = {gate::kTakeOver};
    memcpy(msg + 1, &me, 4);
    try {
      if (!pidfd) throw sys_error("pidfd_open");
      send_fd(kCtlFd, pidfd.get(), msg, sizeof msg);
    } catch (const std::exception& e) {
      log::error("gate: cannot take over from the admitted session", {{"error", e.what()}});
      _exit(1);  // the shim sees the lineage end and starts a fresh gate
    }
    // The admitted connection is the session's: our copy goes without a
    // word (no close_notify, no GOAWAY). DEL first: the session still holds
    // the socket, so closing alone would leave it registered in our epoll.
    auto it = conns.find(handed);
    if (it != conns.end()) {
      Conn& c = *it->second;
      epoll_ctl(ep.get(), EPOLL_CTL_DEL, c.fd, nullptr);
      ::close(c.fd);
      SSL_free(c.ssl);
      conns.erase(it);
      table.remove(handed);
      count_open();
    }
    pending_k8s.reset();
    // The zygote placed for that connection is the session's (its child).
    // The next one is placed at once: a back-to-back client's next
    // connection (its start-up, its handshake) overlaps the placement, which
    // mostly waits for the RCU grace period, instead of paying it cold.
    Confinement::release_warm();
    if (opt.warm) warm_due = monotonic_ms();
    report_counters(monotonic_ms(), true);
  }

  // The parent: the admitted connection's session from now on.
  std::optional<Admitted> become_session(uint64_t id, AuthResult r, Fd session_ctl) {
    auto it = conns.find(id);
    std::unique_ptr<Conn> mine = std::move(it->second);
    conns.erase(it);
    Admitted a;
    a.conn = Fd(mine->fd);
    a.ssl = std::exchange(mine->ssl, nullptr);
    a.h2 = mine->h2;
    a.early = std::move(mine->in);
    a.sent = std::move(mine->sent);
    a.claims = std::move(*r.claims);
    a.accepted_unix = mine->accepted_unix;
    if (mine->h2) {
      a.token = proto::find_header(mine->h2r->headers(), "authorization")->substr(7);
    } else {
      a.k8s = std::move(pending_k8s);
      pending_k8s.reset();
    }
    // Every other connection is the gate's: our copies close now. Their
    // memory is left alone (freed at exit, if ever): a session must not
    // copy the gate's pages to free them.
    for (auto& [cid, c] : conns) {
      ::close(c->fd);
      c->fd = -1;
    }
    ep.reset();
    sigfd.reset();
    ::close(kListenFd);
    if (opt.cri_fd >= 0) ::close(opt.cri_fd);
    // fd 4 is this session's own control socket from now on (the lineage's
    // closes here): its end report goes there (shim/session_proto.h).
    if (::dup3(session_ctl.get(), kCtlFd, O_CLOEXEC) < 0) ::close(kCtlFd);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    return a;
  }

  // ---------------------------------------------------------------- the loop

  std::optional<Admitted> run() {
    setup();
    std::vector<epoll_event> evs(256);
    for (;;) {
      int64_t now = monotonic_ms();
      int64_t next = now + 60000;
      if (auto d = table.next_deadline()) next = std::min(next, *d);
      for (auto& [id, c] : conns)
        if (c->st == Conn::St::Closing) next = std::min(next, c->linger_until);
      if (warm_due) next = std::min(next, warm_due);
      if (accept_resume) next = std::min(next, accept_resume);
      if (memcmp(&counters, &reported, sizeof counters) != 0) next = std::min(next, counters_due);
      next = std::min(next, summary_at + kSummaryEveryMs);
      if (table.size() == 0) next = std::min<int64_t>(next, last_activity + opt.idle_s * 1000LL);
      int timeout = static_cast<int>(std::max<int64_t>(0, next - now));
      int n = epoll_wait(ep.get(), evs.data(), static_cast<int>(evs.size()), timeout);
      if (n < 0 && errno != EINTR) throw sys_error("epoll_wait");
      now = monotonic_ms();
      for (int i = 0; i < n; i++) {
        uint64_t key = evs[i].data.u64;
        uint32_t what = evs[i].events;
        if (key == kSignalKey) {
          log::info("gate stopping on signal");
          return stop();
        }
        if (key == kCtlKey) {
          char junk[16];
          ssize_t r = ::recv(kCtlFd, junk, sizeof junk, MSG_DONTWAIT);
          if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR) || (what & (EPOLLHUP | EPOLLERR))) {
            log::info("gate stopping: the shim is gone");
            return stop();
          }
          continue;
        }
        if (key == kContainerKey) {
          log::info("gate stopping: the container exited");
          return stop();
        }
        if (key == kListenKey || key == kCriListenKey) {
          accept_some(now, key == kCriListenKey);
          continue;
        }
        auto it = conns.find(key);
        if (it == conns.end()) continue;
        auto admitted = on_io(*it->second, what, now);
        if (admitted) {
          if (auto a = admit(admitted->first, std::move(admitted->second))) return a;
        }
      }
      // Deadlines: accept + preauth_timeout_ms; a lingering answer's end.
      for (uint64_t id : table.expired(now)) {
        auto it = conns.find(id);
        if (it == conns.end()) continue;
        Conn& c = *it->second;
        if (c.st == Conn::St::Closing) {
          close_conn(id);
          continue;
        }
        std::string what = c.st == Conn::St::Fresh       ? "nothing received"
                           : c.st == Conn::St::Handshake ? "TLS handshake not done"
                                                         : "no complete request";
        std::string why =
            "pre-authentication deadline (" + std::to_string(cfg.preauth_timeout_ms) + " ms) passed: " + what;
        // The HTTP/1.1 door's answer to a request head that did not arrive (408).
        if (c.st == Conn::St::Request && !c.h2) {
          refuse_k8s(c, 408, "request head not received within " + std::to_string(cfg.preauth_timeout_ms) + " ms", "",
                     &counters.timed_out);
          continue;  // closed at the next turn: its deadline is past
        }
        if (!c.plain && (c.st == Conn::St::Handshake || c.st == Conn::St::Fresh))
          why = "TLS handshake timed out: " + why;
        drop(id, why, &counters.timed_out);
      }
      std::vector<uint64_t> done;
      for (auto& [id, c] : conns)
        if (c->st == Conn::St::Closing && c->linger_until <= now) done.push_back(id);
      for (uint64_t id : done) close_conn(id);
      if (accept_resume && now >= accept_resume) {
        accept_resume = 0;
        listen_on(true);
      }
      if (warm_due && now >= warm_due) {
        warm_due = 0;
        if (!Confinement::has_warm()) {
          try {
            Confinement::prepare_warm(cfg.isolation, ctr);
          } catch (const std::exception& e) {
            log::warn("gate: no zygote placed; the next exec places its own", {{"error", e.what()}});
          }
        }
      }
      report_counters(now, false);
      maybe_summarize(now, false);
      if (table.size() == 0 && now - last_activity >= opt.idle_s * 1000LL) {
        log::info("gate idle: exiting", {{"idle_s", opt.idle_s}});
        return stop();
      }
    }
  }

  std::optional<Admitted> stop() {
    for (auto& [id, c] : conns) {
      ::close(c->fd);
      c->fd = -1;
      SSL_free(std::exchange(c->ssl, nullptr));
    }
    conns.clear();
    count_open();
    maybe_summarize(monotonic_ms(), true);
    report_counters(monotonic_ms(), true);
    Confinement::discard_warm();
    return std::nullopt;
  }
};

Gate::Gate(const Config& cfg, const nsenter::Container& ctr, SSL_CTX* tls, GateOptions opt)
    : impl_(std::make_unique<Impl>(cfg, ctr, tls, opt)) {}

Gate::~Gate() = default;

std::optional<Admitted> Gate::run() { return impl_->run(); }

}  // namespace shimlet::session
