#include "common/file.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fd.h"

namespace shimlet {
namespace {

constexpr size_t kChunk = 16384;

// Reads fd to its end; false (errno set) on a read error or beyond max (EFBIG).
bool read_all(int fd, size_t max, std::string& out) noexcept {
  char buf[kChunk];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (n == 0) return true;
    if (out.size() + static_cast<size_t>(n) > max) {
      errno = EFBIG;
      return false;
    }
    try {
      out.append(buf, static_cast<size_t>(n));
    } catch (...) {
      errno = ENOMEM;
      return false;
    }
  }
}

std::string read_open(int fd, size_t max, const std::string& what) {
  std::string out;
  if (!read_all(fd, max, out)) {
    if (errno == EFBIG) throw Error(what + ": larger than " + std::to_string(max) + " bytes");
    throw sys_error("read " + what);
  }
  return out;
}

Fd open_for_read(const std::string& path, int flags) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | flags));
  if (!fd) throw sys_error("open " + path);
  return fd;
}

}  // namespace

std::string read_fd(int fd, size_t max, const std::string& what) { return read_open(fd, max, what); }

std::string read_file(const std::string& path, size_t max, int flags) {
  Fd fd = open_for_read(path, flags);
  return read_open(fd.get(), max, path);
}

std::string read_regular_file(const std::string& path, size_t max, int flags) {
  Fd fd = open_for_read(path, flags);
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) throw sys_error("fstat " + path);
  if (!S_ISREG(st.st_mode)) throw Error(path + ": not a regular file");
  if (static_cast<uint64_t>(st.st_size) > max)
    throw Error(path + ": larger than " + std::to_string(max) + " bytes (" + std::to_string(st.st_size) + ")");
  return read_open(fd.get(), max, path);
}

std::optional<std::string> read_fd_if_readable(int fd, size_t max) noexcept {
  std::string out;
  if (!read_all(fd, max, out)) return std::nullopt;
  return out;
}

std::optional<std::string> read_file_if_readable(const std::string& path, size_t max, int flags) noexcept {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | flags);
  if (fd < 0) return std::nullopt;
  std::optional<std::string> out = read_fd_if_readable(fd, max);
  int e = errno;
  ::close(fd);
  errno = e;
  return out;
}

Fd write_file_atomic(const std::string& path, std::string_view content, mode_t mode,
                     const std::function<void(int fd)>& prepare) {
  auto slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  std::string tmp = dir + "/." + path.substr(slash == std::string::npos ? 0 : slash + 1) + ".XXXXXX";
  Fd fd(::mkostemp(tmp.data(), O_CLOEXEC));
  if (!fd) throw sys_error("create temp file for " + path);
  try {
    if (::fchmod(fd.get(), mode) < 0) throw sys_error("fchmod " + tmp);
    if (prepare) prepare(fd.get());
    write_all(fd.get(), content.data(), content.size());
    if (::fsync(fd.get()) < 0) throw sys_error("fsync " + tmp);
    if (::rename(tmp.c_str(), path.c_str()) < 0) throw sys_error("rename " + tmp + " -> " + path);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  // The rename made durable; a failure here leaves a valid file: not fatal.
  if (Fd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)); d) (void)::fsync(d.get());
  return fd;
}

}  // namespace shimlet
