#include "landlock/landlock.h"

#include <cap-ng.h>
#include <errno.h>
#include <linux/capability.h>
#include <linux/landlock.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>

namespace shimlet::landlock {
namespace {

// Debian 12's linux-libc-dev (6.1) predates ABI 4-7: the full ruleset
// attribute and the scope bits are spelled out here from the kernel UAPI
// (include/uapi/linux/landlock.h). The kernel accepts this 24-byte layout on
// older ABIs as long as the fields it does not know are zero.
struct RulesetAttr {
  uint64_t handled_access_fs;
  uint64_t handled_access_net;  // ABI >= 4
  uint64_t scoped;              // ABI >= 6
};
constexpr uint64_t kScopeAbstractUnixSocket = 1ULL << 0;
constexpr uint64_t kScopeSignal = 1ULL << 1;
#ifndef LANDLOCK_CREATE_RULESET_ERRATA
constexpr uint32_t LANDLOCK_CREATE_RULESET_ERRATA = 1U << 1;
#endif

long create_ruleset(const RulesetAttr* attr, size_t size, uint32_t flags) noexcept {
  return ::syscall(SYS_landlock_create_ruleset, attr, size, flags);
}

}  // namespace

int abi_version() noexcept {
  long v = create_ruleset(nullptr, 0, LANDLOCK_CREATE_RULESET_VERSION);
  return v < 0 ? 0 : static_cast<int>(v);
}

std::string status() {
  long v = create_ruleset(nullptr, 0, LANDLOCK_CREATE_RULESET_VERSION);
  if (v < 0) {
    int err = errno;
    return std::string("landlock unavailable (") + (err == EOPNOTSUPP ? "disabled at boot" : "not in this kernel") +
           "): sessions are not isolated from each other by Landlock";
  }
  std::string s = "landlock ABI " + std::to_string(v) + ": own domain per session (ptrace and /proc isolation)";
  if (v >= 6) {
    s += ", signal and abstract-unix-socket scoping";
  } else {
    s += "; no signal/abstract-socket scoping before ABI 6; mknod of block devices denied (ABI < 6 needs a handled fs "
         "right)";
  }
  if (v >= 7) {
    long e = create_ruleset(nullptr, 0, LANDLOCK_CREATE_RULESET_ERRATA);
    if (e >= 0)
      s += ", errata 0x" + [](long x) {
        char b[24];
        snprintf(b, sizeof b, "%lx", x);
        return std::string(b);
      }(e);
  }
  return s;
}

int enter_session_domain(const Options& o, Applied* out) noexcept {
  long abi = create_ruleset(nullptr, 0, LANDLOCK_CREATE_RULESET_VERSION);
  if (abi < 0) return errno;
  RulesetAttr attr{};
  if (abi >= 6) {
    // Scoping only: no filesystem right is handled, so every file of the
    // container stays reachable exactly as with runc exec (and mount(2) keeps
    // working: Landlock only denies it to domains that handle fs access).
    if (o.scope_signal) attr.scoped |= kScopeSignal;
    if (o.scope_abstract_unix) attr.scoped |= kScopeAbstractUnixSocket;
  }
  if (attr.scoped == 0) {
    // The kernel refuses an empty ruleset (ENOMSG). Before ABI 6 (or with
    // scoping turned off) the domain itself is what we want (it gives the
    // ptrace/proc isolation), so handle the least used right, creating block
    // device nodes, with no rule: mknod(S_IFBLK) is denied in the session
    // (device cgroups deny using them in containers anyway).
    attr.handled_access_fs = LANDLOCK_ACCESS_FS_MAKE_BLOCK;
  }
  long fd = create_ruleset(&attr, sizeof attr, 0);
  if (fd < 0) return errno;
  long r = ::syscall(SYS_landlock_restrict_self, static_cast<int>(fd), 0U);
  int err = r < 0 ? errno : 0;
  ::close(static_cast<int>(fd));
  if (err) return err;
  if (out) *out = Applied{static_cast<int>(abi), attr.scoped, attr.handled_access_fs};
  return 0;
}

bool holds_cap_sys_admin() {
  capng_clear(CAPNG_SELECT_BOTH);
  if (capng_get_caps_process() != 0) return true;  // cannot tell: fail closed
  return capng_have_capability(CAPNG_EFFECTIVE, CAP_SYS_ADMIN) ||
         capng_have_capability(CAPNG_PERMITTED, CAP_SYS_ADMIN) || capng_have_capability(CAPNG_AMBIENT, CAP_SYS_ADMIN);
}

bool cap_sys_admin_ok(bool granted) { return granted || !holds_cap_sys_admin(); }

}  // namespace shimlet::landlock
