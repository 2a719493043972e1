#include "session/session_isolation.h"

#include "common/base64.h"
#include "common/error.h"
#include "common/log.h"

namespace shimlet::session {
namespace {

cgroup::Limits parse_limits(const nlohmann::json& j, const std::string& what) {
  cgroup::Limits l;
  if (!j.is_object()) throw Error("shim config: " + what + " must be an object");
  for (auto& [k, v] : j.items()) {
    if (!v.is_number_unsigned()) throw Error("shim config: " + what + "." + k + " must be a non-negative integer");
    uint64_t x = v.get<uint64_t>();
    if (k == "pids")
      l.pids_max = x;
    else if (k == "memory")
      l.memory_max = x;
    else if (k == "cpu_weight")
      l.cpu_weight = x;
    else
      throw Error("shim config: " + what + ": unknown key " + k);
  }
  return l;
}

uint64_t capped(uint64_t asked, uint64_t def, uint64_t max) {
  uint64_t v = asked ? asked : def;
  if (max && (v == 0 || v > max)) v = max;
  return v;
}

}  // namespace

Isolation parse_isolation(const nlohmann::json& j) {
  Isolation iso;
  if (j.is_null()) return iso;
  if (!j.is_object()) throw Error("shim config: isolation must be an object");
  for (auto& [k, v] : j.items()) {
    if (k == "cgroup" || k == "selinux") {
      if (!v.is_boolean()) throw Error("shim config: isolation." + k + " must be a boolean");
      (k == "cgroup" ? iso.cgroup : iso.selinux) = v.get<bool>();
    } else if (k == "landlock") {
      if (!v.is_string()) throw Error("shim config: isolation.landlock must be a string");
      iso.landlock = v.get<std::string>();
      if (iso.landlock != "strict" && iso.landlock != "compat" && iso.landlock != "off")
        throw Error("shim config: isolation.landlock must be strict, compat or off");
    } else if (k == "selinux_categories") {
      if (!v.is_string()) throw Error("shim config: isolation.selinux_categories must be a string");
      iso.categories = selinux::CategoryRange::parse(v.get<std::string>());
    } else if (k == "selinux_lock_dir") {
      if (!v.is_string() || v.get<std::string>().empty() || v.get<std::string>()[0] != '/')
        throw Error("shim config: isolation.selinux_lock_dir must be an absolute path");
      iso.selinux_lock_dir = v.get<std::string>();
    } else if (k == "limits") {
      iso.limits = parse_limits(v, "isolation.limits");
    } else if (k == "max_limits") {
      iso.max_limits = parse_limits(v, "isolation.max_limits");
    } else {
      throw Error("shim config: isolation: unknown key " + k);
    }
  }
  return iso;
}

cgroup::Limits effective_limits(const Isolation& iso, const ticket::Limits& asked) {
  cgroup::Limits l;
  l.pids_max = capped(asked.pids, iso.limits.pids_max, iso.max_limits.pids_max);
  l.memory_max = capped(asked.memory, iso.limits.memory_max, iso.max_limits.memory_max);
  l.cpu_weight = capped(asked.cpu_weight, iso.limits.cpu_weight, iso.max_limits.cpu_weight);
  return l;
}

std::string format_bytes(uint64_t n) {
  static const std::pair<uint64_t, const char*> units[] = {
      {1ull << 40, "TiB"}, {1ull << 30, "GiB"}, {1ull << 20, "MiB"}, {1ull << 10, "KiB"}};
  for (const auto& [u, name] : units)
    if (n >= u && n % u == 0) return std::to_string(n / u) + " " + name;
  return std::to_string(n) + " bytes";
}

namespace {

// The container's label from its live init (what the runtime really set),
// a session category, and the superset label.
std::string session_label(const Isolation& iso, pid_t init_pid, std::optional<selinux::SessionCategory>& cat) {
  try {
    auto ctr = selinux::Context::parse(selinux::process_label(init_pid));
    cat.emplace(selinux::SessionCategory::allocate(iso.selinux_lock_dir, ctr.level, iso.categories));
    return selinux::session_context(ctr, cat->category(), iso.categories).str();
  } catch (const std::exception& e) {
    throw Error(std::string("cannot compute the session's SELinux label: ") + e.what() +
                " (isolation.selinux=false runs sessions with the container's own label)");
  }
}

}  // namespace

const std::string& forward_socket_label(const Isolation& iso, const nsenter::Container& c) {
  // One connection per process: computed once, the category held until exit.
  static std::optional<selinux::SessionCategory> cat;
  static std::optional<std::string> label;
  if (!label) label = iso.selinux && selinux::enabled() ? session_label(iso, c.init_pid, cat) : std::string();
  return *label;
}

namespace {
// A warm session's placement (docs/performance.md "Warm sessions"): the
// session cgroup shaped for the default limits and a zygote already in it,
// made before any request. One per process (one connection per process);
// whatever is left is destroyed at exit: the zygote killed, the cgroup removed.
struct Warm {
  cgroup::Membership membership;
  std::optional<cgroup::SessionCgroup> cg;
  nsenter::Zygote zygote;
};
std::optional<Warm>& warm() {
  static std::optional<Warm> w;
  return w;
}

bool any_limit(const cgroup::Limits& l) { return l.pids_max || l.memory_max || l.cpu_weight; }

// A zygote placed in the session cgroup, else in the container's own cgroups.
nsenter::Zygote placed_zygote(const nsenter::Container& c, const std::optional<cgroup::SessionCgroup>& cg,
                              const cgroup::Membership& container) {
  return nsenter::Zygote::start(c, [&](pid_t pid) {
    if (cg)
      cg->attach(pid);
    else
      cgroup::attach(container, pid);
  });
}
}  // namespace

void Confinement::prepare_warm(const Isolation& iso, const nsenter::Container& c) {
  Warm w;
  w.membership = cgroup::of_pid(c.init_pid);
  if (iso.cgroup) {
    try {
      // Shaped for a ticket without limits. Not named after the session id
      // (unknown yet): a name of its own, in the audit's "cgroup".
      w.cg.emplace(cgroup::SessionCgroup::make(w.membership, "warm-" + hex_encode(random_bytes(8)),
                                               effective_limits(iso, ticket::Limits{})));
    } catch (const std::exception& e) {
      log::warn("no warm session cgroup; a request will get a fresh one", {{"error", e.what()}});
      return;
    }
  }
  w.zygote = placed_zygote(c, w.cg, w.membership);
  warm().emplace(std::move(w));
}

void Confinement::discard_warm() { warm().reset(); }

void Confinement::release_warm() {
  auto& w = warm();
  if (!w) return;
  if (w->cg) w->cg->release();
  w->zygote.release();
  w.reset();
}

bool Confinement::has_warm() { return warm().has_value(); }

Confinement::Confinement(const Isolation& iso, const nsenter::Container& c, const std::string& sid,
                         const ticket::Limits& asked)
    : iso_(iso), c_(c) {
  limits_ = effective_limits(iso, asked);
  // The warm placement serves the request if it has exactly the cgroups the
  // limits need; otherwise it is dropped now, not at exit.
  if (auto& w = warm()) {
    bool usable = w->cg ? w->cg->fits(limits_) : !iso.cgroup && !any_limit(limits_);
    if (usable) {
      membership_ = std::move(w->membership);
      cg_ = std::move(w->cg);
      zygote_ = std::move(w->zygote);
    } else {
      log::info("warm session placement does not fit the ticket's limits; placing afresh");
    }
    w.reset();
  }
  if (!zygote_) {
    membership_ = cgroup::of_pid(c.init_pid);
    if (iso.cgroup) {
      try {
        cg_.emplace(cgroup::SessionCgroup::make(membership_, sid, limits_));
      } catch (const std::exception& e) {
        // Without limits the session still joins the container's cgroups (as
        // runc exec); a limit that was asked for must hold, so refuse then.
        if (any_limit(limits_))
          throw Error(std::string("cannot create the session's cgroup for its limits: ") + e.what());
        log::warn("no session cgroup; joining the container's cgroups only", {{"error", e.what()}});
      }
    }
  }
  if (iso.selinux && selinux::enabled()) label_ = session_label(iso, c.init_pid, category_);
}

nsenter::Spawned Confinement::spawn(nsenter::Request& r, const nsenter::Stdio& io) {
  r.selinux_exec_label = label_;
  if (iso_.landlock != "off") {
    landlock::Options o;
    o.scope_signal = o.scope_abstract_unix = iso_.landlock == "strict";
    r.landlock = o;
  }
  if (!zygote_) zygote_ = placed_zygote(c_, cg_, membership_);
  // Limits once the zygote is gone (it would count in pids.max) and before
  // the command does anything (apply() logs what it skips). Without limits
  // there is nothing to wait for.
  std::function<void()> before_go;
  if (cg_ && any_limit(limits_)) before_go = [this] { cg_->apply(limits_); };
  nsenter::Spawned sp = zygote_.spawn(r, io, before_go);
  landlock_abi_ = sp.landlock_abi;
  return sp;
}

std::optional<Confinement::Hit> Confinement::limit_hit() const {
  if (!watch()) return std::nullopt;  // nothing to hit: no cgroup files to read before the status
  cgroup::Usage u = cg_->usage();
  if (u.oom_killed && limits_.memory_max)
    return Hit{"memory", "session killed: memory limit (" + format_bytes(limits_.memory_max) + ") exceeded"};
  if (u.pids_limited && limits_.pids_max)
    return Hit{"pids", "session killed: pids limit (" + std::to_string(limits_.pids_max) + ") exceeded"};
  return std::nullopt;
}

void Confinement::kill_all() const {
  if (!cg_) return;
  try {
    cg_->kill_all();
  } catch (const std::exception& e) {
    log::warn("session cgroup kill failed", {{"error", e.what()}});
  }
}

nlohmann::json Confinement::describe() const {
  nlohmann::json j = {{"cgroup", cg_ ? cg_->dir() : std::string()},
                      {"landlock", iso_.landlock == "off" ? std::string("off")
                                                          : iso_.landlock + " abi " + std::to_string(landlock_abi_)},
                      {"selinux", label_.empty() ? selinux::status() : label_}};
  nlohmann::json l = nlohmann::json::object();
  if (limits_.pids_max) l["pids"] = limits_.pids_max;
  if (limits_.memory_max) l["memory"] = limits_.memory_max;
  if (limits_.cpu_weight) l["cpu_weight"] = limits_.cpu_weight;
  j["limits"] = l;
  return j;
}

void Confinement::usage_into(nlohmann::json& rec) const {
  if (!cg_) return;
  cgroup::Usage u = cg_->usage();
  rec["cpu_usec"] = u.cpu_usec;
  rec["memory_peak"] = u.memory_peak;
  if (u.oom_kills) rec["oom_kills"] = u.oom_kills;
  if (u.pids_max_hits) rec["pids_max_hits"] = u.pids_max_hits;
}

}  // namespace shimlet::session
