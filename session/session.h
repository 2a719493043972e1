// shimlet-session: serves one connection for the shim (docs/design.md "shim →
// session and gate fd contract"): a local socket's (HTTP/2 without TLS), or,
// started as `--gate`, the pre-authentication gate (session/gate.h) that holds
// every unauthenticated TCP connection and becomes the session of each one
// it admits (a fork). Then a ticket on every request, exec in the container
// (session_exec.cc) or port-forward (session_forward.cc). One process per
// connection.
#pragma once

namespace shimlet::session {

// The fds shimlet-session starts with (docs/design.md "shim → session and
// gate fd contract"): the connection, the shim's control socket, the
// container init's pidfd. The gate names them for its own use (gate.cc).
inline constexpr int kConnFd = 3, kShimFd = 4, kPidFd = 5;

// Entry point of the shimlet-session binary; returns the process exit code.
int main(int argc, char** argv);

}  // namespace shimlet::session
