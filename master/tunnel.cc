// shimctl --proxy: a raw byte tunnel through the master to a pod's shim
// (docs/master-api.md "Tunnel"). The master authenticates and authorizes the
// upgrade, takes the shim endpoint from its registry (never from the client),
// answers 101 and splices bytes (master/relay.h, plain TCP toward the shim).
// shimctl runs its own TLS + HTTP/2 to the shim inside, so the shim's pin and
// the ticket's key binding hold end to end and the master sees no plaintext.
#include <strings.h>

#include "common/error.h"
#include "master/audit.h"
#include "master/master.h"

namespace shimlet::master {

using nlohmann::json;

namespace {

constexpr const char* kTunnelProtocol = "shimlet-tunnel";
constexpr const char* kSwitching =
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: shimlet-tunnel\r\nConnection: Upgrade\r\n\r\n";

}  // namespace

Response Master::tunnel(Ctx& ctx, const Request& req, const std::string& ns, const std::string& pod) {
  ctx.ev["namespace"] = ns;
  ctx.ev["pod"] = pod;
  ctx.ev["verb"] = "create";
  ctx.ev["resource"] = "pods/tunnel";
  auto fail = [&](int code, const std::string& why) {
    ctx.ev["decision"] = code == 403 ? "deny" : "error";
    ctx.ev["reason"] = why;
    return status_error(code, why);
  };
  if (!valid_name(ns) || !valid_name(pod)) return fail(400, "invalid namespace or pod name");
  if (req.method != "POST") return fail(405, "use POST with Upgrade: shimlet-tunnel");
  if (!req.upgrade || strcasecmp(req.header("upgrade").c_str(), kTunnelProtocol) != 0)
    return fail(400, "a tunnel is an HTTP/1.1 upgrade: send Connection: Upgrade and Upgrade: shimlet-tunnel");
  std::string container;
  for (const auto& [k, v] : req.query_params()) {
    if (k != "container") return fail(400, "unknown query parameter \"" + k.substr(0, 64) + "\"");
    container = v;
  }
  if (!container.empty() && !valid_name(container)) return fail(400, "invalid container name");
  if (!container.empty()) ctx.ev["container"] = container;

  // The tunnel carries either an exec or a port-forward (the shim checks the
  // ticket inside it): either permission on this pod will do.
  Decision allowed;
  for (const char* sub : {"exec", "portforward"}) {
    Decision d = policy_.authorize(Attributes{ctx.id.user, ctx.id.groups, "create", "", "pods", sub, ns, pod, ""});
    if (d.allowed) {
      allowed = d;
      break;
    }
  }
  if (!allowed.allowed)
    return fail(403, "pods \"" + pod + "\" is forbidden: User \"" + ctx.id.user +
                         "\" cannot create resource \"pods/exec\" nor \"pods/portforward\" in API group \"\" in the "
                         "namespace \"" +
                         ns + "\"");
  if (std::optional<Response> refused = unreadable(ctx)) return *refused;
  const Entries* reg = &registry_->entries();
  Entries::Found found = reg->find(ns, pod, container, monotonic_ms());
  if (!found.registration) return fail(404, found.error);
  const Registration* target = &*found.registration;
  ctx.ev["decision"] = "allow";
  ctx.ev["reason"] = allowed.reason;
  ctx.ev["container"] = target->container;
  ctx.ev["shim"] = {{"endpoint", target->endpoint}, {"container_id", target->id}, {"node", target->node}};
  ctx.ev["tunnel"] = true;

  RelayOptions opt;
  opt.endpoint = target->endpoint;  // plain TCP: the client's TLS to the shim runs inside
  opt.client_preamble = kSwitching;
  opt.connect_error_response = [pod](const std::string& e) {
    return serialize_http1(status_error(502, "error dialing the shim of pod " + pod + ": " + e), false, false);
  };
  json end = {{"user", ctx.id.user},
              {"source", req.peer_ip + ":" + std::to_string(req.peer_port)},
              {"verb", "tunnel"},
              {"namespace", ns},
              {"pod", pod},
              {"container", target->container},
              {"container_id", target->id},
              {"node", target->node},
              {"shim", target->endpoint},
              {"via", "tunnel"},
              {"start", rfc3339_now()}};
  return relay_upgrade(std::move(opt), std::move(end));
}

}  // namespace shimlet::master
