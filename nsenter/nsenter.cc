// Our own nsenter. The child follows runc exec's order (docs/design.md
// "nsenter order"); everything that can be computed up front (argv, env,
// PATH candidates, the seccomp BPF program, capability numbers) is prepared
// in the parent before fork, so the child mostly issues syscalls.
#include "nsenter/nsenter.h"

#include <cap-ng.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/filter.h>
#include <linux/magic.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <set>
#include <utility>

#include "common/error.h"
#include "selinux/label.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif

namespace shimlet::nsenter {
namespace {

// Debian 12's <sys/pidfd.h> lacks extern "C" for C++: use the syscall.
int sys_pidfd_open(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

struct NsType {
  const char* name;
  int flag;
};
// The order we open and (for non-user types) join them in.
constexpr NsType kNsTypes[] = {{"user", CLONE_NEWUSER},     {"mnt", CLONE_NEWNS},   {"pid", CLONE_NEWPID},
                               {"net", CLONE_NEWNET},       {"ipc", CLONE_NEWIPC},  {"uts", CLONE_NEWUTS},
                               {"cgroup", CLONE_NEWCGROUP}, {"time", CLONE_NEWTIME}};

int ns_flag(const std::string& name) {
  for (const auto& t : kNsTypes)
    if (name == t.name) return t.flag;
  throw Error("nsenter: unknown namespace type \"" + name + "\"");
}

constexpr auto kChildTimeout = std::chrono::seconds(10);
constexpr size_t kMaxPasswdBytes = 1 << 20;

// Child -> parent messages over the SOCK_SEQPACKET pair (fixed size, no
// allocation in the child).
enum : char { kMsgPty = 'T', kMsgExec = 'X', kMsgError = 'E', kMsgLandlock = 'L', kMsgForked = 'F' };
enum : int32_t { kSetup = 0, kNotFound = 127, kNotExecutable = 126 };
struct Report {
  char type;
  int32_t code;  // kSetup / kNotFound / kNotExecutable; kMsgForked: the command's host pid
  int32_t err;   // errno
  char step[120];
};

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

// ---------- preparation (parent) ----------

std::string read_small_file(int fd, size_t max, const std::string& what) {
  // Grown as read, not allocated at max: a zero-filled 1 MiB buffer costs 256
  // page faults on the exec path for a passwd file of a hundred bytes.
  std::string buf;
  char chunk[16384];
  for (;;) {
    ssize_t n = ::read(fd, chunk, sizeof chunk);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw sys_error("read " + what);
    }
    if (n == 0) break;
    buf.append(chunk, static_cast<size_t>(n));
    if (buf.size() > max) throw Error(what + ": larger than " + std::to_string(max) + " bytes");
  }
  return buf;
}

int last_cap() {
  Fd fd(::open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC));
  if (!fd) throw sys_error("open /proc/sys/kernel/cap_last_cap");
  std::string s = read_small_file(fd.get(), 16, "/proc/sys/kernel/cap_last_cap");
  return std::stoi(s);
}

// Capability names to numbers. Unknown names or ones this kernel lacks are
// ignored, as runc does: ignoring only ever grants less.
std::vector<int> cap_numbers(const std::vector<std::string>& names, int last) {
  std::set<int> out;
  for (const auto& n : names) {
    auto c = oci::capability_from_name(n);
    if (c && *c <= last) out.insert(*c);
  }
  return {out.begin(), out.end()};
}

// "KEY=VALUE" list: later entries replace earlier ones with the same key and
// keep the first position (runc sets them one by one with os.Setenv).
void set_env(std::vector<std::string>& env, const std::string& kv) {
  auto eq = kv.find('=');
  if (eq == std::string::npos || eq == 0) throw Error("invalid environment variable (need KEY=VALUE): " + kv);
  for (auto& e : env) {
    if (e.compare(0, eq + 1, kv, 0, eq + 1) == 0) {
      e = kv;
      return;
    }
  }
  env.push_back(kv);
}

std::optional<std::string> env_get(const std::vector<std::string>& env, const std::string& key) {
  for (const auto& e : env)
    if (e.size() > key.size() && e.compare(0, key.size(), key) == 0 && e[key.size()] == '=')
      return e.substr(key.size() + 1);
  return std::nullopt;
}

// HOME from the container's /etc/passwd, resolved inside the container's root
// (RESOLVE_IN_ROOT: symlinks cannot escape to host files). Default "/" as runc.
std::string container_home(pid_t init_pid, uid_t uid) {
  std::string root = "/proc/" + std::to_string(init_pid) + "/root";
  Fd rootfd(::open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!rootfd) throw sys_error("open " + root);
  open_how how{};
  how.flags = O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
  how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
  Fd fd(static_cast<int>(::syscall(SYS_openat2, rootfd.get(), "etc/passwd", &how, sizeof how)));
  if (!fd) return "/";  // no passwd file: runc falls back to the default too
  struct stat st;
  if (::fstat(fd.get(), &st) < 0 || !S_ISREG(st.st_mode)) return "/";
  std::string text = read_small_file(fd.get(), kMaxPasswdBytes, "container /etc/passwd");
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    std::string_view line(text.data() + pos, (nl == std::string::npos ? text.size() : nl) - pos);
    pos = nl == std::string::npos ? text.size() : nl + 1;
    // name:password:uid:gid:gecos:home:shell
    std::vector<std::string_view> f;
    size_t s = 0;
    for (;;) {
      size_t c = line.find(':', s);
      f.push_back(line.substr(s, c == std::string_view::npos ? std::string_view::npos : c - s));
      if (c == std::string_view::npos) break;
      s = c + 1;
    }
    if (f.size() < 6 || f[2].empty()) continue;
    if (f[2] == std::to_string(uid)) return f[5].empty() ? "/" : std::string(f[5]);
  }
  return "/";
}

