// The command's process from its clone to execve (nsenter/internal.h): after
// clone mostly syscalls and nothing that throws; failures go to the parent as
// reports.
#include <cap-ng.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/magic.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <termios.h>
#include <unistd.h>

#include "common/fd.h"
#include "nsenter/internal.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif

namespace shimlet::nsenter {

[[noreturn]] void child_fail(int sock, const char* step, int err, int32_t code) {
  Report rep{};
  rep.type = kMsgError;
  rep.code = code;
  rep.err = err;
  snprintf(rep.step, sizeof rep.step, "%s", step);
  (void)::send(sock, &rep, sizeof rep, MSG_NOSIGNAL);
  _exit(code == kSetup ? 1 : code);
}

namespace {

void child_send_fd(int sock, int fd) {
  Report rep{};
  rep.type = kMsgPty;
  if (int e = send_fds_nothrow(sock, {&fd, 1}, &rep, sizeof rep)) child_fail(sock, "send pty master to parent", e);
}

void load_seccomp(int sock, const Plan& plan) {
  sock_fprog prog{static_cast<unsigned short>(plan.bpf.size()), const_cast<sock_filter*>(plan.bpf.data())};
  if (::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, plan.seccomp_flags, &prog) < 0)
    child_fail(sock, "seccomp(SECCOMP_SET_MODE_FILTER)", errno);
}

// Opens the container's devpts ptmx (we are in its mount namespace now) and
// makes the peer our controlling terminal; the master goes to the parent.
void setup_tty(int sock, const Plan& plan) {
  int m = ::open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
  if (m < 0) child_fail(sock, "open /dev/pts/ptmx in the container", errno);
  // It must really be a devpts multiplexer, not something the container
  // placed there (a FIFO, a FUSE file, another device).
  struct statfs sfs;
  struct stat st;
  if (::fstatfs(m, &sfs) < 0) child_fail(sock, "fstatfs /dev/pts/ptmx", errno);
  if (sfs.f_type != DEVPTS_SUPER_MAGIC) child_fail(sock, "/dev/pts/ptmx is not on a devpts filesystem", EINVAL);
  if (::fstat(m, &st) < 0) child_fail(sock, "fstat /dev/pts/ptmx", errno);
  if (!S_ISCHR(st.st_mode) || major(st.st_rdev) != 5 || minor(st.st_rdev) != 2)
    child_fail(sock, "/dev/pts/ptmx is not the pty multiplexer (char 5:2)", EINVAL);
  int fl = ::fcntl(m, F_GETFL);
  if (fl < 0 || ::fcntl(m, F_SETFL, fl & ~O_NONBLOCK) < 0) child_fail(sock, "fcntl ptmx", errno);
  int unlock = 0;
  if (::ioctl(m, TIOCSPTLCK, &unlock) < 0) child_fail(sock, "ioctl(TIOCSPTLCK) unlockpt", errno);
  if (plan.ws.ws_col && plan.ws.ws_row && ::ioctl(m, TIOCSWINSZ, &plan.ws) < 0)
    child_fail(sock, "ioctl(TIOCSWINSZ)", errno);
  // The peer straight from the master: no /dev/pts/N path lookup to race.
  int s = ::ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
  if (s < 0) child_fail(sock, "ioctl(TIOCGPTPEER)", errno);
  if (::ioctl(s, TIOCSCTTY, 0) < 0) child_fail(sock, "ioctl(TIOCSCTTY)", errno);
  // Landlock does not cover opening a same-uid sibling's /dev/pts/N: with
  // TIOCEXCL any further open needs CAP_SYS_ADMIN (docs/isolation.md "Ptys").
  if (plan.pty_exclusive && ::ioctl(s, TIOCEXCL) < 0) child_fail(sock, "ioctl(TIOCEXCL)", errno);
  if (plan.pty_level)
    if (int e = selinux::label_fd_level_nothrow(s, *plan.pty_level))
      child_fail(sock, "relabel the pty to the session's SELinux level", e);
  child_send_fd(sock, m);
  ::close(m);
  for (int fd = 0; fd < 3; fd++)
    if (::dup2(s, fd) < 0) child_fail(sock, "dup2 pty onto stdio", errno);
  if (s > 2) ::close(s);
}

void setup_stdio(int sock, const Plan& plan) {
  // Move them out of 0..2 first so overlapping assignments cannot clobber.
  int tmp[3] = {plan.in, plan.out, plan.err};
  for (int& fd : tmp) {
    fd = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0) child_fail(sock, "dup stdio fd", errno);
  }
  for (int i = 0; i < 3; i++) {
    if (::dup2(tmp[i], i) < 0) child_fail(sock, "dup2 stdio", errno);
  }
  for (int fd : tmp) ::close(fd);
}

