// `shimctl port-forward`'s arguments: kubectl's port forms
// ([LOCAL:]REMOTE[/udp|/tcp]), --address, --stdio (client/client.h).
#include <arpa/inet.h>

#include <algorithm>
#include <string>
#include <vector>

#include "client/client.h"

namespace shimlet::client {

namespace {

// Strict decimal port: digits only, at most 5, value in [min, 65535].
std::optional<uint16_t> port_number(const std::string& s, unsigned min) {
  if (s.empty() || s.size() > 5 || s.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  unsigned long v = std::stoul(s);
  if (v < min || v > 65535) return std::nullopt;
  return static_cast<uint16_t>(v);
}

bool is_ip_literal(const std::string& a) {
  in6_addr buf;
  return inet_pton(AF_INET, a.c_str(), &buf) == 1 || inet_pton(AF_INET6, a.c_str(), &buf) == 1;
}

}  // namespace

PortSpec parse_port_spec(const std::string& arg) {
  auto bad = [&](const std::string& why) {
    return UsageError("port-forward: bad port '" + arg + "': " + why +
                      " (want [LOCAL:]REMOTE[/udp], e.g. 8080:80, :80, 53/udp)");
  };
  std::string s = arg;
  PortSpec p;
  if (auto slash = s.find('/'); slash != std::string::npos) {
    std::string proto = s.substr(slash + 1);
    if (proto == "udp")
      p.udp = true;
    else if (proto != "tcp")
      throw bad("protocol must be tcp or udp");
    s.resize(slash);
  }
  auto colon = s.find(':');
  if (colon == std::string::npos) {
    auto r = port_number(s, 1);
    if (!r) throw bad("REMOTE must be a port number 1-65535");
    p.local = p.remote = *r;
    return p;
  }
  std::string local = s.substr(0, colon), remote = s.substr(colon + 1);
  if (remote.find(':') != std::string::npos) throw bad("too many ':'");
  auto r = port_number(remote, 1);
  if (!r) throw bad("REMOTE must be a port number 1-65535");
  p.remote = *r;
  if (!local.empty()) {
    auto l = port_number(local, 0);
    if (!l) throw bad("LOCAL must be a port number 0-65535 (0 or empty: any free port)");
    p.local = *l;
  }
  return p;
}

void parse_port_forward(PortForwardOptions& pf, const std::vector<std::string>& positional) {
  if (positional.empty()) throw UsageError("port-forward: missing TARGET");
  pf.target = positional[0];
  if (pf.target.empty()) throw UsageError("port-forward: TARGET is empty");
  if (positional.size() < 2)
    throw UsageError("port-forward: name at least one port, as in 'shimctl port-forward " + pf.target + " 8080:80'");
  pf.ports.clear();
  for (size_t i = 1; i < positional.size(); ++i) pf.ports.push_back(parse_port_spec(positional[i]));
  if (pf.stdio) {
    if (pf.ports.size() != 1)
      throw UsageError("port-forward: --stdio forwards exactly one REMOTE port (got " +
                       std::to_string(pf.ports.size()) + ")");
    if (positional[1].find(':') != std::string::npos)
      throw UsageError("port-forward: --stdio takes REMOTE only (no LOCAL: part): '" + positional[1] + "'");
    if (pf.ports[0].udp) throw UsageError("port-forward: --stdio forwards a TCP port (a byte stream), not UDP");
    if (!pf.addresses.empty()) throw UsageError("port-forward: --address does not apply to --stdio");
    pf.ports[0].local = 0;
    return;
  }
  std::vector<std::string> addrs;
  for (const std::string& a : pf.addresses) {
    if (a.empty()) throw UsageError("port-forward: empty --address item");
    if (a != "localhost" && !is_ip_literal(a))
      throw UsageError("port-forward: --address '" + a + "' is not 'localhost' or an IP address");
    if (std::find(addrs.begin(), addrs.end(), a) == addrs.end()) addrs.push_back(a);
  }
  if (addrs.empty()) addrs.push_back("localhost");
  pf.addresses = std::move(addrs);
}

}  // namespace shimlet::client