uint32_t seccomp_action(const std::string& a, std::optional<unsigned> errno_ret) {
  if (a == "SCMP_ACT_KILL" || a == "SCMP_ACT_KILL_THREAD") return SCMP_ACT_KILL_THREAD;
  if (a == "SCMP_ACT_KILL_PROCESS") return SCMP_ACT_KILL_PROCESS;
  if (a == "SCMP_ACT_TRAP") return SCMP_ACT_TRAP;
  if (a == "SCMP_ACT_ERRNO") return SCMP_ACT_ERRNO(errno_ret.value_or(EPERM));
  if (a == "SCMP_ACT_TRACE") return SCMP_ACT_TRACE(errno_ret.value_or(EPERM));
  if (a == "SCMP_ACT_ALLOW") return SCMP_ACT_ALLOW;
  if (a == "SCMP_ACT_LOG") return SCMP_ACT_LOG;
  throw Error("seccomp: unsupported action " + a);
}

scmp_compare seccomp_op(const std::string& op) {
  if (op == "SCMP_CMP_NE") return SCMP_CMP_NE;
  if (op == "SCMP_CMP_LT") return SCMP_CMP_LT;
  if (op == "SCMP_CMP_LE") return SCMP_CMP_LE;
  if (op == "SCMP_CMP_EQ") return SCMP_CMP_EQ;
  if (op == "SCMP_CMP_GE") return SCMP_CMP_GE;
  if (op == "SCMP_CMP_GT") return SCMP_CMP_GT;
  if (op == "SCMP_CMP_MASKED_EQ") return SCMP_CMP_MASKED_EQ;
  throw Error("seccomp: unsupported operator " + op);
}

