#include "session/session.h"

#include <arpa/inet.h>
#include <event2/event.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <charconv>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/base64.h"
#include "common/error.h"
#include "common/event.h"
#include "common/file.h"
#include "common/log.h"
#include "proto/frames.h"
#include "proto/tls.h"
#include "session/gate.h"
#include "session/session_internal.h"
#include "session/session_k8s.h"
#include "session/session_recording.h"
#include "spool/spool.h"

namespace shimlet::session {
namespace {

constexpr int kConnFd = 3, kShimFd = 4, kPidFd = 5;

nlohmann::json error_body(const std::string& why) { return {{"error", why}}; }

}  // namespace

std::string peer_of(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return "?";
  if (ss.ss_family == AF_UNIX) {
    ucred cr{};
    socklen_t cl = sizeof cr;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) < 0) return "unix:?";
    return "unix:pid=" + std::to_string(cr.pid) + ",uid=" + std::to_string(cr.uid);
  }
  char host[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    port = ntohs(a->sin6_port);
  }
  return std::string(host) + ":" + std::to_string(port);
}

Config load_config(const std::string& path) {
  auto j = nlohmann::json::parse(read_regular_file(path, 1 << 20));
  Config c;
  c.id = j.at("id").get<std::string>();
  c.pid = j.at("pid").get<pid_t>();
  c.bundle = j.at("bundle").get<std::string>();
  c.node = j.value("node", std::string());
  c.ns = j.value("namespace", std::string());
  c.pod = j.value("pod", std::string());
  c.container = j.value("container", std::string());
  for (auto& k : j.value("trusted_keys", nlohmann::json::array()))
    c.keys.push_back({k.at("kid").get<std::string>(), ticket::PublicKey::from_pem(k.at("pem").get<std::string>())});
  c.max_ticket_lifetime_s = j.value("max_ticket_lifetime_s", c.max_ticket_lifetime_s);
  c.clock_leeway_s = j.value("clock_leeway_s", c.clock_leeway_s);
  c.drain_timeout_ms = j.value("drain_timeout_ms", c.drain_timeout_ms);
  c.tls_cert = j.at("tls_cert").get<std::string>();
  c.tls_key = j.at("tls_key").get<std::string>();
  c.ends_dir = j.value("ends_dir", std::string());
  c.isolation = parse_isolation(j.value("isolation", nlohmann::json()));
  c.preauth_timeout_ms = j.value("preauth_timeout_ms", c.preauth_timeout_ms);
  c.preauth_max_connections = j.value("preauth_max_connections", c.preauth_max_connections);
  c.preauth_max_per_source = j.value("preauth_max_per_source", c.preauth_max_per_source);
  c.preauth_max_memory = j.value("preauth_max_memory", c.preauth_max_memory);
  c.recording = parse_recording_settings(j.value("recording", nlohmann::json::object()));
  return c;
}

Context::Context(event_base* base, Config cfg, nsenter::Container ctr, int conn_fd, int shim_fd)
    : base_(base), cfg_(std::move(cfg)), ctr_(std::move(ctr)), shim_fd_(shim_fd) {
  sid_ = hex_encode(random_bytes(8));
  own_netns_ = Fd(::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC));
  if (!own_netns_) throw sys_error("open /proc/self/ns/net");
  peer_ = peer_of(conn_fd);
  start_unix_ = time(nullptr);
  log::set_context({{"container", cfg_.id}, {"session", sid_}, {"peer", peer_}});
}

Context::~Context() {
  // A destructor must not throw; a lost record is logged (the shim.log audit
  // line "session.end" still has the session).
  try {
    write_end_record();
  } catch (const std::exception& e) {
    log::error("cannot write the session end record", {{"dir", cfg_.ends_dir}, {"error", e.what()}});
  }
}

nlohmann::json Context::end_record() const {
  const ticket::Claims& c = *end_claims_;
  // session_id: the master's (ticket sid) so the record joins the grant's
  // audit line; the file is named by our own random id (unique per
  // connection even if a local ticket reuses a sid).
  nlohmann::json r = {{"session_id", masterclient::spool::valid_sid(c.sid) ? c.sid : sid_},
                      {"shim_session", sid_},
                      {"container_id", cfg_.id},
                      {"user", c.sub},
                      {"verb", c.verb},
                      {"jti", c.jti},
                      {"peer", peer_},
                      {"start", log::rfc3339(start_unix_)}};
  if (c.verb == "exec") r["command"] = c.cmd;
  return r;
}

