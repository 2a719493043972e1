// The node's outbox of session-end records (docs/design.md "Session end
// records"): shimlet-session writes one JSON file per ended session into
// STATE_DIR/<id>/ends/, the hook's renewer (and poststop) posts them to the
// master and deletes each one the master accepted. A directory of small files
// because the writer (one process per session) and the reader (a short-lived
// renewer) never run at the same time by design and must not share a lock.
#pragma once
#include <cstddef>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/fd.h"

namespace shimlet::spool {

inline constexpr size_t kMaxPending = 1000;           // more: the oldest are dropped (and logged)
inline constexpr size_t kMaxRecordBytes = 60 * 1024;  // below the master's 64 KiB body limit

// [A-Za-z0-9_-]{1,64}: a session id usable as a file name and URL segment.
bool valid_sid(std::string_view sid);

// Writes DIR/<sid>.json atomically (temp file + rename, mode 0600). When more
// than max_pending records are then pending, the oldest are removed; returns
// their session ids (the caller logs them). Throws shimlet::Error with context
// (bad sid, record too large, I/O errors).
std::vector<std::string> write(const std::string& dir, const std::string& sid, const nlohmann::json& record,
                               size_t max_pending = kMaxPending);

struct Pending {
  std::string sid;
  std::string path;
  nlohmann::json record;  // object; discarded (is_discarded()) when the file is unreadable or not JSON
};

// At most max pending records, oldest first (mtime, then name). Temp files
// and names that are not <valid sid>.json are skipped. A missing dir is empty.
std::vector<Pending> list(const std::string& dir, size_t max);

// A live session's provisional record, so that a session killed before it
// could write its <sid>.json (SIGKILL, OOM) still leaves one: DIR/<sid>.open,
// written when the ticket is accepted and flock()ed for the session's whole
// life. The returned fd holds that lock: keep it open until the final record
// is written, then remove_open(). Same limits and errors as write(); not
// counted as pending, and list() does not see it.
Fd write_open(const std::string& dir, const std::string& sid, const nlohmann::json& record);
void remove_open(const std::string& dir, const std::string& sid);

// `path` opened with `flags` (O_CLOEXEC | O_NOFOLLOW added) and flock()ed
// exclusively, when no process holds its lock: nullopt when the file is gone
// or its lock is held (a live session, another sender). Throws on other
// errors. The liveness test of every outbox here (records and recordings).
std::optional<Fd> lock_if_free(const std::string& path, int flags);

struct Promoted {
  size_t promoted = 0;  // now pending as <sid>.json
  size_t dropped = 0;   // unreadable, or the final record was there already
};
// Every provisional record whose lock is free (its session process, and any
// child that inherited the fd, is gone) becomes a pending <sid>.json after
// `finish` completed it (for example with the time the end was noticed).
// A locked one is a live session and stays. Throws on I/O errors.
Promoted promote_orphans(const std::string& dir, const std::function<void(nlohmann::json&)>& finish);

}  // namespace shimlet::spool

// The session (session/session*) still names it masterclient::spool; it goes
// when the session moves to its own folder.
namespace shimlet::masterclient {
namespace spool = shimlet::spool;
}  // namespace shimlet::masterclient
