// shimlet-session: serves one accepted connection for the shim (docs/design.md
// "shim → session fd contract"): TLS 1.3 + HTTP/2, a ticket on every request,
// then exec in the container (session_exec.cc) or port-forward
// (session_forward.cc). One process per connection.
#pragma once

namespace shimlet::session {

// Entry point of the shimlet-session binary; returns the process exit code.
int main(int argc, char** argv);

}  // namespace shimlet::session
