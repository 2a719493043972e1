#include "master/metrics.h"

#include <dirent.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <sstream>

#include "common/error.h"
#include "common/proc.h"
#include "common/version.h"

namespace shimlet::master {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

namespace {

// kube-apiserver's request latency buckets, up to 10 s (a grant is
// milliseconds; the tail catches a stalled loop).
const prometheus::Histogram::BucketBoundaries kLatencyBuckets = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                                 0.1,    0.25,  0.5,    1,     2.5,  5,     10};
constexpr const char* kHandlers[] = {"grant",     "relay",   "tunnel", "pods",  "node",           "session_end",
                                     "discovery", "metrics", "health", "other", "unauthenticated"};

struct ProcessFigures {
  double cpu_seconds = 0, resident_bytes = 0, open_fds = 0, max_fds = 0;
};

// /proc/self/stat (common/proc.h: utime, stime, rss); /proc/self/fd
// entries. Only our own pid: the unit's ProcSubset=pid hides the rest of /proc.
ProcessFigures process_figures() {
  ProcessFigures p;
  const double tick = static_cast<double>(sysconf(_SC_CLK_TCK));
  try {
    if (auto st = proc_stat(getpid()); st && tick > 0) {
      p.cpu_seconds = static_cast<double>(st->utime + st->stime) / tick;
      p.resident_bytes = static_cast<double>(st->rss_pages) * static_cast<double>(sysconf(_SC_PAGESIZE));
    }
  } catch (const Error&) {
    // a malformed stat line: the figures stay 0 (a scrape never fails for them)
  }
  if (DIR* d = opendir("/proc/self/fd")) {
    while (const dirent* e = readdir(d))
      if (e->d_name[0] != '.') p.open_fds += 1;
    closedir(d);
    p.open_fds -= 1;  // the directory stream's own fd
  }
  if (rlimit rl{}; getrlimit(RLIMIT_NOFILE, &rl) == 0) p.max_fds = static_cast<double>(rl.rlim_cur);
  return p;
}

}  // namespace

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      start_time_s_(std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count()) {
  requests_ = &BuildCounter()
                   .Name("shimlet_master_requests_total")
                   .Help("Requests handled, by route class and HTTP status code.")
                   .Register(*registry_);
  duration_ = &BuildHistogram()
                   .Name("shimlet_master_request_duration_seconds")
                   .Help(
                       "Time from a complete request to its response (authentication, authorization, "
                       "registry, ticket signing), by route class.")
                   .Register(*registry_);
  for (const char* h : kHandlers) duration_->Add({{"handler", h}}, kLatencyBuckets);
  grants_ = &BuildCounter()
                 .Name("shimlet_master_grants_total")
                 .Help(
                     "Exec and port-forward ticket decisions, by verb, way (grant: shimctl; relay: kubectl "
                     "through the master) and result (allowed, denied by RBAC, error).")
                 .Register(*registry_);
  for (const char* verb : {"exec", "portforward"})
    for (const char* via : {"grant", "relay"})
      for (const char* result : {"allowed", "denied", "error"})
        grants_->Add({{"verb", verb}, {"via", via}, {"result", result}});
  tunnels_ = &BuildCounter()
                  .Name("shimlet_master_tunnels_total")
                  .Help("shimctl --proxy tunnel requests, by result (allowed, denied by RBAC, error).")
                  .Register(*registry_);
  for (const char* result : {"allowed", "denied", "error"}) tunnels_->Add({{"result", result}});
  relay_bytes_ = &BuildCounter()
                      .Name("shimlet_master_relay_bytes_total")
                      .Help(
                          "Bytes spliced between clients and shims, by way (relay: kubectl, tunnel: shimctl "
                          "--proxy) and direction (to_shim, to_client).")
                      .Register(*registry_);
  for (const char* via : {"relay", "tunnel"})
    for (const char* dir : {"to_shim", "to_client"}) relay_bytes_->Add({{"via", via}, {"direction", dir}});
  auth_failures_ = &BuildCounter()
                        .Name("shimlet_master_authentication_failures_total")
                        .Help("Requests refused with 401: no, unknown or invalid credentials.")
                        .Register(*registry_)
                        .Add({});
  leases_expired_ = &BuildCounter()
                         .Name("shimlet_master_leases_expired_total")
                         .Help("Container registrations dropped because their node stopped renewing them.")
                         .Register(*registry_)
                         .Add({});
  session_ends_ = &BuildCounter()
                       .Name("shimlet_master_session_end_records_total")
                       .Help("Session end records accepted from nodes.")
                       .Register(*registry_)
                       .Add({});
}

Metrics::~Metrics() = default;

void Metrics::request(std::string_view handler, int code, double seconds) {
  std::string h(handler);
  requests_->Add({{"handler", h}, {"code", std::to_string(code)}}).Increment();
  duration_->Add({{"handler", h}}, kLatencyBuckets).Observe(seconds);
}

void Metrics::grant(std::string_view verb, std::string_view via, std::string_view result) {
  grants_->Add({{"verb", std::string(verb)}, {"via", std::string(via)}, {"result", std::string(result)}}).Increment();
}

void Metrics::tunnel(std::string_view result) { tunnels_->Add({{"result", std::string(result)}}).Increment(); }

void Metrics::authentication_failure() { auth_failures_->Increment(); }

void Metrics::relay_bytes(std::string_view via, bool to_shim, uint64_t n) {
  relay_bytes_->Add({{"via", std::string(via)}, {"direction", to_shim ? "to_shim" : "to_client"}})
      .Increment(static_cast<double>(n));
}

void Metrics::leases_expired(uint64_t n) { leases_expired_->Increment(static_cast<double>(n)); }

void Metrics::session_end_record() { session_ends_->Increment(); }

std::string Metrics::render(const State& state) const {
  // Scrape-time figures in a registry of their own, so nothing stale stays.
  prometheus::Registry now;
  auto gauge = [&](const char* name, const char* help, double v, const prometheus::Labels& labels = {}) {
    BuildGauge().Name(name).Help(help).Register(now).Add(labels).Set(v);
  };
  gauge("shimlet_master_build_info", "The master's version (value 1).", 1, {{"version", SHIMLET_VERSION}});
  gauge("shimlet_master_registered_nodes", "Nodes with at least one container whose lease is live.",
        static_cast<double>(state.nodes));
  gauge("shimlet_master_registered_containers", "Containers whose lease is live.",
        static_cast<double>(state.containers));
  gauge("shimlet_master_relays", "Live kubectl relays and shimctl --proxy tunnels.", static_cast<double>(state.relays));
  ProcessFigures p = process_figures();
  BuildCounter()
      .Name("process_cpu_seconds_total")
      .Help("User and system CPU time spent, in seconds.")
      .Register(now)
      .Add({})
      .Increment(p.cpu_seconds);
  gauge("process_resident_memory_bytes", "Resident memory size in bytes.", p.resident_bytes);
  gauge("process_start_time_seconds", "Start time of the process since the Unix epoch, in seconds.", start_time_s_);
  gauge("process_open_fds", "Open file descriptors.", p.open_fds);
  gauge("process_max_fds", "The open file descriptor limit.", p.max_fds);

  auto families = registry_->Collect();
  auto more = now.Collect();
  families.insert(families.end(), more.begin(), more.end());
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, families);
  return out.str();
}

}  // namespace shimlet::master