// Written as soon as the ticket is accepted and locked while this process
// lives: if it is killed (SIGKILL, OOM) before write_end_record(), the node's
// renewer finds the lock free and sends this instead (docs/design.md
// "Session end records"). Costs one small file per session, only with a master.
void Context::write_open_record() {
  if (cfg_.ends_dir.empty() || !end_claims_) return;
  nlohmann::json r = end_record();
  r["error"] = "the session process ended without writing its end record (killed); end is when the node noticed";
  try {
    open_record_ = masterclient::spool::write_open(cfg_.ends_dir, sid_, r);
  } catch (const std::exception& e) {
    log::error("cannot write the provisional session end record", {{"dir", cfg_.ends_dir}, {"error", e.what()}});
  }
}

void Context::write_end_record() {
  if (cfg_.ends_dir.empty() || !end_claims_) return;
  nlohmann::json r = end_record();
  r["end"] = log::rfc3339(time(nullptr));
  r["bytes_in"] = end_bytes_in_;
  r["bytes_out"] = end_bytes_out_;
  if (end_exit_) r["exit_code"] = *end_exit_;
  if (end_signal_) r["signal"] = end_signal_;
  if (!end_error_.empty()) r["error"] = end_error_.substr(0, 1000);
  if (!end_recording_.is_null()) r["recording"] = end_recording_;
  for (const std::string& gone : masterclient::spool::write(cfg_.ends_dir, sid_, r))
    log::warn("session end outbox full: dropped the oldest record",
              {{"dropped_session", gone}, {"limit", masterclient::spool::kMaxPending}});
  if (open_record_) {
    masterclient::spool::remove_open(cfg_.ends_dir, sid_);
    open_record_.reset();
  }
}

void Context::set_peer_cert(SSL* ssl) {
  if (X509* peer = ssl ? SSL_get0_peer_certificate(ssl) : nullptr) peer_jkt_ = proto::jkt_of_cert(peer);
}

std::optional<AuthResult> Context::consume_jti(const ticket::Claims& c) {
  auto refused = [](int status, std::string why) { return AuthResult{std::nullopt, status, std::move(why)}; };
  // The replay cache lives in the shim so it outlives this process and is
  // shared by every session of the container (docs/design.md).
  std::string d = sha256(c.jti);
  char msg[40];
  memcpy(msg, d.data(), 32);
  // Kept until the last moment the ticket could still verify (exp + leeway).
  int64_t exp = c.exp + cfg_.clock_leeway_s;
  memcpy(msg + 32, &exp, 8);
  if (ssize_t n = ::send(shim_fd_, msg, sizeof msg, MSG_NOSIGNAL); n != static_cast<ssize_t>(sizeof msg))
    return refused(503, "replay check unavailable: " + (n < 0 ? std::string(strerror(errno)) : "short write"));
  pollfd p{shim_fd_, POLLIN, 0};
  int r;
  do r = ::poll(&p, 1, 2000);
  while (r < 0 && errno == EINTR);
  char reply = 0;
  if (r <= 0 || ::recv(shim_fd_, &reply, 1, 0) != 1)
    return refused(503, "replay check unavailable: the shim did not answer");
  if (reply == 'A') {
    accepted(c);
    return std::nullopt;
  }
  if (reply == 'R') return refused(403, "ticket already used (replay refused)");
  return refused(503, "replay cache full: try again shortly");
}

void Context::accepted(const ticket::Claims& c) {
  // Every front door comes here once a ticket is accepted: the session's
  // end record is about this one (the first of the connection).
  if (!end_claims_) {
    end_claims_ = c;
    write_open_record();
  }
}

void Context::adopt(const ticket::Claims& c, int64_t accepted_unix) {
  start_unix_ = accepted_unix;
  accepted(c);
  log::set_context({{"container", cfg_.id}, {"session", sid_}, {"peer", peer_}, {"user", c.sub}, {"jti", c.jti}});
  if (c.verb != "exec") Confinement::discard_warm();
}

AuthResult Context::verify_ticket(const std::string& token, const std::string& verb) const {
  return session::verify_ticket(cfg_, token, verb, peer_jkt_);
}

