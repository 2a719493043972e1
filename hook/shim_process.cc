// The shim's process: started detached (double fork, setsid, nothing of the
// runtime's inherited), waited for until its "ready PORT" line, and stopped
// at poststop only if the pid is still this container's shim.
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <charconv>
#include <filesystem>

#include "common/clock.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/file.h"
#include "common/log.h"
#include "common/pidfd.h"
#include "common/proc.h"
#include "hook/internal.h"
#include "proto/tls.h"
#include "spool/spool.h"

namespace shimlet::hook {

using nlohmann::json;

namespace {

uint64_t proc_start_time(pid_t pid) {
  auto ps = proc_stat(pid);
  if (!ps) throw Error("process " + std::to_string(pid) + " is gone");
  return ps->start_time;
}

// Waits until the pidfd's process has exited, at most timeout_ms.
bool wait_exit(int pidfd, int timeout_ms) {
  pollfd p{pidfd, POLLIN, 0};
  Deadline deadline(timeout_ms);
  for (;;) {
    int left = deadline.left_ms();
    if (left <= 0) return false;
    int r = ::poll(&p, 1, left);
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) return false;
  }
}

// SIGTERM, then SIGKILL after 1 s; bounded.
void terminate(int pidfd) {
  if (pidfd_signal(pidfd, SIGTERM) < 0) return;  // ESRCH: gone already
  if (wait_exit(pidfd, 1000)) return;
  pidfd_signal(pidfd, SIGKILL);
  wait_exit(pidfd, 1000);
}

// Stops the shim registered for a container if the pid is still that shim:
// same start time and the same --config on its command line.
void stop_shim(pid_t pid, uint64_t start_time, const std::string& shim_config) {
  if (pid <= 0) return;
  Fd pidfd = open_pidfd(pid);
  if (!pidfd) {
    if (errno == ESRCH) return;  // already gone (it exits when the container does)
    throw sys_error("pidfd_open shim pid " + std::to_string(pid));
  }
  std::string cmdline;
  uint64_t st = 0;
  try {
    cmdline = read_regular_file("/proc/" + std::to_string(pid) + "/cmdline", 64 * 1024);
    st = proc_start_time(pid);
  } catch (const std::exception&) {
    return;  // exited meanwhile
  }
  std::string want = std::string("--config") + '\0' + shim_config + '\0';
  if ((start_time && st != start_time) || cmdline.find(want) == std::string::npos) {
    log::warn("pid is not this container's shim any more; not signalling it", {{"shim_pid", pid}});
    return;
  }
  // The checks above read /proc/PID; if the pidfd's process is still alive
  // now, they were about that process (no pid reuse in between).
  if (pidfd_signal(pidfd.get(), 0) < 0) return;
  terminate(pidfd.get());
}

// Undo of a half-done start: kill the shim, remove the directory.
struct StartGuard {
  std::string dir;
  Fd shim_pidfd;
  bool committed = false;
  ~StartGuard() {
    if (committed) return;
    if (shim_pidfd) {
      pidfd_signal(shim_pidfd.get(), SIGKILL);
      wait_exit(shim_pidfd.get(), 1000);
    }
    g_shim_pidfd = -1;
    std::error_code ec;
    if (!dir.empty()) std::filesystem::remove_all(dir, ec);
  }
};

// Double fork + setsid: the shim is re-parented away from the runtime, has
// /dev/null on stdin, shim.log on stdout/stderr, the ready pipe on fd 3 and
// nothing else (runc waits for EOF on the hook's stdout/stderr pipes).
pid_t spawn_shim(const std::string& binary, const std::vector<std::string>& args, int log_fd, int ready_fd) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  char* envp[] = {const_cast<char*>("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), nullptr};
  Fd devnull(::open("/dev/null", O_RDWR | O_CLOEXEC));
  if (!devnull) throw sys_error("open /dev/null");
  Pipe pidpipe = make_pipe();
  const int src[4] = {devnull.get(), log_fd, log_fd, ready_fd};

  pid_t a = ::fork();
  if (a < 0) throw sys_error("fork");
  if (a == 0) {
    // Only async-signal-safe calls until execve.
    ::setsid();
    pid_t b = ::fork();
    if (b == 0) {
      int tmp[4];
      for (int i = 0; i < 4; i++)
        if ((tmp[i] = ::fcntl(src[i], F_DUPFD_CLOEXEC, 4)) < 0) _exit(126);
      for (int i = 0; i < 4; i++)
        if (::dup2(tmp[i], i) < 0) _exit(126);
      if (::close_range(4, ~0U, 0) < 0) _exit(126);
      for (int s = 1; s < NSIG; s++) ::signal(s, SIG_DFL);
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      if (::chdir("/") < 0) _exit(126);
      ::umask(077);
      ::execve(binary.c_str(), argv.data(), envp);
      static const char msg[] = "{\"level\":\"error\",\"component\":\"hook\",\"msg\":\"execve shim binary failed\"}\n";
      ssize_t r = ::write(2, msg, sizeof msg - 1);
      (void)r;
      _exit(127);
    }
    ssize_t r = ::write(pidpipe.write.get(), &b, sizeof b);
    (void)r;
    _exit(b < 0 ? 1 : 0);
  }
  pidpipe.write.reset();
  int status = 0;
  while (::waitpid(a, &status, 0) < 0 && errno == EINTR) {
  }
  pid_t b = -1;
  if (!read_exact(pidpipe.read.get(), &b, sizeof b) || b <= 0) throw Error("fork of the shim failed");
  return b;
}

// Reads "ready PORT[ CRI_PORT]\n" (bounded bytes and time).
struct Ready {
  unsigned port = 0, cri_port = 0;
};
Ready wait_ready(int fd, int timeout_ms, const std::string& log_path) {
  std::string line;
  Deadline deadline(timeout_ms);
  while (line.find('\n') == std::string::npos) {
    int left = deadline.left_ms();
    if (left <= 0) throw Error("shim not ready after " + std::to_string(timeout_ms) + " ms (see " + log_path + ")");
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, left);
    if (r < 0 && errno != EINTR) throw sys_error("poll ready pipe");
    if (r <= 0) continue;
    char buf[64];
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw sys_error("read ready pipe");
    if (n == 0) {
      // Exited before ready: its last log line says why.
      std::string tail;
      try {
        tail = read_regular_file(log_path, 1 << 20);
      } catch (const std::exception&) {
      }
      while (!tail.empty() && tail.back() == '\n') tail.pop_back();
      auto nl = tail.rfind('\n');
      if (nl != std::string::npos) tail = tail.substr(nl + 1);
      if (tail.size() > 512) tail.resize(512);
      throw Error("shim exited before it was ready: " + (tail.empty() ? "(no log output)" : tail));
    }
    line.append(buf, static_cast<size_t>(n));
    if (line.size() > 32) throw Error("shim wrote an overlong ready line");
  }
  line.resize(line.find('\n'));
  if (line.rfind("ready ", 0) != 0) throw Error("shim wrote an unexpected ready line: " + line);
  Ready r;
  const char* end = line.data() + line.size();
  auto res = std::from_chars(line.data() + 6, end, r.port);
  if (res.ec == std::errc() && res.ptr != end && *res.ptr == ' ') res = std::from_chars(res.ptr + 1, end, r.cri_port);
  if (res.ec != std::errc() || res.ptr != end || r.port == 0 || r.port > 65535 || r.cri_port > 65535)
    throw Error("shim wrote a bad port: " + line);
  return r;
}

std::string canonical_binary(const std::string& path, const char* what) {
  if (path.empty() || path[0] != '/') throw Error(std::string(what) + " must be an absolute path: " + path);
  char buf[PATH_MAX];
  if (!::realpath(path.c_str(), buf)) throw sys_error(std::string(what) + " " + path);
  if (::access(buf, X_OK) != 0) throw sys_error(std::string(what) + " " + buf + " is not executable");
  return buf;
}

// The bundle config's hostname, "" when unset or unreadable (names only:
// never a reason to fail the hook; a bundle the sessions cannot parse fails
// their execs with the parser's reason).
std::string bundle_hostname(const std::string& bundle) {
  try {
    return oci::load_config(bundle).hostname;
  } catch (const std::exception&) {
    return "";
  }
}

}  // namespace

