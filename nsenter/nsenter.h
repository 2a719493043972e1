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
  // Issue 5 (docs/isolation.md): the command gets its own Landlock domain
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

// Starts the command. Must be called from a process that is not multi-threaded.
// Returns once the child has passed execve (or throws ExecError/Error with
// the child's reason). The child is a direct child of the caller.
Spawned spawn(const Container& c, const Request& r, const Stdio& io);

}  // namespace shimlet::nsenter
