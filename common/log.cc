#include "common/log.h"

#include <time.h>
#include <unistd.h>

namespace shimlet::log {
namespace {
std::string g_component = "shimlet";
nlohmann::json g_context = nlohmann::json::object();

void emit(const char* level, const std::string& msg, const nlohmann::json& fields) {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  char tbuf[64];
  tm tmv{};
  gmtime_r(&ts.tv_sec, &tmv);
  size_t n = strftime(tbuf, sizeof tbuf, "%Y-%m-%dT%H:%M:%S", &tmv);
  snprintf(tbuf + n, sizeof tbuf - n, ".%06ldZ", ts.tv_nsec / 1000);
  nlohmann::json j = {{"ts", tbuf}, {"level", level}, {"component", g_component}, {"pid", getpid()}, {"msg", msg}};
  for (auto& [k, v] : g_context.items()) j[k] = v;
  if (fields.is_object())
    for (auto& [k, v] : fields.items()) j[k] = v;
  // One write() per line so concurrent processes sharing the log don't interleave.
  std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  ssize_t r = ::write(2, line.data(), line.size());
  (void)r;
}
}  // namespace

void set_component(std::string component) { g_component = std::move(component); }
void set_context(const nlohmann::json& fields) { g_context = fields; }
void info(const std::string& msg, const nlohmann::json& f) { emit("info", msg, f); }
void warn(const std::string& msg, const nlohmann::json& f) { emit("warn", msg, f); }
void error(const std::string& msg, const nlohmann::json& f) { emit("error", msg, f); }
void audit(const std::string& event, const nlohmann::json& f) { emit("audit", event, f); }

std::string rfc3339(int64_t unix_seconds) {
  time_t tt = static_cast<time_t>(unix_seconds);
  tm g{};
  gmtime_r(&tt, &g);
  char buf[32];
  strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &g);
  return buf;
}

}  // namespace shimlet::log
