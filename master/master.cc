#include "master/master.h"

#include <time.h>

#include <fstream>
#include <set>

#include "common/error.h"
#include "common/log.h"
#include "master/kube.h"
#include "master/registry_memory.h"
#include "proto/tls.h"

namespace shimlet::master {

using nlohmann::json;

int64_t wall_s() { return static_cast<int64_t>(::time(nullptr)); }

namespace {

Authenticator load_authn(const Config& cfg) {
  Authenticator a;
  if (!cfg.token_auth_file.empty()) a.load_token_file(cfg.token_auth_file);
  if (!cfg.client_ca_file.empty()) a.load_client_ca_file(cfg.client_ca_file);
  return a;
}

Policy load_policy(const Config& cfg) {
  Policy p;
  for (const auto& f : cfg.authorization_policy_files) p.load_path(f);
  return p;
}

ticket::PrivateKey load_key(const Config& cfg) {
  if (cfg.ticket_signing_key_file.empty()) throw Error("--ticket-signing-key-file is required");
  try {
    return ticket::PrivateKey::load(cfg.ticket_signing_key_file);
  } catch (const std::exception& e) {
    throw Error("ticket signing key " + cfg.ticket_signing_key_file + ": " + e.what());
  }
}

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> seg;
  if (path.empty() || path[0] != '/') return seg;
  size_t p = 1;
  while (p <= path.size()) {
    size_t n = path.find('/', p);
    std::string s = path.substr(p, n == std::string::npos ? std::string::npos : n - p);
    if (s.empty() && n != std::string::npos) return {"\x01"};  // "//" never matches a route
    if (!s.empty()) seg.push_back(std::move(s));
    if (n == std::string::npos) break;
    p = n + 1;
  }
  return seg;
}

Response json_response(int code, const json& j) {
  Response r;
  r.status = code;
  r.body = j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  return r;
}

// kube-apiserver's forbidden message shape.
std::string forbidden_message(const Attributes& a) {
  std::string res = a.subresource.empty() ? a.resource : a.resource + "/" + a.subresource;
  std::string m = res + (a.name.empty() ? "" : " \"" + a.name + "\"") + " is forbidden: User \"" + a.user +
                  "\" cannot " + a.verb + " resource \"" + res + "\" in API group \"" + a.api_group + "\"";
  m += a.namespace_.empty() ? " at the cluster scope" : " in the namespace \"" + a.namespace_ + "\"";
  return m;
}

}  // namespace

Master::Master(const Config& cfg, std::unique_ptr<Registry> registry)
    : Master(cfg, load_authn(cfg), load_policy(cfg), load_key(cfg),
             cfg.audit_log_path.empty() ? AuditLog() : AuditLog(cfg.audit_log_path), std::move(registry)) {}

Master::Master(const Config& cfg, Authenticator authn, Policy policy, ticket::PrivateKey key, AuditLog audit,
               std::unique_ptr<Registry> registry)
    : cfg_(cfg),
      authn_(std::move(authn)),
      policy_(std::move(policy)),
      key_(std::move(key)),
      audit_(std::move(audit)),
      registry_(registry ? std::move(registry) : std::make_unique<MemoryRegistry>(cfg.lease_duration_s * 1000)) {
  if (!cfg.recording_policy_file.empty()) recording_policy_ = RecordingPolicy::load(cfg.recording_policy_file);
  if (!cfg.recording_dir.empty()) recordings_ = RecordingStore(cfg.recording_dir, cfg.recording_max_bytes);
  if (recording_policy_.records_anything() && !recordings_.enabled())
    throw Error("--recording-policy-file records sessions: --recording-dir is required");
  if (recording_policy_.largest_max_bytes() > cfg.recording_max_bytes)
    throw Error("--recording-policy-file: a maxBytes is above --recording-max-bytes");
  grant_cfg_.issuer = cfg.issuer;
  grant_cfg_.kid = cfg.ticket_key_id;
  grant_cfg_.lifetime_s = cfg.ticket_lifetime_s;
  kube::version_json(cfg.kube_version);  // validates the flag
  // The relay's identity lives only in memory: tickets minted for kubectl are
  // bound to it, so they are useless to anyone but this process.
  proto::Identity id = proto::generate_identity("shimlet-master-relay");
  relay_ctx_ = proto::make_client_ctx(id);
  static const unsigned char alpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  SSL_CTX_set_alpn_protos(relay_ctx_.get(), alpn, sizeof alpn);
  relay_jkt_ = ticket::jkt_of_public_pem(ticket::PrivateKey::from_pem(id.key_pem).public_pem());
}

