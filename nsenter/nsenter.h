// Our own nsenter: start a process inside a running container exactly as
// `runc exec` would (order in docs/design.md), from the bundle's config.json
// and the live namespaces held by the shim.
#pragma once
#include <sys/types.h>

#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/fd.h"
#include "landlock/landlock.h"
#include "oci/oci.h"

namespace shimlet::nsenter {

// The container as the shim holds it.
struct Container {
  pid_t init_pid = 0;  // host pid of the container's init (for /proc lookups)
  int pidfd = -1;      // pidfd of init (borrowed)
  // Namespace fds (borrowed), by type: "user","mnt","pid","net","ipc","uts","cgroup","time".
  // Only namespaces that differ from the shim's own are listed.
  std::vector<std::pair<std::string, int>> ns_fds;
  oci::Config config;  // parsed bundle config.json
};

// Opens /proc/PID/ns/* for every namespace of PID that differs from ours (by
// inode), in a stable order, plus a pidfd. Used by the shim at start.
struct OpenedContainer {
  Fd pidfd;
  std::vector<std::pair<std::string, Fd>> ns;
};
OpenedContainer open_container(pid_t pid);

struct Stdio {
  // Either a tty of the given size (allocated in the container's devpts), or
  // three fds (borrowed, dup'ed onto 0,1,2 in the child).
  bool tty = false;
  unsigned short cols = 80, rows = 24;
  int in = -1, out = -1, err = -1;
};

// What to run; overrides on top of config.process (argv always from here).
struct Request {
  std::vector<std::string> argv;
  std::vector<std::string> extra_env;  // e.g. TERM=...; appended (override same key)
  // Called in the parent with the child's host pid while the child waits,
  // before it sets anything up: puts it in its cgroups (the session uses
  // cgroup::attach / SessionCgroup::attach). Required.
  std::function<void(pid_t)> place;
  // SELinux exec label (setexeccon before execve); empty: config.process.selinuxLabel.
  // With a label here the pty slave is also relabelled to its level.
  std::string selinux_exec_label;
  // docs/isolation.md: the command gets its own Landlock domain
  // (entered after the setns calls, before the capability drop); a kernel
  // without Landlock is tolerated (Spawned.landlock_abi = 0). Its pty gets
  // TIOCEXCL so a sibling session cannot open it.
  std::optional<landlock::Options> landlock;
};

struct Spawned {
  Fd pidfd;              // of the command (host view)
  pid_t pid = 0;         // host pid
  Fd pty_master;         // when tty
  int landlock_abi = 0;  // Landlock ABI of the domain the command runs in (0: none)
};

// Thrown when the command cannot be started; exit_code 126/127 like a shell.
struct ExecError : std::runtime_error {
  ExecError(const std::string& m, int code) : std::runtime_error(m), exit_code(code) {}
  int exit_code;
};

// A process forked and placed in its cgroups before the command is known,
// so that a request does not wait for the cgroup migration (the first
// cgroup.procs write waits for an RCU grace period: docs/performance.md).
// It stays in the host's pid namespace (invisible to the container) and
// holds nothing of the container; on spawn() it computes the command's setup
// from the Container as it was at start(), forks the command into the
// container's pid namespace as the caller's own child (CLONE_PARENT), and
// exits. One use. Must be started and used from a process that is not
// multi-threaded; dies with its parent (PR_SET_PDEATHSIG).
class Zygote {
 public:
  Zygote() = default;
  // Forks it and calls place(pid) while it waits (Request.place's contract).
  // The zygote works from its own copy of c as it was at this call.
  static Zygote start(const Container& c, const std::function<void(pid_t)>& place);
  Zygote(Zygote&& o) noexcept;
  Zygote& operator=(Zygote&& o) noexcept;
  Zygote(const Zygote&) = delete;
  Zygote& operator=(const Zygote&) = delete;
  ~Zygote();  // kills and reaps an unused zygote
  // Forgets the zygote without killing it: in a process forked after it was
  // started, where it is not a child (the parent keeps it).
  void release() noexcept;
  explicit operator bool() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  // Starts the command (Request.place is not used: the zygote was placed).
  // before_go, if given, runs once the zygote has exited and the command
  // waits, before it sets anything up: limits that count processes are
  // written there. Without it the zygote is reaped after the command's execve.
  // Returns once the command has passed execve, like spawn().
  Spawned spawn(const Request& r, const Stdio& io, const std::function<void()>& before_go = {});

 private:
  pid_t init_pid_ = 0;
  int init_pidfd_ = -1;  // borrowed, as in Container
  pid_t pid_ = -1;
  Fd sock_;
};

// Starts the command: Zygote::start(c, r.place) then its spawn(r, io).
// Must be called from a process that is not multi-threaded. Returns once the
// child has passed execve (or throws ExecError/Error with the child's
// reason). The child is a direct child of the caller.
Spawned spawn(const Container& c, const Request& r, const Stdio& io);

}  // namespace shimlet::nsenter
