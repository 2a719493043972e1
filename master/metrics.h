// shimlet-master's Prometheus metrics, served at GET /metrics in the text
// exposition format 0.0.4 (docs/master-api.md "Metrics"; access: RBAC `get`
// on the nonResourceURL /metrics, as kube-apiserver). Counters and the
// latency histogram live in prometheus-cpp's core registry (Debian
// libprometheus-cpp-core: thread-safe metric types and the exact text
// serializer, no HTTP server of its own: ours serves it); what is a state
// rather than an event (registered nodes and containers, live relays, the
// process's own figures) is read at scrape time and passed to render().
// Every known label combination starts at 0, so rate() works from the first
// scrape and a dashboard sees the series before the first event.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace prometheus {
class Registry;
class Counter;
class Histogram;
template <typename T>
class Family;
}  // namespace prometheus

namespace shimlet::master {

inline constexpr const char* kMetricsContentType = "text/plain; version=0.0.4; charset=utf-8";

class Metrics {
 public:
  Metrics();
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // One handled request: `handler` is its route class (grant, relay, tunnel,
  // pods, node, session_end, recording_upload, sessions, discovery, metrics, health, other; unauthenticated:
  // refused with 401 before routing), `code` the
  // HTTP status answered (101 for an upgrade handed to a relay), `seconds`
  // the time from the complete request to the response.
  void request(std::string_view handler, int code, double seconds);
  // A ticket decision: verb exec|portforward, via grant (shimctl) | relay
  // (kubectl), result allowed|denied|error.
  void grant(std::string_view verb, std::string_view via, std::string_view result);
  void tunnel(std::string_view result);  // shimctl --proxy tunnels: allowed|denied|error
  void authentication_failure();
  // Bytes a relay moved: via relay|tunnel; to_shim = client -> shim.
  void relay_bytes(std::string_view via, bool to_shim, uint64_t n);
  void leases_expired(uint64_t n);
  void session_end_record();  // a node's session end record accepted

  struct State {
    uint64_t nodes = 0, containers = 0;  // with a live lease
    uint64_t relays = 0;                 // live kubectl relays and tunnels
  };
  // The whole exposition: the registry plus `state` and process_* figures
  // (/proc/self: CPU seconds, resident memory, open fds, start time).
  std::string render(const State& state) const;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_ = nullptr;
  prometheus::Family<prometheus::Histogram>* duration_ = nullptr;
  prometheus::Family<prometheus::Counter>* grants_ = nullptr;
  prometheus::Family<prometheus::Counter>* tunnels_ = nullptr;
  prometheus::Family<prometheus::Counter>* relay_bytes_ = nullptr;
  prometheus::Counter* auth_failures_ = nullptr;
  prometheus::Counter* leases_expired_ = nullptr;
  prometheus::Counter* session_ends_ = nullptr;
  double start_time_s_;  // wall clock when the master started (made its Metrics)
};

}  // namespace shimlet::master
