// shimctl's top level: parse, get endpoint+pin+ticket, run the verb.
#include "client/client.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/ssl.h>
#include <unistd.h>

#include <cstdio>

namespace shimlet::client {
namespace {

int print_error(const std::string& what) {
  std::string line = "error: " + what + "\n";
  (void)!write(2, line.data(), line.size());
  return kOwnErrorExit;
}

}  // namespace

int main(int argc, char** argv) {
  // A closed fd 0, 1 or 2 becomes /dev/null (as ssh and Go programs such as
  // runc do): else the next file we open takes its number, and exec hands
  // that file to the command as its stdin, stdout or stderr.
  for (int fd = 0; fd <= 2; ++fd)
    if (fcntl(fd, F_GETFD) < 0 && errno == EBADF) {
      int null = ::open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);  // the lowest free fd: this one
      if (null >= 0 && null != fd) ::close(null);
    }
  // The system openssl.cnf has nothing shimctl needs; skip parsing it at startup.
  // Only libcrypto here: the local socket needs no TLS, and libssl's own
  // initialisation (error strings) comes with the first SSL_CTX on the TLS
  // paths. Its legacy cipher and digest tables must not be turned off
  // (OPENSSL_INIT_NO_ADD_ALL_*): certificate verification looks digests up
  // there, and without them every CA signature is "too weak".
  OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG, nullptr);
  try {
    std::vector<std::string> args(argv, argv + argc);
    Invocation inv = parse_args(args);
    if (inv.help) {
      fputs(inv.help_text.c_str(), stdout);
      return 0;
    }
    if (inv.verb == "sessions") return run_sessions(inv);
    if (inv.verb == "completion") {
      fputs(completion_script(inv.completion_shell).c_str(), stdout);
      return 0;
    }
    if (inv.verb == "exec" && inv.local) return run_local_exec(inv);
    // A fresh key per run: the ticket binds it (cnf.jkt), TLS proves it. The
    // local socket (--local without --tls) has no TLS: no key, no cnf.
    proto::Identity id;
    if (!inv.local || inv.local_tls) id = proto::generate_identity("shimctl");
    if (inv.verb == "port-forward") return run_port_forward(obtain_portforward_grant(inv, id), inv.pf, id);
    Grant grant = obtain_exec_grant(inv, id);
    return run_exec(grant, inv.exec, id);
  } catch (const std::exception& e) {
    return print_error(e.what());
  }
}

}  // namespace shimlet::client
