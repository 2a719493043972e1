// Where endpoint + pin + ticket come from. Local mode: the state dir and a
// ticket minted with the node's local.key. Master mode (the default): a grant
// from shimlet-master (client/master.cc).
#include <pwd.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <ctime>

#include "client/client.h"
#include "common/base64.h"
#include "ticket/ticket.h"

namespace shimlet::client {
namespace {

constexpr int64_t kTicketLifetimeS = 30;  // only needs to outlive connect + handshake

}  // namespace

std::string invoking_user() {
  if (const char* s = std::getenv("SUDO_USER"); s && *s) return s;
  uid_t uid = getuid();
  struct passwd pw, *res = nullptr;
  char buf[4096];
  if (getpwuid_r(uid, &pw, buf, sizeof buf, &res) == 0 && res) return pw.pw_name;
  return "uid:" + std::to_string(uid);
}

namespace {

// Signs claims (everything but the common fields) for reg with STATE_DIR/local.key.
Grant sign_local(const std::string& state_dir, const Registration& reg, ticket::Claims c, const proto::Identity& client,
                 int64_t now);

}  // namespace

Grant local_exec_grant(const std::string& state_dir, const std::string& ns, const ExecOptions& ex,
                       const proto::Identity& client, int64_t now) {
  std::vector<Registration> regs = load_registrations(state_dir);
  const Registration& reg = resolve_target(regs, ex.target, ns, ex.container);
  ticket::Claims c;
  c.verb = "exec";
  c.cmd = ex.command;
  c.stdin_ = ex.stdin_;
  c.tty = ex.tty;
  c.limits = ex.limits;
  return sign_local(state_dir, reg, std::move(c), client, now);
}

Grant local_portforward_grant(const std::string& state_dir, const std::string& ns, const PortForwardOptions& pf,
                              const proto::Identity& client, int64_t now) {
  std::vector<Registration> regs = load_registrations(state_dir);
  const Registration& reg = resolve_target(regs, pf.target, ns, pf.container);
  ticket::Claims c;
  c.verb = "portforward";
  for (const PortSpec& p : pf.ports) {
    ticket::Port tp{p.remote, p.udp ? "udp" : "tcp"};
    if (std::find(c.ports.begin(), c.ports.end(), tp) == c.ports.end()) c.ports.push_back(tp);
  }
  return sign_local(state_dir, reg, std::move(c), client, now);
}

namespace {

Grant sign_local(const std::string& state_dir, const Registration& reg, ticket::Claims c, const proto::Identity& client,
                 int64_t now) {
  std::string key_path = state_dir + "/local.key";
  ticket::PrivateKey key;
  try {
    key = ticket::PrivateKey::load(key_path);
  } catch (const std::exception& e) {
    throw Error(std::string("cannot load the node key (--local needs root on the node): ") + e.what());
  }
  c.iss = "local";
  c.sub = invoking_user();
  c.aud = reg.id;
  c.iat = now;
  c.exp = now + kTicketLifetimeS;
  c.jti = base64url_encode(random_bytes(16));
  c.sid = base64url_encode(random_bytes(12));
  // Bind the ticket to this run's TLS key: a stolen ticket is useless without it.
  c.cnf_jkt = ticket::jkt_of_public_pem(ticket::PrivateKey::from_pem(client.key_pem).public_pem());
  Grant g;
  g.container_id = reg.id;
  g.endpoint = reg.endpoint;
  g.pin = reg.pin;
  g.ticket = key.sign(c, "local");
  return g;
}

}  // namespace

Grant obtain_exec_grant(const Invocation& inv, const proto::Identity& client) {
  if (!inv.local) return master_exec_grant(inv, client);
  return local_exec_grant(inv.state_dir, inv.ns, inv.exec, client, static_cast<int64_t>(std::time(nullptr)));
}

Grant obtain_portforward_grant(const Invocation& inv, const proto::Identity& client) {
  if (!inv.local) return master_portforward_grant(inv, client);
  return local_portforward_grant(inv.state_dir, inv.ns, inv.pf, client, static_cast<int64_t>(std::time(nullptr)));
}

}  // namespace shimlet::client
