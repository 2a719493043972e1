// Named label.h, not selinux.h: <selinux/selinux.h> (libselinux) must stay reachable.
// SELinux process labels for session processes (libselinux). When SELinux is
// disabled on the host this backend says so plainly (enabled() == false,
// status() explains) and every call that would touch the kernel is a no-op; it
// never pretends. The label arithmetic (Level, Context, session_context) is
// pure and works everywhere.
//
// MCS scheme (see policy/README.md):
//  * A container runs as USER:ROLE:TYPE:s0:cA,cB (its pair comes from the
//    container runtime, from categories OUTSIDE the reserved session range).
//  * Each session of that container runs as USER:ROLE:TYPE:s0:cA,cB,cS where cS
//    is one category from the reserved range (default c1000.c1023), unique
//    among the live sessions of containers with that same level.
//  * Then a session dominates its container (reads/writes its files and
//    processes) but no other session (cS differs) and no other container (its
//    pair is not a subset of {cA,cB} because runtimes hand out distinct pairs and
//    cS is never in a container's pair). The container's own processes do not
//    dominate a session either.
//  * The label is set by the host-side launcher via setexeccon before execve;
//    a process can never widen its own categories.
#pragma once
#include <sys/types.h>

#include <set>
#include <string>
#include <string_view>

#include "common/fd.h"

namespace shimlet::selinux {

bool enabled();
// One line for logs: "SELinux enforcing" / "SELinux disabled on this host: session labels not applied".
std::string status();
// setexeccon(label) for the next execve of this process (the session child,
// host side, before joining). No-op when disabled or label is empty.
// Throws shimlet::Error with context on failure.
void set_exec_label(const std::string& label);
// The same for a child between fork and execve, where nothing may throw
// (common/error.h): 0, or the errno of the failure.
int set_exec_label_nothrow(const std::string& label) noexcept;

// Highest category index accepted (the MCS policies ship c0..c1023).
inline constexpr unsigned kMaxCategory = 1023;

// One MLS/MCS level: "s0", "s0:c1,c2", "s0:c0.c3,c9".
struct Level {
  unsigned sensitivity = 0;
  std::set<unsigned> categories;

  // Throws shimlet::Error on malformed input or categories > kMaxCategory.
  static Level parse(std::string_view s);
  // Canonical kernel form: runs of 3+ as cA.cB, pairs as cA,cB.
  std::string str() const;
  bool dominates(const Level& o) const;
  bool operator==(const Level&) const = default;
};

// "user:role:type:level". A range "low-high" is accepted only when low == high
// (a session needs one level); anything else is refused with a clear error.
struct Context {
  std::string user, role, type;
  Level level;

  static Context parse(std::string_view s);
  std::string str() const;
  bool operator==(const Context&) const = default;
};

// The reserved session categories, inclusive: "c1000.c1023" or "c1000-c1023".
struct CategoryRange {
  unsigned first = 1000, last = 1023;

  static CategoryRange parse(std::string_view s);
  bool contains(unsigned c) const { return c >= first && c <= last; }
  unsigned size() const { return last - first + 1; }
  std::string str() const;
};

// The session's process label: the container's user, role, type and
// categories plus `session_category`. Throws when the container's level
// already uses a reserved category (the scheme's guarantee would not hold) or
// when session_category is outside `reserved`.
Context session_context(const Context& container, unsigned session_category, const CategoryRange& reserved);

// An object's label moved to `level`, keeping its user/role/type (e.g. the
// pty slave "system_u:object_r:devpts_t:s0" -> "...:devpts_t:s0:c1,c2,c1000").
std::string object_label_at(const std::string& object_ctx, const Level& level);

// Name of the lock file for (container level, category), safe as a file name.
std::string lock_name(const Level& container, unsigned category);

// A session category held for the lifetime of this object (the session
// process): an exclusive flock on STATE/selinux/<level>.cN.lock. Sessions are
// separate processes; the kernel drops the lock when the holder exits, so a
// crash never leaks a category. Allocation starts at a rotating offset (a
// per-level counter) so a just-freed category is reused last. Lock fds are
// O_CLOEXEC: they never reach the container.
class SessionCategory {
 public:
  static SessionCategory allocate(const std::string& dir, const Level& container, const CategoryRange& reserved);
  unsigned category() const { return category_; }

 private:
  SessionCategory(Fd lock, unsigned c) : lock_(std::move(lock)), category_(c) {}
  Fd lock_;
  unsigned category_ = 0;
};

// The label of a running process (getpidcon). Throws on failure; "" when disabled.
std::string process_label(pid_t pid);

// Relabels an open file (the session's pty slave) to the session's level,
// keeping the file's type. No-op when disabled.
void label_fd_level(int fd, const Level& level);
// The same for a child between fork and execve: 0, or the errno of the failure.
int label_fd_level_nothrow(int fd, const Level& level) noexcept;
// The label of an open fd (fgetfilecon; sockets too). "" when disabled.
std::string fd_label(int fd);

// setsockcreatecon / setfscreatecon for this thread for the scope's lifetime
// (sockets/files a session creates for a forward get the session's label).
// No-op when disabled or label is empty. Restores the default on destruction.
class ScopedSockCreate {
 public:
  explicit ScopedSockCreate(const std::string& label);
  ~ScopedSockCreate();
  ScopedSockCreate(const ScopedSockCreate&) = delete;
  ScopedSockCreate& operator=(const ScopedSockCreate&) = delete;

 private:
  bool set_ = false;
};
class ScopedFsCreate {
 public:
  explicit ScopedFsCreate(const std::string& label);
  ~ScopedFsCreate();
  ScopedFsCreate(const ScopedFsCreate&) = delete;
  ScopedFsCreate& operator=(const ScopedFsCreate&) = delete;

 private:
  bool set_ = false;
};

}  // namespace shimlet::selinux
