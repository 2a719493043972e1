// The zygote (nsenter/nsenter.h): forked and placed in the session's cgroups
// before the command is known; given the request over its socket it
// completes the plan and forks the command as its parent's child.
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <span>
#include <utility>

#include "common/clock.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/pidfd.h"
#include "nsenter/internal.h"

namespace shimlet::nsenter {
namespace {

void put_u32(std::string& b, uint32_t v) { b.append(reinterpret_cast<const char*>(&v), sizeof v); }
void put_str(std::string& b, const std::string& v) {
  put_u32(b, static_cast<uint32_t>(v.size()));
  b += v;
}
void put_list(std::string& b, const std::vector<std::string>& l) {
  put_u32(b, static_cast<uint32_t>(l.size()));
  for (const auto& v : l) put_str(b, v);
}

}  // namespace

std::string encode(const Request& r, const Stdio& io) {
  std::string b;
  b += static_cast<char>(io.tty);
  b += static_cast<char>(r.landlock.has_value());
  b += static_cast<char>(r.landlock && r.landlock->scope_signal);
  b += static_cast<char>(r.landlock && r.landlock->scope_abstract_unix);
  b.append(reinterpret_cast<const char*>(&io.cols), sizeof io.cols);
  b.append(reinterpret_cast<const char*>(&io.rows), sizeof io.rows);
  put_list(b, r.argv);
  put_list(b, r.extra_env);
  put_str(b, r.selinux_exec_label);
  if (b.size() > kMaxRequestBytes)
    throw Error("nsenter: command and environment too large (" + std::to_string(b.size()) + " bytes, limit " +
                std::to_string(kMaxRequestBytes) + ")");
  return b;
}

namespace {

struct Reader {
  const char* p;
  const char* end;
  bool ok = true;
  bool take(void* out, size_t n) {
    if (!ok || static_cast<size_t>(end - p) < n) return ok = false;
    memcpy(out, p, n);
    p += n;
    return true;
  }
  std::string str() {
    uint32_t n = 0;
    if (!take(&n, sizeof n) || static_cast<size_t>(end - p) < n) {
      ok = false;
      return {};
    }
    std::string v(p, n);
    p += n;
    return v;
  }
  std::vector<std::string> list() {
    uint32_t n = 0;
    std::vector<std::string> l;
    if (!take(&n, sizeof n) || n > static_cast<size_t>(end - p) / sizeof(uint32_t)) {
      ok = false;
      return l;
    }
    for (uint32_t i = 0; i < n && ok; i++) l.push_back(str());
    return l;
  }
};

}  // namespace

bool decode(const char* data, size_t len, Request& r, Stdio& io) {
  Reader rd{data, data + len};
  unsigned char f[4];
  if (!rd.take(f, sizeof f) || !rd.take(&io.cols, sizeof io.cols) || !rd.take(&io.rows, sizeof io.rows)) return false;
  io.tty = f[0];
  if (f[1]) {
    landlock::Options o;
    o.scope_signal = f[2];
    o.scope_abstract_unix = f[3];
    r.landlock = o;
  }
  r.argv = rd.list();
  r.extra_env = rd.list();
  r.selinux_exec_label = rd.str();
  return rd.ok && rd.p == rd.end;
}

namespace {

void prepare_request_or_report(int sock, Plan& plan, const Container& c, const Request& r, const Stdio& io) {
  try {
    prepare_request(plan, c, r, io);
  } catch (const ExecError& e) {
    child_fail(sock, e.what(), ENOENT, e.exit_code == 126 ? kNotExecutable : kNotFound);
  } catch (const std::exception& e) {
    child_fail(sock, e.what(), EINVAL);
  }
}

// Closes every fd but stdio, the zygote's socket, the init's pidfd and the
// namespace fds: a zygote holds no connection (a gate's zygote was forked
// while it held unauthenticated ones, which must close when the gate does).
void close_all_but(int sock, const Container& c) {
  std::vector<int> keep = {0, 1, 2, sock};
  if (c.pidfd >= 0) keep.push_back(c.pidfd);
  for (const auto& [type, fd] : c.ns_fds) keep.push_back(fd);
  std::sort(keep.begin(), keep.end());
  unsigned from = 0;
  for (int k : keep) {
    if (k < 0) continue;
    if (static_cast<unsigned>(k) > from) ::syscall(SYS_close_range, from, static_cast<unsigned>(k) - 1, 0U);
    from = static_cast<unsigned>(k) + 1;
  }
  ::syscall(SYS_close_range, from, ~0U, 0U);
}

// The zygote: prepare the container's part of the command's plan from the
// container as it was at fork time, wait for the request and complete the
// plan, fork the command as our parent's child and exit. Errors go to the
// parent as reports, like the command's, in answer to the request.
[[noreturn]] void zygote_main(int sock, const Container& c, pid_t parent) {
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0 || ::getppid() != parent) _exit(1);
  close_all_but(sock, c);
  // It holds the session's host resources, like the command before execve.
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  std::optional<Plan> plan;  // never moves once made: see prepare_request
  std::string plan_error;
  try {
    plan.emplace(prepare_container(c));
  } catch (const std::exception& e) {
    plan_error = e.what();
  }
  // Not zero-filled: only the pages the request lands in are touched.
  auto buf = std::make_unique_for_overwrite<char[]>(kMaxRequestBytes);
  int fds[3] = {-1, -1, -1};
  size_t nfds = 0;
  ssize_t n = recv_fds_nothrow(sock, buf.get(), kMaxRequestBytes, fds, &nfds);
  if (n < 0 && errno == EMSGSIZE) child_fail(sock, "zygote: request or its fds truncated", EMSGSIZE);
  if (n <= 0) _exit(0);  // the parent dropped us unused
  Request r;
  Stdio io;
  if (!decode(buf.get(), static_cast<size_t>(n), r, io)) child_fail(sock, "zygote: malformed request", EINVAL);
  if (!io.tty) {
    if (nfds != 3) child_fail(sock, "zygote: stdio fds missing", EINVAL);
    io.in = fds[0];
    io.out = fds[1];
    io.err = fds[2];
  }
  buf.reset();
  if (!plan) child_fail(sock, plan_error.c_str(), EINVAL);
  prepare_request_or_report(sock, *plan, c, r, io);
  // Our direct child would be born in the container's pid namespace; we exit
  // right after, so our own pid_for_children needs no restoring.
  for (const auto& [type, fd] : c.ns_fds)
    if (type == "pid" && ::setns(fd, CLONE_NEWPID) < 0) child_fail(sock, "setns(container pid namespace)", errno);
  // A raw clone: glibc's fork() has no CLONE_PARENT. The child is single-
  // threaded like us and only runs child_main (syscalls, then execve).
  long pid = ::syscall(SYS_clone, CLONE_PARENT | SIGCHLD, nullptr, nullptr, nullptr, nullptr);
  if (pid < 0) child_fail(sock, "clone(CLONE_PARENT) the command", errno);
  if (pid == 0) child_main(sock, *plan);
  Report rep{};
  rep.type = kMsgForked;
  rep.code = static_cast<int32_t>(pid);
  (void)::send(sock, &rep, sizeof rep, MSG_NOSIGNAL);
  _exit(0);
}

}  // namespace

