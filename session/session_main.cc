#include <unistd.h>

#include <cstdio>
#include <string_view>

#include "common/version.h"
#include "session/session.h"
#include "session/session_isolation.h"

int main(int argc, char** argv) {
  if (argc == 2 && std::string_view(argv[1]) == "--version") {
    fputs("shimlet-session " SHIMLET_VERSION "\n", stdout);
    return 0;
  }
  int code = shimlet::session::main(argc, argv);
#if defined(__SANITIZE_ADDRESS__)
  return code;  // keep LeakSanitizer's exit-time check in sanitizer builds
#else
  // The connection is closed and the end record written (session::main's
  // scopes have ended). The one exit-time teardown that matters is a warm
  // placement nobody used (its cgroup removed, its zygote killed): done here.
  // OpenSSL's teardown of its method store (about 0.7 ms) only frees memory,
  // and the shim starts the next warm session once this one is gone.
  shimlet::session::Confinement::discard_warm();
  fflush(stdout);
  fflush(stderr);
  _exit(code);
#endif
}
