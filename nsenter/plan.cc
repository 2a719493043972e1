// The plan (nsenter/plan.h), computed in the parent (the zygote) before fork.
#include "nsenter/plan.h"

#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <set>

#include "common/error.h"
#include "common/fd.h"
#include "common/file.h"
#include "nsenter/seccomp.h"

namespace shimlet::nsenter {
namespace {

constexpr size_t kMaxPasswdBytes = 1 << 20;

int last_cap() {
  Fd fd(::open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC));
  if (!fd) throw sys_error("open /proc/sys/kernel/cap_last_cap");
  std::string s = read_fd(fd.get(), 16, "/proc/sys/kernel/cap_last_cap");
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

}  // namespace

int ns_flag(const std::string& name) {
  for (const auto& t : kNsTypes)
    if (name == t.name) return t.flag;
  throw Error("nsenter: unknown namespace type \"" + name + "\"");
}

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

std::string home_from_passwd(std::string_view text, uid_t uid) {
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
  std::string text = read_fd(fd.get(), kMaxPasswdBytes, "container /etc/passwd");
  return home_from_passwd(text, uid);
}

void validate(const Request& r) {
  if (r.argv.empty()) throw Error("nsenter: empty command");
  for (const auto& a : r.argv)
    if (a.find('\0') != std::string::npos) throw Error("nsenter: command argument contains a NUL byte");
  if (r.argv[0].empty()) throw ExecError("exec: empty command name", 127);
}

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
  if (c.config.seccomp) {
    SeccompProgram prog = compile_seccomp(*c.config.seccomp);
    plan.bpf = std::move(prog.bpf);
    plan.seccomp_flags = prog.flags;
    plan.seccomp = true;
  }

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
    if (fd) plan.allow_setgroups = read_fd(fd.get(), 64, path).rfind("deny", 0) != 0;
  }
  plan.cwd = p.cwd.empty() ? "/" : p.cwd;
  return plan;
}

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

}  // namespace shimlet::nsenter