// Builds the filter with libseccomp the way runc does (libcontainer/seccomp)
// and exports the BPF program, which the child loads with seccomp(2).
void prepare_seccomp(const oci::Seccomp& s, Plan& plan) {
  uint32_t def = seccomp_action(s.default_action, s.default_errno_ret);
  std::unique_ptr<void, void (*)(void*)> ctx(seccomp_init(def), [](void* c) { seccomp_release(c); });
  if (!ctx) throw Error("seccomp_init failed");
  // NO_NEW_PRIVS is decided by config.process.noNewPrivileges, not libseccomp.
  if (int rc = seccomp_attr_set(ctx.get(), SCMP_FLTATR_CTL_NNP, 0); rc < 0)
    throw sys_error("seccomp_attr_set(CTL_NNP)", -rc);
  for (const auto& a : s.architectures) {
    std::string name = a.rfind("SCMP_ARCH_", 0) == 0 ? a.substr(10) : a;
    for (auto& ch : name) ch = static_cast<char>(::tolower(static_cast<unsigned char>(ch)));
    uint32_t arch = seccomp_arch_resolve_name(name.c_str());
    if (arch == 0) throw Error("seccomp: unknown architecture " + a);
    int rc = seccomp_arch_add(ctx.get(), arch);
    if (rc < 0 && rc != -EEXIST) throw sys_error("seccomp_arch_add(" + a + ")", -rc);
  }
  for (const auto& f : s.flags) {
    if (f == "SECCOMP_FILTER_FLAG_LOG") {
      plan.seccomp_flags |= SECCOMP_FILTER_FLAG_LOG;
    } else if (f == "SECCOMP_FILTER_FLAG_SPEC_ALLOW") {
      plan.seccomp_flags |= SECCOMP_FILTER_FLAG_SPEC_ALLOW;
    } else if (f == "SECCOMP_FILTER_FLAG_TSYNC") {
      // The child is single-threaded: nothing to synchronise.
    } else {
      throw Error("seccomp: unsupported flag " + f);
    }
  }
  for (const auto& r : s.syscalls) {
    uint32_t act = seccomp_action(r.action, r.errno_ret);
    if (act == def) continue;  // libseccomp rejects it; it is a no-op anyway
    std::vector<scmp_arg_cmp> conds;
    unsigned per_index[6] = {};
    bool repeated = false;
    for (const auto& a : r.args) {
      conds.push_back(scmp_arg_cmp{a.index, seccomp_op(a.op), a.value, a.value_two});
      repeated |= ++per_index[a.index % 6] > 1;
    }
    for (const auto& name : r.names) {
      int nr = seccomp_syscall_resolve_name(name.c_str());
      if (nr == __NR_SCMP_ERROR) continue;  // unknown to this libseccomp/arch: runc ignores it too
      auto add = [&](const scmp_arg_cmp* c, unsigned n) {
        int rc = seccomp_rule_add_array(ctx.get(), act, nr, n, c);
        if (rc < 0) throw sys_error("seccomp: adding rule for syscall " + name, -rc);
      };
      if (conds.empty()) {
        add(nullptr, 0);
      } else if (repeated) {
        // Several conditions on one argument: each is its own rule (OR), as runc does.
        for (const auto& c : conds) add(&c, 1);
      } else {
        add(conds.data(), static_cast<unsigned>(conds.size()));
      }
    }
  }
  // Export the BPF program through a memfd (libseccomp 2.5 exports to fds only).
  Fd mem(::memfd_create("shimlet-seccomp", MFD_CLOEXEC));
  if (!mem) throw sys_error("memfd_create");
  if (int rc = seccomp_export_bpf(ctx.get(), mem.get()); rc < 0) throw sys_error("seccomp_export_bpf", -rc);
  if (::lseek(mem.get(), 0, SEEK_SET) < 0) throw sys_error("lseek memfd");
  std::string prog = read_small_file(mem.get(), BPF_MAXINSNS * sizeof(sock_filter) * 8, "seccomp program");
  if (prog.empty() || prog.size() % sizeof(sock_filter) != 0) throw Error("seccomp: bad exported program size");
  if (prog.size() / sizeof(sock_filter) > BPF_MAXINSNS)
    throw Error("seccomp: filter has " + std::to_string(prog.size() / sizeof(sock_filter)) +
                " instructions, more than the kernel's limit of " + std::to_string(BPF_MAXINSNS));
  plan.bpf.resize(prog.size() / sizeof(sock_filter));
  memcpy(plan.bpf.data(), prog.data(), prog.size());
  plan.seccomp = true;
}

// The request's own errors, reported by the caller before anything is forked.
void validate(const Request& r) {
  if (r.argv.empty()) throw Error("nsenter: empty command");
  for (const auto& a : r.argv)
    if (a.find('\0') != std::string::npos) throw Error("nsenter: command argument contains a NUL byte");
  if (r.argv[0].empty()) throw ExecError("exec: empty command name", 127);
}

// The container's part of the plan: nothing here depends on the request, so
// the zygote computes it while it waits for one (compiling a seccomp profile
// takes milliseconds).
Plan prepare_container(const Container& c) {
  const oci::Process& p = c.config.process;
  Plan plan;
  for (const auto& e : p.env) set_env(plan.env_s, e);
  plan.oom_score_adj = p.oom_score_adj;
  plan.rlimits = p.rlimits;
  for (const auto& [type, fd] : c.ns_fds) {
    int flag = ns_flag(type);
    if (fd < 0) throw Error("nsenter: bad fd for namespace " + type);
    if (flag == CLONE_NEWUSER)
      plan.userns_fd = fd;
    else if (flag != CLONE_NEWPID)  // the pid namespace applies through fork
      plan.ns.emplace_back(fd, flag);
  }
  if (plan.ns.size() > 8) throw Error("nsenter: too many namespace fds");

  plan.nnp = p.no_new_privileges;
  // runc exec leaves process.user.umask to container init and runs the
  // command with 0022 (its caller's usual umask); parity over the spec here.
  plan.umask = 022;
  for (const auto* set : {&p.caps.bounding, &p.caps.effective, &p.caps.permitted, &p.caps.inheritable, &p.caps.ambient})
    for (const auto& n : *set) plan.cap_sys_admin_granted |= n == "CAP_SYS_ADMIN";
  if (c.config.seccomp) prepare_seccomp(*c.config.seccomp, plan);

  int last = last_cap();
  plan.bounding = cap_numbers(p.caps.bounding, last);
  plan.effective = cap_numbers(p.caps.effective, last);
  plan.permitted = cap_numbers(p.caps.permitted, last);
  plan.inheritable = cap_numbers(p.caps.inheritable, last);
  plan.ambient = cap_numbers(p.caps.ambient, last);
  plan.uid = p.uid;
  plan.gid = p.gid;
  plan.groups.assign(p.additional_gids.begin(), p.additional_gids.end());
  // setgroups(2) is refused in user namespaces whose setgroups file says
  // "deny"; runc then silently skips it. The flag belongs to the namespace,
  // so the container init's view is ours after joining.
  {
    std::string path = "/proc/" + std::to_string(c.init_pid) + "/setgroups";
    Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd) plan.allow_setgroups = read_small_file(fd.get(), 64, path).rfind("deny", 0) != 0;
  }
  plan.cwd = p.cwd.empty() ? "/" : p.cwd;
  return plan;
}

