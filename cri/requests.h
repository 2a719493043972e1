// The pure decisions of shimlet-cri's interceptor (no I/O; fuzzed by
// tests/fuzz/cri_requests_fuzz.cc): whether a decoded Exec, ExecSync or
// PortForward request is served through a shim, with which ticket claims,
// which URL, and which registration serves a pod sandbox.
//
// Rule: anything the shim would serve differently from the runtime (invalid
// requests, whose error text is the runtime's to give) gets nullopt and goes
// to the runtime unchanged.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "client/client.h"
#include "cri/streaming.pb.h"
#include "ticket/ticket.h"

namespace shimlet::cri {

// Exec: the ticket's claims (cmd, stdin, tty) and the streams the client
// asked for. CRI: one of stdin/stdout/stderr, and no stderr with a tty (the
// kubelet's streaming server refuses both otherwise: left to the runtime).
struct ExecPlan {
  std::vector<std::string> cmd;
  bool tty = false, stdin_ = false, stdout_ = false, stderr_ = false;
};
std::optional<ExecPlan> plan_exec(const runtime::v1::ExecRequest& r);
ticket::Claims exec_claims(const ExecPlan& p);
// http://ENDPOINT/exec/TICKET, plus ?stdout=false / ?stderr=false when the
// client does not want a stream the shim's CRI shape shows by default
// (stdout always, stderr without a tty).
std::string exec_url(const std::string& cri_endpoint, const std::string& ticket, const ExecPlan& p);

// PortForward: the ports claim. The CRI request's ports, TCP (the CRI
// streaming protocol has no UDP); none listed (kubectl sends none, so the
// kubelet asks for none): port 0, any TCP port, as the master mints for
// kubectl. A port outside 1..65535: nullopt.
std::optional<std::vector<ticket::Port>> plan_port_forward(const runtime::v1::PortForwardRequest& r);
ticket::Claims port_forward_claims(const std::vector<ticket::Port>& ports);
std::string port_forward_url(const std::string& cri_endpoint, const std::string& ticket);

// ExecSync: argv and the timeout in ms (0 = none; at most INT_MAX, what the
// exec's timer takes: a longer timeout is none). Empty argv or a negative
// timeout: nullopt.
struct ExecSyncPlan {
  std::vector<std::string> cmd;
  int64_t timeout_ms = 0;
};
std::optional<ExecSyncPlan> plan_exec_sync(const runtime::v1::ExecSyncRequest& r);
// Go's time.Duration String() of whole seconds ("1s", "1m30s", "2h0m0s"):
// containerd's timeout error names the timeout that way.
std::string go_duration(int64_t seconds);
// containerd 1.6's ExecSync timeout error, which the kubelet shows in events.
std::string exec_sync_timeout_message(int64_t timeout_s);

// The registration that serves a pod sandbox's PortForward among live ones:
// the sandbox's own (when a hook ran for it, as CRI-O's does), else one of
// its app containers (containerd runs no hook for the sandbox; every
// container of the pod shares its network namespace), the lowest id so the
// choice is stable. Only registrations with a CRI listener qualify. nullptr
// if none.
const client::Registration* pick_pod_target(const std::vector<client::Registration>& live,
                                            const std::string& sandbox_id);

}  // namespace shimlet::cri
