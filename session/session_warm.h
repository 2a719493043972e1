// A warm session (docs/design.md "Warm sessions"): everything that does not
// depend on the connection is done before it arrives (config, the placement
// of the command's zygote in its cgroups); then it waits, at most idle_s,
// for the shim to pass a local socket's connection over the control
// socket (fd 3 from then on). Returns false when it should just exit (idle, SIGTERM, container
// or shim gone).
#pragma once
#include "nsenter/nsenter.h"
#include "session/session_context.h"

namespace shimlet::session {

bool await_connection(const Config& cfg, const nsenter::Container& ctr, int idle_s);
// A SIGTERM came while await_connection waited or after it, before the event
// loop's own SIGTERM event replaced its handler: serve() acts on it at once.
bool warm_term_pending();

}  // namespace shimlet::session
