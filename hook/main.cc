// shimlet-hook: OCI runtime hook (createRuntime/poststop); see hook/hook.h.
#include <openssl/ssl.h>

#include "common/exit.h"
#include "hook/hook.h"

int main(int argc, char** argv) {
  // The hook runs inside `runc run`/`create` (docs/performance.md "Container
  // start"): the system openssl.cnf has nothing it needs, and parsing it is
  // paid per container start.
  OPENSSL_init_ssl(OPENSSL_INIT_NO_LOAD_CONFIG, nullptr);
  // The shim is started and the state files written by now (hook::main's
  // scopes have ended).
  shimlet::exit_without_teardown(shimlet::hook::main(argc, argv));
}
