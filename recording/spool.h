// The node's outbox of recordings (docs/recording.md "On the node"): one
// directory per container under the recording root, holding the files of
// recording/recorder.h. The hook's renewer and poststop send what is ready to
// the master (hook/recordings.cc) and delete each one the master has whole.
// Like the session end records (spool/spool.h), liveness is a flock,
// not a pid: a .rec whose lock is free belongs to a session that is gone.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace shimlet::recording::spool {

// Bytes held by the regular files of root/* /* (every container's spool):
// the outbox bound is checked against it before a recording starts.
uint64_t usage(const std::string& root);

// Creates root and root/<container> (0700) when missing and checks both are
// private directories of ours: the session calls it before its first
// recording. Throws shimlet::Error / std::system_error.
void prepare(const std::string& root, const std::string& container_dir);

struct Finished {
  size_t finished = 0;  // now <id>.cast, marked incomplete when they had no terminal marker
  size_t dropped = 0;   // not even a whole header line: removed
};
// Every <id>.rec in dir whose lock is free becomes <id>.cast: cut after its
// last complete line and, when that line is not a terminal marker, followed
// by incomplete_marker(why) at the last event's time (best effort: on a full
// disk the master marks it incomplete for want of a terminal marker). Locked
// ones are live sessions and stay. Throws on I/O errors other than ENOSPC.
Finished finish_orphans(const std::string& dir, std::string_view why);

struct Ready {
  std::string id, path;
  uint64_t size = 0;
};
// The <id>.cast files of dir, oldest first (mtime, then name). A missing dir is empty.
std::vector<Ready> ready(const std::string& dir);

// The container directories under root (names only), for the sweep of
// containers that are gone.
std::vector<std::string> container_dirs(const std::string& root);

}  // namespace shimlet::recording::spool