Zygote Zygote::start(const Container& c, const std::function<void(pid_t)>& place) {
  if (!place) throw Error("nsenter: Request.place is required");
  // /proc/init_pid is read by the zygote (HOME, setgroups): it must still be the container's init.
  if (c.pidfd >= 0 && pidfd_signal(c.pidfd, 0) < 0)
    throw sys_error("nsenter: container init " + std::to_string(c.init_pid) + " is gone");
  int sp[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) < 0) throw sys_error("socketpair");
  Fd parent_sock(sp[0]), child_sock(sp[1]);
  // The command dup2()s onto 0..2: keep its socket out of the way.
  if (child_sock.get() < 3) {
    Fd moved(::fcntl(child_sock.get(), F_DUPFD_CLOEXEC, 3));
    if (!moved) throw sys_error("fcntl(F_DUPFD_CLOEXEC)");
    child_sock = std::move(moved);
  }
  // One request message of up to kMaxRequestBytes (root may exceed wmem_max).
  int big = static_cast<int>(2 * kMaxRequestBytes);
  if (::setsockopt(parent_sock.get(), SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big) < 0)
    throw sys_error("setsockopt(SO_SNDBUFFORCE) for the zygote");
  pid_t self = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) throw sys_error("fork the nsenter zygote");
  if (pid == 0) {
    parent_sock.reset();
    zygote_main(child_sock.get(), c, self);
  }
  Zygote z;
  z.init_pid_ = c.init_pid;
  z.init_pidfd_ = c.pidfd;
  z.pid_ = pid;
  z.sock_ = std::move(parent_sock);
  place(pid);  // on a throw, ~Zygote kills it
  return z;
}

