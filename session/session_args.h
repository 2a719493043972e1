// shimlet-session's command line, as the shim builds it (shim/shim.cc; the fd
// contract in docs/design.md "shim → session and gate fd contract"):
//
//   shimlet-session --config PATH [--ns TYPE=FD,...] [--warm IDLE_S]
//   shimlet-session --config PATH [--ns TYPE=FD,...] --gate IDLE_S [--no-zygote] [--cri-listener FD]
//
// Parsed with CLI11. A bad command line throws Error naming what is wrong,
// with the usage; nothing here touches an fd.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace shimlet::session {

struct Args {
  std::string config;                           // the shim's shim.json
  std::vector<std::pair<std::string, int>> ns;  // the container's namespace fds, in the order given
  int warm_idle_s = 0;      // > 0: set up now, serve the connection the shim passes within this time
  int gate_idle_s = 0;      // > 0: the pre-authentication gate (session/gate.h), exits after this long unused
  bool gate_zygote = true;  // the gate keeps a zygote placed (off: warm_idle_s 0)
  int gate_cri_fd = -1;     // the gate: the shim's CRI listener (plain HTTP/1.1, CRI shapes only), if any
};

// argv[0] is the program name. Throws Error.
Args parse_args(int argc, const char* const* argv);

}  // namespace shimlet::session
