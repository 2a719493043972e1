// shimlet-node-metrics: the node's exposition read from a state directory.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "common/proc.h"
#include "hook/metrics.h"
#include "shim/gate_proto.h"
#include "shim/session_proto.h"

using namespace shimlet::hook;
namespace fs = std::filesystem;

namespace {

struct StateDir {
  fs::path dir = fs::temp_directory_path() / ("hook-metrics-" + std::to_string(getpid()));
  StateDir() { fs::create_directories(dir); }
  ~StateDir() { fs::remove_all(dir); }
  void write(const std::string& rel, const std::string& text) {
    fs::create_directories((dir / rel).parent_path());
    std::ofstream(dir / rel) << text;
  }
};

uint64_t own_start_time() { return shimlet::proc_stat(getpid()).value().start_time; }

bool has_line(const std::string& text, const std::string& line) {
  return text.find("\n" + line + "\n") != std::string::npos;
}

}  // namespace

TEST(NodeMetrics, ContainersShimsAndTheirCounters) {
  StateDir s;
  const std::string labels = R"(container="c1",container_id="live",namespace="ns1",pod="p1")";
  // a container whose shim runs (this process stands in for it) and wrote its counters
  s.write("live/registration.json", R"({"namespace":"ns1","pod":"p1","container":"c1","shim_pid":)" +
                                        std::to_string(getpid()) + R"(,"shim_start_time":)" +
                                        std::to_string(own_start_time()) + "}");
  // The shim's layout (shim/shim.cc write_stats), every gate counter with its own value: 100 + its index.
  std::string preauth;
  for (size_t i = 0; i < shimlet::gate::kNumCounters; i++)
    preauth += (i ? ",\"" : "\"") + std::string(shimlet::gate::kCounterNames[i]) + "\":" + std::to_string(100 + i);
  // Sessions ended by door and result: 200 + 10 * door + the result's index.
  std::string ended;
  for (size_t d = 0; d < 2; d++)
    for (size_t i = 0; i < shimlet::session_end::kNumResults; i++)
      ended += (ended.empty() ? "\"" : ",\"") + std::string(d ? "local_" : "tcp_") +
               shimlet::session_end::kResultNames[i] + "\":" + std::to_string(200 + 10 * d + i);
  s.write("live/stats.json",
          R"({"ts":"2026-12-07T00:20:31.250000Z","sessions":{"tcp":2,"local":1,"warm":1,"tcp_started":7,)"
          R"("local_started":3,"local_refused":4,"max_sessions":256,"max_local_sessions":128},"ended":{)" +
              ended + R"(},"bytes":{"tcp_in":50000,"tcp_out":1234,"local_in":0,"local_out":17},"preauth":{)" + preauth +
              R"(},"gate_pid":4242})");
  // a registration whose shim is gone, without counters
  s.write("gone/registration.json", R"({"namespace":"ns2","pod":"p2","container":"c2","shim_pid":1,)"
                                    R"("shim_start_time":1})");
  // not containers: no registration yet, a file, a bad name
  s.write("starting/shim.json", "{}");
  s.write("local.pub", "x");
  s.write("bad name/registration.json", "{}");
  Config c;
  c.state_dir = s.dir;
  std::string m = "\n" + node_metrics(c);
  EXPECT_TRUE(has_line(m, "shimlet_node_containers 2")) << m;
  EXPECT_TRUE(has_line(m, "shimlet_node_shim_up{" + labels + "} 1")) << m;
  EXPECT_TRUE(has_line(m, R"(shimlet_node_shim_up{container="c2",container_id="gone",namespace="ns2",pod="p2"} 0)"));
  // One more label, in its sorted place.
  auto with = [&](const std::string& l) {
    std::string at = l < "container_id" ? "container_id" : l < "namespace" ? "namespace" : "pod";
    return "{" + labels.substr(0, labels.find(at)) + l + "," + labels.substr(labels.find(at)) + "}";
  };
  for (const std::string& line : {
           "shimlet_node_stats_timestamp_seconds{" + labels + "} 1796602831.25",
           "shimlet_node_gate_up{" + labels + "} 1",
           "shimlet_node_sessions" + with(R"(door="tcp")") + " 2",
           "shimlet_node_sessions" + with(R"(door="local")") + " 1",
           "shimlet_node_warm_sessions{" + labels + "} 1",
           "shimlet_node_sessions_started_total" + with(R"(door="tcp")") + " 7",
           "shimlet_node_sessions_started_total" + with(R"(door="local")") + " 3",
           "shimlet_node_sessions_max" + with(R"(door="tcp")") + " 256",
           "shimlet_node_sessions_max" + with(R"(door="local")") + " 128",
           "shimlet_node_limit_hits_total" + with(R"(limit="max_local_sessions")") + " 4",
           "shimlet_node_unauthenticated_accepted_total{" + labels + "} 100",
           "shimlet_node_unauthenticated_connections_total" + with(R"(outcome="admitted")") + " 101",
           "shimlet_node_unauthenticated_connections_total" + with(R"(outcome="refused_request")") + " 102",
           "shimlet_node_unauthenticated_connections_total" + with(R"(outcome="refused_protocol")") + " 103",
           "shimlet_node_unauthenticated_connections_total" + with(R"(outcome="timed_out")") + " 104",
           "shimlet_node_limit_hits_total" + with(R"(limit="preauth_max_connections")") + " 105",
           "shimlet_node_limit_hits_total" + with(R"(limit="preauth_max_per_source")") + " 106",
           "shimlet_node_limit_hits_total" + with(R"(limit="preauth_max_memory")") + " 107",
           "shimlet_node_limit_hits_total" + with(R"(limit="max_sessions")") + " 108",
           "shimlet_node_unauthenticated_connections_total" + with(R"(outcome="peer_closed")") + " 109",
           "shimlet_node_unauthenticated_open{" + labels + "} 110",
           "shimlet_node_unauthenticated_open_peak{" + labels + "} 111",
           "shimlet_node_unauthenticated_accepted_cri_total{" + labels + "} 112",
       })
    EXPECT_TRUE(has_line(m, line)) << line << "\n" << m;
  // Two more labels: all in their sorted places.
  auto series = [](const std::string& name, std::map<std::string, std::string> l) {
    l.insert({{"container", "c1"}, {"container_id", "live"}, {"namespace", "ns1"}, {"pod", "p1"}});
    std::string out = name + "{";
    for (const auto& [k, v] : l) out += (out.back() == '{' ? "" : ",") + k + "=\"" + v + "\"";
    return out + "}";
  };
  for (size_t d = 0; d < 2; d++)
    for (size_t i = 0; i < shimlet::session_end::kNumResults; i++) {
      std::string line = series("shimlet_node_sessions_ended_total",
                                {{"door", d ? "local" : "tcp"}, {"result", shimlet::session_end::kResultNames[i]}}) +
                         " " + std::to_string(200 + 10 * d + i);
      EXPECT_TRUE(has_line(m, line)) << line << "\n" << m;
    }
  for (const std::string& line : {
           series("shimlet_node_session_bytes_total", {{"door", "tcp"}, {"direction", "in"}}) + " 50000",
           series("shimlet_node_session_bytes_total", {{"door", "tcp"}, {"direction", "out"}}) + " 1234",
           series("shimlet_node_session_bytes_total", {{"door", "local"}, {"direction", "in"}}) + " 0",
           series("shimlet_node_session_bytes_total", {{"door", "local"}, {"direction", "out"}}) + " 17",
       })
    EXPECT_TRUE(has_line(m, line)) << line << "\n" << m;
  // Every sample of the live container is one of those (+ shim_up): each field exported once.
  size_t samples = 0;
  for (size_t at = m.find("container_id=\"live\""); at != std::string::npos;
       at = m.find("container_id=\"live\"", at + 1))
    samples++;
  EXPECT_EQ(samples, 36u) << m;
  EXPECT_EQ(m.find("container_id=\"gone\",door"), std::string::npos) << "no counters without a stats file";
}