// runc's fixStdioPermissions: stdio belongs to the user the command runs as
// (so e.g. `echo > /dev/stdout` works for non-root), /dev/null excepted;
// unmapped owners and read-only /dev are skipped.
void fix_stdio_owner(int sock, const Plan& plan) {
  struct stat null_st;
  bool have_null = ::stat("/dev/null", &null_st) == 0;
  for (int fd = 0; fd < 3; fd++) {
    struct stat st;
    if (::fstat(fd, &st) < 0) child_fail(sock, "fstat stdio", errno);
    if (have_null && S_ISCHR(st.st_mode) && st.st_rdev == null_st.st_rdev) continue;
    if (st.st_uid == plan.uid) continue;
    if (::fchown(fd, plan.uid, st.st_gid) < 0 && errno != EINVAL && errno != EPERM && errno != EROFS)
      child_fail(sock, "fchown stdio to the container user", errno);
  }
}

}  // namespace

[[noreturn]] void child_main(int sock, const Plan& plan) {
  // CVE-2016-9962: nothing in the container may ptrace or open /proc/PID of
  // this process while it still holds host resources.
  if (plan.oom_score_adj) {
    char buf[16];
    int n = snprintf(buf, sizeof buf, "%d", *plan.oom_score_adj);
    int fd = ::open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd < 0 || ::write(fd, buf, static_cast<size_t>(n)) != n) child_fail(sock, "write oom_score_adj", errno);
    ::close(fd);
  }
  if (::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) child_fail(sock, "prctl(PR_SET_DUMPABLE, 0)", errno);

  // Signal state is inherited across execve: give the command a clean one
  // (the session blocks signals for its signalfd and ignores SIGPIPE).
  for (int sig = 1; sig < NSIG; sig++)
    if (sig != SIGKILL && sig != SIGSTOP) ::signal(sig, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);

  // Wait until the parent has placed us in the container's cgroups.
  char go = 0;
  ssize_t n;
  do n = ::recv(sock, &go, 1, 0);
  while (n < 0 && errno == EINTR);
  if (n != 1 || go != 'G') _exit(1);  // parent gave up: nothing to report to

  // Rlimits before the user namespace, so hard limits can still be raised.
  for (const auto& rl : plan.rlimits) {
    rlimit lim{static_cast<rlim_t>(rl.soft), static_cast<rlim_t>(rl.hard)};
    if (::setrlimit(static_cast<__rlimit_resource_t>(rl.resource), &lim) < 0) child_fail(sock, "setrlimit", errno);
  }

  // Non-user namespaces first (with host privileges), then the user
  // namespace and root in it, then whatever needed the user namespace.
  bool failed[16] = {};
  for (size_t i = 0; i < plan.ns.size() && i < 16; i++) failed[i] = ::setns(plan.ns[i].first, plan.ns[i].second) < 0;
  if (plan.userns_fd >= 0) {
    if (::setns(plan.userns_fd, CLONE_NEWUSER) < 0) child_fail(sock, "setns(user namespace)", errno);
    if (::setresgid(0, 0, 0) < 0) child_fail(sock, "setresgid(0) in the user namespace", errno);
    if (::setresuid(0, 0, 0) < 0) child_fail(sock, "setresuid(0) in the user namespace", errno);
  }
  for (size_t i = 0; i < plan.ns.size() && i < 16; i++) {
    if (failed[i] && ::setns(plan.ns[i].first, plan.ns[i].second) < 0) {
      const char* what = "setns";
      for (const auto& t : kNsTypes)
        if (t.flag == plan.ns[i].second) what = t.name;
      char step[64];
      snprintf(step, sizeof step, "setns(%s namespace)", what);
      child_fail(sock, step, errno);
    }
  }

  if (::setsid() < 0) child_fail(sock, "setsid", errno);
  // Own Landlock domain: after every setns (we hold CAP_SYS_ADMIN in the
  // container's user namespace, so no NO_NEW_PRIVS is needed) and before the
  // capability drop and seccomp (whose filter may not allow landlock_*).
  if (plan.landlock) {
    landlock::Applied applied;
    int e = landlock::enter_session_domain(*plan.landlock, &applied);
    if (e != 0 && e != ENOSYS && e != EOPNOTSUPP) child_fail(sock, "enter a Landlock session domain", e);
    Report lr{};
    lr.type = kMsgLandlock;
    lr.code = e == 0 ? applied.abi : 0;
    (void)::send(sock, &lr, sizeof lr, MSG_NOSIGNAL);
  }
  if (plan.tty)
    setup_tty(sock, plan);
  else
    setup_stdio(sock, plan);

  if (plan.nnp && ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) child_fail(sock, "prctl(PR_SET_NO_NEW_PRIVS)", errno);
  ::umask(plan.umask);
  if (int e = selinux::set_exec_label_nothrow(plan.selinux_label)) child_fail(sock, "SELinux setexeccon", e);
  // Without NO_NEW_PRIVS loading a filter needs CAP_SYS_ADMIN: before the drop.
  if (plan.seccomp && !plan.nnp) load_seccomp(sock, plan);

  // CVE-2024-21626: no inherited fd survives execve (our report socket is
  // O_CLOEXEC already and must stay usable until then).
  if (::syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) < 0) child_fail(sock, "close_range(CLOEXEC)", errno);

  // chdir as root first; if root may not enter it, retry as the user (runc).
  bool chdir_later = false;
  if (::chdir(plan.cwd.c_str()) < 0) {
    if (errno != EACCES && errno != EPERM) child_fail(sock, "chdir to the configured cwd", errno);
    chdir_later = true;
  }

  capng_clear(CAPNG_SELECT_ALL);
  for (int cap : plan.bounding) capng_update(CAPNG_ADD, CAPNG_BOUNDING_SET, static_cast<unsigned>(cap));
  if (capng_apply(CAPNG_SELECT_BOUNDS) < 0) child_fail(sock, "drop capability bounding set", errno ? errno : EPERM);
  if (::prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0) child_fail(sock, "prctl(PR_SET_KEEPCAPS, 1)", errno);

  fix_stdio_owner(sock, plan);
  if (plan.allow_setgroups && ::setgroups(plan.groups.size(), plan.groups.data()) < 0)
    child_fail(sock, "setgroups(additionalGids)", errno);
  if (::setresgid(plan.gid, plan.gid, plan.gid) < 0) child_fail(sock, "setgid", errno);
  if (::setresuid(plan.uid, plan.uid, plan.uid) < 0) child_fail(sock, "setuid", errno);
  if (chdir_later && ::chdir(plan.cwd.c_str()) < 0) child_fail(sock, "chdir to the configured cwd", errno);
  if (::prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0) < 0) child_fail(sock, "prctl(PR_SET_KEEPCAPS, 0)", errno);

  // CVE-2024-21626: the cwd must be reachable from the container's root.
  // (Raw syscall: glibc hides the kernel's "(unreachable)" prefix.)
  char cwd[4096];
  long cl = ::syscall(SYS_getcwd, cwd, sizeof cwd);
  if (cl < 0) child_fail(sock, "getcwd", errno);
  if (cwd[0] != '/') child_fail(sock, "working directory is outside the container", EPERM);

  // The config's five sets, as runc's ApplyCaps (libcontainer/capabilities)
  // after the uid change: effective, permitted and inheritable in one capset
  // (a set the kernel refuses, e.g. effective beyond permitted or
  // inheritable beyond the bounding set, refuses the exec as runc does);
  // then the ambient set, each listed capability raised. CVE-2022-29162 was
  // runc exec adding inheritable capabilities of its own: only the config's
  // are applied here. Like runc, a raise the kernel refuses (EPERM: not in
  // both permitted and inheritable) leaves that capability out silently
  // (runc spec's default lists ambient capabilities without inheritable
  // ones), and EINVAL means a kernel without ambient capabilities.
  capng_clear(CAPNG_SELECT_CAPS);
  for (int cap : plan.effective) capng_update(CAPNG_ADD, CAPNG_EFFECTIVE, static_cast<unsigned>(cap));
  for (int cap : plan.permitted) capng_update(CAPNG_ADD, CAPNG_PERMITTED, static_cast<unsigned>(cap));
  for (int cap : plan.inheritable) capng_update(CAPNG_ADD, CAPNG_INHERITABLE, static_cast<unsigned>(cap));
  if (capng_apply(CAPNG_SELECT_CAPS) < 0) child_fail(sock, "capset", errno ? errno : EPERM);
  if (::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
    child_fail(sock, "prctl(PR_CAP_AMBIENT_CLEAR_ALL)", errno);
  for (int cap : plan.ambient)
    if (::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, static_cast<unsigned long>(cap), 0, 0) < 0 && errno != EPERM &&
        errno != EINVAL)
      child_fail(sock, "prctl(PR_CAP_AMBIENT_RAISE)", errno);
  // docs/isolation.md "CAP_SYS_ADMIN": a session never keeps CAP_SYS_ADMIN unless the container's
  // config grants it (with it, Landlock would not hide a sibling's environ).
  if (plan.landlock && !landlock::cap_sys_admin_ok(plan.cap_sys_admin_granted))
    child_fail(sock, "session would keep CAP_SYS_ADMIN that the container's config does not grant", EPERM);

  // Tell the parent we reached execve before a NO_NEW_PRIVS filter might
  // forbid talking to it.
  Report rep{};
  rep.type = kMsgExec;
  (void)::send(sock, &rep, sizeof rep, MSG_NOSIGNAL);
  if (plan.seccomp && plan.nnp) load_seccomp(sock, plan);

  int saw = ENOENT;
  for (const char* path : plan.candidates) {
    ::execve(path, plan.argv.data(), plan.envp.data());
    int e = errno;
    if (!plan.searched) {
      saw = e;
      break;
    }
    if (e == ENOENT || e == ENOTDIR) continue;  // keep searching, like LookPath/execvp
    saw = e;
    if (e != EACCES) break;
  }
  int32_t code = (saw == ENOENT || saw == ENOTDIR) ? kNotFound : kNotExecutable;
  child_fail(sock, "execve", saw, code);
}

}  // namespace shimlet::nsenter