// Completes plan (from prepare_container) with the request's part, in place:
// the char* arrays point into plan's own strings, so plan must not move after.
// r passed validate() in the caller. HOME is read here, not ahead: the
// container's /etc/passwd may change while a zygote waits.
void prepare_request(Plan& plan, const Container& c, const Request& r, const Stdio& io) {
  const oci::Process& p = c.config.process;
  plan.argv_s = r.argv;
  for (const auto& e : r.extra_env) set_env(plan.env_s, e);
  if (auto home = env_get(plan.env_s, "HOME"); !home || home->empty())
    set_env(plan.env_s, "HOME=" + container_home(c.init_pid, p.uid));
  for (auto& s : plan.argv_s) plan.argv.push_back(s.data());
  plan.argv.push_back(nullptr);
  for (auto& s : plan.env_s) plan.envp.push_back(s.data());
  plan.envp.push_back(nullptr);

  // Go's exec.LookPath with the container's PATH: a name with '/' is used
  // as is; otherwise each absolute PATH entry in order (relative entries are
  // refused by Go >= 1.19, so they are skipped).
  const std::string& name = r.argv[0];
  if (name.empty()) throw ExecError("exec: empty command name", 127);
  if (name.find('/') != std::string::npos) {
    plan.candidates_s.push_back(name);
  } else {
    plan.searched = true;
    std::string path = env_get(plan.env_s, "PATH").value_or("");
    size_t s = 0;
    while (s <= path.size() && !path.empty()) {
      size_t colon = path.find(':', s);
      std::string dir = path.substr(s, colon == std::string::npos ? std::string::npos : colon - s);
      if (!dir.empty() && dir[0] == '/') plan.candidates_s.push_back(dir + (dir.back() == '/' ? "" : "/") + name);
      if (colon == std::string::npos) break;
      s = colon + 1;
    }
  }
  for (const auto& s : plan.candidates_s) plan.candidates.push_back(s.c_str());

  plan.tty = io.tty;
  plan.ws.ws_col = io.cols;
  plan.ws.ws_row = io.rows;
  if (!io.tty) {
    if (io.in < 0 || io.out < 0 || io.err < 0) throw Error("nsenter: stdio fds are required without a tty");
    plan.in = io.in;
    plan.out = io.out;
    plan.err = io.err;
  }
  plan.selinux_label = r.selinux_exec_label.empty() ? p.selinux_label : r.selinux_exec_label;
  if (!r.selinux_exec_label.empty() && selinux::enabled())
    plan.pty_level = selinux::Context::parse(r.selinux_exec_label).level;
  plan.landlock = r.landlock;
  plan.pty_exclusive = r.landlock.has_value();
}

// ---------- the child ----------

[[noreturn]] void child_fail(int sock, const char* step, int err, int32_t code = kSetup) {
  Report rep{};
  rep.type = kMsgError;
  rep.code = code;
  rep.err = err;
  snprintf(rep.step, sizeof rep.step, "%s", step);
  (void)::send(sock, &rep, sizeof rep, MSG_NOSIGNAL);
  _exit(code == kSetup ? 1 : code);
}

