// Recorded sessions on the master (docs/recording.md, docs/master-api.md
// "Sessions"): the nodes' upload API and the read API (list, get, the
// recording's bytes) under RBAC `list`/`get` on `sessions` in API group
// shimlet.io. The store is master/recordings.h; this file is routing,
// authorization and audit only.
#include <algorithm>

#include "common/error.h"
#include "master/master.h"
#include "spool/spool.h"

namespace shimlet::master {

using nlohmann::json;

namespace {

Response json_body(int code, const json& j) {
  Response r;
  r.status = code;
  r.body = j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  return r;
}

std::optional<uint64_t> number_param(const std::multimap<std::string, std::string>& q, const char* k) {
  auto it = q.find(k);
  if (it == q.end()) return std::nullopt;
  const std::string& v = it->second;
  if (v.empty() || v.size() > 19 || !std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; }))
    throw Error(std::string("query parameter ") + k + " must be a non-negative integer");
  return std::stoull(v);
}

}  // namespace

std::string Master::sessions_forbidden(const Attributes& a) {
  std::string m = "sessions" + (a.name.empty() ? "" : " \"" + a.name + "\"") + " is forbidden: User \"" + a.user +
                  "\" cannot " + a.verb + " resource \"sessions\" in API group \"shimlet.io\"";
  m += a.namespace_.empty() ? " at the cluster scope" : " in the namespace \"" + a.namespace_ + "\"";
  return m;
}

// POST /apis/shimlet.io/v1/nodes/NODE/recordings/ID?offset=N[&final=true]
Response Master::recording_upload(Ctx& ctx, const Request& req, const std::string& node, const std::string& id) {
  ctx.ev["verb"] = "recording_upload";
  ctx.ev["recording"] = id.substr(0, 64);
  if (auto r = require_node(ctx, node)) return *r;
  uint64_t offset = 0;
  bool final = false;
  try {
    auto q = req.query_params();
    offset = number_param(q, "offset").value_or(0);
    if (auto f = q.find("final"); f != q.end()) final = f->second == "true" || f->second == "1";
  } catch (const Error& e) {
    ctx.ev["reason"] = e.what();
    return status_error(400, e.what(), "BadRequest");
  }
  ctx.ev["offset"] = offset;
  ctx.ev["bytes"] = req.body.size();
  // The owner check reads the registry (unreadable: the node keeps the chunk and sends it again).
  if (std::optional<Response> refused = unreadable(ctx)) return *refused;
  const Entries& reg = registry_->entries();
  RecordingStore::Upload u = recordings_.upload(
      node, id, offset, final, req.body, [&reg](const std::string& cid) { return reg.owner(cid); }, wall_s());
  if (u.code >= 400) {
    if (u.code == 403) return deny(ctx, u.error);
    ctx.ev["reason"] = u.error;
    Response r = status_error(u.code, u.error);
    if (u.code == 409) {
      // Where to resume from, in the Status object itself.
      json j = json::parse(r.body);
      j["size"] = u.size;
      r.body = j.dump() + "\n";
    }
    return r;
  }
  ctx.ev["reason"] = u.complete ? "recording stored" : "recording chunk stored";
  if (!u.stored.is_null()) {
    json ev = {{"node", node}, {"id", id}, {"path", u.stored["path"]}};
    for (const char* k : {"namespace", "pod", "container", "container_id", "user", "session_id", "command", "bytes",
                          "duration_s", "complete", "truncated", "end", "container_registered"})
      ev[k] = u.stored[k];
    audit_.write("recording_stored", std::move(ev));
  }
  return json_body(200, {{"kind", "RecordingUpload"},
                         {"apiVersion", "shimlet.io/v1"},
                         {"id", id},
                         {"size", u.size},
                         {"complete", u.complete}});
}