TEST(NodeMetrics, NoStateDirectoryIsNoContainers) {
  Config c;
  c.state_dir = "/nonexistent/shimlet-state";
  EXPECT_NE(node_metrics(c).find("\nshimlet_node_containers 0\n"), std::string::npos);
}

TEST(NodeMetrics, MalformedCountersAreSkipped) {
  StateDir s;
  s.write("x/registration.json", R"({"shim_pid":1,"shim_start_time":1})");
  s.write("x/stats.json", "{not json");
  s.write("y/registration.json", R"({"shim_pid":1,"shim_start_time":1})");
  s.write("y/stats.json", R"({"ts":"yesterday","sessions":{"tcp":-1,"local":"3"},"preauth":[1],"gate_pid":"x"})");
  Config c;
  c.state_dir = s.dir;
  std::string m = node_metrics(c);
  EXPECT_NE(m.find("\nshimlet_node_containers 2\n"), std::string::npos) << m;
  EXPECT_EQ(m.find("door="), std::string::npos) << m;  // negative or non-integer counts are not exported
  EXPECT_EQ(m.find("outcome="), std::string::npos) << m;
  EXPECT_EQ(m.find("shimlet_node_stats_timestamp_seconds{"), std::string::npos) << m;
  EXPECT_EQ(m.find("shimlet_node_gate_up{"), std::string::npos) << m;
}
