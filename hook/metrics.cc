// shimlet-node-metrics (hook/metrics.h): the exposition, and main().
#include "hook/metrics.h"

#include <dirent.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <cerrno>
#include <ctime>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string_view>
#include <system_error>

#include "common/error.h"
#include "common/file.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/version.h"
#include "shim/gate_proto.h"
#include "shim/session_proto.h"

namespace shimlet::hook {
namespace {

using nlohmann::json;
using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::Labels;

constexpr size_t kMaxStatsBytes = 64 * 1024;
constexpr size_t kMaxRegistrationBytes = 64 * 1024;

// A non-negative integer field of obj, or nullopt (absent, or of another type).
std::optional<double> count(const json& obj, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end() || !it->is_number_unsigned()) return std::nullopt;
  return static_cast<double>(it->get<uint64_t>());
}

struct Families {
  explicit Families(prometheus::Registry& r)
      : shim_up(gauge(r, "shimlet_node_shim_up",
                      "1 when the container's shim runs, 0 when its registration names a gone process.")),
        stats_time(gauge(r, "shimlet_node_stats_timestamp_seconds",
                         "When the shim last wrote its counters (stats.json ts; it does at most once a second "
                         "while they change), unix seconds.")),
        gate_up(gauge(r, "shimlet_node_gate_up",
                      "1 while the shim's pre-authentication gate process runs (it starts at the first TCP "
                      "connection and exits when idle).")),
        sessions(gauge(r, "shimlet_node_sessions",
                       "Authenticated sessions running, by door (tcp: the TLS port, through the gate; local: the "
                       "root-only unix socket).")),
        warm(gauge(r, "shimlet_node_warm_sessions", "Warm sessions of the local socket waiting for their connection.")),
        sessions_max(gauge(r, "shimlet_node_sessions_max",
                           "The session limit by door: max_sessions (tcp), max_local_sessions (local).")),
        started(counter(r, "shimlet_node_sessions_started_total", "Sessions started, by door.")),
        ended(counter(r, "shimlet_node_sessions_ended_total",
                      "Sessions ended, by door and result: ok (a ticket accepted; the exec exited 0, or the "
                      "forward ended normally), exit_nonzero (the exec's command exited non-zero or on a signal), "
                      "refused (no ticket accepted on the connection), error (ended abnormally: the command did "
                      "not start, a limit, the client gone, terminated, or the session process died without "
                      "reporting).")),
        bytes(counter(r, "shimlet_node_session_bytes_total",
                      "Application bytes of ended sessions, by door and direction: in (client to container: "
                      "stdin, forwarded), out (container to client: stdout and stderr, forwarded); the session "
                      "end record's bytes_in and bytes_out. A local exec given the client's own stdio copies none: "
                      "0.")),
        limit_hits(counter(r, "shimlet_node_limit_hits_total",
                           "Connections refused or dropped because a limit of the hook config was reached, by "
                           "limit: preauth_max_connections, preauth_max_per_source, preauth_max_memory (an "
                           "unauthenticated connection dropped, the idlest first), max_sessions (a valid ticket "
                           "refused with 503), max_local_sessions (a local connection closed).")),
        accepted(counter(r, "shimlet_node_unauthenticated_accepted_total",
                         "TCP connections accepted by the pre-authentication gate.")),
        cri_accepted(counter(r, "shimlet_node_unauthenticated_accepted_cri_total",
                             "Of shimlet_node_unauthenticated_accepted_total: connections to the shim's CRI "
                             "listener (cri_listen, plain HTTP on loopback).")),
        unauth(counter(r, "shimlet_node_unauthenticated_connections_total",
                       "Unauthenticated TCP connections ended, by outcome: admitted (a valid ticket, the session "
                       "started), refused_request (answered with an error: no, bad or replayed ticket, bad "
                       "request), refused_protocol (TLS or HTTP error), timed_out (no valid ticket within "
                       "preauth_timeout_ms), peer_closed (the peer hung up first). The others end on a limit "
                       "(shimlet_node_limit_hits_total) or are still open.")),
        unauth_open(gauge(r, "shimlet_node_unauthenticated_open", "Unauthenticated connections held now.")),
        unauth_peak(gauge(r, "shimlet_node_unauthenticated_open_peak",
                          "The most unauthenticated connections held at once since the shim started.")) {}
  static prometheus::Family<prometheus::Gauge>& gauge(prometheus::Registry& r, const char* name, const char* help) {
    return BuildGauge().Name(name).Help(help).Register(r);
  }
  static prometheus::Family<prometheus::Counter>& counter(prometheus::Registry& r, const char* name, const char* help) {
    return BuildCounter().Name(name).Help(help).Register(r);
  }
  prometheus::Family<prometheus::Gauge>& shim_up;
  prometheus::Family<prometheus::Gauge>& stats_time;
  prometheus::Family<prometheus::Gauge>& gate_up;
  prometheus::Family<prometheus::Gauge>& sessions;
  prometheus::Family<prometheus::Gauge>& warm;
  prometheus::Family<prometheus::Gauge>& sessions_max;
  prometheus::Family<prometheus::Counter>& started;
  prometheus::Family<prometheus::Counter>& ended;
  prometheus::Family<prometheus::Counter>& bytes;
  prometheus::Family<prometheus::Counter>& limit_hits;
  prometheus::Family<prometheus::Counter>& accepted;
  prometheus::Family<prometheus::Counter>& cri_accepted;
  prometheus::Family<prometheus::Counter>& unauth;
  prometheus::Family<prometheus::Gauge>& unauth_open;
  prometheus::Family<prometheus::Gauge>& unauth_peak;
};

Labels with(Labels l, const char* k, const char* v) {
  l.emplace(k, v);
  return l;
}

void add_counter(prometheus::Family<prometheus::Counter>& f, const Labels& l, std::optional<double> v) {
  if (v) f.Add(l).Increment(*v);
}

void add_gauge(prometheus::Family<prometheus::Gauge>& f, const Labels& l, std::optional<double> v) {
  if (v) f.Add(l).Set(*v);
}

// Where each gate counter (shim/gate_proto.h, the "preauth" object of
// stats.json) goes, in GateCounters' order: every one exported, once.
enum class To { Accepted, Outcome, Limit, Open, OpenPeak, CriAccepted };
struct PreauthField {
  const char* name;  // in stats.json
  To to;
  const char* label;  // the outcome, or the limit's hook config key
};
constexpr PreauthField kPreauth[] = {
    {"accepted", To::Accepted, ""},
    {"admitted", To::Outcome, "admitted"},
    {"refused_request", To::Outcome, "refused_request"},
    {"refused_protocol", To::Outcome, "refused_protocol"},
    {"timed_out", To::Outcome, "timed_out"},
    {"dropped_total", To::Limit, "preauth_max_connections"},
    {"dropped_per_source", To::Limit, "preauth_max_per_source"},
    {"dropped_memory", To::Limit, "preauth_max_memory"},
    {"refused_sessions", To::Limit, "max_sessions"},
    {"peer_closed", To::Outcome, "peer_closed"},
    {"open", To::Open, ""},
    {"open_peak", To::OpenPeak, ""},
    {"cri_accepted", To::CriAccepted, ""},
};
constexpr bool same_as_the_gate() {
  if (std::size(kPreauth) != gate::kNumCounters) return false;
  for (size_t i = 0; i < gate::kNumCounters; i++)
    if (std::string_view(kPreauth[i].name) != gate::kCounterNames[i]) return false;
  return true;
}
static_assert(same_as_the_gate(), "kPreauth must name every gate counter, in shim/gate_proto.h's order");

// stats.json's "ts" (the shim's "YYYY-MM-DDTHH:MM:SS.ffffffZ", UTC) as unix
// seconds; nullopt when absent or of another form.
std::optional<double> unix_time(const json& st) {
  auto it = st.find("ts");
  if (it == st.end() || !it->is_string()) return std::nullopt;
  const std::string& ts = it->get_ref<const std::string&>();
  tm t{};
  const char* rest = strptime(ts.c_str(), "%Y-%m-%dT%H:%M:%S", &t);
  if (!rest) return std::nullopt;
  double frac = 0;
  if (*rest == '.') {
    double scale = 0.1;
    for (rest++; *rest >= '0' && *rest <= '9'; rest++, scale /= 10) frac += (*rest - '0') * scale;
  }
  if (std::string_view(rest) != "Z") return std::nullopt;
  return static_cast<double>(timegm(&t)) + frac;
}

// The shim's STATE/<id>/stats.json (docs/design.md "Pre-authentication
// gate"): {"ts", "sessions": {"tcp", "local", "warm", "tcp_started",
// "local_started", "local_refused", "max_sessions", "max_local_sessions"},
// "ended": {"<door>_<result>"}, "bytes": {"<door>_in", "<door>_out"},
// "preauth": {the gate counters}, "gate_pid"}; each field exported once.
void add_stats(Families& f, const Labels& l, const json& st) {
  const json none = json::object();
  auto object = [&](const char* key) -> const json& {
    auto it = st.find(key);
    return it != st.end() && it->is_object() ? *it : none;
  };
  const json& s = object("sessions");
  const json& p = object("preauth");
  const json& e = object("ended");
  const json& b = object("bytes");
  for (const char* door : {"tcp", "local"}) {
    const Labels dl = with(l, "door", door);
    for (const char* result : session_end::kResultNames)
      add_counter(f.ended, with(dl, "result", result), count(e, (std::string(door) + "_" + result).c_str()));
    add_counter(f.bytes, with(dl, "direction", "in"), count(b, (std::string(door) + "_in").c_str()));
    add_counter(f.bytes, with(dl, "direction", "out"), count(b, (std::string(door) + "_out").c_str()));
  }
  add_gauge(f.stats_time, l, unix_time(st));
  if (auto pid = count(st, "gate_pid")) f.gate_up.Add(l).Set(*pid > 0 ? 1 : 0);
  add_gauge(f.sessions, with(l, "door", "tcp"), count(s, "tcp"));
  add_gauge(f.sessions, with(l, "door", "local"), count(s, "local"));
  add_gauge(f.warm, l, count(s, "warm"));
  add_counter(f.started, with(l, "door", "tcp"), count(s, "tcp_started"));
  add_counter(f.started, with(l, "door", "local"), count(s, "local_started"));
  add_gauge(f.sessions_max, with(l, "door", "tcp"), count(s, "max_sessions"));
  add_gauge(f.sessions_max, with(l, "door", "local"), count(s, "max_local_sessions"));
  add_counter(f.limit_hits, with(l, "limit", "max_local_sessions"), count(s, "local_refused"));
  for (const PreauthField& field : kPreauth) {
    auto v = count(p, field.name);
    switch (field.to) {
      case To::Accepted:
        add_counter(f.accepted, l, v);
        break;
      case To::Outcome:
        add_counter(f.unauth, with(l, "outcome", field.label), v);
        break;
      case To::Limit:
        add_counter(f.limit_hits, with(l, "limit", field.label), v);
        break;
      case To::Open:
        add_gauge(f.unauth_open, l, v);
        break;
      case To::OpenPeak:
        add_gauge(f.unauth_peak, l, v);
        break;
      case To::CriAccepted:
        add_counter(f.cri_accepted, l, v);
        break;
    }
  }
}

}  // namespace

