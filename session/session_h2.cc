// The native front door: HTTP/2 (over TLS from the gate, or plain on the
// local socket), a ticket on every request, exec and port-forward streams
// (session_exec.cc, session_forward.cc).
#include <nlohmann/json.hpp>

#include "common/log.h"
#include "proto/frames.h"
#include "session/session_internal.h"

namespace shimlet::session {
namespace {

nlohmann::json error_body(const std::string& why) { return {{"error", why}}; }

}  // namespace

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
    : Context(base, std::move(cfg), std::move(ctr), conn_fd, shim_fd, shim_fd) {
  proto::H2Settings st = session_h2_settings();
  // Root's local exec may pass its own stdin/stdout/stderr (docs/design.md
  // "Local socket": the command's stdio, as runc exec gives it).
  st.accept_fds = 3;
  conn_ = std::make_unique<proto::H2Conn>(base, conn_fd, nullptr, proto::H2Conn::Role::Server, this, st);
}

Session::Session(event_base* base, Config cfg, nsenter::Container ctr, int conn_fd, SSL* ssl, std::string early,
                 std::string sent, const std::string& token, const ticket::Claims& claims, int64_t accepted_unix,
                 int report_fd)
    : Context(base, std::move(cfg), std::move(ctr), conn_fd, -1, report_fd) {
  set_peer_cert(ssl);
  accepted_token_ = token;
  accepted_claims_ = claims;
  adopt(claims, accepted_unix);
  conn_ = std::make_unique<proto::H2Conn>(base, conn_fd, ssl, proto::H2Conn::Role::Server, this, session_h2_settings(),
                                          proto::H2Conn::Handover{std::move(early), std::move(sent), {}});
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

}  // namespace shimlet::session
