// open_container, the wait for the command's execve, and spawn()
// (nsenter/nsenter.h).
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/pidfd.h"
#include "nsenter/internal.h"

namespace shimlet::nsenter {
namespace {

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char ch : s.substr(0, 200)) out += (ch >= 0x20 && ch < 0x7f && ch != '"') ? char(ch) : '?';
  return out + "\"";
}

}  // namespace

Spawned await_exec(int sock, pid_t pid, const Request& r, bool tty, ChildGuard& guard) {
  Spawned out;
  out.pid = pid;
  out.pidfd = open_pidfd(pid);  // our unreaped child: no pid reuse race
  if (!out.pidfd) throw sys_error("pidfd_open child " + std::to_string(pid));
  char go = 'G';
  if (::send(sock, &go, 1, MSG_NOSIGNAL) != 1) throw sys_error("release the nsenter child");

  const bool searched = r.argv[0].find('/') == std::string::npos;
  Deadline deadline(kChildTimeoutMs);
  bool reached_exec = false;
  for (;;) {
    int left = deadline.left_ms();
    if (left <= 0) throw Error("nsenter: child " + std::to_string(pid) + " did not reach execve in time");
    pollfd pfd{sock, POLLIN, 0};
    int pr = ::poll(&pfd, 1, left);
    if (pr < 0) {
      if (errno == EINTR) continue;
      throw sys_error("poll nsenter child");
    }
    if (pr == 0) continue;

    Report rep{};
    int fd = -1;
    size_t nfds = 0;
    ssize_t n = recv_fds_nothrow(sock, &rep, sizeof rep, {&fd, 1}, &nfds);
    if (n < 0) throw sys_error("recvmsg from nsenter child");
    Fd passed(nfds == 1 ? fd : -1);
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

OpenedContainer open_container(pid_t pid) {
  if (pid <= 0) throw Error("open_container: bad pid " + std::to_string(pid));
  OpenedContainer oc;
  oc.pidfd = open_pidfd(pid);
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
  if (pidfd_signal(oc.pidfd.get(), 0) < 0)
    throw sys_error("pid " + std::to_string(pid) + " exited while its namespaces were being opened");
  return oc;
}

Spawned spawn(const Container& c, const Request& r, const Stdio& io) {
  validate(r);
  return Zygote::start(c, r.place).spawn(r, io);
}

}  // namespace shimlet::nsenter
