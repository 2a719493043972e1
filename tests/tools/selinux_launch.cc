// selinux-launch: test tool for the SELinux VM (tests/vm). Starts one "exec
// session" in a running container the way the shim does it, using the
// project's selinux/ code: read the container's label from its init, allocate
// a session category (held until the command exits), compute the superset
// label, join the container's namespaces, optionally make a pty in the
// container's devpts labelled at the session's level and a socket labelled
// with the session's label, then setexeccon + execve.
//
//   selinux-launch --pid PID [--state-dir DIR] [--range cA.cB] [--pty] [--socket]
//                  [--env K=V]... -- CMD [ARG]...
//   selinux-launch --status
//
// Prints "selinux-launch: ..." lines on stderr; exits with the command's status.
#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "selinux/label.h"

namespace sl = shimlet::selinux;

namespace {

[[noreturn]] void usage() {
  fprintf(stderr,
          "usage: selinux-launch --pid PID [--state-dir DIR] [--range cA.cB] [--pty] [--socket] [--env K=V]... -- "
          "CMD [ARG]...\n       selinux-launch --status\n");
  exit(2);
}

[[noreturn]] void child_fail(const std::string& what) {
  fprintf(stderr, "selinux-launch: child: %s\n", what.c_str());
  _exit(127);
}

// Runs in the forked child: join, label pty/socket, set the exec label, exec.
[[noreturn]] void child(const std::vector<std::pair<int, shimlet::Fd>>& ns, const sl::Context& session, bool pty,
                        bool sock, std::vector<std::string> env, const std::vector<std::string>& argv) {
  try {
    for (const auto& [type, fd] : ns)  // mnt last: it switches root and cwd
      if (setns(fd.get(), type) < 0) throw shimlet::sys_error("setns " + std::to_string(type));
    if (chdir("/") < 0) throw shimlet::sys_error("chdir /");
    if (sock) {
      sl::ScopedSockCreate sc(session.str());
      shimlet::Fd s(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      if (!s) throw shimlet::sys_error("socket");
      fprintf(stderr, "selinux-launch: socket label=%s\n", sl::fd_label(s.get()).c_str());
    }
    if (pty) {
      shimlet::Fd master(posix_openpt(O_RDWR | O_NOCTTY));
      if (!master || grantpt(master.get()) < 0 || unlockpt(master.get()) < 0)
        throw shimlet::sys_error("open the container's /dev/ptmx");
      std::string name = ptsname(master.get());
      shimlet::Fd slave(open(name.c_str(), O_RDWR | O_NOCTTY));
      if (!slave) throw shimlet::sys_error("open " + name);
      sl::label_fd_level(slave.get(), session.level);
      fprintf(stderr, "selinux-launch: pty=%s label=%s\n", name.c_str(), sl::fd_label(slave.get()).c_str());
      // Kept open across exec as fd 3 (slave) and 4 (master) for the command.
      if (dup2(slave.get(), 3) < 0 || dup2(master.get(), 4) < 0) throw shimlet::sys_error("dup2 pty");
    }
    sl::set_exec_label(session.str());
  } catch (const std::exception& e) {
    child_fail(e.what());
  }
  env.insert(env.begin(), "PATH=/usr/sbin:/usr/bin:/sbin:/bin");
  std::vector<char*> a, e;
  for (const auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
  a.push_back(nullptr);
  for (const auto& s : env) e.push_back(const_cast<char*>(s.c_str()));
  e.push_back(nullptr);
  execvpe(a[0], a.data(), e.data());
  child_fail("execvpe " + argv[0] + ": " + strerror(errno));
}

}  // namespace

int main(int argc, char** argv) {
  pid_t pid = 0;
  std::string state_dir = "/run/shimlet/selinux";
  sl::CategoryRange range;
  bool pty = false, sock = false;
  std::vector<std::string> env, cmd;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      auto next = [&]() -> std::string {
        if (i + 1 >= argc) usage();
        return argv[++i];
      };
      if (a == "--status") {
        printf("%s\n", sl::status().c_str());
        return sl::enabled() ? 0 : 1;
      } else if (a == "--pid") {
        pid = std::stoi(next());
      } else if (a == "--state-dir") {
        state_dir = next();
      } else if (a == "--range") {
        range = sl::CategoryRange::parse(next());
      } else if (a == "--pty") {
        pty = true;
      } else if (a == "--socket") {
        sock = true;
      } else if (a == "--env") {
        env.push_back(next());
      } else if (a == "--") {
        cmd.assign(argv + i + 1, argv + argc);
        break;
      } else {
        usage();
      }
    }
    if (pid <= 0 || cmd.empty()) usage();
    if (!sl::enabled()) throw shimlet::Error(sl::status());

    auto container = sl::Context::parse(sl::process_label(pid));
    auto cat = sl::SessionCategory::allocate(state_dir, container.level, range);
    auto session = sl::session_context(container, cat.category(), range);

    std::vector<std::pair<int, shimlet::Fd>> ns;
    for (auto [name, type] :
         {std::pair{"ipc", CLONE_NEWIPC}, {"uts", CLONE_NEWUTS}, {"net", CLONE_NEWNET}, {"mnt", CLONE_NEWNS}}) {
      std::string p = "/proc/" + std::to_string(pid) + "/ns/" + name;
      shimlet::Fd fd(open(p.c_str(), O_RDONLY | O_CLOEXEC));
      if (!fd) throw shimlet::sys_error("open " + p);
      ns.emplace_back(type, std::move(fd));
    }
    // Like the session: only pid_for_children, so the command is our child.
    std::string pidns = "/proc/" + std::to_string(pid) + "/ns/pid";
    shimlet::Fd pfd(open(pidns.c_str(), O_RDONLY | O_CLOEXEC));
    if (!pfd || setns(pfd.get(), CLONE_NEWPID) < 0) throw shimlet::sys_error("setns " + pidns);

    fflush(stderr);
    pid_t c = fork();
    if (c < 0) throw shimlet::sys_error("fork");
    if (c == 0) child(ns, session, pty, sock, env, cmd);
    fprintf(stderr, "selinux-launch: container=%s session=%s category=c%u pid=%d\n", container.str().c_str(),
            session.str().c_str(), cat.category(), c);
    int st = 0;
    while (waitpid(c, &st, 0) < 0)
      if (errno != EINTR) throw shimlet::sys_error("waitpid");
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  } catch (const std::exception& e) {
    fprintf(stderr, "selinux-launch: %s\n", e.what());
    return 1;
  }
}
