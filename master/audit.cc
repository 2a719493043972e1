#include "master/audit.h"

#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <array>
#include <cctype>

#include "common/error.h"
#include "common/log.h"

namespace shimlet::master {
namespace {

bool is_secret_key(std::string k) {
  for (auto& c : k) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  static const std::array<const char*, 8> kSecret = {"authorization", "token",  "ticket",      "password",
                                                     "secret",        "bearer", "private_key", "cookie"};
  for (const char* s : kSecret)
    if (k == s) return true;
  return false;
}

}  // namespace

std::string rfc3339(int64_t t) { return log::rfc3339(t); }

std::string rfc3339_now() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  tm tmv{};
  gmtime_r(&ts.tv_sec, &tmv);
  char buf[64];
  size_t n = strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tmv);
  snprintf(buf + n, sizeof buf - n, ".%06ldZ", ts.tv_nsec / 1000);
  return buf;
}

AuditLog::AuditLog(const std::string& path) {
  if (path == "-") {
    to_stdout_ = true;
    return;
  }
  int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) throw sys_error("cannot open audit log " + path);
  fd_ = Fd(fd);
}

void AuditLog::redact(nlohmann::json& j) {
  if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (is_secret_key(it.key()))
        it.value() = "[redacted]";
      else
        redact(it.value());
    }
  } else if (j.is_array()) {
    for (auto& e : j) redact(e);
  }
}

void AuditLog::write(const std::string& event, nlohmann::json fields) {
  if (!enabled()) return;
  if (!fields.is_object()) fields = nlohmann::json::object();
  redact(fields);
  nlohmann::json line = {{"ts", rfc3339_now()}, {"event", event}};
  for (auto& [k, v] : fields.items()) line[k] = v;
  std::string s = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  int fd = to_stdout_ ? 1 : fd_.get();
  ssize_t w;
  do w = ::write(fd, s.data(), s.size());
  while (w < 0 && errno == EINTR);
  if ((w < 0 || static_cast<size_t>(w) != s.size()) && !warned_) {
    warned_ = true;
    log::error("audit log write failed", {{"errno", errno}});
  }
}

}  // namespace shimlet::master