AuthResult verify_ticket(const Config& cfg, const std::string& token, const std::string& verb,
                         const std::string& peer_jkt) {
  AuthResult r;
  ticket::Claims c;
  try {
    ticket::Expect e;
    e.aud = cfg.id;
    e.verb = verb;
    e.now = time(nullptr);
    e.leeway_s = cfg.clock_leeway_s;
    e.max_lifetime_s = cfg.max_ticket_lifetime_s;
    c = ticket::verify(token, cfg.keys, e);
  } catch (const std::exception& ex) {
    r.status = 403;
    r.why = ex.what();
    return r;
  }
  // aud is unique per node only; local tickets carry no node claim.
  if (!cfg.node.empty() && !c.node.empty() && c.node != cfg.node) {
    r.status = 403;
    r.why = "ticket is for node " + c.node + ", not " + cfg.node;
    return r;
  }
  if (!c.cnf_jkt.empty() && c.cnf_jkt != peer_jkt) {
    r.status = 403;
    r.why = peer_jkt.empty() ? "ticket is bound to a client key, but no client certificate was presented"
                             : "ticket is bound to another client key";
    return r;
  }
  r.claims = std::move(c);
  return r;
}

AuthResult Context::authenticate_once(const std::string& token, const std::string& verb) {
  AuthResult r = verify_ticket(token, verb);
  if (!r.claims) return r;
  if (std::optional<AuthResult> refused = consume_jti(*r.claims)) return std::move(*refused);
  log::set_context(
      {{"container", cfg_.id}, {"session", sid_}, {"peer", peer_}, {"user", r.claims->sub}, {"jti", r.claims->jti}});
  // A warm session's placed zygote serves execs only: a forward gives its
  // cgroup and process back now rather than when the connection ends.
  if (verb != "exec") Confinement::discard_warm();
  return r;
}

namespace {
proto::H2Settings session_h2_settings() {
  proto::H2Settings st;
  // A client that vanished without a FIN (network gone, laptop closed) must
  // not pin this session and its container sockets: an unanswered PING ends it.
  st.ping_interval_s = 30;
  return st;
}
}  // namespace

Session::Session(event_base* base, Config cfg, nsenter::Container ctr, int conn_fd, int shim_fd)
    : Context(base, std::move(cfg), std::move(ctr), conn_fd, shim_fd) {
  conn_ =
      std::make_unique<proto::H2Conn>(base, conn_fd, nullptr, proto::H2Conn::Role::Server, this, session_h2_settings());
}

Session::Session(event_base* base, Config cfg, nsenter::Container ctr, int conn_fd, SSL* ssl, std::string early,
                 std::string sent, const std::string& token, const ticket::Claims& claims, int64_t accepted_unix)
    : Context(base, std::move(cfg), std::move(ctr), conn_fd, -1) {
  set_peer_cert(ssl);
  accepted_token_ = token;
  accepted_claims_ = claims;
  adopt(claims, accepted_unix);
  conn_ = std::make_unique<proto::H2Conn>(base, conn_fd, ssl, proto::H2Conn::Role::Server, this, session_h2_settings(),
                                          proto::H2Conn::Handover{std::move(early), std::move(sent)});
}

Session::~Session() {
  streams_.clear();
  conn_.reset();
}

std::optional<std::string> Session::on_connected(SSL* ssl) {
  set_peer_cert(ssl);
  return std::nullopt;
}

void Session::refuse(int32_t stream, int status, const std::string& why, const std::string& event) {
  log::audit(event, {{"status", status}, {"reason", why}, {"stream", stream}});
  conn_->respond_simple(stream, status, "application/json", error_body(why).dump() + "\n");
}

std::optional<ticket::Claims> Session::authenticate(int32_t stream, const proto::Headers& h, const std::string& verb) {
  const std::string* auth = proto::find_header(h, "authorization");
  if (!auth || auth->rfind("Bearer ", 0) != 0) {
    refuse(stream, 401, "missing ticket: send authorization: Bearer <ticket>");
    return std::nullopt;
  }
  std::string token = auth->substr(7);
  // The connection is the unit of authentication (as with kubelet's
  // single-use streaming tokens): the byte-identical ticket was verified, its
  // cnf checked against this connection's client certificate, and its jti
  // consumed. A forward outlives the ticket's short exp, so later streams
  // (port-forward) must not be refused as "expired".
  if (accepted_claims_ && token == accepted_token_) {
    // Authenticated once, but only for what the ticket is for.
    if (accepted_claims_->verb != verb) {
      refuse(stream, 403, "ticket is for " + accepted_claims_->verb + ", not " + verb);
      return std::nullopt;
    }
    return accepted_claims_;
  }
  if (accepted_claims_) {
    // Verified first so a bad ticket gets its precise reason.
    AuthResult v = verify_ticket(token, verb);
    refuse(stream, 403, v.claims ? "a connection serves one ticket; open a new connection for another" : v.why);
    return std::nullopt;
  }
  AuthResult r = authenticate_once(token, verb);
  if (!r.claims) {
    refuse(stream, r.status, r.why);
    return std::nullopt;
  }
  accepted_token_ = token;
  accepted_claims_ = r.claims;
  return r.claims;
}

