// Cgroup placement of session processes: join the container's cgroups (as
// runc exec does) and, per session, a child cgroup that can be killed whole.
#pragma once
#include <sys/types.h>

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
  uint64_t memory_max = 0;  // bytes
  uint64_t cpu_weight = 0;  // v2 cpu.weight 1..10000 (v1: mapped to cpu.shares)
};
struct Usage {
  uint64_t cpu_usec = 0;
  uint64_t memory_peak = 0;
  bool oom_killed = false;
  bool pids_limited = false;
};

// A session's own cgroup under the container's (docs/design.md). Created
// before the session's first process starts; destroying it kills every
// process still in it and removes the directories.
class SessionCgroup {
 public:
  static SessionCgroup create(const Membership& container, const std::string& name, const Limits& limits);
  SessionCgroup(SessionCgroup&&) noexcept;
  SessionCgroup& operator=(SessionCgroup&&) noexcept;
  ~SessionCgroup();
  // Places pid into the session cgroup (and the container's cgroups where the
  // session has no own directory).
  void attach(pid_t pid) const;
  // SIGKILLs every process in the session and waits (bounded) until empty.
  void kill_all() const;
  Usage usage() const;
  const Membership& membership() const { return m_; }

 private:
  SessionCgroup() = default;
  Membership m_;
  std::vector<std::string> created_;  // directories we made, removed in reverse
};

}  // namespace shimlet::cgroup