void child_send_fd(int sock, int fd) {
  Report rep{};
  rep.type = kMsgPty;
  iovec iov{&rep, sizeof rep};
  alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = cbuf;
  msg.msg_controllen = sizeof cbuf;
  cmsghdr* cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(cm), &fd, sizeof(int));
  while (::sendmsg(sock, &msg, MSG_NOSIGNAL) < 0)
    if (errno != EINTR) child_fail(sock, "send pty master to parent", errno);
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
  if (plan.pty_level) {
    try {
      selinux::label_fd_level(s, *plan.pty_level);
    } catch (...) {
      child_fail(sock, "relabel the pty to the session's SELinux level", errno ? errno : EACCES);
    }
  }
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
  try {
    selinux::set_exec_label(plan.selinux_label);
  } catch (...) {
    child_fail(sock, "SELinux setexeccon", errno ? errno : EINVAL);
  }
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

// ---------- the parent ----------

struct ChildGuard {  // kills and reaps the child unless released
  pid_t pid;
  ~ChildGuard() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
      }
    }
  }
};

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char ch : s.substr(0, 200)) out += (ch >= 0x20 && ch < 0x7f && ch != '"') ? char(ch) : '?';
  return out + "\"";
}

// ---------- the zygote ----------

// The request crosses from the session to its zygote as one SOCK_SEQPACKET
// message (a private, fixed format between two copies of this code; stdio
// fds ride along as SCM_RIGHTS): u8 tty, u8 landlock, u8 scope_signal,
// u8 scope_abstract_unix, u16 cols, u16 rows, then length-prefixed (u32)
// string lists argv and extra_env, then the SELinux label.
constexpr size_t kMaxRequestBytes = 1 << 20;

void put_u32(std::string& b, uint32_t v) { b.append(reinterpret_cast<const char*>(&v), sizeof v); }
void put_str(std::string& b, const std::string& v) {
  put_u32(b, static_cast<uint32_t>(v.size()));
  b += v;
}
void put_list(std::string& b, const std::vector<std::string>& l) {
  put_u32(b, static_cast<uint32_t>(l.size()));
  for (const auto& v : l) put_str(b, v);
}

std::string encode(const Request& r, const Stdio& io) {
  std::string b;
  b += static_cast<char>(io.tty);
  b += static_cast<char>(r.landlock.has_value());
  b += static_cast<char>(r.landlock && r.landlock->scope_signal);
  b += static_cast<char>(r.landlock && r.landlock->scope_abstract_unix);
  b.append(reinterpret_cast<const char*>(&io.cols), sizeof io.cols);
  b.append(reinterpret_cast<const char*>(&io.rows), sizeof io.rows);
  put_list(b, r.argv);
  put_list(b, r.extra_env);
  put_str(b, r.selinux_exec_label);
  if (b.size() > kMaxRequestBytes)
    throw Error("nsenter: command and environment too large (" + std::to_string(b.size()) + " bytes, limit " +
                std::to_string(kMaxRequestBytes) + ")");
  return b;
}

struct Reader {
  const char* p;
  const char* end;
  bool ok = true;
  bool take(void* out, size_t n) {
    if (!ok || static_cast<size_t>(end - p) < n) return ok = false;
    memcpy(out, p, n);
    p += n;
    return true;
  }
  std::string str() {
    uint32_t n = 0;
    if (!take(&n, sizeof n) || static_cast<size_t>(end - p) < n) {
      ok = false;
      return {};
    }
    std::string v(p, n);
    p += n;
    return v;
  }
  std::vector<std::string> list() {
    uint32_t n = 0;
    std::vector<std::string> l;
    if (!take(&n, sizeof n) || n > static_cast<size_t>(end - p) / sizeof(uint32_t)) {
      ok = false;
      return l;
    }
    for (uint32_t i = 0; i < n && ok; i++) l.push_back(str());
    return l;
  }
};

bool decode(const char* data, size_t len, Request& r, Stdio& io) {
  Reader rd{data, data + len};
  unsigned char f[4];
  if (!rd.take(f, sizeof f) || !rd.take(&io.cols, sizeof io.cols) || !rd.take(&io.rows, sizeof io.rows)) return false;
  io.tty = f[0];
  if (f[1]) {
    landlock::Options o;
    o.scope_signal = f[2];
    o.scope_abstract_unix = f[3];
    r.landlock = o;
  }
  r.argv = rd.list();
  r.extra_env = rd.list();
  r.selinux_exec_label = rd.str();
  return rd.ok && rd.p == rd.end;
}

void prepare_request_or_report(int sock, Plan& plan, const Container& c, const Request& r, const Stdio& io) {
  try {
    prepare_request(plan, c, r, io);
  } catch (const ExecError& e) {
    child_fail(sock, e.what(), ENOENT, e.exit_code == 126 ? kNotExecutable : kNotFound);
  } catch (const std::exception& e) {
    child_fail(sock, e.what(), EINVAL);
  }
}