void Session::on_headers(int32_t stream, const proto::Headers& h, bool) {
  if (streams_.count(stream)) return;  // trailers: ignored
  const std::string* method = proto::find_header(h, ":method");
  const std::string* path = proto::find_header(h, ":path");
  if (!method || !path) return refuse(stream, 400, "request without :method or :path");
  if (finishing_) return refuse(stream, 503, "session is ending");
  try {
    if (*path == proto::kExecPath) {
      if (*method != "POST") return refuse(stream, 405, "exec needs POST");
      auto claims = authenticate(stream, h, "exec");
      if (!claims) return;
      if (exec_started_) return refuse(stream, 409, "one exec per connection");
      exec_started_ = true;
      auto handler = start_exec(*this, stream, h, *claims);
      // When the client had already ended its side, a refusal or a command
      // that could not start has closed the stream by now: the exec is over.
      if (handler && conn_->is_open(stream))
        streams_[stream] = std::move(handler);
      else
        finish();
      return;
    }
    if (*path == proto::kPortForwardOpenPath) {
      // Session open: authenticates (and consumes) the ticket before any
      // port is touched, so the client reports a bad ticket at once.
      if (*method != "POST") return refuse(stream, 405, "port-forward needs POST");
      if (exec_started_) return refuse(stream, 409, "this connection runs an exec");
      auto claims = authenticate(stream, h, "portforward");
      if (!claims) return;
      nlohmann::json ports = nlohmann::json::array();
      for (auto& p : claims->ports) ports.push_back({{"port", p.port}, {"proto", p.proto}});
      log::audit("portforward.session", {{"ports", ports}});
      conn_->respond_simple(stream, 200, "application/json", nlohmann::json{{"ports", ports}}.dump() + "\n");
      return;
    }
    if (path->rfind(proto::kPortForwardPrefix, 0) == 0) {
      if (*method != "POST") return refuse(stream, 405, "port-forward needs POST");
      if (exec_started_) return refuse(stream, 409, "this connection runs an exec");
      auto claims = authenticate(stream, h, "portforward");
      if (!claims) return;
      auto handler = start_forward(*this, stream, path->substr(strlen(proto::kPortForwardPrefix)), *claims);
      // A forward that failed at once may have closed its stream already.
      if (handler && conn_->is_open(stream)) streams_[stream] = std::move(handler);
      return;
    }
    refuse(stream, 404, "no such endpoint: " + *path);
  } catch (const std::exception& e) {
    log::error("request failed", {{"error", e.what()}});
    refuse(stream, 500, e.what());
  }
}

void Session::on_data(int32_t stream, const uint8_t* data, size_t len) {
  auto it = streams_.find(stream);
  if (it == streams_.end()) {
    conn_->consume(stream, len);  // a refused request's body: discard, keep the window open
    return;
  }
  it->second->on_data(data, len);
}

void Session::on_remote_end(int32_t stream) {
  auto it = streams_.find(stream);
  if (it != streams_.end()) it->second->on_remote_end();
}

void Session::on_drain(int32_t stream) {
  auto it = streams_.find(stream);
  if (it != streams_.end()) it->second->on_drain();
  // Streams paused by the session-wide budget resume once it has room.
  if (!exec_started_ && !over_budget()) {
    std::vector<int32_t> ids;
    for (auto& [id, h] : streams_) ids.push_back(id);
    for (int32_t id : ids)
      if (auto it = streams_.find(id); it != streams_.end()) resume_forward(*it->second);
  }
}

void Session::on_stream_close(int32_t stream, uint32_t code) {
  auto it = streams_.find(stream);
  if (it == streams_.end()) return;
  it->second->on_close(code);
  streams_.erase(it);
  // An exec connection ends with its exec.
  if (exec_started_ && streams_.empty()) finish();
}

