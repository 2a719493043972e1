// The session's end record (docs/design.md "Session end records"): a
// provisional one as soon as a ticket is accepted, the final one when the
// session ends; spooled on the node (spool/) for the hook to send.
#include <time.h>

#include <nlohmann/json.hpp>

#include "common/log.h"
#include "session/session_context.h"
#include "spool/spool.h"

namespace shimlet::session {

nlohmann::json Context::end_record() const {
  const ticket::Claims& c = *end_claims_;
  // session_id: the master's (ticket sid) so the record joins the grant's
  // audit line; the file is named by our own random id (unique per
  // connection even if a local ticket reuses a sid).
  nlohmann::json r = {{"session_id", masterclient::spool::valid_sid(c.sid) ? c.sid : sid_},
                      {"shim_session", sid_},
                      {"container_id", cfg_.id},
                      {"user", c.sub},
                      {"verb", c.verb},
                      {"jti", c.jti},
                      {"peer", peer_},
                      {"start", log::rfc3339(start_unix_)}};
  if (c.verb == "exec") r["command"] = c.cmd;
  return r;
}

// Written as soon as the ticket is accepted and locked while this process
// lives: if it is killed (SIGKILL, OOM) before write_end_record(), the node's
// renewer finds the lock free and sends this instead (docs/design.md
// "Session end records"). Costs one small file per session, only with a master.
void Context::write_open_record() {
  if (cfg_.ends_dir.empty() || !end_claims_) return;
  nlohmann::json r = end_record();
  r["error"] = "the session process ended without writing its end record (killed); end is when the node noticed";
  try {
    open_record_ = masterclient::spool::write_open(cfg_.ends_dir, sid_, r);
  } catch (const std::exception& e) {
    log::error("cannot write the provisional session end record", {{"dir", cfg_.ends_dir}, {"error", e.what()}});
  }
}

void Context::write_end_record() {
  if (cfg_.ends_dir.empty() || !end_claims_) return;
  nlohmann::json r = end_record();
  r["end"] = log::rfc3339(time(nullptr));
  r["bytes_in"] = end_bytes_in_;
  r["bytes_out"] = end_bytes_out_;
  if (end_stdio_client_) r["stdio"] = "client";
  if (end_exit_) r["exit_code"] = *end_exit_;
  if (end_signal_) r["signal"] = end_signal_;
  if (!end_error_.empty()) r["error"] = end_error_.substr(0, 1000);
  if (!end_recording_.is_null()) r["recording"] = end_recording_;
  for (const std::string& gone : masterclient::spool::write(cfg_.ends_dir, sid_, r))
    log::warn("session end outbox full: dropped the oldest record",
              {{"dropped_session", gone}, {"limit", masterclient::spool::kMaxPending}});
  if (open_record_) {
    masterclient::spool::remove_open(cfg_.ends_dir, sid_);
    open_record_.reset();
  }
}

}  // namespace shimlet::session