// The zygote: prepare the container's part of the command's plan from the
// container as it was at fork time, wait for the request and complete the
// plan, fork the command as our parent's child and exit. Errors go to the
// parent as reports, like the command's, in answer to the request.
// Closes every fd but stdio, the zygote's socket, the init's pidfd and the
// namespace fds: a zygote holds no connection (a gate's zygote was forked
// while it held unauthenticated ones, which must close when the gate does).
void close_all_but(int sock, const Container& c) {
  std::vector<int> keep = {0, 1, 2, sock};
  if (c.pidfd >= 0) keep.push_back(c.pidfd);
  for (const auto& [type, fd] : c.ns_fds) keep.push_back(fd);
  std::sort(keep.begin(), keep.end());
  unsigned from = 0;
  for (int k : keep) {
    if (k < 0) continue;
    if (static_cast<unsigned>(k) > from) ::syscall(SYS_close_range, from, static_cast<unsigned>(k) - 1, 0U);
    from = static_cast<unsigned>(k) + 1;
  }
  ::syscall(SYS_close_range, from, ~0U, 0U);
}

[[noreturn]] void zygote_main(int sock, const Container& c, pid_t parent) {
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0 || ::getppid() != parent) _exit(1);
  close_all_but(sock, c);
  // It holds the session's host resources, like the command before execve.
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  std::optional<Plan> plan;  // never moves once made: see prepare_request
  std::string plan_error;
  try {
    plan.emplace(prepare_container(c));
  } catch (const std::exception& e) {
    plan_error = e.what();
  }
  // Not zero-filled: only the pages the request lands in are touched.
  auto buf = std::make_unique_for_overwrite<char[]>(kMaxRequestBytes);
  iovec iov{buf.get(), kMaxRequestBytes};
  alignas(cmsghdr) char cbuf[CMSG_SPACE(3 * sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = cbuf;
  msg.msg_controllen = sizeof cbuf;
  ssize_t n;
  do n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n <= 0) _exit(0);  // the parent dropped us unused
  if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) child_fail(sock, "zygote: request truncated", EMSGSIZE);
  int fds[3] = {-1, -1, -1};
  size_t nfds = 0;
  for (cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm))
    if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
      nfds = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      if (nfds > 3) child_fail(sock, "zygote: too many fds", EINVAL);
      memcpy(fds, CMSG_DATA(cm), nfds * sizeof(int));
    }
  Request r;
  Stdio io;
  if (!decode(buf.get(), static_cast<size_t>(n), r, io)) child_fail(sock, "zygote: malformed request", EINVAL);
  if (!io.tty) {
    if (nfds != 3) child_fail(sock, "zygote: stdio fds missing", EINVAL);
    io.in = fds[0];
    io.out = fds[1];
    io.err = fds[2];
  }
  buf.reset();
  if (!plan) child_fail(sock, plan_error.c_str(), EINVAL);
  prepare_request_or_report(sock, *plan, c, r, io);
  // Our direct child would be born in the container's pid namespace; we exit
  // right after, so our own pid_for_children needs no restoring.
  for (const auto& [type, fd] : c.ns_fds)
    if (type == "pid" && ::setns(fd, CLONE_NEWPID) < 0) child_fail(sock, "setns(container pid namespace)", errno);
  // A raw clone: glibc's fork() has no CLONE_PARENT. The child is single-
  // threaded like us and only runs child_main (syscalls, then execve).
  long pid = ::syscall(SYS_clone, CLONE_PARENT | SIGCHLD, nullptr, nullptr, nullptr, nullptr);
  if (pid < 0) child_fail(sock, "clone(CLONE_PARENT) the command", errno);
  if (pid == 0) child_main(sock, *plan);
  Report rep{};
  rep.type = kMsgForked;
  rep.code = static_cast<int32_t>(pid);
  (void)::send(sock, &rep, sizeof rep, MSG_NOSIGNAL);
  _exit(0);
}

