#include "common/fd.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>

#include "common/error.h"

namespace shimlet {

void Fd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);  // close errors are not actionable here
  fd_ = fd;
}

Pipe make_pipe(int extra_flags) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC | extra_flags) < 0) throw sys_error("pipe2");
  return Pipe{Fd(p[0]), Fd(p[1])};
}

void set_nonblocking(int fd, bool on) {
  int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0) throw sys_error("fcntl(F_GETFL) fd " + std::to_string(fd));
  fl = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
  if (::fcntl(fd, F_SETFL, fl) < 0) throw sys_error("fcntl(F_SETFL) fd " + std::to_string(fd));
}

void set_cloexec(int fd, bool on) {
  int fl = ::fcntl(fd, F_GETFD);
  if (fl < 0) throw sys_error("fcntl(F_GETFD) fd " + std::to_string(fd));
  fl = on ? (fl | FD_CLOEXEC) : (fl & ~FD_CLOEXEC);
  if (::fcntl(fd, F_SETFD, fl) < 0) throw sys_error("fcntl(F_SETFD) fd " + std::to_string(fd));
}

void write_all(int fd, const void* buf, size_t len) {
  auto* p = static_cast<const char*>(buf);
  while (len > 0) {
    ssize_t n = ::write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw sys_error("write fd " + std::to_string(fd));
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
}

bool read_exact(int fd, void* buf, size_t len) {
  auto* p = static_cast<char*>(buf);
  size_t got = 0;
  while (got < len) {
    ssize_t n = ::read(fd, p + got, len - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw sys_error("read fd " + std::to_string(fd));
    }
    if (n == 0) {
      if (got == 0) return false;
      throw Error("read fd " + std::to_string(fd) + ": short read (" + std::to_string(got) + " of " +
                  std::to_string(len) + " bytes)");
    }
    got += static_cast<size_t>(n);
  }
  return true;
}

int send_fds_nothrow(int sock, std::span<const int> fds, const void* data, size_t len) noexcept {
  if (fds.size() > kMaxPassedFds) return EINVAL;
  char dummy = 0;
  iovec iov{const_cast<void*>(data ? data : &dummy), data ? len : 1};
  alignas(cmsghdr) char cbuf[CMSG_SPACE(kMaxPassedFds * sizeof(int))];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!fds.empty()) {
    msg.msg_control = cbuf;
    msg.msg_controllen = CMSG_SPACE(fds.size_bytes());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(fds.size_bytes());
    memcpy(CMSG_DATA(c), fds.data(), fds.size_bytes());
  }
  while (::sendmsg(sock, &msg, MSG_NOSIGNAL) < 0)
    if (errno != EINTR) return errno;
  return 0;
}

ssize_t recv_fds_nothrow(int sock, void* data, size_t len, std::span<int> fds, size_t* nfds) noexcept {
  *nfds = 0;
  char dummy = 0;
  iovec iov{data ? data : &dummy, data ? len : 1};
  alignas(cmsghdr) char cbuf[CMSG_SPACE(kMaxPassedFds * sizeof(int))];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = cbuf;
  msg.msg_controllen = CMSG_SPACE(std::min(fds.size(), kMaxPassedFds) * sizeof(int));
  ssize_t n;
  do n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0) return -1;
  size_t got = 0;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k; i++) {
      int fd;
      memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      if (got < fds.size())
        fds[got++] = fd;
      else
        ::close(fd);
    }
  }
  if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
    for (size_t i = 0; i < got; i++) ::close(fds[i]);
    errno = EMSGSIZE;
    return -1;
  }
  *nfds = got;
  return n;
}

void send_fds(int sock, std::span<const int> fds, const void* data, size_t len) {
  if (int e = send_fds_nothrow(sock, fds, data, len)) throw sys_error("sendmsg(SCM_RIGHTS)", e);
}

void send_fd(int sock, int fd, const void* data, size_t len) { send_fds(sock, {&fd, 1}, data, len); }

Fd recv_fd(int sock, void* data, size_t len) {
  int fd = -1;
  size_t nfds = 0;
  ssize_t n = recv_fds_nothrow(sock, data, len, {&fd, 1}, &nfds);
  if (n < 0) throw sys_error("recvmsg(SCM_RIGHTS)");
  if (n == 0) throw Error("recvmsg(SCM_RIGHTS): peer closed");
  if (nfds != 1) throw Error("recvmsg: no file descriptor received");
  return Fd(fd);
}

}  // namespace shimlet
