// shimlet-cri: a CRI v1 gRPC server in front of the node's real runtime
// (containerd, CRI-O) that the kubelet is pointed at
// (--container-runtime-endpoint=unix:///run/shimlet/cri.sock). Contract:
// docs/design.md "CRI proxy".
//
// Every call of runtime.v1.RuntimeService / runtime.v1.ImageService (and any
// other method name: v1alpha2, future methods) is forwarded to the runtime as
// raw bytes (cri/proxy.h): unknown fields, metadata, deadline, streaming, status
// codes, messages and trailers all pass unchanged. Three methods are answered
// here when the container has a live shim (cri/service.cc):
//   Exec         URL http://<shim's CRI listener>/exec/<ticket>
//   PortForward  URL http://<shim of a container of the pod>/portforward/<ticket>
//   ExecSync     run through the shim's root-only local socket, result in
//                CRI's fields (stdout, stderr, exit_code; timeout and output
//                caps as containerd reports them)
// Tickets are minted with the node key (STATE/local.key), as
// `shimctl --local` does: single use, 30 s, bound to container, command,
// stdin and tty. A container without a live shim, or a request the shim
// cannot serve as asked, is forwarded unchanged (the runtime answers, logged
// once per container).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace shimlet::cri {

struct Options {
  std::string listen = "/run/shimlet/cri.sock";                             // --listen (unix socket path)
  std::string runtime_endpoint = "unix:///run/containerd/containerd.sock";  // --runtime-endpoint
  std::string state_dir = "/run/shimlet";                                   // --state-dir (the hook's)
  // The largest gRPC message either way (the kubelet's and containerd's: 16 MiB).
  size_t max_message = 16u << 20;
  // ExecSync output kept per stream (containerd 1.6: 16 MiB, then the
  // response exceeds max_message and the call fails RESOURCE_EXHAUSTED).
  size_t exec_sync_max_output = 16u << 20;
  // ExecSyncs run through shims at once; more go to the runtime.
  unsigned max_exec_sync = 128;
  // Lifetime of the tickets in Exec/PortForward URLs (the kubelet uses a URL
  // at once; containerd's streaming server keeps its tokens 1 minute).
  int64_t url_ticket_lifetime_s = 30;
  // Log every call (method, status, time) at info level.
  bool verbose = false;
};

// Serves until SIGTERM/SIGINT (READY=1 to systemd once serving: common/systemd.h);
// returns the exit code. Throws on setup failure.
int run(const Options& opt);

}  // namespace shimlet::cri