// GET /apis/shimlet.io/v1/sessions[/ID[/recording]]
// GET /apis/shimlet.io/v1/namespaces/NS/sessions[/ID[/recording]]
// `rest` is what follows "sessions" (0..2 segments); ns "" = the cluster-wide form.
Response Master::sessions(Ctx& ctx, const Request& req, const std::string& ns, const std::vector<std::string>& rest) {
  ctx.ev["resource"] = "sessions";
  if (!ns.empty()) ctx.ev["namespace"] = ns;
  if (req.method != "GET" && req.method != "HEAD")
    return status_error(405, "only get and list are served for sessions", "MethodNotAllowed");
  if (rest.size() > 2 || (rest.size() == 2 && rest[1] != "recording"))
    return status_error(404, "the server could not find the requested resource", "NotFound");
  if ((!ns.empty() && !valid_name(ns)) || (!rest.empty() && !spool::valid_sid(rest[0])))
    return status_error(400, "invalid namespace or session id");
  auto authorize = [&](const std::string& verb, const std::string& where, const std::string& name) {
    Attributes a{ctx.id.user, ctx.id.groups, verb, "shimlet.io", "sessions", "", where, name, ""};
    ctx.ev["verb"] = verb;
    Decision d = policy_.authorize(a);
    ctx.ev["decision"] = d.allowed ? "allow" : "deny";
    ctx.ev["reason"] = d.reason;
    return d.allowed ? std::optional<Response>() : status_error(403, sessions_forbidden(a), "Forbidden");
  };
  std::multimap<std::string, std::string> q;
  try {
    q = req.query_params();
  } catch (const std::exception&) {
    return status_error(400, "bad query");
  }
  if (rest.empty()) {
    // The listing is audited like every request, with what it returned.
    if (auto denied = authorize("list", ns, "")) return *denied;
    std::string user;
    if (auto u = q.find("user"); u != q.end()) user = u->second;
    uint64_t limit = 500;
    try {
      limit = std::clamp<uint64_t>(number_param(q, "limit").value_or(500), 1, 5000);
    } catch (const Error& e) {
      return status_error(400, e.what(), "BadRequest");
    }
    if (!user.empty()) ctx.ev["filter_user"] = user.substr(0, 256);
    json items = json::array();
    for (json& m : recordings_.list(ns, user, limit)) items.push_back(std::move(m));
    ctx.ev["count"] = items.size();
    return json_body(200, {{"kind", "SessionList"}, {"apiVersion", "shimlet.io/v1"}, {"items", items}});
  }
  const std::string& id = rest[0];
  ctx.ev["session"] = id;
  std::optional<json> meta = recordings_.get(id);
  // Authorized in the recording's own namespace. An id that does not exist
  // (or is in another namespace than the path's) is a 404 only for who could
  // get it; everyone else gets the 403 (no probing for ids).
  std::string where = meta ? (*meta)["namespace"].get<std::string>() : ns;
  if (meta && !ns.empty() && where != ns) {
    meta.reset();
    where = ns;
  }
  ctx.ev["namespace"] = where;
  if (auto denied = authorize("get", where, id)) return *denied;
  if (!meta) return status_error(404, "sessions \"" + id + "\" not found", "NotFound");
  ctx.ev["pod"] = (*meta)["pod"];
  if (rest.size() == 1) return json_body(200, *meta);
  uint64_t offset = 0, length = RecordingStore::kMaxReadBytes;
  try {
    offset = number_param(q, "offset").value_or(0);
    length = std::min<uint64_t>(number_param(q, "length").value_or(length), RecordingStore::kMaxReadBytes);
  } catch (const Error& e) {
    return status_error(400, e.what(), "BadRequest");
  }
  auto bytes = recordings_.read(id, offset, static_cast<size_t>(length));
  if (!bytes) return status_error(404, "sessions \"" + id + "\" has no recording", "NotFound");
  ctx.ev["offset"] = offset;
  ctx.ev["bytes"] = bytes->size();
  Response r;
  r.content_type = "application/x-asciicast";
  r.body = std::move(*bytes);
  r.headers.emplace_back("x-shimlet-recording-size", std::to_string((*meta)["bytes"].get<uint64_t>()));
  return r;
}

// The recording policy's decision for an exec grant, in the ticket and the audit line.
void Master::apply_recording(Ctx& ctx, GrantRequest& gr, const std::string& ns) const {
  RecordingPolicy::Decision d = recording_policy_.decide(ctx.id.user, ctx.id.groups, ns, gr.tty);
  gr.rec = d.rec;
  if (gr.rec)
    ctx.ev["recording"] = {{"rule", d.rule},
                           {"disk_full", gr.rec->fail_closed ? "fail-closed" : "fail-open"},
                           {"max_bytes", gr.rec->max_bytes}};
}

// The session end record's "recording" (what the node wrote) for the
// session_end audit line: where the master keeps it.
json Master::recording_ref(const json& record) const {
  auto it = record.find("recording");
  if (it == record.end() || !it->is_object()) return json();
  json out = json::object();
  if (auto id = it->find("id"); id != it->end() && id->is_string() && spool::valid_sid(id->get<std::string>())) {
    out["id"] = *id;
    auto ns = record.find("namespace");
    if (recordings_.enabled() && ns != record.end() && ns->is_string() && valid_name(ns->get<std::string>()))
      out["path"] = recordings_.path_of(ns->get<std::string>(), id->get<std::string>());
  }
  for (const char* k : {"bytes", "out_bytes", "err_bytes", "in_bytes"})
    if (auto v = it->find(k); v != it->end() && v->is_number_unsigned()) out[k] = *v;
  for (const char* k : {"complete", "truncated"})
    if (auto v = it->find(k); v != it->end() && v->is_boolean()) out[k] = *v;
  if (auto v = it->find("error"); v != it->end() && v->is_string())
    out["error"] = v->get<std::string>().substr(0, 1024);
  return out.empty() ? json() : out;
}

}  // namespace shimlet::master
