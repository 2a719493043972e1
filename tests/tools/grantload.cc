// shimlet-grantload: N exec grants from C concurrent clients, each grant the
// way shimctl asks for one (a new TLS connection to the first master of
// --server that can be reached: masterclient::Masters, the same failover
// code as shimctl and the hook; each client stays on the master that last
// answered). Prints ONE JSON line: counts, errors by message, grants per
// master, latency percentiles, rate. Used by tests/integration/test_master_ha.py
// (kill a master during the stream) and bench/master.
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/file.h"
#include "masterclient/masterclient.h"

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace mc = shimlet::masterclient;

const char* kUsage =
    "usage: shimlet-grantload --server URL[,URL...] --ca CA.pem --token TOKEN --path PATH [--body JSON]\n"
    "                         [-n GRANTS] [-c CLIENTS] [--timeout-ms MS] [--spread]\n"
    "  --spread: client i starts at master i mod M (clients spread over the masters)\n";

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

}  // namespace

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);  // a master killed mid-request: an error to fail over on, not a death
  std::vector<std::string> servers;
  std::string ca, token, path, body = R"({"command":["true"],"jkt":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"})";
  int n = 100, clients = 1, timeout_ms = 10000;
  bool spread = false;
  try {
    for (int i = 1; i < argc; i++) {
      std::string a = argv[i];
      auto val = [&]() -> std::string {
        if (i + 1 >= argc) throw shimlet::Error(a + " needs a value");
        return argv[++i];
      };
      if (a == "--server") {
        std::string l = val();
        for (size_t p = 0; p <= l.size();) {
          size_t c = l.find(',', p);
          if (c == std::string::npos) c = l.size();
          if (c > p) servers.push_back(l.substr(p, c - p));
          p = c + 1;
        }
      } else if (a == "--ca") {
        ca = shimlet::read_regular_file(val(), 1 << 20);
      } else if (a == "--token") {
        token = val();
      } else if (a == "--path") {
        path = val();
      } else if (a == "--body") {
        body = val();
      } else if (a == "-n") {
        n = std::stoi(val());
      } else if (a == "-c") {
        clients = std::stoi(val());
      } else if (a == "--timeout-ms") {
        timeout_ms = std::stoi(val());
      } else if (a == "--spread") {
        spread = true;
      } else {
        std::cerr << kUsage;
        return 2;
      }
    }
    if (servers.empty() || path.empty() || n < 1 || clients < 1) throw shimlet::Error("missing --server or --path");
  } catch (const std::exception& e) {
    std::cerr << "shimlet-grantload: " << e.what() << "\n" << kUsage;
    return 2;
  }

  std::mutex mu;
  std::vector<double> lat_ms;
  std::map<std::string, int> errors, by_master;
  int ok = 0, failed = 0;
  const auto t0 = Clock::now();
  std::vector<std::thread> ths;
  for (int c = 0; c < clients; c++) {
    const int mine = n / clients + (c < n % clients ? 1 : 0);
    ths.emplace_back([&, c, mine] {
      std::vector<mc::Target> ts;
      for (size_t i = 0; i < servers.size(); i++) {
        mc::Target t;
        t.server = servers[spread ? (i + static_cast<size_t>(c)) % servers.size() : i];
        t.ca_pem = ca;
        t.token = token;
        t.timeout_ms = timeout_ms;
        t.user_agent = "shimlet-grantload";
        ts.push_back(std::move(t));
      }
      mc::Masters masters(std::move(ts));
      for (int i = 0; i < mine; i++) {
        const auto s = Clock::now();
        std::string err, who;
        try {
          mc::Response r = masters.request("POST", path, body);
          who = masters.current().server;
          if (r.status != 201) err = "HTTP " + std::to_string(r.status) + ": " + mc::error_message(r);
        } catch (const std::exception& e) {
          err = e.what();
        }
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - s).count();
        std::lock_guard lk(mu);
        if (err.empty()) {
          ok++;
          lat_ms.push_back(ms);
          by_master[who]++;
        } else {
          failed++;
          errors[err.substr(0, 300)]++;
        }
      }
    });
  }
  for (auto& t : ths) t.join();
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  json out = {{"ok", ok},
              {"failed", failed},
              {"errors", errors},
              {"by_master", by_master},
              {"seconds", secs},
              {"rate", secs > 0 ? ok / secs : 0},
              {"latency_ms",
               {{"p50", percentile(lat_ms, 0.50)}, {"p99", percentile(lat_ms, 0.99)}, {"max", percentile(lat_ms, 1)}}}};
  std::cout << out.dump() << std::endl;
  return failed ? 1 : 0;
}
