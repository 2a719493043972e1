// The plan: everything a command needs to start in the container, computed
// before anything is forked so that the child only issues syscalls. The
// container's part does not depend on the request (the zygote computes it
// while it waits); the request's part completes it per command. Internal to
// nsenter/ and its unit tests.
#pragma once
#include <linux/filter.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/types.h>

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "landlock/landlock.h"
#include "nsenter/nsenter.h"
#include "oci/oci.h"
#include "selinux/label.h"

namespace shimlet::nsenter {

struct NsType {
  const char* name;
  int flag;
};
// The order we open and (for non-user types) join them in.
inline constexpr NsType kNsTypes[] = {{"user", CLONE_NEWUSER},     {"mnt", CLONE_NEWNS},   {"pid", CLONE_NEWPID},
                                      {"net", CLONE_NEWNET},       {"ipc", CLONE_NEWIPC},  {"uts", CLONE_NEWUTS},
                                      {"cgroup", CLONE_NEWCGROUP}, {"time", CLONE_NEWTIME}};

// The CLONE_NEW* flag of a namespace type name; throws on an unknown one.
int ns_flag(const std::string& name);

// Everything the child needs, computed before fork.
struct Plan {
  std::vector<std::string> argv_s, env_s, candidates_s;
  std::vector<char*> argv, envp;
  std::vector<const char*> candidates;  // execve targets in order (PATH search)
  bool searched = false;                // argv[0] had no '/'

  std::optional<int> oom_score_adj;
  std::vector<oci::Rlimit> rlimits;
  std::vector<std::pair<int, int>> ns;  // (fd, CLONE_NEW*) non-user, non-pid
  int userns_fd = -1;

  bool tty = false;
  winsize ws{};
  int in = -1, out = -1, err = -1;

  bool nnp = false;
  mode_t umask = 022;
  std::string selinux_label;
  std::optional<selinux::Level> pty_level;  // relabel the pty slave to the session's level

  std::optional<landlock::Options> landlock;
  bool pty_exclusive = false;  // TIOCEXCL on the pty slave (sibling sessions cannot open it)
  bool cap_sys_admin_granted = false;

  bool seccomp = false;
  std::vector<sock_filter> bpf;
  unsigned seccomp_flags = 0;

  std::vector<int> bounding, effective, permitted, inheritable, ambient;
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;
  bool allow_setgroups = true;
  std::string cwd;
};

// "KEY=VALUE" list: later entries replace earlier ones with the same key and
// keep the first position (runc sets them one by one with os.Setenv).
void set_env(std::vector<std::string>& env, const std::string& kv);
// The value of KEY in a "KEY=VALUE" list.
std::optional<std::string> env_get(const std::vector<std::string>& env, const std::string& key);
// The home directory of uid in an /etc/passwd text ("/" when it has none, as runc).
std::string home_from_passwd(std::string_view passwd, uid_t uid);
// HOME from the container's /etc/passwd, resolved inside the container's root
// (RESOLVE_IN_ROOT: symlinks cannot escape to host files). Default "/" as runc.
std::string container_home(pid_t init_pid, uid_t uid);

// The request's own errors, reported by the caller before anything is forked.
void validate(const Request& r);
// The container's part of the plan: nothing here depends on the request, so
// the zygote computes it while it waits for one (compiling a seccomp profile
// takes milliseconds).
Plan prepare_container(const Container& c);
// Completes plan (from prepare_container) with the request's part, in place:
// the char* arrays point into plan's own strings, so plan must not move after.
// r passed validate() in the caller. HOME is read here, not ahead: the
// container's /etc/passwd may change while a zygote waits.
void prepare_request(Plan& plan, const Container& c, const Request& r, const Stdio& io);

}  // namespace shimlet::nsenter