void Master::expire_leases() {
  auto expired = registry_->expire(monotonic_ms());
  if (!expired.empty()) metrics_.leases_expired(expired.size());
  for (const auto& r : expired)
    audit_.write("lease_expired", {{"node", r.node},
                                   {"container_id", r.id},
                                   {"namespace", r.namespace_},
                                   {"pod", r.pod},
                                   {"container", r.container}});
}

Response Master::handle(const Request& req) {
  Ctx ctx;
  ctx.start_ns = monotonic_ns();
  if (req.method == "GET" && (req.path == "/healthz" || req.path == "/livez" || req.path == "/readyz")) {
    Response r;
    r.content_type = "text/plain; charset=utf-8";
    r.body = "ok";
    // Ready = able to serve grants: the registry can be read.
    if (req.path == "/readyz")
      if (std::optional<std::string> why = registry_->unavailable(monotonic_ms())) {
        r.status = 503;
        r.body = "registry: " + *why;
      }
    ctx.handler = "health";
    account(ctx, r.status);
    return r;
  }
  if (req.method == "GET" && req.path == "/version") {  // public, as kube-apiserver's system:public-info-viewer
    ctx.handler = "discovery";
    account(ctx, 200);
    return json_response(200, kube::version_json(cfg_.kube_version));
  }
  expire_leases();
  ctx.ev = {{"source", req.peer_ip + ":" + std::to_string(req.peer_port)},
            {"protocol", req.protocol},
            {"method", req.method},
            {"path", req.path.substr(0, 1024)}};
  if (auto ua = req.header("user-agent"); !ua.empty()) ctx.ev["user_agent"] = ua.substr(0, 256);
  Response resp;
  AuthResult ar = authn_.authenticate(req.header("authorization"), req.ssl);
  if (!ar.identity) {
    ctx.handler = "unauthenticated";
    metrics_.authentication_failure();
    ctx.ev["decision"] = "deny";
    ctx.ev["reason"] = ar.error;
    resp = status_error(401, "Unauthorized: " + ar.error, "Unauthorized");
  } else {
    ctx.id = *ar.identity;
    ctx.ev["user"] = ctx.id.user;
    ctx.ev["groups"] = ctx.id.groups;
    ctx.ev["auth"] = ctx.id.method;
    try {
      resp = route(ctx, req);
    } catch (const std::exception& e) {
      log::error("request failed", {{"path", req.path}, {"error", e.what()}});
      ctx.ev["reason"] = std::string("internal error: ") + e.what();
      resp = status_error(500, "internal error");
    }
  }
  if (!resp.deferred && !ctx.audited) audit_request(ctx, resp);
  return resp;
}

void Master::audit_request(Ctx& ctx, const Response& resp) {
  ctx.ev["code"] = resp.status;
  if (!ctx.ev.contains("decision")) ctx.ev["decision"] = resp.status < 400 ? "allow" : "error";
  account(ctx, resp.status);
  audit_.write("request", std::move(ctx.ev));
  ctx.audited = true;
}

Response Master::answer_later(Ctx& ctx, std::function<void(Answer)> start) {
  struct Pending {
    std::optional<Response> early;  // answered before start returned, or before the server asked
    Reply reply;
    bool audited = false;
  };
  auto p = std::make_shared<Pending>();
  start([this, p](Ctx& c, Response r) {
    audit_request(c, r);
    p->audited = true;
    if (p->reply)
      p->reply(std::move(r));
    else
      p->early = std::move(r);
  });
  if (p->early) {
    ctx.audited = p->audited;
    return std::move(*p->early);
  }
  ctx.audited = true;  // the answer's audit line comes with it
  Response r;
  r.deferred = [p](Reply reply) {
    if (p->early)
      reply(std::move(*p->early));
    else
      p->reply = std::move(reply);
  };
  return r;
}

std::optional<Response> Master::unreadable(Ctx& ctx) {
  std::optional<std::string> why = registry_->unavailable(monotonic_ms());
  if (!why) return std::nullopt;
  ctx.ev["decision"] = "error";
  ctx.ev["reason"] = "registry unavailable: " + *why;
  return status_error(503, "registry unavailable: " + *why, "ServiceUnavailable");
}

