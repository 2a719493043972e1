// Per-session confinement of an exec (issue 5, docs/isolation.md and
// docs/cgroups.md): the session's own cgroup with limits from shim.json and
// the ticket, its SELinux label (the container's type and categories plus one
// reserved category), and its own Landlock domain. Each step can be switched
// off in shim.json ("isolation"), e.g. for bench/isolation.
#pragma once
#include <sys/types.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "cgroup/cgroup.h"
#include "landlock/landlock.h"
#include "nsenter/nsenter.h"
#include "selinux/label.h"
#include "ticket/ticket.h"

namespace shimlet::session {

// shim.json "isolation" (written by the hook from its config; docs/design.md).
struct Isolation {
  bool cgroup = true;                 // own cgroup per session (else: the container's, as runc exec)
  std::string landlock = "strict";    // "strict" | "compat" (no signal/abstract-socket scoping) | "off"
  bool selinux = true;                // session labels when SELinux is enabled on the host
  selinux::CategoryRange categories;  // reserved session categories (default c1000.c1023)
  std::string selinux_lock_dir = "/run/shimlet/selinux";  // category locks (STATE_DIR/selinux)
  cgroup::Limits limits;                                  // default per-session limits (0 = none)
  cgroup::Limits max_limits;                              // cap for limits (0 = no cap)
};
// Parses shim.json's "isolation" object (absent = defaults). Throws Error.
Isolation parse_isolation(const nlohmann::json& j);
// Effective limits: the ticket's, else the default, each capped by the max.
cgroup::Limits effective_limits(const Isolation& iso, const ticket::Limits& asked);
// "64 MiB", "1.5 GiB", "1000 bytes".
std::string format_bytes(uint64_t n);

// The SELinux label for the sockets a port-forward session creates in the
// container (setsockcreatecon): the container's type and categories plus a
// session category held for this process's lifetime (one connection). ""
// when SELinux is off or isolation.selinux is false. Throws Error when it
// cannot be computed (the forward is refused: fail closed).
const std::string& forward_socket_label(const Isolation& iso, const nsenter::Container& c);

// One exec's confinement, owned by the exec for its lifetime.
class Confinement {
 public:
  // Creates the session cgroup and allocates the SELinux category. Throws
  // Error when a step that is on cannot be set up (the exec is refused: a
  // session never runs with less isolation than configured), except the
  // documented fallbacks (SELinux disabled, Landlock missing, v2 controllers
  // not delegated), which are logged.
  // A warm session's placement, when one was prepared and its cgroups fit
  // the limits, is taken over instead (prepare_warm).
  Confinement(const Isolation& iso, const nsenter::Container& c, const std::string& sid, const ticket::Limits& asked);
  // Starts the command confined (sets r's SELinux label and Landlock; the
  // limits are written once the command exists and before it runs). Once.
  nsenter::Spawned spawn(nsenter::Request& r, const nsenter::Stdio& io);
  // A warm session, before its connection arrives: the session cgroup with
  // the default limits' shape and a zygote already placed in it, so the
  // request skips the cgroup migration (docs/performance.md). Throws Error.
  static void prepare_warm(const Isolation& iso, const nsenter::Container& c);
  // Removes the warm placement, if any (the request is not an exec).
  static void discard_warm();
  // Forgets the warm placement without removing it: in the pre-
  // authentication gate's child, whose parent (now a session) keeps it.
  static void release_warm();
  // Whether a warm placement is ready.
  static bool has_warm();
  // True when a limit is set that the exec must watch (pids, memory).
  bool watch() const { return cg_ && (limits_.pids_max || limits_.memory_max); }
  // A limit the session hit: {"memory", "session killed: memory limit (64 MiB) exceeded"}, or nullopt.
  struct Hit {
    std::string kind, message;
  };
  std::optional<Hit> limit_hit() const;
  // SIGKILL every process of the session's cgroup (no-op without one).
  void kill_all() const;
  // What was applied, for the exec.start audit line.
  nlohmann::json describe() const;
  // Usage (cpu_usec, memory_peak, oom_kills, pids_max_hits) into the end record.
  void usage_into(nlohmann::json& rec) const;
  const std::string& label() const { return label_; }

 private:
  const Isolation& iso_;
  const nsenter::Container& c_;
  cgroup::Membership membership_;
  std::optional<cgroup::SessionCgroup> cg_;
  nsenter::Zygote zygote_;  // declared after cg_: destroyed (killed) before the cgroup goes
  cgroup::Limits limits_;
  std::optional<selinux::SessionCategory> category_;
  std::string label_;  // the session's SELinux process label ("" when not applied)
  int landlock_abi_ = 0;
};

}  // namespace shimlet::session
