// Ticket checks used by every front door (the native HTTP/2 door, the
// Kubernetes door) and by the gate (verify_ticket): signature and claims,
// the client certificate's key (cnf.jkt), and the jti consumed once in the
// shim's replay cache (fail closed).
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <cerrno>

#include "common/base64.h"
#include "common/log.h"
#include "proto/tls.h"
#include "session/session_context.h"
#include "session/session_isolation.h"

namespace shimlet::session {

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

}  // namespace shimlet::session