void Master::account(const Ctx& ctx, int code) {
  metrics_.request(ctx.handler, code, static_cast<double>(monotonic_ns() - ctx.start_ns) / 1e9);
  const std::string_view h = ctx.handler;
  if (h != "grant" && h != "relay" && h != "tunnel") return;
  std::string decision = ctx.ev.value("decision", "");
  const char* result = decision == "deny" ? "denied" : decision == "allow" && code < 400 ? "allowed" : "error";
  if (h == "tunnel")
    metrics_.tunnel(result);
  else if (!ctx.grant_verb.empty())
    metrics_.grant(ctx.grant_verb, h, result);
}

Response Master::metrics(Ctx& ctx) {
  ctx.handler = "metrics";
  Attributes a{ctx.id.user, ctx.id.groups, "get", "", "", "", "", "", "/metrics"};
  ctx.ev["verb"] = a.verb;
  Decision d = policy_.authorize(a);
  ctx.ev["reason"] = d.reason;
  if (!d.allowed) {
    ctx.ev["decision"] = "deny";
    return status_error(403, "forbidden: User \"" + ctx.id.user + "\" cannot get path \"/metrics\"", "Forbidden");
  }
  ctx.ev["decision"] = "allow";
  Metrics::State st;
  std::set<std::string> nodes;
  // This master's copy (the etcd registry's watch-fed one): what it grants from.
  for (const auto& r : registry_->entries().list("", monotonic_ms())) {
    ++st.containers;
    nodes.insert(r.node);
  }
  st.nodes = nodes.size();
  st.relays = relays_.active();
  Response r;
  r.content_type = kMetricsContentType;
  r.body = metrics_.render(st);
  return r;
}

// Mints the ticket for an authorized request and records it in the audit line.
Grant Master::allow(Ctx& ctx, const GrantRequest& gr, const Registration& target) {
  Grant g = mint_grant(key_, grant_cfg_, ctx.id.user, gr, target, wall_s());
  ctx.ev["decision"] = "allow";
  ctx.ev["container"] = target.container;
  ctx.ev["shim"] = {{"endpoint", target.endpoint}, {"container_id", target.id}, {"node", target.node}};
  ctx.ev["session_id"] = g.claims.sid;
  ctx.ev["jti"] = g.claims.jti;
  ctx.ev["ticket_expires"] = rfc3339(g.claims.exp);
  return g;
}

Response Master::deny(Ctx& ctx, const std::string& reason) {
  ctx.ev["decision"] = "deny";
  ctx.ev["reason"] = reason;
  return status_error(403, reason, "Forbidden");
}

