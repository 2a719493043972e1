// Cgroup placement of session processes: join the container's cgroups (as
// runc exec does) and, per session, a child cgroup that can be killed whole
// and carries the session's limits (docs/cgroups.md).
#pragma once
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/fd.h"

namespace shimlet::cgroup {

// One line of /proc/PID/cgroup resolved to a directory on this host.
struct Entry {
  std::string controllers;  // "memory", "cpu,cpuacct", "name=systemd", "" for v2
  std::string path;         // path inside the hierarchy, e.g. "/t1"
  std::string dir;          // absolute directory, e.g. "/sys/fs/cgroup/memory/t1"
  bool v2() const { return controllers.empty(); }
  // True when this v1 hierarchy carries controller c ("memory", "pids", ...).
  bool has(const std::string& c) const;
};
struct Membership {
  std::vector<Entry> entries;
  const Entry* unified() const;  // the v2 entry, if mounted
};

// Reads /proc/PID/cgroup and /proc/self/mountinfo.
Membership of_pid(pid_t pid);
// Writes pid into cgroup.procs of every hierarchy of m (the container's
// cgroups); throws with the failing path.
void attach(const Membership& m, pid_t pid);

// Limits for a session cgroup (0 = unlimited / unchanged).
struct Limits {
  uint64_t pids_max = 0;
  uint64_t memory_max = 0;  // bytes (swap is limited to the same: no swapping around the limit)
  uint64_t cpu_weight = 0;  // v2 cpu.weight 1..10000 (v1: mapped to cpu.shares as runc does)
};
struct Usage {
  uint64_t cpu_usec = 0;       // v2 cpu.stat usage_usec, else v1 cpuacct.usage / 1000
  uint64_t memory_peak = 0;    // bytes: v2 memory.peak, v1 memory.max_usage_in_bytes (0: no memory child)
  uint64_t oom_kills = 0;      // processes the kernel OOM-killed in the session's memory cgroup
  uint64_t pids_max_hits = 0;  // fork/clone refused by pids.max ("max" in pids.events)
  bool oom_killed = false;     // oom_kills > 0
  bool pids_limited = false;   // pids_max_hits > 0
};

// Session cgroup names: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}. Throws Error otherwise.
void validate_name(const std::string& name);

// A session's own cgroup under the container's (docs/cgroups.md). Created
// before the session's first process starts; destroying it kills every
// process still in it and removes the directories.
//
// Layout: v2 (unified) <container>/shimlet-<name> for tracking and killing
// (and limits when the container's cgroup delegates controllers); v1
// <container>/shimlet-<name> in the pids and memory hierarchies (cpu when a
// weight is set; cpuacct and freezer too when there is no v2 hierarchy).
// On every other hierarchy session processes join the container's cgroup.
class SessionCgroup {
 public:
  // Throws (with the failing path) when a directory cannot be made or a
  // requested limit cannot be written where the controller is available;
  // limits whose controller is not available are skipped and logged (see
  // skipped()). Nothing is left behind on failure.
  static SessionCgroup create(const Membership& container, const std::string& name, const Limits& limits);
  // create() in two steps, for a session placed before its request (a warm
  // session, docs/performance.md): make() creates the directories that
  // `shape` needs and writes no limit; apply() writes limits. fits() says
  // whether limits need exactly the directories that were made.
  static SessionCgroup make(const Membership& container, const std::string& name, const Limits& shape);
  void apply(const Limits& limits);
  bool fits(const Limits& limits) const;
  SessionCgroup(SessionCgroup&&) noexcept;
  SessionCgroup& operator=(SessionCgroup&&) noexcept;
  SessionCgroup(const SessionCgroup&) = delete;
  SessionCgroup& operator=(const SessionCgroup&) = delete;
  // kill_all() then removes the directories; never throws (logs failures).
  ~SessionCgroup();
  // Forgets the directories without touching them: another process owns
  // them now (a process forked after they were made, giving them up).
  void release() noexcept { created_.clear(); }
  // Places pid into the session cgroup (and the container's cgroups where the
  // session has no own directory). Throws with the failing path.
  void attach(pid_t pid) const;
  // SIGKILLs every process in the session (cgroup.kill where present, else
  // freeze + SIGKILL each pid + thaw) and waits until every session directory
  // is empty, at most `timeout`. Returns true when empty. Never throws.
  bool kill_all(std::chrono::milliseconds timeout = std::chrono::seconds(5)) const;
  // Pids currently in the session (from the tracking directory).
  std::vector<pid_t> pids() const;
  // Read it before destruction (the counters go with the directories).
  Usage usage() const;
  // Where session processes go, one entry per hierarchy (session child or
  // the container's own directory).
  const Membership& membership() const { return m_; }
  // The directory used for tracking/killing (v2 child, else the v1 pids child).
  const std::string& dir() const { return track_; }
  // Human-readable limits that could not be applied (e.g. "memory_max: ...").
  const std::vector<std::string>& skipped() const { return skipped_; }

 private:
  SessionCgroup() = default;
  void destroy() noexcept;
  const Entry* own(const std::string& controller) const;  // our child in that hierarchy ("" = v2)
  Membership m_;
  Membership container_;
  std::string name_;
  std::vector<bool> layout_;          // per container entry: a child was made
  std::vector<std::string> created_;  // directories we made, removed in reverse
  std::string track_;
  std::vector<std::string> skipped_;
};

}  // namespace shimlet::cgroup