Started start(const Config& c, const oci::State& st) {
  if (!valid_container_id(st.id)) throw Error("refusing container id (want [A-Za-z0-9_.-]{1,128}): " + st.id);
  if (st.pid <= 0) throw Error("OCI state has no pid for container " + st.id);
  ensure_state_dir(c.state_dir);  // first: hook.log records the failures below
  const std::string shim_bin = canonical_binary(c.shim_binary, "shim_binary");
  Config cfg = c;
  cfg.session_binary = canonical_binary(c.session_binary, "session_binary");

  const std::string dir = c.state_dir + "/" + st.id;
  if (::access(dir.c_str(), F_OK) == 0) {
    log::warn("stale state directory, cleaning it up first", {{"dir", dir}});
    cleanup(c, st.id);
  }
  if (::mkdir(dir.c_str(), 0700) < 0) throw sys_error("mkdir " + dir);
  StartGuard guard;
  guard.dir = dir;

  std::vector<std::pair<std::string, std::string>> trusted = {{"local", ensure_local_key(c.state_dir)}};
  for (const auto& k : c.trusted_keys) trusted.emplace_back(k.kid, load_public_key(k.path));

  proto::Identity id = proto::generate_identity("shimlet " + st.id);
  write_new_file(dir + "/tls.key", id.key_pem, 0600);
  write_new_file(dir + "/tls.crt", id.cert_pem, 0644);
  if (c.master && ::mkdir((dir + "/ends").c_str(), 0700) < 0) throw sys_error("mkdir " + dir + "/ends");
  Started s;
  s.pin = proto::pin_of_cert_pem(id.cert_pem);
  s.pid_start_time = proc_start_time(st.pid);
  s.names = names_from(st.id, st.annotations, bundle_hostname(st.bundle));
  const std::string shim_config = dir + "/shim.json";
  write_file_atomic(shim_config, shim_json(cfg, st, dir, trusted, s.names).dump(1) + "\n", 0600);

  const std::string log_path = dir + "/shim.log";
  Fd log_fd(::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!log_fd) throw sys_error("create " + log_path);
  Pipe ready = make_pipe();
  std::vector<std::string> args = {
      shim_bin, "--config", shim_config, "--pid", std::to_string(st.pid), "--session-binary", cfg.session_binary,
      "--id", st.id, "--listen", c.listen, "--local-socket", dir + "/shim.sock", "--max-sessions",
      std::to_string(c.max_sessions), "--max-local-sessions", std::to_string(c.max_local_sessions), "--warm-idle-s",
      std::to_string(c.warm_idle_s), "--ready-fd", "3",
      // The shim runs us again: `cleanup ID` when its container is gone
      // (docs/design.md "Stale state"), `renew ID` with a master.
      "--hook", canonical_binary("/proc/self/exe", "hook binary")};
  if (!c.config_path.empty()) args.insert(args.end(), {"--hook-config", c.config_path});
  if (!c.cri_listen.empty()) args.insert(args.end(), {"--cri-listen", c.cri_listen});
  if (c.master) {
    // Lease renewal (docs/design.md "Master registration"): the TLS-free shim
    // runs `shimlet-hook --config CFG renew ID` every renew_interval_s.
    if (c.config_path.empty()) throw Error("master registration needs the hook's --config path");
    args.insert(args.end(), {"--renew-every", std::to_string(c.master->renew_interval_s)});
  }
  s.shim_pid = spawn_shim(shim_bin, args, log_fd.get(), ready.write.get());
  ready.write.reset();
  guard.shim_pidfd = open_pidfd(s.shim_pid);
  if (guard.shim_pidfd) g_shim_pidfd = guard.shim_pidfd.get();
  Ready ready_ports = wait_ready(ready.read.get(), c.ready_timeout_ms, log_path);
  if (!guard.shim_pidfd) throw sys_error("pidfd_open shim pid " + std::to_string(s.shim_pid));
  s.shim_start_time = proc_start_time(s.shim_pid);

  std::string host = c.listen.substr(0, c.listen.rfind(':'));
  s.endpoint = host + ":" + std::to_string(ready_ports.port);
  if (!c.cri_listen.empty()) {
    if (!ready_ports.cri_port) throw Error("shim reported no CRI listener port");
    s.cri_endpoint = c.cri_listen.substr(0, c.cri_listen.rfind(':')) + ":" + std::to_string(ready_ports.cri_port);
  }
  s.local_socket = dir + "/shim.sock";
  s.created = now_rfc3339();
  write_file_atomic(dir + "/registration.json", registration_json(st, s).dump(1) + "\n", 0600);
  guard.committed = true;
  g_shim_pidfd = -1;
  return s;
}