Response Master::route(Ctx& ctx, const Request& req) {
  auto seg = split_path(req.path);
  auto is = [&](std::initializer_list<const char*> prefix) {
    if (seg.size() < prefix.size()) return false;
    size_t i = 0;
    for (const char* p : prefix)
      if (seg[i++] != p) return false;
    return true;
  };
  // Discovery, for every authenticated user (kube-apiserver's system:discovery).
  if (req.method == "GET" && (seg == std::vector<std::string>{"api"} || seg == std::vector<std::string>{"apis"} ||
                              seg == std::vector<std::string>{"api", "v1"})) {
    ctx.handler = "discovery";
    ctx.ev["decision"] = "allow";
    ctx.ev["reason"] = "discovery";
    if (seg.size() == 2) return json_response(200, kube::api_v1_resources());
    if (seg[0] == "apis") return json_response(200, kube::api_group_list());
    return json_response(200, kube::api_versions(req.header("host")));
  }
  if (req.path == "/metrics") {
    if (req.method != "GET") return status_error(405, "use GET for /metrics", "MethodNotAllowed");
    return metrics(ctx);
  }
  if (is({"api", "v1"}) && (seg.size() == 3 || seg.size() >= 5)) return pods(ctx, req, seg);
  if (is({"apis", "shimlet.io", "v1", "namespaces"}) && seg.size() == 8 && seg[5] == "pods" && seg[7] == "tunnel") {
    ctx.handler = "tunnel";
    return tunnel(ctx, req, seg[4], seg[6]);  // shimctl --proxy (master/tunnel.cc)
  }
  if (is({"apis", "shimlet.io", "v1", "namespaces"}) && seg.size() == 8 && seg[5] == "pods" &&
      (seg[7] == "exec" || seg[7] == "portforward")) {
    ctx.handler = "grant";
    ctx.grant_verb = seg[7];
    if (req.method != "POST") return status_error(405, "use POST for " + seg[7] + " grants", "MethodNotAllowed");
    return grant(ctx, req, seg[4], seg[6], seg[7]);
  }
  if (is({"apis", "shimlet.io", "v1", "nodes"}) && seg.size() == 7 && seg[5] == "containers") {
    ctx.handler = "node";
    if (req.method == "PUT") return node_put(ctx, req, seg[4], seg[6]);
    if (req.method == "DELETE") return node_delete(ctx, req, seg[4], seg[6]);
    return status_error(405, "use PUT (register/renew) or DELETE", "MethodNotAllowed");
  }
  if (is({"apis", "shimlet.io", "v1", "nodes"}) && seg.size() == 7 && seg[5] == "recordings") {
    ctx.handler = "recording_upload";
    if (req.method != "POST") return status_error(405, "use POST to upload a recording", "MethodNotAllowed");
    return recording_upload(ctx, req, seg[4], seg[6]);
  }
  if (is({"apis", "shimlet.io", "v1", "sessions"})) {  // recorded sessions (master/sessions.cc)
    ctx.handler = "sessions";
    return sessions(ctx, req, "", {seg.begin() + 4, seg.end()});
  }
  if (is({"apis", "shimlet.io", "v1", "namespaces"}) && seg.size() >= 6 && seg[5] == "sessions") {
    ctx.handler = "sessions";
    return sessions(ctx, req, seg[4], {seg.begin() + 6, seg.end()});
  }
  if (is({"apis", "shimlet.io", "v1", "nodes"}) && seg.size() == 7 && seg[5] == "sessions") {
    ctx.handler = "session_end";
    if (req.method != "POST") return status_error(405, "use POST to report a session end", "MethodNotAllowed");
    return session_end(ctx, req, seg[4], seg[6]);
  }
  return status_error(404, "the server could not find the requested resource", "NotFound");
}

Response Master::pods(Ctx& ctx, const Request& req, const std::vector<std::string>& seg) {
  // /api/v1/pods | /api/v1/namespaces/NS/pods[/POD[/exec|/portforward]]
  ctx.handler = "pods";
  Attributes a{ctx.id.user, ctx.id.groups, "", "", "pods", "", "", "", ""};
  if (seg.size() == 3) {
    if (seg[2] != "pods") return status_error(404, "the server could not find the requested resource", "NotFound");
  } else {
    if (seg[2] != "namespaces" || seg[4] != "pods" || seg.size() > 7)
      return status_error(404, "the server could not find the requested resource", "NotFound");
    a.namespace_ = seg[3];
    if (seg.size() >= 6) a.name = seg[5];
    if (seg.size() == 7) {
      if (seg[6] != "exec" && seg[6] != "portforward")
        return status_error(404, "the server could not find the requested resource", "NotFound");
      a.subresource = seg[6];
    }
    if (!valid_name(a.namespace_) || (!a.name.empty() && !valid_name(a.name)))
      return status_error(400, "invalid namespace or pod name");
  }
  ctx.ev["namespace"] = a.namespace_;
  if (!a.name.empty()) ctx.ev["pod"] = a.name;
  if (!a.subresource.empty()) {
    ctx.handler = "relay";
    ctx.grant_verb = a.subresource;
    a.verb = "create";
    ctx.ev["verb"] = a.verb;
    ctx.ev["resource"] = "pods/" + a.subresource;
    Decision d = policy_.authorize(a);
    ctx.ev["decision"] = d.allowed ? "allow" : "deny";
    ctx.ev["reason"] = d.reason;
    if (!d.allowed) return status_error(403, forbidden_message(a), "Forbidden");
    return stream(ctx, req, a.namespace_, a.name, a.subresource);
  }
  if (req.method != "GET" && req.method != "HEAD")
    return status_error(405, "only get and list are served for pods", "MethodNotAllowed");
  a.verb = a.name.empty() ? "list" : "get";
  ctx.ev["verb"] = a.verb;
  ctx.ev["resource"] = "pods";
  Decision d = policy_.authorize(a);
  ctx.ev["decision"] = d.allowed ? "allow" : "deny";
  ctx.ev["reason"] = d.reason;
  if (!d.allowed) return status_error(403, forbidden_message(a), "Forbidden");
  if (std::optional<Response> refused = unreadable(ctx)) return *refused;
  const Entries* reg = &registry_->entries();
  int64_t now = monotonic_ms();
  if (a.name.empty()) return json_response(200, reg->pod_list_json(a.namespace_, now));
  auto pod = reg->pod_json(a.namespace_, a.name, now);
  if (!pod) return status_error(404, "pods \"" + a.name + "\" not found", "NotFound");
  return json_response(200, *pod);
}