std::string node_metrics(const Config& c) {
  prometheus::Registry r;
  Families f(r);
  BuildGauge()
      .Name("shimlet_node_build_info")
      .Help("The node's shimlet version (value 1).")
      .Register(r)
      .Add({{"version", SHIMLET_VERSION}})
      .Set(1);
  auto& containers = BuildGauge()
                         .Name("shimlet_node_containers")
                         .Help("Containers with a shimlet registration on this node.")
                         .Register(r)
                         .Add({});
  std::unique_ptr<DIR, int (*)(DIR*)> dir(::opendir(c.state_dir.c_str()), ::closedir);
  if (!dir) {
    if (errno != ENOENT) throw sys_error("open state directory " + c.state_dir);
  } else {
    while (const dirent* e = ::readdir(dir.get())) {
      std::string id = e->d_name;
      if (!valid_container_id(id)) continue;
      const std::string base = c.state_dir + "/" + id;
      json reg, st;
      try {
        reg = json::parse(read_regular_file(base + "/registration.json", kMaxRegistrationBytes));
      } catch (const std::exception&) {
        continue;  // not a container directory, or one being set up or torn down
      }
      containers.Increment();
      Labels l = {{"container_id", id},
                  {"namespace", reg.value("namespace", "")},
                  {"pod", reg.value("pod", "")},
                  {"container", reg.value("container", "")}};
      bool up = same_live_process(static_cast<pid_t>(reg.value("shim_pid", int64_t{0})),
                                  reg.value("shim_start_time", uint64_t{0}));
      f.shim_up.Add(l).Set(up ? 1 : 0);
      try {
        st = json::parse(read_regular_file(base + "/stats.json", kMaxStatsBytes));
      } catch (const std::system_error& ex) {
        // None yet (a shim writes it once it has something to count).
        if (ex.code().value() != ENOENT)
          log::warn("unreadable shim stats file", {{"container", id}, {"error", ex.what()}});
        continue;
      } catch (const std::exception& ex) {
        log::warn("unreadable shim stats file", {{"container", id}, {"error", ex.what()}});
        continue;
      }
      if (st.is_object()) add_stats(f, l, st);
    }
  }
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, r.Collect());
  return out.str();
}

}  // namespace shimlet::hook
