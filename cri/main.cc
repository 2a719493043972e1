// shimlet-cri: see cri/cri.h.
#include <CLI/CLI.hpp>
#include <iostream>

#include "common/log.h"
#include "common/version.h"
#include "cri/cri.h"

int main(int argc, char** argv) {
  shimlet::cri::Options opt;
  CLI::App app{
      "shimlet-cri: a CRI v1 server for the kubelet in front of containerd / CRI-O; Exec, ExecSync and PortForward "
      "go to the containers' shimlet shims, every other call to the runtime unchanged"};
  app.set_version_flag("--version", "shimlet-cri " SHIMLET_VERSION, "Print the version and exit");
  app.add_option("--listen", opt.listen, "unix socket to serve (the kubelet's --container-runtime-endpoint)")
      ->capture_default_str();
  app.add_option("--runtime-endpoint", opt.runtime_endpoint,
                 "the real runtime's CRI socket (CRI-O: unix:///var/run/crio/crio.sock)")
      ->capture_default_str();
  app.add_option("--state-dir", opt.state_dir, "shimlet-hook's state_dir (registrations, local.key)")
      ->capture_default_str();
  app.add_option("--max-message-size", opt.max_message, "largest gRPC message either way (bytes)")
      ->capture_default_str()
      ->check(CLI::Range(size_t{4} << 20, size_t{1} << 30));
  app.add_option("--exec-sync-max-output", opt.exec_sync_max_output, "ExecSync output kept per stream (bytes)")
      ->capture_default_str();
  app.add_option("--max-exec-sync", opt.max_exec_sync, "ExecSync calls through shims at once (more: the runtime)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 65536u));
  app.add_option("--url-ticket-lifetime", opt.url_ticket_lifetime_s,
                 "seconds an Exec/PortForward URL stays valid (at most the shims' max_ticket_lifetime_s)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{300}));
  app.add_flag("-v,--verbose", opt.verbose, "log every call (method, status, milliseconds)");
  CLI11_PARSE(app, argc, argv);
  try {
    return shimlet::cri::run(opt);
  } catch (const std::exception& e) {
    shimlet::log::error("shimlet-cri failed", {{"error", e.what()}});
    return 1;
  }
}