void Session::finish() {
  if (finishing_) return;
  finishing_ = true;
  conn_->shutdown();
}

void Session::container_exited() {
  log::info("container exited");
  // A handler's reset can close its stream (and erase it from streams_)
  // synchronously: iterate over a snapshot of ids.
  std::vector<int32_t> ids;
  for (auto& [id, h] : streams_) ids.push_back(id);
  for (int32_t id : ids)
    if (auto it = streams_.find(id); it != streams_.end()) it->second->container_exited();
  // Nothing is left to forward to: end the port-forward session (an exec
  // ends by itself when its processes are gone).
  if (streams_.empty() || !exec_started_) finish();
}

void Session::on_stream_refused(int32_t stream) {
  // One audit line per connection, not per stream: a client flooding
  // streams must not flood the log. The count goes into "connection closed".
  if (refused_streams_++ == 0)
    log::audit("request.refused", {{"status", 0},
                                   {"stream", stream},
                                   {"reason", "too many concurrent streams (limit " +
                                                  std::to_string(conn_->settings().max_concurrent_streams) +
                                                  "): stream refused with RST_STREAM REFUSED_STREAM"}});
}

namespace {
// Close reasons (proto/h2.cc) that mean the peer's bytes were refused: not
// TLS 1.3 + h2, or malformed HTTP/2.
bool refused_connection(const std::string& why) {
  for (const char* p : {"TLS handshake", "TLS error", "HTTP/2 protocol error", "peer did not negotiate ALPN"})
    if (why.rfind(p, 0) == 0) return true;
  return false;
}
}  // namespace

void Session::on_closed(const std::string& why) {
  for (auto& [id, h] : streams_)
    if (!h->done()) h->abort(why);
  streams_.clear();
  if (refused_connection(why)) log::audit("request.refused", {{"status", 0}, {"stream", 0}, {"reason", why}});
  nlohmann::json f = {{"reason", why}, {"bytes_in", conn_->bytes_in()}, {"bytes_out", conn_->bytes_out()}};
  if (refused_streams_) f["refused_streams"] = refused_streams_;
  log::info("connection closed", f);
  event_base_loopexit(base_, nullptr);
}

namespace {

struct Args {
  std::string config;
  std::vector<std::pair<std::string, int>> ns;
  int warm_idle_s = 0;      // > 0: set up now, serve the connection the shim passes within this time
  int gate_idle_s = 0;      // > 0: the pre-authentication gate (session/gate.h), exits after this long unused
  bool gate_zygote = true;  // the gate keeps a zygote placed (off: warm_idle_s 0)
  int gate_cri_fd = -1;     // the gate: the shim's CRI listener (plain HTTP/1.1, CRI shapes only), if any
};

int parse_int(const std::string& k, const std::string& v, int lo, int hi) {
  int n = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (ec != std::errc() || p != v.data() + v.size() || n < lo || n > hi)
    throw Error("bad " + k + " " + v + " (" + std::to_string(lo) + ".." + std::to_string(hi) + ")");
  return n;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; i++) {
    std::string k = argv[i];
    if (k == "--no-zygote") {
      a.gate_zygote = false;
      continue;
    }
    if (i + 1 >= argc) throw Error("missing value for " + k);
    std::string v = argv[++i];
    if (k == "--config") {
      a.config = v;
    } else if (k == "--warm") {
      a.warm_idle_s = parse_int(k, v, 1, 3600);
    } else if (k == "--gate") {
      a.gate_idle_s = parse_int(k, v, 1, 3600);
    } else if (k == "--cri-listener") {
      a.gate_cri_fd = parse_int(k, v, 6, 1 << 20);
    } else if (k == "--ns") {
      std::stringstream ss(v);
      std::string item;
      while (std::getline(ss, item, ',')) {
        auto eq = item.find('=');
        if (eq == std::string::npos) throw Error("bad --ns item " + item);
        a.ns.emplace_back(item.substr(0, eq), parse_int("--ns fd", item.substr(eq + 1), 0, 1 << 20));
      }
    } else {
      throw Error("unknown argument " + k);
    }
  }
  if (a.config.empty())
    throw Error(
        "usage: shimlet-session --config PATH [--ns TYPE=FD,...] [--warm IDLE_S | --gate IDLE_S [--no-zygote] "
        "[--cri-listener FD]]");
  return a;
}