// Reads the command's reports until it passes execve (the socket's EOF).
Spawned await_exec(int sock, pid_t pid, const Request& r, bool tty, ChildGuard& guard) {
  Spawned out;
  out.pid = pid;
  out.pidfd = Fd(sys_pidfd_open(pid));  // our unreaped child: no pid reuse race
  if (!out.pidfd) throw sys_error("pidfd_open child " + std::to_string(pid));
  char go = 'G';
  if (::send(sock, &go, 1, MSG_NOSIGNAL) != 1) throw sys_error("release the nsenter child");

  const bool searched = r.argv[0].find('/') == std::string::npos;
  auto deadline = std::chrono::steady_clock::now() + kChildTimeout;
  bool reached_exec = false;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) throw Error("nsenter: child " + std::to_string(pid) + " did not reach execve in time");
    pollfd pfd{sock, POLLIN, 0};
    int pr = ::poll(&pfd, 1, static_cast<int>(left.count()));
    if (pr < 0) {
      if (errno == EINTR) continue;
      throw sys_error("poll nsenter child");
    }
    if (pr == 0) continue;

    Report rep{};
    iovec iov{&rep, sizeof rep};
    alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int))] = {};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf;
    msg.msg_controllen = sizeof cbuf;
    ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw sys_error("recvmsg from nsenter child");
    }
    Fd passed;
    for (cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
      if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS && cm->cmsg_len == CMSG_LEN(sizeof(int))) {
        int fd;
        memcpy(&fd, CMSG_DATA(cm), sizeof fd);
        passed = Fd(fd);
      }
    }
    if (n == 0) {  // EOF: execve closed the CLOEXEC socket, or the child died
      if (!reached_exec) {
        siginfo_t si{};
        ::waitid(P_PID, pid, &si, WEXITED);
        guard.pid = 0;
        throw Error("nsenter: child " + std::to_string(pid) + " died during setup (" +
                    (si.si_code == CLD_EXITED ? "exit " + std::to_string(si.si_status)
                                              : "signal " + std::to_string(si.si_status)) +
                    ")");
      }
      break;
    }
    if (static_cast<size_t>(n) != sizeof rep) throw Error("nsenter: malformed report from child");
    if (rep.type == kMsgPty) {
      if (!passed) throw Error("nsenter: child sent no pty master");
      out.pty_master = std::move(passed);
    } else if (rep.type == kMsgLandlock) {
      out.landlock_abi = rep.code;
    } else if (rep.type == kMsgExec) {
      reached_exec = true;
    } else if (rep.type == kMsgError) {
      rep.step[sizeof rep.step - 1] = '\0';
      while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
      }
      guard.pid = 0;
      std::string err = strerror(rep.err);
      if (rep.code == kNotFound) {
        if (searched) throw ExecError("exec " + quote(r.argv[0]) + ": executable file not found in $PATH", 127);
        throw ExecError("exec " + quote(r.argv[0]) + ": " + err, 127);
      }
      if (rep.code == kNotExecutable) throw ExecError("exec " + quote(r.argv[0]) + ": " + err, 126);
      throw Error(std::string("nsenter: ") + rep.step + ": " + err);
    } else {
      throw Error("nsenter: unknown report from child");
    }
  }
  if (tty && !out.pty_master) throw Error("nsenter: no pty master received");
  guard.pid = 0;
  return out;
}

}  // namespace

OpenedContainer open_container(pid_t pid) {
  if (pid <= 0) throw Error("open_container: bad pid " + std::to_string(pid));
  OpenedContainer oc;
  oc.pidfd = Fd(sys_pidfd_open(pid));
  if (!oc.pidfd) throw sys_error("pidfd_open pid " + std::to_string(pid));
  for (const auto& t : kNsTypes) {
    std::string ours = std::string("/proc/self/ns/") + t.name;
    std::string theirs = "/proc/" + std::to_string(pid) + "/ns/" + t.name;
    struct stat a, b;
    if (::stat(ours.c_str(), &a) < 0) {
      if (errno == ENOENT) continue;  // this kernel lacks the namespace type
      throw sys_error("stat " + ours);
    }
    Fd fd(::open(theirs.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) throw sys_error("open " + theirs);
    if (::fstat(fd.get(), &b) < 0) throw sys_error("fstat " + theirs);
    if (a.st_dev == b.st_dev && a.st_ino == b.st_ino) continue;
    oc.ns.emplace_back(t.name, std::move(fd));
  }
  // Still alive after the opens: /proc/PID was this process throughout (a
  // pid is not reused while its process lives).
  if (::syscall(SYS_pidfd_send_signal, oc.pidfd.get(), 0, nullptr, 0) < 0)
    throw sys_error("pid " + std::to_string(pid) + " exited while its namespaces were being opened");
  return oc;
}

Zygote Zygote::start(const Container& c, const std::function<void(pid_t)>& place) {
  if (!place) throw Error("nsenter: Request.place is required");
  // /proc/init_pid is read by the zygote (HOME, setgroups): it must still be the container's init.
  if (c.pidfd >= 0 && ::syscall(SYS_pidfd_send_signal, c.pidfd, 0, nullptr, 0) < 0)
    throw sys_error("nsenter: container init " + std::to_string(c.init_pid) + " is gone");
  int sp[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) < 0) throw sys_error("socketpair");
  Fd parent_sock(sp[0]), child_sock(sp[1]);
  // The command dup2()s onto 0..2: keep its socket out of the way.
  if (child_sock.get() < 3) {
    Fd moved(::fcntl(child_sock.get(), F_DUPFD_CLOEXEC, 3));
    if (!moved) throw sys_error("fcntl(F_DUPFD_CLOEXEC)");
    child_sock = std::move(moved);
  }
  // One request message of up to kMaxRequestBytes (root may exceed wmem_max).
  int big = static_cast<int>(2 * kMaxRequestBytes);
  if (::setsockopt(parent_sock.get(), SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big) < 0)
    throw sys_error("setsockopt(SO_SNDBUFFORCE) for the zygote");
  pid_t self = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) throw sys_error("fork the nsenter zygote");
  if (pid == 0) {
    parent_sock.reset();
    zygote_main(child_sock.get(), c, self);
  }
  Zygote z;
  z.init_pid_ = c.init_pid;
  z.init_pidfd_ = c.pidfd;
  z.pid_ = pid;
  z.sock_ = std::move(parent_sock);
  place(pid);  // on a throw, ~Zygote kills it
  return z;
}