// kubectl's exec/portforward: an HTTP/1.1 upgrade (WebSocket or SPDY) that is
// already authorized. kubectl cannot follow a redirect, so the master mints a
// ticket bound to its relay key, and the connection is relayed to the shim
// with the request head unchanged but for the ticket (docs/design.md "Kubernetes streaming").
Response Master::stream(Ctx& ctx, const Request& req, const std::string& ns, const std::string& pod,
                        const std::string& sub) {
  auto fail = [&](int code, const std::string& why) {
    ctx.ev["decision"] = "error";
    ctx.ev["reason"] = why;
    return status_error(code, why);
  };
  if (req.method != "GET" && req.method != "POST") return fail(405, "use GET (WebSocket) or POST (SPDY) for " + sub);
  if (!req.upgrade) return fail(400, "Upgrade request required");
  // Relayed connections leave the server's connection count: bound them too.
  if (relays_.active() >= cfg_.limits.max_connections)
    return fail(429, "too many exec/port-forward sessions through this master");
  GrantRequest gr;
  gr.verb = sub;
  gr.jkt = relay_jkt_;
  if (sub == "exec") {
    kube::ExecParams ep;
    try {
      ep = kube::parse_exec_query(req.query);
    } catch (const Error& e) {
      return fail(400, e.what());
    }
    if (!ep.container.empty() && !valid_name(ep.container)) return fail(400, "invalid container name");
    gr.container = ep.container;
    gr.command = ep.command;
    gr.stdin_ = ep.stdin_;
    gr.tty = ep.tty;
    ctx.ev["command"] = gr.command;
    ctx.ev["stdin"] = gr.stdin_;
    ctx.ev["tty"] = gr.tty;
    apply_recording(ctx, gr, ns);
  } else {
    // kubectl names no ports and pods/portforward is not port-scoped: port 0 = any TCP port.
    gr.ports = {ticket::Port{0, "tcp"}};
    ctx.ev["ports"] = json::array({{{"port", 0}, {"proto", "tcp"}}});
  }
  if (std::optional<Response> refused = unreadable(ctx)) return *refused;
  const Entries* reg = &registry_->entries();
  Entries::Found found = reg->find(ns, pod, gr.container, monotonic_ms());
  if (!found.registration) return fail(found.status, found.error);
  const Registration* target = &*found.registration;
  Grant g = allow(ctx, gr, *target);
  ctx.ev["relay"] = true;

  RelayOptions opt;
  opt.endpoint = target->endpoint;
  opt.tls = relay_ctx_.get();
  opt.pin = target->pin;
  opt.shim_preamble = kube::relay_request_head(req, g.ticket);
  opt.connect_error_response = [pod](const std::string& why) {
    return serialize_http1(status_error(502, "error dialing backend for pod " + pod + ": " + why), false, false);
  };
  json end = {{"session_id", g.claims.sid},
              {"user", ctx.id.user},
              {"source", req.peer_ip + ":" + std::to_string(req.peer_port)},
              {"verb", sub},
              {"namespace", ns},
              {"pod", pod},
              {"container", target->container},
              {"container_id", target->id},
              {"node", target->node},
              {"jti", g.claims.jti},
              {"via", "relay"},
              {"start", rfc3339_now()}};
  return relay_upgrade(std::move(opt), std::move(end));
}

Response Master::relay_upgrade(RelayOptions opt, json end) {
  opt.on_bytes = [this, via = end.value("via", "relay")](bool to_shim, uint64_t n) {
    metrics_.relay_bytes(via, to_shim, n);
  };
  opt.on_end = [this, end = std::move(end)](const RelayStats& st) mutable {
    end["end"] = rfc3339_now();
    end["bytes_in"] = st.bytes_in;
    end["bytes_out"] = st.bytes_out;
    end["duration_ms"] = st.duration_ms;
    if (!st.error.empty()) end["error"] = st.error;
    audit_.write("session_end", std::move(end));
  };
  Response r;
  r.status = 101;  // what is audited: the far end answers the upgrade itself
  r.upgrade = [this, opt = std::move(opt)](Upgraded up) mutable {
    relays_.start(up.base, std::move(up.bev), std::move(opt));
  };
  return r;
}

