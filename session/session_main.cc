#include <cstdio>
#include <string_view>

#include "common/exit.h"
#include "common/version.h"
#include "session/session.h"
#include "session/session_isolation.h"

int main(int argc, char** argv) {
  if (argc == 2 && std::string_view(argv[1]) == "--version") {
    fputs("shimlet-session " SHIMLET_VERSION "\n", stdout);
    return 0;
  }
  int code = shimlet::session::main(argc, argv);
  // The connection is closed and the end record written (session::main's
  // scopes have ended). The one exit-time teardown that matters is a warm
  // placement nobody used (its cgroup removed, its zygote killed): done here.
  // OpenSSL's teardown of its method store (about 0.7 ms) only frees memory,
  // and the shim starts the next warm session once this one is gone.
  shimlet::session::Confinement::discard_warm();
  shimlet::exit_without_teardown(code);
}
