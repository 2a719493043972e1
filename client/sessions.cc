// `shimctl sessions list|play|export` (docs/recording.md "Reading"): the
// master's read API (docs/master-api.md "Sessions"). Recordings are fetched
// in 1 MiB pieces (the master's and masterclient's response bound), so
// neither side ever holds a whole recording; the player parses and plays
// each piece as it arrives.
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "client/client.h"
#include "common/error.h"
#include "common/fd.h"
#include "masterclient/masterclient.h"
#include "recording/asciicast.h"

namespace shimlet::client {
namespace {

using nlohmann::json;

constexpr int kTimeoutMs = 30000;
constexpr uint64_t kPiece = masterclient::kMaxResponseBody;

json get_json(masterclient::Masters& t, const std::string& path) {
  masterclient::Response r = t.request("GET", path, "");
  if (r.status != 200) throw Error(masterclient::error_message(r));
  json j = json::parse(r.body, nullptr, false);
  if (!j.is_object()) throw Error("the master answered " + path + " with something that is not a JSON object");
  return j;
}

std::string session_path(const std::string& id) {
  return "/apis/shimlet.io/v1/sessions/" + masterclient::path_segment(id);
}

// Calls `each` with the recording's bytes, piece by piece, in order.
void fetch(masterclient::Masters& t, const std::string& id, const std::function<void(std::string_view)>& each) {
  json meta = get_json(t, session_path(id));
  uint64_t size = meta.value("bytes", uint64_t{0});
  for (uint64_t off = 0; off < size;) {
    std::string path = session_path(id) + "/recording?offset=" + std::to_string(off) +
                       "&length=" + std::to_string(std::min(kPiece, size - off));
    masterclient::Response r = t.request("GET", path, "");
    if (r.status != 200) throw Error(masterclient::error_message(r));
    if (r.body.empty())
      throw Error("recording " + id + " ended at byte " + std::to_string(off) + " of " + std::to_string(size));
    off += r.body.size();
    each(r.body);
  }
}

void write_out(int fd, std::string_view data) {
  if (!data.empty()) write_all(fd, data.data(), data.size());
}

std::string human_bytes(uint64_t b) {
  char buf[32];
  if (b < 1024)
    snprintf(buf, sizeof buf, "%lluB", static_cast<unsigned long long>(b));
  else if (b < (1u << 20))
    snprintf(buf, sizeof buf, "%.1fKiB", static_cast<double>(b) / 1024);
  else
    snprintf(buf, sizeof buf, "%.1fMiB", static_cast<double>(b) / (1 << 20));
  return buf;
}

std::string status_of(const json& m) {
  if (m.value("truncated", false)) return "truncated";
  return m.value("complete", false) ? "complete" : "incomplete";
}

int list(masterclient::Masters& t, const Invocation& inv) {
  std::string path = inv.ns_set ? "/apis/shimlet.io/v1/namespaces/" + masterclient::path_segment(inv.ns) + "/sessions"
                                : "/apis/shimlet.io/v1/sessions";
  if (!inv.sessions.user.empty()) path += "?user=" + masterclient::path_segment(inv.sessions.user);
  json l = get_json(t, path);
  const json items = l.value("items", json::array());
  if (inv.sessions.output == "json") {
    std::string s = l.dump(2, ' ', false, json::error_handler_t::replace) + "\n";
    write_out(1, s);
    return 0;
  }
  std::string out;
  char line[1024];
  snprintf(line, sizeof line, "%-18s %-12s %-16s %-10s %-12s %-20s %9s %9s %-10s %s\n", "ID", "NAMESPACE", "POD",
           "CONTAINER", "USER", "START", "DURATION", "SIZE", "STATUS", "COMMAND");
  out += line;
  for (const json& m : items) {
    auto s = [&](const char* k) { return m.value(k, std::string()); };
    std::vector<std::string> argv;
    for (const auto& a : m.value("command", json::array()))
      if (a.is_string()) argv.push_back(a.get<std::string>());
    std::string cmd = recording::shell_join(argv);
    if (cmd.size() > 60) cmd = cmd.substr(0, 57) + "...";
    char dur[32];
    snprintf(dur, sizeof dur, "%.1fs", m.value("duration_s", 0.0));
    snprintf(line, sizeof line, "%-18s %-12s %-16s %-10s %-12s %-20s %9s %9s %-10s %s\n", s("id").c_str(),
             s("namespace").c_str(), s("pod").c_str(), s("container").c_str(), s("user").c_str(), s("start").c_str(),
             dur, human_bytes(m.value("bytes", uint64_t{0})).c_str(), status_of(m).c_str(), cmd.c_str());
    out += line;
  }
  write_out(1, out);
  return 0;
}

void sleep_until(const timespec& start, int64_t offset_us) {
  timespec at = start;
  at.tv_sec += offset_us / 1000000;
  at.tv_nsec += (offset_us % 1000000) * 1000;
  if (at.tv_nsec >= 1000000000) {
    at.tv_sec++;
    at.tv_nsec -= 1000000000;
  }
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, nullptr) == EINTR) {
  }
}

int play(masterclient::Masters& t, const Invocation& inv) {
  recording::Reader reader;
  recording::Summary sum;
  recording::Pacer pacer(inv.sessions.speed, static_cast<int64_t>(inv.sessions.idle_limit_s * 1e6));
  timespec start{};
  clock_gettime(CLOCK_MONOTONIC, &start);
  bool tty = false;
  auto on_event = [&](recording::Event&& e) {
    sum.add(e);
    // Only what the terminal showed is played: output (and a non-tty
    // session's stderr on ours). Input, resizes and markers are not drawn.
    if (e.code != "o" && (e.code != "e" || tty)) return;
    sleep_until(start, pacer.at(e.t_us));
    write_out(e.code == "e" ? 2 : 1, e.data);
  };
  fetch(t, inv.sessions.id, [&](std::string_view piece) {
    bool had_header = reader.has_header();
    if (!reader.feed(piece, on_event)) throw Error("recording " + inv.sessions.id + ": " + reader.error());
    if (!had_header && reader.has_header()) {
      const json& s = reader.header().value("shimlet", json::object());
      tty = s.value("tty", false);
    }
  });
  if (!reader.finish(on_event)) throw Error("recording " + inv.sessions.id + ": " + reader.error());
  if (!reader.has_header()) throw Error("recording " + inv.sessions.id + " is empty");
  // What the recording says of itself, where the player's user sees it.
  std::string note;
  if (sum.truncated) note += "shimctl: the recording was truncated at its size limit\n";
  if (sum.gaps) note += "shimctl: the recording has gaps (events the recorder could not keep)\n";
  if (!sum.complete())
    note += "shimctl: the recording is incomplete" + (sum.terminal ? ": " + sum.terminal->substr(12) : "") + "\n";
  write_out(2, note);
  return 0;
}

}  // namespace

int run_sessions(const Invocation& inv) {
  masterclient::Masters t = master_targets(master_settings(inv), kTimeoutMs);
  if (inv.sessions.action == "list") return list(t, inv);
  if (inv.sessions.action == "export") {
    fetch(t, inv.sessions.id, [](std::string_view piece) { write_out(1, piece); });
    return 0;
  }
  return play(t, inv);
}

}  // namespace shimlet::client
