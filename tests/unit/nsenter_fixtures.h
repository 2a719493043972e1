// What nsenter's unit tests start from: a container whose "init" is the test
// process itself (/proc/self/root is the host's /, so HOME comes from the
// host's /etc/passwd), a request, and the process's own stdio.
#pragma once
#include <unistd.h>

#include <string>
#include <utility>
#include <vector>

#include "nsenter/nsenter.h"

namespace shimlet::test {

inline nsenter::Container container() {
  nsenter::Container c;
  c.init_pid = getpid();
  c.config.process.env = {"PATH=/usr/local/bin:relative:/usr/bin:", "TERM=dumb"};
  c.config.process.cwd = "/tmp";
  return c;
}

inline nsenter::Request request(std::vector<std::string> argv) {
  nsenter::Request r;
  r.argv = std::move(argv);
  return r;
}

inline nsenter::Stdio pipes() {
  nsenter::Stdio io;
  io.in = 0;
  io.out = 1;
  io.err = 2;
  return io;
}

}  // namespace shimlet::test