Zygote::Zygote(Zygote&& o) noexcept
    : init_pid_(o.init_pid_), init_pidfd_(o.init_pidfd_), pid_(std::exchange(o.pid_, -1)), sock_(std::move(o.sock_)) {}

Zygote& Zygote::operator=(Zygote&& o) noexcept {
  if (this != &o) {
    Zygote old(std::move(*this));
    init_pid_ = o.init_pid_;
    init_pidfd_ = o.init_pidfd_;
    pid_ = std::exchange(o.pid_, -1);
    sock_ = std::move(o.sock_);
  }
  return *this;
}

Zygote::~Zygote() { ChildGuard kill_it{pid_}; }

void Zygote::release() noexcept {
  pid_ = -1;
  sock_.reset();  // our copy; the owner's keeps the zygote waiting
}

Spawned Zygote::spawn(const Request& r, const Stdio& io, const std::function<void()>& before_go) {
  if (pid_ <= 0) throw Error("nsenter: zygote already used");
  validate(r);
  if (!io.tty && (io.in < 0 || io.out < 0 || io.err < 0)) throw Error("nsenter: stdio fds are required without a tty");
  if (init_pidfd_ >= 0 && ::syscall(SYS_pidfd_send_signal, init_pidfd_, 0, nullptr, 0) < 0)
    throw sys_error("nsenter: container init " + std::to_string(init_pid_) + " is gone");
  std::string req = encode(r, io);
  Fd sock = std::move(sock_);
  ChildGuard zygote{std::exchange(pid_, -1)};

  const int stdio[3] = {io.in, io.out, io.err};
  send_fds(sock.get(), io.tty ? std::span<const int>() : std::span<const int>(stdio), req.data(), req.size());

  // The zygote answers with the command's pid (or an error), then exits.
  pollfd pfd{sock.get(), POLLIN, 0};
  int pr;
  do pr = ::poll(&pfd, 1, static_cast<int>(std::chrono::milliseconds(kChildTimeout).count()));
  while (pr < 0 && errno == EINTR);
  if (pr <= 0) throw Error("nsenter: zygote " + std::to_string(zygote.pid) + " did not answer in time");
  Report rep{};
  ssize_t n = ::recv(sock.get(), &rep, sizeof rep, 0);
  // With limits to write, reaped first: it must not count in the session's
  // pids.max. Otherwise reaped when this returns (ChildGuard): it exits right
  // after its report, so by then it is gone, and the wait for its teardown
  // stays off the request's path.
  if (before_go) {
    ChildGuard reap{std::exchange(zygote.pid, 0)};
  }
  if (n == 0) throw Error("nsenter: zygote died before forking the command");
  if (n != static_cast<ssize_t>(sizeof rep)) throw sys_error("recv from the nsenter zygote");
  if (rep.type == kMsgError) {
    rep.step[sizeof rep.step - 1] = '\0';
    if (rep.code == kNotFound || rep.code == kNotExecutable) throw ExecError(rep.step, rep.code);
    throw Error(std::string("nsenter: ") + rep.step + ": " + strerror(rep.err));
  }
  if (rep.type != kMsgForked || rep.code <= 0) throw Error("nsenter: unknown report from the zygote");
  pid_t pid = rep.code;
  ChildGuard guard{pid};
  if (before_go) before_go();
  return await_exec(sock.get(), pid, r, io.tty, guard);
}

Spawned spawn(const Container& c, const Request& r, const Stdio& io) {
  validate(r);
  return Zygote::start(c, r.place).spawn(r, io);
}

}  // namespace shimlet::nsenter