bool cleanup(const Config& c, const std::string& id, bool own_shim_only) {
  if (!valid_container_id(id)) throw Error("refusing container id (want [A-Za-z0-9_.-]{1,128}): " + id);
  const std::string dir = c.state_dir + "/" + id;
  struct stat sb {};
  if (::lstat(dir.c_str(), &sb) < 0) {
    if (errno == ENOENT) return true;  // nothing started, or cleaned up already
    throw sys_error("lstat " + dir);
  }
  if (!S_ISDIR(sb.st_mode)) throw Error(dir + ": not a directory (refusing to touch it)");
  // One cleanup at a time (the runtime's poststop and the shim's own, after
  // its container's exit, can overlap): a lock on the directory itself. One
  // that waited finds it gone, and there is nothing left to do.
  Fd lock(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!lock) {
    if (errno == ENOENT) return true;
    throw sys_error("open " + dir);
  }
  while (::flock(lock.get(), LOCK_EX) < 0)
    if (errno != EINTR) throw sys_error("flock " + dir);
  struct stat locked {
  }, now{};
  if (::fstat(lock.get(), &locked) < 0) throw sys_error("fstat " + dir);
  if (::lstat(dir.c_str(), &now) < 0 || now.st_ino != locked.st_ino || now.st_dev != locked.st_dev) return true;
  std::string first_error;
  try {
    json reg = json::parse(read_regular_file(dir + "/registration.json", kMaxRegistrationBytes));
    pid_t pid = reg.value("shim_pid", 0);
    // The shim's own cleanup, started before a poststop removed its state and
    // a new container of the same id registered: that one is not ours.
    if (own_shim_only && pid != ::getpid()) {
      log::info("the state directory is a newer container's (another shim): left alone", {{"shim_pid", pid}});
      return false;
    }
    uint64_t start_time = reg.value("shim_start_time", uint64_t{0});
    // `cleanup ID` run by the shim itself (it exec'd us, same pid): gone already.
    if (pid != ::getpid()) stop_shim(pid, start_time, dir + "/shim.json");
  } catch (const std::exception& e) {
    // No registration: the start failed or was interrupted, its shim was killed then.
    if (::access((dir + "/registration.json").c_str(), F_OK) == 0) first_error = e.what();
  }
  if (c.master) {
    // Last chance for the sessions' end records (the shim, hence its
    // sessions, are gone now): short, the runtime waits for us.
    try {
      FlushResult f = flush_session_ends(c, id, spool::kMaxPending, kPoststopFlushMs);
      if (f.kept)
        log::warn("session end records not delivered to the master (lost with the state directory)",
                  {{"kept", f.kept}, {"posted", f.posted}, {"error", f.error}});
    } catch (const std::exception& e) {
      log::warn("session end records not delivered to the master", {{"error", e.what()}});
    }
  }
  // Recordings: the killed sessions' finished as incomplete, then sent while
  // the runtime can wait; the rest stays in the recording root, where any
  // later renewer on this node sends it (docs/recording.md).
  try {
    RecordingFlush f = flush_recordings(c, id, kPoststopRecordingsMs, false);
    if (f.kept)
      log::warn("recordings not delivered to the master yet (kept on the node for a later renewer)",
                {{"kept", f.kept}, {"sent", f.sent}, {"error", f.error}});
    // Only when empty: the root goes with the last container that recorded nothing left.
    ::rmdir((recording_root(c) + "/" + id).c_str());
    ::rmdir(recording_root(c).c_str());
  } catch (const std::exception& e) {
    log::warn("recordings not delivered to the master yet", {{"error", e.what()}});
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  if (ec) throw Error("remove " + dir + ": " + ec.message());
  if (!first_error.empty()) throw Error("registration of " + id + ": " + first_error);
  return true;
}

}  // namespace shimlet::hook