Response Master::grant(Ctx& ctx, const Request& req, const std::string& ns, const std::string& pod,
                       const std::string& verb) {
  ctx.ev["namespace"] = ns;
  ctx.ev["pod"] = pod;
  ctx.ev["verb"] = "create";
  ctx.ev["resource"] = "pods/" + verb;
  if (!valid_name(ns) || !valid_name(pod)) return status_error(400, "invalid namespace or pod name");
  Attributes a{ctx.id.user, ctx.id.groups, "create", "", "pods", verb, ns, pod, ""};
  Decision d = policy_.authorize(a);
  ctx.ev["reason"] = d.reason;
  if (!d.allowed) {
    ctx.ev["decision"] = "deny";
    return status_error(403, forbidden_message(a), "Forbidden");
  }
  GrantRequest gr;
  try {
    gr = parse_grant_request(verb, req.body);
  } catch (const Error& e) {
    ctx.ev["decision"] = "error";
    ctx.ev["reason"] = e.what();
    return status_error(400, e.what(), "BadRequest");
  }
  if (verb == "exec") {
    ctx.ev["command"] = gr.command;
    ctx.ev["stdin"] = gr.stdin_;
    ctx.ev["tty"] = gr.tty;
    apply_recording(ctx, gr, ns);
  } else {
    json ports = json::array();
    for (const auto& p : gr.ports) ports.push_back({{"port", p.port}, {"proto", p.proto}});
    ctx.ev["ports"] = ports;
  }
  if (!gr.container.empty()) ctx.ev["container"] = gr.container;
  if (gr.jkt.empty() && req.ssl) {
    // No explicit key: bind to the certificate the client shows the master.
    if (X509* peer = SSL_get0_peer_certificate(req.ssl)) gr.jkt = proto::jkt_of_cert(peer);
  }
  if (gr.jkt.empty()) {
    ctx.ev["decision"] = "error";
    ctx.ev["reason"] = "no jkt and no client certificate to bind the ticket to";
    return status_error(400, "\"jkt\" is required: tickets are bound to the key of the client's TLS certificate",
                        "BadRequest");
  }
  if (std::optional<Response> refused = unreadable(ctx)) return *refused;
  const Entries* reg = &registry_->entries();
  Entries::Found found = reg->find(ns, pod, gr.container, monotonic_ms());
  if (!found.registration) {  // a grant names what is missing with 404 either way
    ctx.ev["decision"] = "error";
    ctx.ev["reason"] = found.error;
    return status_error(404, found.error, "NotFound");
  }
  Grant g = allow(ctx, gr, *found.registration);
  ctx.ev["jkt"] = g.claims.cnf_jkt;
  return json_response(201, g.response);
}

std::optional<Response> Master::require_node(Ctx& ctx, const std::string& node) {
  ctx.ev["node"] = node;
  auto mine = node_of_user(ctx.id.user);
  if (!mine) return deny(ctx, "user \"" + ctx.id.user + "\" is not a node (system:node:NAME)");
  if (*mine != node) return deny(ctx, "node \"" + *mine + "\" may not act for node \"" + node + "\"");
  return std::nullopt;
}

Response Master::node_put(Ctx& ctx, const Request& req, const std::string& node, const std::string& id) {
  ctx.ev["verb"] = "register";
  ctx.ev["container_id"] = id.substr(0, 128);
  if (auto r = require_node(ctx, node)) return *r;
  if (!valid_id(id)) return status_error(400, "invalid container id");
  Registration reg;
  try {
    reg = parse_registration(req.body);
  } catch (const Error& e) {
    ctx.ev["reason"] = e.what();
    return status_error(400, e.what(), "BadRequest");
  }
  ctx.ev["namespace"] = reg.namespace_;
  ctx.ev["pod"] = reg.pod;
  ctx.ev["container"] = reg.container;
  return answer_later(ctx, [this, ctx, node, id, reg = std::move(reg), peer = req.peer_ip](Answer answer) mutable {
    registry_->put(node, id, std::move(reg), peer, [this, ctx, node, id, answer](PutResult pr) mutable {
      if (pr.code >= 400) {
        if (pr.code == 403) return answer(ctx, deny(ctx, pr.error));
        ctx.ev["reason"] = pr.error;
        return answer(ctx, status_error(pr.code, pr.error));
      }
      ctx.ev["decision"] = "allow";
      ctx.ev["reason"] = pr.code == 201 ? "registered" : "lease renewed";
      int64_t lease = registry_->lease_ms() / 1000;
      answer(ctx, json_response(pr.code, {{"kind", "Lease"},
                                          {"apiVersion", "shimlet.io/v1"},
                                          {"node", node},
                                          {"container_id", id},
                                          {"leaseDurationSeconds", lease},
                                          {"renewIntervalSeconds", std::max<int64_t>(1, lease / 3)}}));
    });
  });
}

