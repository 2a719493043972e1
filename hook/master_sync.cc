// The node's side of shimlet-master (docs/master-api.md "Node API";
// docs/design.md "Master registration"): register and unregister a container,
// the renewer's lease renewal, and the session end records' delivery.
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <optional>
#include <vector>

#include "common/clock.h"
#include "common/error.h"
#include "common/file.h"
#include "common/log.h"
#include "hook/internal.h"
#include "masterclient/masterclient.h"
#include "spool/spool.h"

namespace shimlet::hook {
namespace {

using nlohmann::json;

std::string node_path(const MasterConfig& m, const std::string& id) {
  return "/apis/shimlet.io/v1/nodes/" + masterclient::path_segment(m.node) + "/containers/" +
         masterclient::path_segment(id);
}

}  // namespace

// The masters and our node credential, files read now (small, bounded).
masterclient::Masters masters(const MasterConfig& m) {
  masterclient::Target t;
  t.timeout_ms = m.timeout_ms;
  t.user_agent = "shimlet-hook";
  if (!m.ca.empty()) t.ca_pem = read_regular_file(m.ca, kMaxPemBytes * 16);
  if (!m.token.empty()) t.token = m.token;
  if (!m.token_file.empty()) {
    t.token = read_regular_file(m.token_file, 4096);
    while (!t.token.empty() && isspace(static_cast<unsigned char>(t.token.back()))) t.token.pop_back();
    if (t.token.empty()) throw Error(m.token_file + ": empty token file");
  }
  if (!m.client_cert.empty()) {
    t.cert_pem = read_regular_file(m.client_cert, kMaxPemBytes);
    t.key_pem = read_regular_file(m.client_key, kMaxPemBytes);
  }
  std::vector<masterclient::Target> ts;
  for (const auto& u : m.urls) {
    ts.push_back(t);
    ts.back().server = u;
  }
  return masterclient::Masters(std::move(ts));
}

json register_container(const Config& c, const std::string& id) {
  if (!c.master) throw Error("no master in the hook config");
  if (!valid_container_id(id)) throw Error("refusing container id (want [A-Za-z0-9_.-]{1,128}): " + id);
  json reg = json::parse(read_regular_file(c.state_dir + "/" + id + "/registration.json", kMaxRegistrationBytes));
  reg["node"] = c.master->node;
  masterclient::Response r = masters(*c.master).request("PUT", node_path(*c.master, id), reg.dump());
  if (r.status != 200 && r.status != 201)
    throw Error("master registration of " + id + " refused (HTTP " + std::to_string(r.status) +
                "): " + masterclient::error_message(r));
  json lease = json::parse(r.body, nullptr, false);
  return lease.is_object() ? lease : json::object();
}

void unregister_container(const Config& c, const std::string& id) {
  if (!c.master) throw Error("no master in the hook config");
  if (!valid_container_id(id)) throw Error("refusing container id (want [A-Za-z0-9_.-]{1,128}): " + id);
  masterclient::Response r = masters(*c.master).request("DELETE", node_path(*c.master, id), "");
  if (r.status != 200 && r.status != 404)
    throw Error("master unregistration of " + id + " refused (HTTP " + std::to_string(r.status) +
                "): " + masterclient::error_message(r));
}

void poststop(const Config& c, const std::string& id, bool own_shim_only) {
  bool registered = c.master && valid_container_id(id) &&
                    ::access((c.state_dir + "/" + id + "/registration.json").c_str(), F_OK) == 0;
  std::string err;
  try {
    // first: the shim (and its renewer) must be gone before the DELETE
    if (!cleanup(c, id, own_shim_only)) return;  // a newer container's, registered as its own
  } catch (const std::exception& e) {
    err = e.what();
  }
  if (registered) {
    try {
      unregister_container(c, id);
    } catch (const std::exception& e) {
      err += (err.empty() ? "" : "; ") + std::string(e.what());
    }
  }
  if (!err.empty()) throw Error(err);
}

int renew(const Config& c, const std::string& id) {
  try {
    if (!valid_container_id(id)) throw Error("refusing container id (want [A-Za-z0-9_.-]{1,128}): " + id);
    if (::access((c.state_dir + "/" + id + "/registration.json").c_str(), F_OK) != 0) {
      log::info("no registration (container stopping?): not renewing");
      return 0;
    }
    register_container(c, id);
  } catch (const std::exception& e) {
    // Only logged: the next renewal retries, and the lease covers a few misses.
    log::error("lease renewal failed", {{"error", e.what()}});
    return 1;
  }
  // Within the renewer's deadline (alarm: timeout_ms per master + 5 s from its start),
  // keeping a second for the exit.
  int64_t started = g_start_ms ? g_start_ms : monotonic_ms();
  int budget = c.master->timeout_ms * static_cast<int>(c.master->urls.size()) + 4000 -
               static_cast<int>(monotonic_ms() - started);
  FlushResult f;
  try {
    f = flush_session_ends(c, id, kEndsPerRenewal, budget);
  } catch (const std::exception& e) {
    f.error = e.what();
  }
  if (!f.error.empty()) {
    log::error("posting session end records failed (kept for the next renewal)",
               {{"error", f.error}, {"posted", f.posted}, {"kept", f.kept}});
    return 1;
  }
  // Then recordings (bigger, resumable), with what is left of the deadline.
  RecordingFlush rf;
  try {
    rf = flush_recordings(c, id, c.master->timeout_ms + 4000 - static_cast<int>(monotonic_ms() - started), true);
  } catch (const std::exception& e) {
    rf.error = e.what();
  }
  if (rf.sent || rf.dropped) log::info("recordings sent to the master", {{"sent", rf.sent}, {"dropped", rf.dropped}});
  if (!rf.error.empty()) {
    log::error("sending recordings failed (kept for the next renewal)",
               {{"error", rf.error}, {"sent", rf.sent}, {"kept", rf.kept}});
    return 1;
  }
  return 0;
}

FlushResult flush_session_ends(const Config& c, const std::string& id, size_t max, int budget_ms) {
  FlushResult res;
  if (!c.master) return res;
  if (!valid_container_id(id)) throw Error("refusing container id (want [A-Za-z0-9_.-]{1,128}): " + id);
  const int64_t deadline = monotonic_ms() + budget_ms;
  const std::string dir = c.state_dir + "/" + id;
  // Sessions killed before their end record: their provisional one, with
  // the time we noticed as the end (docs/design.md "Session end records").
  // A failure here must not hold back the records already pending.
  const std::string noticed = now_rfc3339();
  try {
    spool::Promoted pr = spool::promote_orphans(dir + "/ends", [&](json& r) { r["end"] = noticed; });
    if (pr.promoted)
      log::warn("sessions ended without an end record (killed): sending their provisional records",
                {{"sessions", pr.promoted}});
  } catch (const std::exception& e) {
    log::error("cannot check for killed sessions' provisional records", {{"error", e.what()}});
  }
  std::vector<spool::Pending> pending = spool::list(dir + "/ends", max);
  if (pending.empty()) return res;
  // Names the session cannot know: from the registration (as the master has them).
  json names = json::object();
  try {
    json reg = json::parse(read_regular_file(dir + "/registration.json", kMaxRegistrationBytes));
    for (const char* k : {"namespace", "pod", "container"})
      if (reg.contains(k) && reg[k].is_string()) names[k] = reg[k];
  } catch (const std::exception&) {
    // Posted without names; the container id is in the record.
  }
  std::optional<masterclient::Masters> ms;
  try {
    ms.emplace(masters(*c.master));
  } catch (const std::exception& e) {
    res.error = e.what();
    res.kept = pending.size();
    return res;
  }
  for (size_t i = 0; i < pending.size(); i++) {
    auto& p = pending[i];
    if (p.record.is_discarded()) {
      // Never deliverable: it would block the outbox forever.
      log::error("dropping an unreadable session end record", {{"path", p.path}});
      ::unlink(p.path.c_str());
      res.dropped++;
      continue;
    }
    int64_t left = deadline - monotonic_ms();
    if (left < 100) {
      res.kept += pending.size() - i;
      if (res.error.empty()) res.error = "deadline reached";
      break;
    }
    ms->set_timeout_ms(static_cast<int>(std::min<int64_t>(c.master->timeout_ms, left)));
    std::string sid = p.record.value("session_id", std::string());
    if (!spool::valid_sid(sid)) sid = p.sid;
    json body = p.record;
    for (auto& [k, v] : names.items())
      if (!body.contains(k)) body[k] = v;
    std::string path = "/apis/shimlet.io/v1/nodes/" + masterclient::path_segment(c.master->node) + "/sessions/" +
                       masterclient::path_segment(sid);
    try {
      masterclient::Response r = ms->request("POST", path, body.dump());
      if (r.status >= 200 && r.status < 300) {
        ::unlink(p.path.c_str());
        res.posted++;
        continue;
      }
      if (r.status == 400 || r.status == 413) {
        log::error("the master refused a session end record as malformed: dropped",
                   {{"session_id", sid}, {"status", r.status}, {"error", masterclient::error_message(r)}});
        ::unlink(p.path.c_str());
        res.dropped++;
        continue;
      }
      res.error = "POST " + path + ": HTTP " + std::to_string(r.status) + ": " + masterclient::error_message(r);
    } catch (const std::exception& e) {
      res.error = e.what();
    }
    // The master is down or refuses us: the rest waits for the next try.
    res.kept += pending.size() - i;
    break;
  }
  if (res.posted || res.dropped)
    log::info("session end records flushed", {{"posted", res.posted}, {"dropped", res.dropped}});
  return res;
}

}  // namespace shimlet::hook
