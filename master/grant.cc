#include "master/grant.h"

#include "common/base64.h"
#include "common/error.h"

namespace shimlet::master {
namespace {

using nlohmann::json;
constexpr size_t kMaxBody = 64 * 1024;
constexpr size_t kMaxArgs = 4096;
constexpr size_t kMaxPorts = 64;

bool get_bool(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return false;
  if (!it->is_boolean()) throw Error(std::string("\"") + key + "\" must be a boolean");
  return it->get<bool>();
}

}  // namespace

bool valid_jkt(std::string_view jkt) {
  if (jkt.size() != 43) return false;
  auto raw = base64url_decode(jkt);
  return raw && raw->size() == 32;
}

GrantRequest parse_grant_request(std::string_view verb, std::string_view body) {
  if (verb != "exec" && verb != "portforward") throw Error("unknown verb");
  if (body.size() > kMaxBody) throw Error("request body too large");
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded()) throw Error("request body is not valid JSON");
  if (!j.is_object()) throw Error("request body must be a JSON object");
  GrantRequest r;
  r.verb = verb;
  if (auto it = j.find("container"); it != j.end() && !it->is_null()) {
    if (!it->is_string()) throw Error("\"container\" must be a string");
    r.container = it->get<std::string>();
    if (!r.container.empty() && !valid_name(r.container)) throw Error("invalid container name");
  }
  if (auto it = j.find("jkt"); it != j.end() && !it->is_null()) {
    if (!it->is_string() || !valid_jkt(it->get<std::string>()))
      throw Error("\"jkt\" must be the base64url SHA-256 of the client key's SPKI (43 characters)");
    r.jkt = it->get<std::string>();
  }
  if (verb == "exec") {
    auto it = j.find("command");
    if (it == j.end() || !it->is_array() || it->empty())
      throw Error("\"command\" must be a non-empty array of strings");
    if (it->size() > kMaxArgs) throw Error("\"command\" has too many arguments");
    size_t total = 0;
    for (const auto& a : *it) {
      if (!a.is_string()) throw Error("\"command\" must be a non-empty array of strings");
      r.command.push_back(a.get<std::string>());
      if (r.command.back().find('\0') != std::string::npos) throw Error("\"command\" contains a NUL byte");
      total += r.command.back().size() + 1;
    }
    if (total > 32 * 1024) throw Error("\"command\" is too long");
    r.stdin_ = get_bool(j, "stdin");
    r.tty = get_bool(j, "tty");
    if (j.contains("ports")) throw Error("\"ports\" is for portforward");
  } else {
    auto it = j.find("ports");
    if (it == j.end() || !it->is_array() || it->empty()) throw Error("\"ports\" must be a non-empty array");
    if (it->size() > kMaxPorts) throw Error("too many ports");
    for (const auto& p : *it) {
      ticket::Port port;
      if (p.is_number_integer()) {
        auto n = p.get<int64_t>();
        if (n < 1 || n > 65535) throw Error("port out of range 1-65535");
        port.port = static_cast<uint16_t>(n);
      } else if (p.is_object()) {
        auto pn = p.find("port");
        if (pn == p.end() || !pn->is_number_integer()) throw Error("each port needs an integer \"port\"");
        auto n = pn->get<int64_t>();
        if (n < 1 || n > 65535) throw Error("port out of range 1-65535");
        port.port = static_cast<uint16_t>(n);
        if (auto pr = p.find("proto"); pr != p.end() && !pr->is_null()) {
          if (!pr->is_string() || (*pr != "tcp" && *pr != "udp")) throw Error("\"proto\" must be \"tcp\" or \"udp\"");
          port.proto = pr->get<std::string>();
        }
      } else {
        throw Error("each port must be a number or {\"port\":N,\"proto\":\"tcp\"|\"udp\"}");
      }
      r.ports.push_back(port);
    }
    if (j.contains("command")) throw Error("\"command\" is for exec");
  }
  return r;
}

Grant mint_grant(const ticket::PrivateKey& key, const GrantConfig& cfg, const std::string& sub, const GrantRequest& req,
                 const Registration& target, int64_t now_s) {
  if (!valid_jkt(req.jkt)) throw Error("a ticket must be bound to the client's key (jkt)");
  Grant g;
  ticket::Claims& c = g.claims;
  c.iss = cfg.issuer;
  c.sub = sub;
  c.aud = target.id;
  c.iat = now_s;
  c.exp = now_s + cfg.lifetime_s;
  c.jti = base64url_encode(random_bytes(16));
  c.verb = req.verb;
  c.sid = hex_encode(random_bytes(8));
  c.node = target.node;
  c.cmd = req.command;
  c.stdin_ = req.stdin_;
  c.tty = req.tty;
  c.ports = req.ports;
  c.cnf_jkt = req.jkt;
  c.rec = req.rec;
  g.ticket = key.sign(c, cfg.kid);
  g.response = {{"kind", "Grant"},
                {"apiVersion", "shimlet.io/v1"},
                {"endpoint", target.endpoint},
                {"pin", target.pin},
                {"ticket", g.ticket},
                {"container_id", target.id},
                {"container", target.container},
                {"node", target.node},
                {"session_id", c.sid},
                {"expires", c.exp}};
  if (c.rec) g.response["recorded"] = true;
  return g;
}

}  // namespace shimlet::master
