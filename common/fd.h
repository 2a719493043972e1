// RAII owners for kernel handles: file descriptors and child pids.
#pragma once
#include <sys/types.h>

#include <span>
#include <utility>

namespace shimlet {

// Owns one file descriptor; closes it on destruction. Move-only.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  ~Fd() { reset(); }

  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// A pipe whose both ends are O_CLOEXEC.
struct Pipe {
  Fd read;
  Fd write;
};
Pipe make_pipe(int extra_flags = 0);

// Sets or clears O_NONBLOCK; throws on failure.
void set_nonblocking(int fd, bool on = true);
void set_cloexec(int fd, bool on = true);

// Writes all of buf (retrying EINTR/partial writes) on a blocking fd.
void write_all(int fd, const void* buf, size_t len);
// Reads exactly len bytes; returns false on EOF before any byte.
bool read_exact(int fd, void* buf, size_t len);

// SCM_RIGHTS over a unix socket: one message (on a SOCK_SEQPACKET) with up
// to kMaxPassedFds fds. The _nothrow primitives allocate nothing and are
// async-signal-safe (a child between fork and execve uses them); EINTR is
// retried. The static shim keeps its own copy (shim/shim.cc FdMsg: it links no
// common/ code).
inline constexpr size_t kMaxPassedFds = 8;
// 0, or an errno (EINVAL: more than kMaxPassedFds fds).
int send_fds_nothrow(int sock, std::span<const int> fds, const void* data, size_t len) noexcept;
// One message into data[0..len) and up to fds.size() fds (received
// O_CLOEXEC, stored in fds[0..*nfds), owned by the caller): the message's
// length (0: the peer closed), or -1 with errno (EMSGSIZE: the message or
// its fds did not fit; any fds that came are closed).
ssize_t recv_fds_nothrow(int sock, void* data, size_t len, std::span<int> fds, size_t* nfds) noexcept;
// Throwing forms: sys_error with context.
void send_fds(int sock, std::span<const int> fds, const void* data, size_t len);
void send_fd(int sock, int fd, const void* data = nullptr, size_t len = 0);
// Exactly one fd, with data; Error when the peer closed or sent no fd.
Fd recv_fd(int sock, void* data = nullptr, size_t len = 0);

}  // namespace shimlet
