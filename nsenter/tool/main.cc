// shimlet-nsenter-run --pid PID --bundle DIR [--tty] -- CMD...
// Test tool: runs CMD in the container whose init is PID through
// nsenter::spawn (stdio inherited, or a pty relayed to our stdio with --tty),
// waits, and exits with CMD's exit code (128+signal when killed).
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cgroup/cgroup.h"
#include "common/error.h"
#include "nsenter/nsenter.h"
#include "oci/oci.h"

using namespace shimlet;

namespace {

[[noreturn]] void usage() {
  fprintf(stderr, "usage: shimlet-nsenter-run --pid PID --bundle DIR [--tty] -- CMD...\n");
  exit(2);
}

// Copies pty output to stdout and stdin to the pty until the pty closes.
void relay(int master) {
  bool in_open = true;
  char buf[16384];
  for (;;) {
    pollfd p[2] = {{master, POLLIN, 0}, {in_open ? 0 : -1, POLLIN, 0}};
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (p[0].revents) {
      ssize_t n = read(master, buf, sizeof buf);
      if (n <= 0) return;  // EIO once the last slave fd is closed
      write_all(1, buf, static_cast<size_t>(n));
    }
    if (p[1].revents) {
      ssize_t n = read(0, buf, sizeof buf);
      if (n <= 0) {
        in_open = false;
        char eot = 4;  // ^D: end of input for the terminal's reader
        write_all(master, &eot, 1);
      } else {
        write_all(master, buf, static_cast<size_t>(n));
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  pid_t pid = 0;
  std::string bundle;
  bool tty = false;
  int i = 1;
  for (; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--pid" && i + 1 < argc) {
      pid = static_cast<pid_t>(atoi(argv[++i]));
    } else if (a == "--bundle" && i + 1 < argc) {
      bundle = argv[++i];
    } else if (a == "--tty") {
      tty = true;
    } else if (a == "--") {
      i++;
      break;
    } else {
      usage();
    }
  }
  if (pid <= 0 || bundle.empty() || i >= argc) usage();
  std::vector<std::string> cmd(argv + i, argv + argc);

  try {
    nsenter::OpenedContainer opened = nsenter::open_container(pid);
    nsenter::Container c;
    c.init_pid = pid;
    c.pidfd = opened.pidfd.get();
    for (const auto& [type, fd] : opened.ns) c.ns_fds.emplace_back(type, fd.get());
    c.config = oci::load_config(bundle);

    auto membership = cgroup::of_pid(pid);
    nsenter::Request req;
    req.argv = cmd;
    req.place = [&](pid_t child) { cgroup::attach(membership, child); };
    nsenter::Stdio io;
    io.tty = tty;
    io.in = 0;
    io.out = 1;
    io.err = 2;
    if (tty) {
      winsize ws{};
      if (ioctl(0, TIOCGWINSZ, &ws) == 0 && ws.ws_col && ws.ws_row) {
        io.cols = ws.ws_col;
        io.rows = ws.ws_row;
      }
      req.extra_env.push_back("TERM=xterm");
    }
    nsenter::Spawned s = nsenter::spawn(c, req, io);
    if (tty) relay(s.pty_master.get());
    siginfo_t si{};
    while (waitid(P_PIDFD, static_cast<id_t>(s.pidfd.get()), &si, WEXITED) < 0)
      if (errno != EINTR) throw sys_error("waitid");
    if (si.si_code == CLD_EXITED) return si.si_status;
    return 128 + si.si_status;
  } catch (const nsenter::ExecError& e) {
    fprintf(stderr, "shimlet-nsenter-run: %s\n", e.what());
    return e.exit_code;
  } catch (const std::exception& e) {
    fprintf(stderr, "shimlet-nsenter-run: %s\n", e.what());
    return 125;
  }
}
