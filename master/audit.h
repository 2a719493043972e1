// Audit log for shimlet-master: one JSON object per line, appended with a
// single write(2) per line (O_APPEND), so concurrent writers never interleave.
// Secrets never reach the file: fields named like credentials are replaced by
// "[redacted]" wherever they appear, tickets are only ever named by their jti.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "common/fd.h"

namespace shimlet::master {

class AuditLog {
 public:
  AuditLog() = default;  // disabled: events are dropped
  // "-" = stdout (as kube-apiserver's --audit-log-path); otherwise the file is
  // created 0600 if missing and opened O_APPEND.
  explicit AuditLog(const std::string& path);

  bool enabled() const { return static_cast<bool>(fd_) || to_stdout_; }
  // Adds "ts" (RFC 3339, microseconds) and "event", redacts, writes one line.
  // Write errors are reported on stderr once and otherwise ignored (the master
  // keeps serving; the operator sees the error in its log).
  void write(const std::string& event, nlohmann::json fields);

  // The redaction applied by write(), exposed for tests.
  static void redact(nlohmann::json& j);

 private:
  Fd fd_;
  bool to_stdout_ = false;
  bool warned_ = false;
};

// Current time as RFC 3339 UTC with microseconds ("2026-01-02T03:04:05.123456Z").
std::string rfc3339_now();
std::string rfc3339(int64_t unix_seconds);

}  // namespace shimlet::master
