// shimctl: see client/client.h.
#include <unistd.h>

#include <cstdio>

#include "client/client.h"

int main(int argc, char** argv) {
  int code = shimlet::client::main(argc, argv);
#if defined(__SANITIZE_ADDRESS__)
  return code;  // keep LeakSanitizer's exit-time check in sanitizer builds
#else
  // Everything is written and the terminal restored by now (client::main's
  // scopes have ended); skip OpenSSL's and the C++ runtime's exit-time
  // teardown, which only frees memory the kernel is about to reclaim.
  fflush(stdout);
  fflush(stderr);
  _exit(code);
#endif
}
