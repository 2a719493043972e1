// Where endpoint + pin + ticket come from. Local mode: the state dir and a
// ticket minted with the node's local.key. Master mode (the default): a grant
// from shimlet-master (client/master.cc).
#include <openssl/crypto.h>
#include <pwd.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <ctime>

#include "client/client.h"
#include "common/base64.h"
#include "ticket/ticket.h"

namespace shimlet::client {
std::string invoking_user() {
  if (const char* s = std::getenv("SUDO_USER"); s && *s) return s;
  uid_t uid = getuid();
  struct passwd pw, *res = nullptr;
  char buf[4096];
  if (getpwuid_r(uid, &pw, buf, sizeof buf, &res) == 0 && res) return pw.pw_name;
  return "uid:" + std::to_string(uid);
}

namespace {

constexpr const char* kNodeKeyError = "cannot load the node key (--local needs root on the node): ";

Grant grant_for(const Registration& reg) {
  Grant g;
  g.container_id = reg.id;
  g.endpoint = reg.endpoint;
  g.pin = reg.pin;
  return g;
}

}  // namespace

std::string sign_local_ticket(const std::string& container_id, const std::string& key_path, const std::string& key_pem,
                              ticket::Claims c, const proto::Identity& client, int64_t now, const std::string& sub,
                              int64_t lifetime_s) {
  ticket::PrivateKey key;
  try {
    key = ticket::PrivateKey::from_pem(key_pem);
  } catch (const std::exception& e) {
    throw Error(std::string(kNodeKeyError) + key_path + ": " + e.what());
  }
  c.iss = "local";
  c.sub = sub.empty() ? invoking_user() : sub;
  c.aud = container_id;
  c.iat = now;
  c.exp = now + lifetime_s;
  c.jti = base64url_encode(random_bytes(16));
  c.sid = base64url_encode(random_bytes(12));
  // Bind the ticket to this run's TLS key: a stolen ticket is useless without
  // it. Over the local socket there is no TLS key to bind (an empty identity):
  // that socket admits root only, who holds the node key anyway.
  if (!client.cert_pem.empty()) c.cnf_jkt = proto::jkt_of_identity(client);
  return key.sign(c, "local");
}

std::string read_node_key(const std::string& state_dir) {
  try {
    return ticket::PrivateKey::read_pem(state_dir + "/local.key");
  } catch (const std::exception& e) {
    throw Error(std::string(kNodeKeyError) + e.what());
  }
}

ticket::Claims exec_claims(const ExecOptions& ex) {
  ticket::Claims c;
  c.verb = "exec";
  c.cmd = ex.command;
  c.stdin_ = ex.stdin_;
  c.tty = ex.tty;
  c.limits = ex.limits;
  return c;
}

LocalExec::~LocalExec() { OPENSSL_cleanse(key_pem.data(), key_pem.size()); }

LocalExec local_exec_for(const Registration& reg, const std::string& state_dir) {
  LocalExec le;
  le.grant = grant_for(reg);
  le.grant.local_socket = reg.local_socket;
  le.key_path = state_dir + "/local.key";
  le.key_pem = read_node_key(state_dir);
  return le;
}

LocalExec local_exec_target(const std::string& state_dir, const std::string& ns, const ExecOptions& ex) {
  std::vector<Registration> regs = load_registrations(state_dir);
  return local_exec_for(resolve_target(regs, ex.target, ns, ex.container), state_dir);
}

void mint_local_exec_ticket(LocalExec& le, const ExecOptions& ex, const proto::Identity& client, int64_t now,
                            int64_t lifetime_s) {
  le.grant.ticket = sign_local_ticket(le.grant.container_id, le.key_path, le.key_pem, exec_claims(ex), client, now,
                                      le.sub, lifetime_s);
}

Grant local_exec_grant(const std::string& state_dir, const std::string& ns, const ExecOptions& ex,
                       const proto::Identity& client, int64_t now, int64_t lifetime_s) {
  LocalExec le = local_exec_target(state_dir, ns, ex);
  mint_local_exec_ticket(le, ex, client, now, lifetime_s);
  return le.grant;
}

Grant local_portforward_grant(const std::string& state_dir, const std::string& ns, const PortForwardOptions& pf,
                              const proto::Identity& client, int64_t now, int64_t lifetime_s) {
  std::vector<Registration> regs = load_registrations(state_dir);
  const Registration& reg = resolve_target(regs, pf.target, ns, pf.container);
  Grant g = grant_for(reg);
  if (client.cert_pem.empty()) {  // no TLS identity: the local socket
    if (reg.local_socket.empty())
      throw Error(reg.path + " names no local socket (a shim started by an older hook): use --local --tls");
    g.local_socket = reg.local_socket;
  }
  ticket::Claims c;
  c.verb = "portforward";
  for (const PortSpec& p : pf.ports) {
    ticket::Port tp{p.remote, p.udp ? "udp" : "tcp"};
    if (std::find(c.ports.begin(), c.ports.end(), tp) == c.ports.end()) c.ports.push_back(tp);
  }
  std::string key_pem = read_node_key(state_dir);
  g.ticket =
      sign_local_ticket(g.container_id, state_dir + "/local.key", key_pem, std::move(c), client, now, "", lifetime_s);
  OPENSSL_cleanse(key_pem.data(), key_pem.size());
  return g;
}

Grant obtain_exec_grant(const Invocation& inv, const proto::Identity& client) {
  if (!inv.local) return master_exec_grant(inv, client);
  return local_exec_grant(inv.state_dir, inv.ns, inv.exec, client, static_cast<int64_t>(std::time(nullptr)),
                          inv.ticket_lifetime_s);
}

Grant obtain_portforward_grant(const Invocation& inv, const proto::Identity& client) {
  if (!inv.local) return master_portforward_grant(inv, client);
  return local_portforward_grant(inv.state_dir, inv.ns, inv.pf, client, static_cast<int64_t>(std::time(nullptr)),
                                 inv.ticket_lifetime_s);
}

}  // namespace shimlet::client