Zygote::Zygote(Zygote&& o) noexcept
    : init_pid_(o.init_pid_), init_pidfd_(o.init_pidfd_), pid_(std::exchange(o.pid_, -1)), sock_(std::move(o.sock_)) {}

Zygote& Zygote::operator=(Zygote&& o) noexcept {
  if (this != &o) {
    Zygote old(std::move(*this));
    init_pid_ = o.init_pid_;
    init_pidfd_ = o.init_pidfd_;
    pid_ = std::exchange(o.pid_, -1);
    sock_ = std::move(o.sock_);
  }
  return *this;
}

Zygote::~Zygote() { ChildGuard kill_it{pid_}; }

void Zygote::release() noexcept {
  pid_ = -1;
  sock_.reset();  // our copy; the owner's keeps the zygote waiting
}

Spawned Zygote::spawn(const Request& r, const Stdio& io, const std::function<void()>& before_go) {
  if (pid_ <= 0) throw Error("nsenter: zygote already used");
  validate(r);
  if (!io.tty && (io.in < 0 || io.out < 0 || io.err < 0)) throw Error("nsenter: stdio fds are required without a tty");
  if (init_pidfd_ >= 0 && pidfd_signal(init_pidfd_, 0) < 0)
    throw sys_error("nsenter: container init " + std::to_string(init_pid_) + " is gone");
  std::string req = encode(r, io);
  Fd sock = std::move(sock_);
  ChildGuard zygote{std::exchange(pid_, -1)};

  const int stdio[3] = {io.in, io.out, io.err};
  send_fds(sock.get(), io.tty ? std::span<const int>() : std::span<const int>(stdio), req.data(), req.size());

  // The zygote answers with the command's pid (or an error), then exits.
  pollfd pfd{sock.get(), POLLIN, 0};
  Deadline deadline(kChildTimeoutMs);
  int pr;
  do pr = ::poll(&pfd, 1, deadline.left_ms());
  while (pr < 0 && errno == EINTR && !deadline.passed());
  if (pr <= 0) throw Error("nsenter: zygote " + std::to_string(zygote.pid) + " did not answer in time");
  Report rep{};
  ssize_t n = ::recv(sock.get(), &rep, sizeof rep, 0);
  // With limits to write, reaped first: it must not count in the session's
  // pids.max. Otherwise reaped when this returns (ChildGuard): it exits right
  // after its report, so by then it is gone, and the wait for its teardown
  // stays off the request's path.
  if (before_go) {
    ChildGuard reap{std::exchange(zygote.pid, 0)};
  }
  if (n == 0) throw Error("nsenter: zygote died before forking the command");
  if (n != static_cast<ssize_t>(sizeof rep)) throw sys_error("recv from the nsenter zygote");
  if (rep.type == kMsgError) {
    rep.step[sizeof rep.step - 1] = '\0';
    if (rep.code == kNotFound || rep.code == kNotExecutable) throw ExecError(rep.step, rep.code);
    throw Error(std::string("nsenter: ") + rep.step + ": " + strerror(rep.err));
  }
  if (rep.type != kMsgForked || rep.code <= 0) throw Error("nsenter: unknown report from the zygote");
  pid_t pid = rep.code;
  ChildGuard guard{pid};
  if (before_go) before_go();
  return await_exec(sock.get(), pid, r, io.tty, guard);
}

}  // namespace shimlet::nsenter