Response Master::node_delete(Ctx& ctx, const Request&, const std::string& node, const std::string& id) {
  ctx.ev["verb"] = "unregister";
  ctx.ev["container_id"] = id.substr(0, 128);
  if (auto r = require_node(ctx, node)) return *r;
  return answer_later(ctx, [this, ctx, node, id](Answer answer) mutable {
    registry_->remove(node, id, [this, ctx, answer](PutResult pr) mutable {
      if (pr.code == 403) return answer(ctx, deny(ctx, pr.error));
      if (pr.code >= 400) {
        ctx.ev["reason"] = pr.error;
        return answer(ctx, status_error(pr.code, pr.error));
      }
      ctx.ev["reason"] = "unregistered";
      answer(ctx, json_response(200, {{"kind", "Status"}, {"apiVersion", "v1"}, {"status", "Success"}, {"code", 200}}));
    });
  });
}

Response Master::session_end(Ctx& ctx, const Request& req, const std::string& node, const std::string& sid) {
  ctx.ev["verb"] = "session_end";
  ctx.ev["session_id"] = sid.substr(0, 64);
  if (auto r = require_node(ctx, node)) return *r;
  if (req.body.size() > 64 * 1024) return status_error(413, "body too large");
  json j = json::parse(req.body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return status_error(400, "body must be a JSON object");
  // Only known fields, type-checked, so a node cannot write arbitrary records.
  // "via":"node" tells it from the relay's own session_end ("via":"relay")
  // for the same session_id (docs/design.md "Session end records"); "node"
  // is the authenticated node, whatever the body says.
  json ev = {{"node", node}, {"session_id", sid.substr(0, 64)}, {"via", "node"}};
  for (const char* k : {"container_id", "user", "verb", "start", "end", "jti", "error", "namespace", "pod", "container",
                        "peer", "shim_session", "stdio"})
    if (auto it = j.find(k); it != j.end() && it->is_string()) ev[k] = it->get<std::string>().substr(0, 1024);
  for (const char* k : {"exit_code", "signal", "bytes_in", "bytes_out"})
    if (auto it = j.find(k); it != j.end() && it->is_number_integer()) ev[k] = it->get<int64_t>();
  if (auto it = j.find("command"); it != j.end() && it->is_array() && it->size() <= 4096) {
    json cmd = json::array();
    for (const auto& a : *it)
      if (a.is_string()) cmd.push_back(a);
    ev["command"] = cmd;
  }
  // A node reports only its own containers' sessions: one registered by
  // another node is refused (audited). One no longer registered (the record
  // came after poststop's unregister, or after a master restart) is kept,
  // marked, since the end of a real session must not be lost.
  if (auto cid = ev.find("container_id"); cid != ev.end()) {
    // (unreadable: the node keeps the record and posts it again)
    if (std::optional<Response> refused = unreadable(ctx)) return *refused;
    const Entries* reg = &registry_->entries();
    const auto owner = reg->owner(cid->get<std::string>());
    if (owner && *owner != node)
      return deny(ctx, "container " + cid->get<std::string>() + " is registered by node \"" + *owner + "\"");
    ev["container_registered"] = owner.has_value();
  }
  if (json rec = recording_ref(j); !rec.is_null()) ev["recording"] = std::move(rec);
  audit_.write("session_end", ev);
  metrics_.session_end_record();
  ctx.ev["reason"] = "session end recorded";
  return json_response(200, {{"kind", "Status"}, {"apiVersion", "v1"}, {"status", "Success"}, {"code", 200}});
}

}  // namespace shimlet::master