void on_signal(evutil_socket_t, short, void* arg) {
  log::info("terminating on signal");
  static_cast<FrontDoor*>(arg)->terminate("session terminated by the shim");
}

void on_container_exit(evutil_socket_t, short, void* arg) { static_cast<FrontDoor*>(arg)->container_exited(); }

volatile sig_atomic_t g_warm_term = 0;
void on_warm_term(int) { g_warm_term = 1; }

// A warm session (docs/design.md "Warm sessions"): everything that does not
// depend on the connection is done before it arrives (config, the placement
// of the command's zygote in its cgroups); then it waits, at most idle_s,
// for the shim to pass a local socket's connection over the control
// socket. Returns false when it should just exit (idle, SIGTERM, container
// or shim gone).
bool await_connection(const Config& cfg, const nsenter::Container& ctr, int idle_s) {
  // SIGTERM (the shim stopping) must not kill us once the placement exists
  // (its cgroup would be left behind): from here it only sets a flag, and is
  // delivered only while ppoll waits, so none is lost between check and wait.
  // The flag handler stays until the event loop's own SIGTERM event replaces
  // it (main checks the flag then).
  struct sigaction sa {};
  sa.sa_handler = on_warm_term;
  sigaction(SIGTERM, &sa, nullptr);
  sigset_t term, old;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  sigprocmask(SIG_BLOCK, &term, &old);
  sigset_t during = old;
  sigdelset(&during, SIGTERM);
  // The shim started us at the lowest priority so warming never competes
  // with a live session; the placement below takes the global cgroup lock
  // and everything after it serves a request: normal priority from here.
  setpriority(PRIO_PROCESS, 0, 0);
  try {
    Confinement::prepare_warm(cfg.isolation, ctr);
  } catch (const std::exception& e) {
    log::warn("warm session without a placed zygote", {{"error", e.what()}});
  }
  pollfd pfd[2] = {{kShimFd, POLLIN, 0}, {kPidFd, POLLIN, 0}};
  timespec idle{idle_s, 0};
  int n = 0;
  while (!g_warm_term) {
    n = ppoll(pfd, 2, &idle, &during);
    if (n >= 0 || errno != EINTR) break;
  }
  sigprocmask(SIG_SETMASK, &old, nullptr);
  if (g_warm_term || n <= 0 || pfd[1].revents) return false;

  char tag = 0;
  Fd conn;
  try {
    conn = recv_fd(kShimFd, &tag, 1);
  } catch (const std::exception& e) {  // the shim went away, or sent no socket
    log::warn("warm session: no connection from the shim", {{"error", e.what()}});
    return false;
  }
  if (tag != 'C') {
    log::warn("warm session: unexpected message from the shim");
    return false;
  }
  // The connection takes its contract number (dup2 leaves it inheritable, as
  // a cold session's fd 3 is; nsenter closes it before the command runs).
  if (dup2(conn.get(), kConnFd) < 0) throw sys_error("dup2 the passed connection");
  prctl(PR_SET_NAME, "shimlet-session", 0, 0, 0);
  return true;
}

bool is_unix_socket(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  return getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0 && ss.ss_family == AF_UNIX;
}

// Why the local socket's peer may not use it; nullopt for the shim's own user (root).
std::optional<std::string> local_peer_refusal(int fd) {
  ucred cr{};
  socklen_t len = sizeof cr;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) < 0)
    return std::string("local socket: SO_PEERCRED: ") + strerror(errno);
  if (cr.uid != geteuid())
    return "local socket: peer uid " + std::to_string(cr.uid) + " is not " + std::to_string(geteuid());
  return std::nullopt;
}

// A connection refused before any front door exists (local socket peer):
// audited and logged; the session ends (exit code 0).
int refuse_connection(const std::string& container, const std::string& why) {
  log::set_context({{"container", container}, {"peer", peer_of(kConnFd)}});
  log::audit("request.refused", {{"status", 0}, {"stream", 0}, {"reason", why}});
  log::info("connection closed", {{"reason", why}});
  return 0;
}

