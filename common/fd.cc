#include "common/fd.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <vector>

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

void send_fds(int sock, std::span<const int> fds, const void* data, size_t len) {
  char dummy = 0;
  iovec iov{const_cast<void*>(data ? data : &dummy), data ? len : 1};
  std::vector<char> cbuf(fds.empty() ? 0 : CMSG_SPACE(fds.size_bytes()));
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (!fds.empty()) {
    msg.msg_control = cbuf.data();
    msg.msg_controllen = cbuf.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(fds.size_bytes());
    memcpy(CMSG_DATA(c), fds.data(), fds.size_bytes());
  }
  for (;;) {
    if (::sendmsg(sock, &msg, MSG_NOSIGNAL) >= 0) return;
    if (errno != EINTR) throw sys_error("sendmsg(SCM_RIGHTS)");
  }
}

void send_fd(int sock, int fd, const void* data, size_t len) { send_fds(sock, {&fd, 1}, data, len); }

Fd recv_fd(int sock, void* data, size_t len) {
  char dummy = 0;
  iovec iov{data ? data : &dummy, data ? len : 1};
  alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = cbuf;
  msg.msg_controllen = sizeof cbuf;
  ssize_t n;
  do {
    n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) throw sys_error("recvmsg(SCM_RIGHTS)");
  if (n == 0) throw Error("recvmsg(SCM_RIGHTS): peer closed");
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  if (!c || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(sizeof(int)))
    throw Error("recvmsg: no file descriptor received");
  int fd;
  memcpy(&fd, CMSG_DATA(c), sizeof(int));
  return Fd(fd);
}

}  // namespace shimlet
