// Landlock session domains (docs/isolation.md): every exec session runs in
// its own Landlock domain so sibling sessions of one container cannot
// ptrace each other, read each other's /proc/PID/{environ,mem,fd,...},
// signal each other or connect to each other's abstract unix sockets, even
// when SELinux is off. Filesystem access is not restricted (ABI >= 6).
#pragma once
#include <cstdint>
#include <string>

namespace shimlet::landlock {

// Highest Landlock ABI the running kernel supports; 0 when Landlock is not
// built in or not enabled at boot (lsm=).
int abi_version() noexcept;

// One line for logs, e.g. "landlock ABI 7: session domains with signal and
// abstract-unix-socket scoping" or "landlock unavailable: ...".
std::string status();

struct Options {
  // ABI >= 6. Scoping signals also stops a session from signalling the
  // container's own processes (a kernel rule: see docs/isolation.md).
  bool scope_signal = true;
  bool scope_abstract_unix = true;
};

// What enter_session_domain() put in place.
struct Applied {
  int abi = 0;
  uint64_t scoped = 0;      // LANDLOCK_SCOPE_* bits
  uint64_t handled_fs = 0;  // 0 on ABI >= 6; LANDLOCK_ACCESS_FS_MAKE_BLOCK before (see .cc)
};

// Puts the calling process (and its future children) into a new Landlock
// domain nested under its current one. Call it in the session child before
// execve, after joining the container's namespaces and BEFORE dropping
// capabilities: landlock_restrict_self needs CAP_SYS_ADMIN in the current
// user namespace or no_new_privs, and we must not set no_new_privs when the
// container's config does not ask for it (setuid binaries keep working).
// Returns 0, or an errno value: ENOSYS/EOPNOTSUPP when the kernel has no
// Landlock (the caller logs and continues, as documented), EPERM when
// neither CAP_SYS_ADMIN nor no_new_privs, others from the syscalls.
// No allocation, no exceptions: safe in a clone()/fork() child.
int enter_session_domain(const Options& o = {}, Applied* out = nullptr) noexcept;

// "Sessions never keep CAP_SYS_ADMIN unless the container's own config
// grants it" (docs/isolation.md "CAP_SYS_ADMIN"): true when the calling process holds CAP_SYS_ADMIN in
// its effective, permitted or ambient set (libcap-ng, capget(2)).
bool holds_cap_sys_admin();
// The assertion the session child makes right before execve: `granted` is
// whether the container's process.capabilities lists CAP_SYS_ADMIN in any
// set. Returns false (the child must refuse to exec) when the process holds
// it without the grant.
bool cap_sys_admin_ok(bool granted);

}  // namespace shimlet::landlock