// Runs the connection's front door until it is done; its exit code.
int serve(event_base* base, std::unique_ptr<FrontDoor> door) {
  EventPtr term = new_event(base, SIGTERM, EV_SIGNAL | EV_PERSIST, on_signal, door.get());
  event_add(term.get(), nullptr);
  if (g_warm_term) on_signal(SIGTERM, 0, door.get());  // arrived after a warm session's wait
  EventPtr cexit = new_event(base, kPidFd, EV_READ, on_container_exit, door.get());
  event_add(cexit.get(), nullptr);
  event_base_dispatch(base);
  term.reset();
  cexit.reset();
  int code = door->exit_code();
  door.reset();
  return code;
}

// The pre-authentication gate (session/gate.h) until it admits a connection;
// then this process serves that connection as its session.
int run_gate(const Args& args, Config cfg, nsenter::Container ctr) {
  prctl(PR_SET_NAME, "shimlet-gate", 0, 0, 0);
  log::set_component("gate");
  proto::SslCtx ctx =
      proto::make_server_ctx(read_regular_file(cfg.tls_cert, 1 << 16), read_regular_file(cfg.tls_key, 1 << 16),
                             /*allow_http1=*/true);
  Gate gate(cfg, ctr, ctx.get(), GateOptions{args.gate_idle_s, args.gate_zygote, args.gate_cri_fd});
  std::optional<Admitted> a = gate.run();
  if (!a) return 0;
  prctl(PR_SET_NAME, "shimlet-session", 0, 0, 0);
  log::set_component("session");
  EventBasePtr base = new_event_base();
  int fd = a->conn.release();
  SSL* ssl = std::exchange(a->ssl, nullptr);
  std::unique_ptr<FrontDoor> door;
  if (a->h2)
    door = std::make_unique<Session>(base.get(), std::move(cfg), std::move(ctr), fd, ssl, std::move(a->early),
                                     std::move(a->sent), a->token, a->claims, a->accepted_unix);
  else
    door = make_http1_front_door(base.get(), std::move(cfg), std::move(ctr), fd, ssl, std::move(*a->k8s),
                                 std::move(a->early), a->accepted_unix);
  return serve(base.get(), std::move(door));
}

}  // namespace

int main(int argc, char** argv) {
  // A warm session is not a session until it gets a connection (ps, tests).
  for (int i = 1; i < argc; i++)
    if (std::string_view(argv[i]) == "--warm") prctl(PR_SET_NAME, "shimlet-warm", 0, 0, 0);
  // The system openssl.cnf has nothing a session needs; parsing it (and what it
  // loads) is paid per connection.
  OPENSSL_init_ssl(OPENSSL_INIT_NO_LOAD_CONFIG, nullptr);
  log::set_component("session");
  // Secrets (TLS key, tickets) live here; nobody may ptrace or read /proc/PID/mem.
  if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) {
    log::error("session failed", {{"error", sys_error("prctl(PR_SET_DUMPABLE, 0)").what()}});
    return 1;
  }
  signal(SIGPIPE, SIG_IGN);
  // One fd per forwarded connection (the gate: per unauthenticated
  // connection): allow up to the hard limit.
  if (rlimit rl{}; getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);  // best effort: the soft limit still serves most sessions
  }
  try {
    Args args = parse_args(argc, argv);
    Config cfg = load_config(args.config);
    nsenter::Container ctr;
    ctr.init_pid = cfg.pid;
    ctr.pidfd = kPidFd;
    ctr.ns_fds = args.ns;
    ctr.config = oci::load_config(cfg.bundle);
    if (args.gate_idle_s) return run_gate(args, std::move(cfg), std::move(ctr));
    // Made before a warm session's wait: one step less after its connection arrives.
    EventBasePtr base = new_event_base();
    if (args.warm_idle_s && !await_connection(cfg, ctr, args.warm_idle_s)) return 0;
    // The shim's local socket (docs/design.md "Local socket"): root on the
    // node, HTTP/2 with prior knowledge, no TLS. TCP connections never come
    // here: the gate serves them (and becomes their session).
    if (!is_unix_socket(kConnFd)) throw Error("fd 3 is not the local socket's connection (TCP goes to the gate)");
    // The socket file is root's 0600 in a 0700 directory; its peer's uid is
    // checked all the same.
    set_nonblocking(kConnFd);
    if (auto why = local_peer_refusal(kConnFd)) return refuse_connection(cfg.id, *why);
    return serve(base.get(), std::make_unique<Session>(base.get(), std::move(cfg), std::move(ctr), kConnFd, kShimFd));
  } catch (const std::exception& e) {
    log::error("session failed", {{"error", e.what()}});
    return 1;
  }
}

}  // namespace shimlet::session
