// Files: bounded reads and atomic writes. Reads grow as they go (never a
// buffer of the maximum, which would be zero-filled page faults on the exec
// path). Errors keep errno (sys_error) and name the path.
#pragma once
#include <sys/types.h>

#include <cstddef>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "common/fd.h"

namespace shimlet {

// All of `path`, at most `max` bytes: sys_error("open PATH"/"read PATH"),
// Error("PATH: larger than MAX bytes"). `flags` join O_RDONLY | O_CLOEXEC |
// O_NOCTTY (O_NOFOLLOW, O_NONBLOCK).
std::string read_file(const std::string& path, size_t max, int flags = 0);
// The same for a file that must be regular (configs, keys, state files: a
// FIFO would block, a device might never end): Error("PATH: not a regular
// file"), and a size fstat already shows beyond max is refused unread.
std::string read_regular_file(const std::string& path, size_t max, int flags = 0);
// The rest of an open fd, at most max bytes; `what` names it in errors.
std::string read_fd(int fd, size_t max, const std::string& what);
// For files whose absence is an answer (a cgroup or a process that is gone,
// a record being replaced): nullopt with errno set when the file cannot be
// opened or read, or holds more than max bytes (EFBIG). Never throws.
std::optional<std::string> read_file_if_readable(const std::string& path, size_t max, int flags = 0) noexcept;
// The same for the rest of an open fd.
std::optional<std::string> read_fd_if_readable(int fd, size_t max) noexcept;

// Replaces path atomically: a temp file in the same directory with `mode`,
// written, fsync()ed and renamed over path (the directory fsync()ed too). `prepare`, when given, runs on
// the temp file first (a flock taken there means the file is never seen
// unlocked). Returns the file, still open (and locked); throws with context,
// and the temp file never stays behind.
Fd write_file_atomic(const std::string& path, std::string_view content, mode_t mode,
                     const std::function<void(int fd)>& prepare = {});

}  // namespace shimlet
