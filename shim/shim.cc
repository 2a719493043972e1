#include "shim/shim.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <concepts>
#include <cstdint>
#include <optional>

#include "shim/gate_proto.h"
#include "shim/session_proto.h"
#include "ticket/replay.h"

namespace shimlet::shim {
namespace {

// glibc 2.36's <sys/pidfd.h> lacks extern "C": call the syscalls directly.
// common/pidfd.h's, copied: the static shim links no common/ code (shim.h says why).
int sys_pidfd_open(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }
int sys_pidfd_signal(int pidfd, int sig) {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
}

// ---- logging: JSON lines on stderr (shim.log). Hand-written instead of
// common/log (nlohmann) to keep the static shim small; values are escaped.

std::string g_id;

const char* errdesc(int e) {
  const char* d = strerrordesc_np(e);
  return d ? d : "unknown error";
}

// RFC 3339 UTC time without gmtime/strftime (they pull the tz database code
// into the static binary): days-to-civil per H. Hinnant's public algorithm.
void append_time(std::string& out) {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  long long days = ts.tv_sec / 86400, secs = ts.tv_sec % 86400;
  long long z = days + 719468, era = (z >= 0 ? z : z - 146096) / 146097;
  long long doe = z - era * 146097, yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  long long doy = doe - (365 * yoe + yoe / 4 - yoe / 100), mp = (5 * doy + 2) / 153;
  long long d = doy - (153 * mp + 2) / 5 + 1, m = mp < 10 ? mp + 3 : mp - 9, y = yoe + era * 400 + (m <= 2);
  auto put = [&](long long v, int width) {
    char b[12];
    for (int i = width - 1; i >= 0; i--, v /= 10) b[i] = static_cast<char>('0' + v % 10);
    out.append(b, static_cast<size_t>(width));
  };
  put(y, 4), out += '-', put(m, 2), out += '-', put(d, 2), out += 'T';
  put(secs / 3600, 2), out += ':', put(secs / 60 % 60, 2), out += ':', put(secs % 60, 2), out += '.';
  put(ts.tv_nsec / 1000, 6), out += 'Z';
}

void json_escape(std::string& out, std::string_view s) {
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          static const char hex[] = "0123456789abcdef";
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
}

// One field of a log line: a string (escaped), a number or a boolean.
struct F {
  const char* key;
  std::string str;
  bool is_num = false;  // written raw
  F(const char* k, std::string_view v) : key(k), str(v) {}
  F(const char* k, const char* v) : key(k), str(v) {}
  F(const char* k, long long v) : key(k), str(std::to_string(v)), is_num(true) {}
  F(const char* k, std::same_as<bool> auto v) : key(k), str(v ? "true" : "false"), is_num(true) {}
};

void log(const char* level, std::string_view msg, std::initializer_list<F> fields = {}) {
  std::string line = "{\"ts\":\"";
  append_time(line);
  line += "\",\"level\":\"";
  line += level;
  line += "\",\"component\":\"shim\",\"pid\":";
  line += std::to_string(getpid());
  if (!g_id.empty()) {
    line += ",\"id\":\"";
    json_escape(line, g_id);
    line += '"';
  }
  line += ",\"msg\":\"";
  json_escape(line, msg);
  line += '"';
  for (const F& f : fields) {
    line += ",\"";
    line += f.key;
    line += "\":";
    if (f.is_num) {
      line += f.str;
    } else {
      line += '"';
      json_escape(line, f.str);
      line += '"';
    }
  }
  line += "}\n";
  // One write per line: sessions share the log.
  ssize_t r = ::write(2, line.data(), line.size());
  (void)r;
}

std::optional<long long> to_num(std::string_view s, long long lo, long long hi) {
  long long v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || v < lo || v > hi) return std::nullopt;
  return v;
}

// The namespaces a session may need, in the order they are handed over.
constexpr std::array<const char*, 8> kNsTypes = {"user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time"};

// Fixed fds of the session and gate contracts (design.md): fd 3 is the
// local connection for a session, the TCP listening socket for the gate
// (the CRI listener, if any, follows the namespace fds: --cri-listener FD).
constexpr int kConnFd = 3, kCtlFd = 4, kPidFd = 5, kFirstNsFd = 6;

// Warm sessions (docs/design.md "Warm sessions"): one kept ready; two once a
// connection found none ready while connections come less than kWarmBurstMs
// apart (back to back, or concurrent clients), one again after a pause.
// Bounded: each is a ~1 MB process with a placed zygote.
constexpr size_t kWarmPool = 2;
constexpr int64_t kWarmBurstMs = 1000;
// A warm session's one message on its control socket before its connection:
// it is placed and waits (its replay requests come only after a connection).
constexpr char kWarmReady = 'W';
// A gate that could not be started, or ended, is started again at a
// connection no sooner than this after the last start (the pending ones wait
// in the listen backlog meanwhile).
constexpr int64_t kGateRetryMs = 1000;
// STATE/<id>/stats.json is rewritten at most this often.
constexpr int64_t kStatsEveryMs = 1000;
// A renewal still running after this long is killed at the next tick (its
// own alarm should have ended it long before: docs/design.md "Master").
constexpr int64_t kRenewerMaxMs = 120000;
// Quiet this long after an event, the shim drops its code pages again (drop_code_pages).
constexpr int64_t kTrimAfterQuietMs = 1000;
// When the gate lingers without a zygote (warm_idle_s 0).
constexpr unsigned kColdGateIdleS = 10;

// Replay cache datagram: SHA-256(jti) + int64 LE expiry.
constexpr size_t kReplayRequest = 32 + 8;

// A session of the local socket: our child, exec'd per connection (or warm).
struct LocalSession {
  pid_t pid = -1;
  Fd ctl;  // our end of the SOCK_SEQPACKET; closed (-1) once the session hung up
  // Started ahead of a connection (docs/design.md "Warm sessions"): it waits
  // on ctl for the next accepted socket. False once it has been given one.
  bool warm = false;
  bool ready = false;                         // it sent kWarmReady: placed, waiting for its connection
  int64_t started_ms = 0;                     // CLOCK_MONOTONIC; the oldest starting one is the nearest to ready
  bool serving = false;                       // it has a connection: counted in local_started_, its end in local_ends_
  std::optional<session_end::Report> report;  // its end report (shim/session_proto.h), once sent
};

// An authenticated TCP session: a gate process that admitted a connection
// (docs/design.md "Pre-authentication gate"). Known by a pidfd: it may be
// the child of an earlier session rather than ours.
struct TcpSession {
  pid_t pid = -1;
  Fd pidfd;
  Fd ctl;  // our end of its own control socket (given with 'A'): its end report only
};

// Sessions ended, by result, and their bytes: one door's (stats.json "ended", "bytes").
struct DoorEnds {
  uint64_t by_result[session_end::kNumResults] = {};
  uint64_t bytes_in = 0, bytes_out = 0;
};

// The end report among the datagrams still queued on a session's control
// socket (it exited right after sending it; anything else there is moot).
void take_report(const Fd& ctl, std::optional<session_end::Report>& report) {
  if (!ctl) return;
  unsigned char buf[64];
  for (;;) {
    ssize_t n = ::recv(ctl.get(), buf, sizeof buf, MSG_DONTWAIT | MSG_TRUNC);
    if (n <= 0) return;
    if (static_cast<size_t>(n) == sizeof(session_end::Report) && buf[0] == session_end::kTag) {
      report.emplace();
      memcpy(&*report, buf, sizeof *report);
    }
  }
}

// The shim's read-only file pages (its executable's PT_LOAD segments without
// PF_W: headers, code, constants; never written, so the file's bytes) are
// dropped from its page tables once it is ready and after each second of
// quiet: start-up's code, and the kernel's fault-around neighbours of every
// page that ran, would otherwise stay counted as the shim's (its Pss) for
// its whole life. They stay in the page cache; what runs next faults back in
// (minor faults: microseconds, once per burst).
void drop_code_pages() {
  ::dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void*) {
        auto ours = [&] {  // the executable, not the vDSO
          const uintptr_t here = reinterpret_cast<uintptr_t>(&drop_code_pages);
          for (int i = 0; i < info->dlpi_phnum; i++) {
            const ElfW(Phdr)& ph = info->dlpi_phdr[i];
            uintptr_t at = info->dlpi_addr + ph.p_vaddr;
            if (ph.p_type == PT_LOAD && here >= at && here < at + ph.p_memsz) return true;
          }
          return false;
        };
        if (!ours()) return 0;
        const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
        for (int i = 0; i < info->dlpi_phnum; i++) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          if (ph.p_type != PT_LOAD || (ph.p_flags & PF_W)) continue;
          uintptr_t begin = (info->dlpi_addr + ph.p_vaddr) & ~(page - 1);
          uintptr_t end = (info->dlpi_addr + ph.p_vaddr + ph.p_memsz + page - 1) & ~(page - 1);
          ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);  // a hint: nothing to handle
        }
        return 1;
      },
      nullptr);
}

// common/clock.h's monotonic_ms, copied: the static shim links no common/ code (shim.h).
int64_t mono_ms() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

uint64_t* counters_of(gate::GateCounters& c) { return reinterpret_cast<uint64_t*>(&c); }

// The shim's state; the main loop is a hand-written poll() over a few kinds
// of fds (signalfd+pidfd, the listeners, the gate's and the local sessions'
// control sockets, the TCP sessions' pidfds): an event library would cost
// more memory than the whole loop.
class Shim {
 public:
  Shim(const Options& opt) : opt_(opt) {}
  // Runs until the container exits or SIGTERM; returns the exit code. After
  // the container's exit with a hook to clean up, *cleanup is set.
  int run(bool* cleanup);
  // Replaces the shim with `shimlet-hook [--config CFG] cleanup ID`.
  [[noreturn]] void exec_cleanup();

 private:
  void setup();
  void accept_local();
  pid_t spawn(int fd3, int fd4, char* const* argv, bool warm, int extra = -1);
  void spawn_session(Fd conn, bool warm);
  void spawn_gate();
  bool hand_to_warm(const Fd& conn);
  char consume(const unsigned char* req, size_t n, pid_t who);
  void handle_replay(LocalSession& s);
  void handle_gate();
  void gate_gone();
  void reap();
  void spawn_renewer();
  void start_warm();
  void write_stats(bool force);
  void session_ended(DoorEnds& door, const std::optional<session_end::Report>& report);
  std::vector<TcpSession>::iterator tcp_session_ended(std::vector<TcpSession>::iterator it);
  int shutdown(const char* why);

  const Options& opt_;
  Fd sigfd_, devnull_, listen_, local_, cri_;
  Held held_;
  std::vector<LocalSession> local_sessions_;
  std::vector<TcpSession> tcp_sessions_;
  // The gate lineage (shim/gate_proto.h): its control socket while it
  // lives; the pidfd of the process that is the gate now (none between an
  // 'A' and the new gate's 'G').
  Fd gate_ctl_, gate_pidfd_;
  pid_t gate_pid_ = -1;
  int64_t gate_started_ = 0;  // when the current lineage's first gate started (CLOCK_MONOTONIC ms)
  int64_t gate_retry_ = 0;    // no gate start before this
  // Pre-authentication counters: the ended lineages' sum, the current one's last report.
  gate::GateCounters gate_base_, gate_now_;
  uint64_t tcp_started_ = 0, local_started_ = 0, local_refused_ = 0;
  DoorEnds tcp_ends_, local_ends_;
  std::string stats_path_;
  bool stats_dirty_ = true;
  int64_t stats_due_ = 0;
  int64_t trim_due_ = 0;  // CLOCK_MONOTONIC ms: drop_code_pages() then, unless an event came first (0: none due)
  ticket::ReplayCache cache_;
  bool accept_paused_ = false;  // after EMFILE/ENOMEM until a session ends
  // Prepared once: argv/envp of every session and gate (the child only execs).
  std::vector<std::string> argv_store_, gate_store_;
  std::vector<char*> argv_, warm_argv_, gate_argv_;
  std::vector<int> ns_src_;
  std::vector<std::string> renew_store_;
  std::vector<char*> renew_argv_;
  pid_t renewer_ = -1;              // the running renewal, if any
  int64_t renewer_started_ms_ = 0;  // CLOCK_MONOTONIC ms
  bool renewer_overdue_logged_ = false;
  int64_t next_renew_ = 0;  // CLOCK_MONOTONIC ms
  // The last local accept (CLOCK_MONOTONIC ms; 0: none yet) and the number of
  // warm sessions to keep (1 or kWarmPool, see kWarmBurstMs).
  int64_t last_local_accept_ = 0;
  size_t warm_want_ = 1;
};

void Shim::setup() {
  // Signals arrive through a signalfd; SIGPIPE is ignored (writes to dead
  // sessions' sockets must not kill the shim) and reset in each child.
  sigset_t set;
  sigemptyset(&set);
  for (int s : {SIGCHLD, SIGTERM, SIGINT, SIGHUP}) sigaddset(&set, s);
  if (sigprocmask(SIG_BLOCK, &set, nullptr) < 0) throw sys_error("sigprocmask");
  sigfd_ = Fd(signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!sigfd_) throw sys_error("signalfd");
  signal(SIGPIPE, SIG_IGN);
  // Sessions born of the gate are the children of earlier sessions: when
  // one of those ends first, its orphans come to us (reaped, not leaked to
  // the host's init).
  if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0) throw sys_error("prctl(PR_SET_CHILD_SUBREAPER)");

  devnull_ = Fd(::open("/dev/null", O_RDWR | O_CLOEXEC));
  if (!devnull_) throw sys_error("open /dev/null");

  held_ = open_container(opt_.pid);
  listen_ = listen_on(opt_.listen);
  if (!opt_.local_socket.empty()) local_ = listen_local(opt_.local_socket);
  if (!opt_.cri_listen.empty()) cri_ = listen_on(opt_.cri_listen);
  protect_binary(opt_.session_binary);
  size_t slash = opt_.config.rfind('/');
  stats_path_ = (slash == std::string::npos ? std::string(".") : opt_.config.substr(0, slash)) + "/stats.json";

  std::string ns_arg;
  for (size_t i = 0; i < held_.ns.size(); i++) {
    if (i) ns_arg += ',';
    ns_arg += held_.ns[i].first + "=" + std::to_string(kFirstNsFd + static_cast<int>(i));
    ns_src_.push_back(held_.ns[i].second.get());
  }
  // A warm session's argv is a cold one's plus "--warm IDLE_S".
  argv_store_ = {
      opt_.session_binary, "--config", opt_.config, "--ns", ns_arg, "--warm", std::to_string(opt_.warm_idle_s)};
  for (auto& a : argv_store_) warm_argv_.push_back(a.data());
  argv_.assign(warm_argv_.begin(), warm_argv_.end() - 2);
  argv_.push_back(nullptr);
  warm_argv_.push_back(nullptr);
  // The gate lingers warm_idle_s unused, keeping a zygote; without warm
  // sessions it keeps none and lingers kColdGateIdleS.
  gate_store_ = {opt_.session_binary,
                 "--config",
                 opt_.config,
                 "--ns",
                 ns_arg,
                 "--gate",
                 std::to_string(opt_.warm_idle_s ? opt_.warm_idle_s : kColdGateIdleS)};
  if (!opt_.warm_idle_s) gate_store_.push_back("--no-zygote");
  // The CRI listener goes to the gate after the namespace fds (spawn's extra).
  if (cri_) gate_store_.insert(gate_store_.end(), {"--cri-listener", std::to_string(kFirstNsFd + ns_src_.size())});
  for (auto& a : gate_store_) gate_argv_.push_back(a.data());
  gate_argv_.push_back(nullptr);
  if (opt_.renew_every_s) {
    renew_store_ = {opt_.hook_exec};
    if (!opt_.hook_config.empty()) renew_store_.insert(renew_store_.end(), {"--config", opt_.hook_config});
    renew_store_.insert(renew_store_.end(), {"renew", opt_.id});
    for (auto& a : renew_store_) renew_argv_.push_back(a.data());
    renew_argv_.push_back(nullptr);
    next_renew_ = mono_ms() + opt_.renew_every_s * 1000LL;  // the hook registered us just now
  }
}

int Shim::run(bool* cleanup) {
  setup();
  unsigned short port = bound_port(listen_.get());
  std::string names;
  for (auto& [t, fd] : held_.ns) names += (names.empty() ? "" : ",") + t;
  log("info", "shim ready",
      {F("port", static_cast<long long>(port)), F("container_pid", static_cast<long long>(opt_.pid)),
       F("namespaces", names), F("session_binary", opt_.session_binary), F("local_socket", opt_.local_socket)});
  if (opt_.ready_fd >= 0) {
    std::string line = "ready " + std::to_string(port);
    if (cri_) line += " " + std::to_string(bound_port(cri_.get()));
    line += "\n";
    // The hook may already have given up (timeout): that is not our error.
    ssize_t r = ::write(opt_.ready_fd, line.data(), line.size());
    (void)r;
    ::close(opt_.ready_fd);
  }
  drop_code_pages();
  trim_due_ = mono_ms() + kTrimAfterQuietMs;  // and again once what follows the start is done

  // What each pollfd is, by index; `pid` ties TCP sessions' pidfds to their
  // entry (an fd number can be reused within one turn).
  enum class Kind { Signals, Container, Listen, Local, GateCtl, LocalCtl, TcpPidfd };
  struct Slot {
    Kind kind;
    pid_t pid;
  };
  std::vector<pollfd> pfds;
  std::vector<Slot> slots;
  for (;;) {
    pfds.clear();
    slots.clear();
    auto watch = [&](int fd, Kind k, pid_t pid = 0) {
      pfds.push_back({fd, POLLIN, 0});
      slots.push_back({k, pid});
    };
    int64_t now = mono_ms();
    watch(sigfd_.get(), Kind::Signals);
    watch(held_.pidfd.get(), Kind::Container);
    // Unauthenticated TCP connections are the gate's; the shim accepts
    // nothing on the port (nor on the CRI listener), it only notices the
    // first one to start a gate.
    if (!gate_ctl_ && now >= gate_retry_) {
      watch(listen_.get(), Kind::Listen);
      if (cri_) watch(cri_.get(), Kind::Listen);
    }
    if (local_ && !accept_paused_) watch(local_.get(), Kind::Local);
    if (gate_ctl_) watch(gate_ctl_.get(), Kind::GateCtl);
    for (auto& s : local_sessions_)
      if (s.ctl) watch(s.ctl.get(), Kind::LocalCtl, s.pid);
    for (auto& s : tcp_sessions_) watch(s.pidfd.get(), Kind::TcpPidfd, s.pid);
    int64_t next = -1;
    auto soon = [&](int64_t t) {
      if (t > 0) next = next < 0 ? t : std::min(next, t);
    };
    if (opt_.renew_every_s) soon(next_renew_);
    if (!gate_ctl_ && gate_retry_ > now) soon(gate_retry_);
    if (stats_dirty_) soon(std::max(stats_due_, now));
    if (trim_due_) soon(trim_due_);
    int timeout = next < 0 ? -1 : static_cast<int>(std::max<int64_t>(0, next - now));
    int n = ::poll(pfds.data(), pfds.size(), timeout);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw sys_error("poll");
    }
    bool worked = n > 0;
    if (opt_.renew_every_s && mono_ms() >= next_renew_) {
      next_renew_ = mono_ms() + opt_.renew_every_s * 1000LL;
      spawn_renewer();
      worked = true;
    }
    for (size_t i = 0; i < pfds.size(); i++) {
      if (!pfds[i].revents) continue;
      switch (slots[i].kind) {
        case Kind::Signals: {
          signalfd_siginfo si;
          while (::read(sigfd_.get(), &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
            if (si.ssi_signo == SIGCHLD) continue;  // reaped below
            if (si.ssi_signo == SIGHUP) continue;   // no terminal, nothing to reload
            return shutdown(si.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
          }
          reap();
          break;
        }
        case Kind::Container:
          // Nothing is left to serve. Without a poststop (a start that
          // failed after createRuntime, a killed runtime) nobody else would
          // clean up: the hook's cleanup runs in our place (docs/design.md
          // "Stale state").
          *cleanup = !opt_.hook_exec.empty();
          return shutdown("container init exited");
        case Kind::Listen:
          if (!gate_ctl_) spawn_gate();  // both listeners may be ready in one turn
          break;
        case Kind::Local:
          accept_local();
          break;
        case Kind::GateCtl:
          if (gate_ctl_) handle_gate();
          break;
        case Kind::LocalCtl:
          for (auto& s : local_sessions_)
            if (s.pid == slots[i].pid && s.ctl.get() == pfds[i].fd) handle_replay(s);
          break;
        case Kind::TcpPidfd:
          for (auto it = tcp_sessions_.begin(); it != tcp_sessions_.end(); ++it) {
            if (it->pid != slots[i].pid || it->pidfd.get() != pfds[i].fd) continue;
            // Not necessarily our child (then reap() logs its status).
            log("info", "session ended", {F("session_pid", static_cast<long long>(it->pid)), F("via", "gate")});
            tcp_session_ended(it);
            break;
          }
          break;
      }
    }
    write_stats(false);
    if (worked) {
      trim_due_ = mono_ms() + kTrimAfterQuietMs;
    } else if (trim_due_ && mono_ms() >= trim_due_) {
      drop_code_pages();
      trim_due_ = 0;
    }
  }
}

// The local socket's connections: root on the node (docs/design.md "Local
// socket"), one session process each (a warm one when ready), own limit.
void Shim::accept_local() {
  for (int i = 0; i < 16; i++) {
    int c = ::accept4(local_.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) {
      if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) return;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // Level-triggered poll would spin: pause until a session ends.
        log("error", "accept failed, pausing until a session ends", {F("error", errdesc(errno))});
        accept_paused_ = true;
        return;
      }
      log("error", "accept failed", {F("error", errdesc(errno))});
      return;
    }
    Fd conn(c);
    size_t live = 0;
    for (auto& s : local_sessions_) live += s.pid > 0 && !s.warm;
    if (live >= opt_.max_local_sessions) {
      local_refused_++;
      stats_dirty_ = true;
      log("warn", "too many local sessions, connection closed",
          {F("max_local_sessions", static_cast<long long>(opt_.max_local_sessions))});
      continue;  // conn closes here
    }
    int64_t now = mono_ms();
    if (!last_local_accept_ || now - last_local_accept_ >= kWarmBurstMs)
      warm_want_ = 1;
    else if (std::none_of(local_sessions_.begin(), local_sessions_.end(),
                          [](const LocalSession& s) { return s.warm && s.ready; }))
      warm_want_ = kWarmPool;
    last_local_accept_ = now;
    try {
      if (!(opt_.warm_idle_s && hand_to_warm(conn))) spawn_session(std::move(conn), false);
      local_started_++;
      stats_dirty_ = true;
    } catch (const std::exception& e) {
      log("error", "cannot start session", {F("error", e.what())});
    }
    // The next connection finds one ready: the pool is refilled at once (at
    // nice 19, so warming yields the CPUs to the request just handed over).
    // Only after a first connection, so a shim that is never used stays one
    // small process; a warm session exits by itself after warm_idle_s
    // without a connection.
    if (opt_.warm_idle_s) start_warm();
  }
}

void Shim::start_warm() {
  size_t live = 0, warm = 0;
  for (auto& s : local_sessions_) {
    live += s.pid > 0;
    warm += s.warm;
  }
  for (; warm < warm_want_ && live < opt_.max_local_sessions; warm++, live++) {
    try {
      spawn_session(Fd(), true);
    } catch (const std::exception& e) {
      log("warn", "cannot start a warm session", {F("error", e.what())});
      return;
    }
  }
}

// One datagram with room for one fd (SCM_RIGHTS). common/fd.h has
// send_fd/recv_fd, but shimlet_common links OpenSSL and nlohmann, which the
// static shim must not.
struct FdMsg {
  iovec iov;
  alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  FdMsg(void* data, size_t len) : iov{data, len} {
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf;
    msg.msg_controllen = sizeof cbuf;
  }
  void put(int fd) {
    cmsghdr* cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof fd);
  }
  Fd take() const {  // the fd received, if any
    for (cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(const_cast<msghdr*>(&msg), cm))
      if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS && cm->cmsg_len == CMSG_LEN(sizeof(int))) {
        int fd;
        memcpy(&fd, CMSG_DATA(cm), sizeof fd);
        return Fd(fd);
      }
    return Fd();
  }
};

// Passes conn to a warm session, if there is one: true when it took it. A
// ready one first; else the oldest still starting (the nearest to ready), at
// normal priority from now on: it serves a request. Either beats a cold
// session, which would do the same start-up after the accept.
bool Shim::hand_to_warm(const Fd& conn) {
  for (;;) {
    LocalSession* pick = nullptr;
    for (auto& s : local_sessions_) {
      if (!s.warm) continue;
      if (!pick || (s.ready && !pick->ready) || (s.ready == pick->ready && s.started_ms < pick->started_ms)) pick = &s;
    }
    if (!pick) return false;
    LocalSession& s = *pick;
    s.warm = false;  // given this connection, or broken: never offered again
    if (!s.ready) setpriority(PRIO_PROCESS, static_cast<id_t>(s.pid), 0);
    char tag = 'C';
    FdMsg m(&tag, 1);
    m.put(conn.get());
    if (s.ctl && ::sendmsg(s.ctl.get(), &m.msg, MSG_DONTWAIT | MSG_NOSIGNAL) == 1) {
      s.serving = true;
      log("info", "session started",
          {F("session_pid", static_cast<long long>(s.pid)), F("warm", true), F("ready", s.ready)});
      return true;
    }
    log("warn", "warm session unreachable",
        {F("session_pid", static_cast<long long>(s.pid)), F("error", errdesc(errno))});
    ::kill(s.pid, SIGKILL);  // reaped in reap()
  }
}

// fork + exec of the session binary with the contract's fds: fd3 and the
// control socket (fd 4) given, 0-2, 5 and the namespace fds ours; extra
// (>= 0) right after the namespace fds. Returns the pid.
pid_t Shim::spawn(int fd3, int fd4, char* const* argv, bool warm, int extra) {
  // src[i] becomes fd i in the child (design.md's fd contracts).
  std::vector<int> src(kFirstNsFd);
  src[0] = src[1] = devnull_.get();
  src[2] = 2;
  src[kConnFd] = fd3;
  src[kCtlFd] = fd4;
  src[kPidFd] = held_.pidfd.get();
  src.insert(src.end(), ns_src_.begin(), ns_src_.end());
  if (extra >= 0) src.push_back(extra);
  const int nfds = static_cast<int>(src.size());
  char* envp[] = {const_cast<char*>("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), nullptr};
  pid_t shim_pid = getpid();

  pid_t pid = ::fork();
  if (pid < 0) throw sys_error("fork");
  if (pid == 0) {
    // Child: only async-signal-safe calls from here to execve.
    // Die with the shim (the sessions' replay cache is gone then anyway).
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != shim_pid) _exit(1);
    // Move every source above the target range first so no dup2 clobbers a
    // source that is still needed, then put each at its contract number
    // (dup2 clears CLOEXEC on the target) and close everything else.
    int tmp[64];
    if (nfds > 64) _exit(1);
    for (int i = 0; i < nfds; i++) {
      tmp[i] = fcntl(src[i], F_DUPFD_CLOEXEC, nfds);
      if (tmp[i] < 0) _exit(1);
    }
    for (int i = 0; i < nfds; i++)
      if (dup2(tmp[i], i) < 0) _exit(1);
    if (close_range(nfds, ~0U, 0) < 0) _exit(1);
    sigset_t none;
    sigemptyset(&none);
    signal(SIGPIPE, SIG_DFL);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    if (chdir("/") < 0) _exit(1);
    execve(argv[0], argv, envp);
    static const char msg[] = "{\"level\":\"error\",\"component\":\"shim\",\"msg\":\"execve session binary failed\"}\n";
    ssize_t r = ::write(2, msg, sizeof msg - 1);
    (void)r;
    _exit(127);
  }
  // Warming runs at the lowest priority (the session raises it once placed,
  // hand_to_warm when it gives it a connection before). Set here, not in the
  // child: a later raise by hand_to_warm can never be undone by the child.
  if (warm && setpriority(PRIO_PROCESS, static_cast<id_t>(pid), 19) < 0) {
    Error e = sys_error("setpriority(warm session)");
    ::kill(pid, SIGKILL);  // reaped in reap()
    throw e;
  }
  return pid;
}

void Shim::spawn_session(Fd conn, bool warm) {
  int sp[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) < 0) throw sys_error("socketpair(SOCK_SEQPACKET)");
  Fd ours(sp[0]), theirs(sp[1]);
  // A warm session gets its connection later.
  pid_t pid = spawn(warm ? devnull_.get() : conn.get(), theirs.get(), warm ? warm_argv_.data() : argv_.data(), warm);
  local_sessions_.push_back(LocalSession{pid, std::move(ours), warm, false, mono_ms(), !warm, std::nullopt});
  if (warm)
    log("info", "warm session started", {F("session_pid", static_cast<long long>(pid))});
  else
    log("info", "session started", {F("session_pid", static_cast<long long>(pid))});
}

// The first TCP connection since no gate runs (on the port or the CRI
// listener): start one. It takes the listening sockets and accepts that
// connection and every later one.
void Shim::spawn_gate() {
  int sp[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) < 0) {
    log("error", "cannot start the gate", {F("what", "socketpair"), F("error", errdesc(errno))});
    gate_retry_ = mono_ms() + kGateRetryMs;
    return;
  }
  Fd ours(sp[0]), theirs(sp[1]);
  try {
    pid_t pid = spawn(listen_.get(), theirs.get(), gate_argv_.data(), false, cri_ ? cri_.get() : -1);
    gate_pidfd_ = Fd(sys_pidfd_open(pid));  // our unreaped child: it is this process
    gate_pid_ = pid;
    gate_ctl_ = std::move(ours);
    gate_started_ = mono_ms();
    gate_now_ = {};
    log("info", "gate started", {F("gate_pid", static_cast<long long>(pid))});
  } catch (const std::exception& e) {
    log("error", "cannot start the gate", {F("error", e.what())});
    gate_retry_ = mono_ms() + kGateRetryMs;
  }
}

char Shim::consume(const unsigned char* buf, size_t n, pid_t who) {
  if (n != kReplayRequest) {
    log("warn", "bad replay-cache request size",
        {F("session_pid", static_cast<long long>(who)), F("size", static_cast<long long>(n))});
    return 'F';
  }
  std::array<uint8_t, 32> digest;
  memcpy(digest.data(), buf, 32);
  uint64_t u = 0;
  for (int i = 7; i >= 0; i--) u = (u << 8) | buf[32 + i];
  char reply = 'F';
  switch (cache_.consume(digest, static_cast<int64_t>(u), static_cast<int64_t>(time(nullptr)))) {
    case ticket::ReplayCache::Result::Accepted:
      reply = 'A';
      break;
    case ticket::ReplayCache::Result::Replayed:
      reply = 'R';
      break;
    case ticket::ReplayCache::Result::Full:
      reply = 'F';
      break;
  }
  if (reply != 'A')
    log("warn", reply == 'R' ? "ticket replay refused" : "replay cache full",
        {F("session_pid", static_cast<long long>(who))});
  return reply;
}

// One datagram of the gate lineage (shim/gate_proto.h).
void Shim::handle_gate() {
  unsigned char buf[1 + sizeof(gate::GateCounters) + 8];
  FdMsg m(buf, sizeof buf);
  ssize_t n = ::recvmsg(gate_ctl_.get(), &m.msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  Fd passed = n > 0 ? m.take() : Fd();
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n <= 0) return gate_gone();
  auto pid_at = [&](size_t off) {
    int32_t p = 0;
    if (static_cast<size_t>(n) >= off + 4) memcpy(&p, buf + off, 4);
    return static_cast<pid_t>(p);
  };
  switch (buf[0]) {
    case gate::kAdmit: {
      char reply;
      int sp[2];
      Fd ours, theirs;
      if (!gate_pidfd_) {
        // Only the gate admits, and the gate is known by its pidfd ('G').
        reply = gate::kCacheFull;
        log("warn", "admission request from a gate that did not take over (no pidfd): refused");
      } else if (tcp_sessions_.size() >= opt_.max_sessions) {
        reply = gate::kLimit;
        log("warn", "too many sessions, admission refused",
            {F("max_sessions", static_cast<long long>(opt_.max_sessions))});
      } else if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) < 0) {
        reply = gate::kCacheFull;  // fail closed, as when the cache cannot answer
        log("error", "admission refused: no control socket for the session",
            {F("what", "socketpair"), F("error", errdesc(errno))});
      } else {
        ours = Fd(sp[0]);
        theirs = Fd(sp[1]);
        reply = consume(buf + 1, static_cast<size_t>(n) - 1, gate_pid_);
      }
      // 'A' carries the session's own control socket (its end report).
      FdMsg out(&reply, 1);
      if (reply == gate::kAccepted) {
        out.put(theirs.get());
      } else {
        out.msg.msg_control = nullptr;
        out.msg.msg_controllen = 0;
      }
      if (::sendmsg(gate_ctl_.get(), &out.msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) return gate_gone();
      if (reply == gate::kAccepted) {
        // The gate process is that connection's session now; its child
        // takes over as the gate ('G').
        log("info", "session started", {F("session_pid", static_cast<long long>(gate_pid_)), F("via", "gate")});
        tcp_sessions_.push_back(TcpSession{gate_pid_, std::move(gate_pidfd_), std::move(ours)});
        gate_pid_ = -1;
        tcp_started_++;
        stats_dirty_ = true;
      }
      return;
    }
    case gate::kUnreserve:
      for (auto it = tcp_sessions_.begin(); it != tcp_sessions_.end(); ++it) {
        if (it->pid != pid_at(1)) continue;
        gate_pid_ = it->pid;
        gate_pidfd_ = std::move(it->pidfd);
        tcp_sessions_.erase(it);
        tcp_started_--;
        break;
      }
      return;
    case gate::kTakeOver:
      if (!passed) return;
      gate_pid_ = pid_at(1);
      gate_pidfd_ = std::move(passed);
      return;
    case gate::kCounters:
      if (static_cast<size_t>(n) == 1 + sizeof gate_now_) {
        memcpy(&gate_now_, buf + 1, sizeof gate_now_);
        stats_dirty_ = true;
      }
      return;
    default:
      log("warn", "unknown message from the gate", {F("type", static_cast<long long>(buf[0]))});
  }
}

// The lineage ended (idle, crashed, stopped): its counters join the totals
// and the next TCP connection starts a new gate.
void Shim::gate_gone() {
  uint64_t* base = counters_of(gate_base_);
  uint64_t* now = counters_of(gate_now_);
  for (size_t i = 0; i < gate::kNumCounters; i++) base[i] += now[i];
  gate_base_.open = 0;
  gate_base_.open_peak = std::max(gate_base_.open_peak - gate_now_.open_peak, gate_now_.open_peak);
  gate_now_ = {};
  gate_ctl_.reset();
  gate_pidfd_.reset();  // an exiting process; a child of ours is reaped in reap()
  gate_pid_ = -1;
  stats_dirty_ = true;
  // A gate that dies at once (a broken session binary) is not restarted in
  // a loop while the connection that woke it waits in the backlog.
  gate_retry_ = gate_started_ + kGateRetryMs;
  log("info", "gate ended");
}

// One lease renewal: fork + exec the hook's `renew` (it has its own deadline).
// Failures are only logged; the next tick tries again.
void Shim::spawn_renewer() {
  if (renewer_ > 0) {
    // A renewal bounds itself (its alarm: the master timeout per URL + 5 s)
    // and may take longer than the interval (a slow master, a big recording
    // to upload): killing it at the next tick would starve every renewal
    // that long. This tick is skipped; only one past kRenewerMaxMs is killed.
    if (mono_ms() - renewer_started_ms_ < kRenewerMaxMs) {
      if (!renewer_overdue_logged_)
        log("warn", "previous lease renewal still running, this one skipped",
            {F("renew_pid", static_cast<long long>(renewer_))});
      renewer_overdue_logged_ = true;
      return;
    }
    log("warn", "lease renewal hung, killing it", {F("renew_pid", static_cast<long long>(renewer_))});
    ::kill(renewer_, SIGKILL);  // reaped (and forgotten) in reap()
  }
  char* envp[] = {const_cast<char*>("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), nullptr};
  int null_fd = devnull_.get();
  pid_t shim_pid = getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    log("error", "cannot fork the lease renewal", {F("error", errdesc(errno))});
    return;
  }
  if (pid == 0) {
    // Child: async-signal-safe calls only. Dies with the shim so that no
    // renewal can re-register the container after poststop's DELETE.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != shim_pid) _exit(1);
    if (dup2(null_fd, 0) < 0 || dup2(null_fd, 1) < 0) _exit(1);
    if (close_range(3, ~0U, 0) < 0) _exit(1);
    sigset_t none;
    sigemptyset(&none);
    signal(SIGPIPE, SIG_DFL);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    if (chdir("/") < 0) _exit(1);
    execve(renew_argv_[0], renew_argv_.data(), envp);
    static const char msg[] = "{\"level\":\"error\",\"component\":\"shim\",\"msg\":\"execve renewal failed\"}\n";
    ssize_t r = ::write(2, msg, sizeof msg - 1);
    (void)r;
    _exit(127);
  }
  renewer_ = pid;
  renewer_started_ms_ = mono_ms();
  renewer_overdue_logged_ = false;
}

void Shim::handle_replay(LocalSession& s) {
  unsigned char buf[kReplayRequest + 1];
  ssize_t n = ::recv(s.ctl.get(), buf, sizeof buf, MSG_DONTWAIT | MSG_TRUNC);
  if (n < 0) {
    if (errno == EAGAIN || errno == EINTR) return;
    s.ctl.reset();  // broken: the session will fail closed
    return;
  }
  if (n == 0) {  // session closed its end
    s.ctl.reset();
    return;
  }
  if (n == 1 && buf[0] == kWarmReady) {  // no reply: the session does not wait for one
    s.ready = true;
    return;
  }
  if (static_cast<size_t>(n) == sizeof(session_end::Report) && buf[0] == session_end::kTag) {  // its last word
    s.report.emplace();
    memcpy(&*s.report, buf, sizeof *s.report);
    return;
  }
  char reply = consume(buf, static_cast<size_t>(n), s.pid);
  if (::send(s.ctl.get(), &reply, 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) s.ctl.reset();
}

void Shim::reap() {
  for (;;) {
    int status = 0;
    pid_t p = ::waitpid(-1, &status, WNOHANG);
    if (p <= 0) return;
    auto ended = [&](const char* via) {
      if (WIFSIGNALED(status))
        log("info", "session ended",
            {F("session_pid", static_cast<long long>(p)), F("signal", WTERMSIG(status)), F("via", via)});
      else
        log("info", "session ended",
            {F("session_pid", static_cast<long long>(p)), F("exit_code", WEXITSTATUS(status)), F("via", via)});
    };
    if (p == renewer_) {
      renewer_ = -1;
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        log("warn", "lease renewal failed (see its log line above)",
            {F("exit_code", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status))});
      continue;
    }
    bool found = false;
    for (auto it = tcp_sessions_.begin(); it != tcp_sessions_.end(); ++it) {
      if (it->pid != p) continue;
      ended("gate");
      tcp_session_ended(it);
      found = true;
      break;
    }
    if (found) continue;
    for (auto it = local_sessions_.begin(); it != local_sessions_.end(); ++it) {
      if (it->pid != p) continue;
      ended("local");
      if (it->serving) {
        take_report(it->ctl, it->report);
        session_ended(local_ends_, it->report);
      }
      local_sessions_.erase(it);
      accept_paused_ = false;
      stats_dirty_ = true;
      break;
    }
    // Anything else: a gate (its lineage ends through the control socket),
    // or an orphan adopted as the sessions' subreaper.
  }
}

// STATE/<id>/stats.json (docs/design.md "Pre-authentication gate"): the
// gate's counters (ended lineages + the current one) and the sessions, as
// one JSON object; written atomically, at most every kStatsEveryMs.
void Shim::write_stats(bool force) {
  int64_t now = mono_ms();
  if (!stats_dirty_ || (!force && now < stats_due_)) return;
  stats_dirty_ = false;
  stats_due_ = now + kStatsEveryMs;
  std::string j = "{\"ts\":\"";
  append_time(j);
  j += "\",\"sessions\":{\"tcp\":" + std::to_string(tcp_sessions_.size());
  size_t local = 0, warm = 0;
  for (auto& s : local_sessions_) (s.warm ? warm : local)++;
  j += ",\"local\":" + std::to_string(local) + ",\"warm\":" + std::to_string(warm) +
       ",\"tcp_started\":" + std::to_string(tcp_started_) + ",\"local_started\":" + std::to_string(local_started_) +
       ",\"local_refused\":" + std::to_string(local_refused_) +
       ",\"max_sessions\":" + std::to_string(opt_.max_sessions) +
       ",\"max_local_sessions\":" + std::to_string(opt_.max_local_sessions) + "},\"ended\":{";
  bool first = true;
  for (auto [door, ends] : {std::pair{"tcp", &tcp_ends_}, std::pair{"local", &local_ends_}})
    for (size_t i = 0; i < session_end::kNumResults; i++) {
      j += (first ? "\"" : ",\"") + std::string(door) + "_" + session_end::kResultNames[i] +
           "\":" + std::to_string(ends->by_result[i]);
      first = false;
    }
  j += "},\"bytes\":{\"tcp_in\":" + std::to_string(tcp_ends_.bytes_in) +
       ",\"tcp_out\":" + std::to_string(tcp_ends_.bytes_out) + ",\"local_in\":" + std::to_string(local_ends_.bytes_in) +
       ",\"local_out\":" + std::to_string(local_ends_.bytes_out) + "},\"preauth\":{";
  const uint64_t* base = counters_of(gate_base_);
  const uint64_t* cur = counters_of(gate_now_);
  for (size_t i = 0; i < gate::kNumCounters; i++) {
    std::string name = gate::kCounterNames[i];
    uint64_t v = name == "open" ? cur[i] : name == "open_peak" ? std::max(base[i], cur[i]) : base[i] + cur[i];
    j += (i ? ",\"" : "\"") + name + "\":" + std::to_string(v);
  }
  j += "},\"gate_pid\":" + std::to_string(gate_ctl_ ? gate_pid_ : 0) + "}\n";
  // Not common/file.h's write_file_atomic (no common/ code here, shim.h); no fsync: a crash loses one snapshot.
  std::string tmp = stats_path_ + ".tmp";
  Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd || ::write(fd.get(), j.data(), j.size()) != static_cast<ssize_t>(j.size()) ||
      ::rename(tmp.c_str(), stats_path_.c_str()) < 0)
    log("warn", "cannot write the stats file", {F("path", stats_path_), F("error", errdesc(errno))});
}

// A session with a connection ended: counted by its report's result (none:
// error), its bytes added.
void Shim::session_ended(DoorEnds& door, const std::optional<session_end::Report>& report) {
  size_t result = static_cast<size_t>(session_end::Result::Error);
  if (report) {
    if (report->result < session_end::kNumResults) result = report->result;
    door.bytes_in += report->bytes_in;
    door.bytes_out += report->bytes_out;
  }
  door.by_result[result]++;
  stats_dirty_ = true;
}

std::vector<TcpSession>::iterator Shim::tcp_session_ended(std::vector<TcpSession>::iterator it) {
  std::optional<session_end::Report> report;
  take_report(it->ctl, report);
  session_ended(tcp_ends_, report);
  return tcp_sessions_.erase(it);
}

int Shim::shutdown(const char* why) {
  listen_.reset();
  cri_.reset();
  if (local_) {
    local_.reset();
    ::unlink(opt_.local_socket.c_str());
  }
  log("info", "shim stopping",
      {F("reason", why), F("sessions", static_cast<long long>(local_sessions_.size() + tcp_sessions_.size()))});
  auto signal_all = [&](int sig) {
    if (gate_pidfd_) sys_pidfd_signal(gate_pidfd_.get(), sig);
    for (auto& s : tcp_sessions_) sys_pidfd_signal(s.pidfd.get(), sig);
    for (auto& s : local_sessions_) ::kill(s.pid, sig);
  };
  signal_all(SIGTERM);
  if (renewer_ > 0) ::kill(renewer_, SIGKILL);
  // Up to 1 s for the sessions and the gate to end on SIGTERM, then SIGKILL (bounded).
  int64_t start = mono_ms();
  bool killed = false;
  std::vector<pollfd> pfds;
  for (;;) {
    // Gone: the gate and TCP sessions by their pidfds, the rest reaped.
    if (gate_pidfd_) {
      pollfd p{gate_pidfd_.get(), POLLIN, 0};
      if (::poll(&p, 1, 0) > 0) gate_pidfd_.reset();
    }
    for (auto it = tcp_sessions_.begin(); it != tcp_sessions_.end();) {
      pollfd p{it->pidfd.get(), POLLIN, 0};
      if (::poll(&p, 1, 0) > 0)
        it = tcp_session_ended(it);
      else
        ++it;
    }
    if (local_sessions_.empty() && tcp_sessions_.empty() && !gate_pidfd_ && renewer_ <= 0) break;
    int64_t ms = mono_ms() - start;
    if (ms >= 1000 && !killed) {
      signal_all(SIGKILL);
      killed = true;
    }
    if (ms >= 3000) break;  // SIGKILLed processes stuck in D state: don't hang
    pfds.assign(1, pollfd{sigfd_.get(), POLLIN, 0});
    if (gate_pidfd_) pfds.push_back({gate_pidfd_.get(), POLLIN, 0});
    for (auto& s : tcp_sessions_) pfds.push_back({s.pidfd.get(), POLLIN, 0});
    ::poll(pfds.data(), pfds.size(), 50);
    signalfd_siginfo si;
    while (::read(sigfd_.get(), &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
    }
    reap();
  }
  reap();
  stats_dirty_ = true;
  write_stats(true);
  log("info", "shim stopped");
  return 0;
}

void Shim::exec_cleanup() {
  std::vector<std::string> store = {opt_.hook_exec};
  if (!opt_.hook_config.empty()) store.insert(store.end(), {"--config", opt_.hook_config});
  store.insert(store.end(), {"cleanup", opt_.id});
  std::vector<char*> argv;
  for (auto& a : store) argv.push_back(a.data());
  argv.push_back(nullptr);
  char* envp[] = {const_cast<char*>("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), nullptr};
  log("info", "container gone: cleaning up as poststop would", {F("hook", opt_.hook_exec)});
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  signal(SIGPIPE, SIG_DFL);
  // The same pid: `shimlet-hook cleanup` recognises the registration's shim as itself.
  execve(argv[0], argv.data(), envp);
  log("error", "execve of the cleanup hook failed", {F("hook", opt_.hook_exec), F("error", errdesc(errno))});
  _exit(1);
}

}  // namespace

void Fd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);  // close errors are not actionable here
  fd_ = fd;
}

// common/error.h's sys_error without std::system_error (its strerror pulls gettext in: shim.h).
Error sys_error(const std::string& what) {
  int e = errno;
  return Error(what + ": " + errdesc(e));
}

Options parse_args(int argc, const char* const* argv) {
  Options o;
  for (int i = 1; i < argc; i++) {
    std::string_view a = argv[i];
    if (i + 1 >= argc) throw Error("shimlet: missing value for " + std::string(a));
    std::string_view v = argv[++i];
    if (a == "--config") {
      o.config = v;
    } else if (a == "--session-binary") {
      o.session_binary = v;
    } else if (a == "--id") {
      o.id = v;
    } else if (a == "--listen") {
      o.listen = v;
    } else if (a == "--local-socket") {
      if (v.empty() || v.front() != '/') throw Error("shimlet: --local-socket needs an absolute path");
      o.local_socket = v;
    } else if (a == "--cri-listen") {
      o.cri_listen = v;
    } else if (a == "--pid") {
      auto n = to_num(v, 1, 0x3fffffff);
      if (!n) throw Error("shimlet: bad --pid " + std::string(v));
      o.pid = static_cast<pid_t>(*n);
    } else if (a == "--ready-fd") {
      auto n = to_num(v, 0, 1 << 20);
      if (!n) throw Error("shimlet: bad --ready-fd " + std::string(v));
      o.ready_fd = static_cast<int>(*n);
    } else if (a == "--renew-every") {
      auto n = to_num(v, 1, 86400);
      if (!n) throw Error("shimlet: bad --renew-every " + std::string(v) + " (1..86400 seconds)");
      o.renew_every_s = static_cast<unsigned>(*n);
    } else if (a == "--hook") {
      o.hook_exec = v;
    } else if (a == "--hook-config") {
      o.hook_config = v;
    } else if (a == "--warm-idle-s") {
      auto n = to_num(v, 0, 3600);
      if (!n) throw Error("shimlet: bad --warm-idle-s " + std::string(v) + " (0..3600)");
      o.warm_idle_s = static_cast<unsigned>(*n);
    } else if (a == "--max-sessions") {
      auto n = to_num(v, 1, 65536);
      if (!n) throw Error("shimlet: bad --max-sessions " + std::string(v) + " (1..65536)");
      o.max_sessions = static_cast<unsigned>(*n);
    } else if (a == "--max-local-sessions") {
      auto n = to_num(v, 1, 65536);
      if (!n) throw Error("shimlet: bad --max-local-sessions " + std::string(v) + " (1..65536)");
      o.max_local_sessions = static_cast<unsigned>(*n);
    } else {
      throw Error("shimlet: unknown argument " + std::string(a));
    }
  }
  if (o.config.empty() || o.session_binary.empty() || o.pid <= 0)
    throw Error(
        "usage: shimlet --config PATH --pid PID --session-binary PATH [--id ID] [--listen ADDR:PORT] "
        "[--local-socket PATH] [--cri-listen ADDR:PORT] [--ready-fd N] [--max-sessions N] [--max-local-sessions N] "
        "[--warm-idle-s N] "
        "[--hook PATH [--hook-config PATH] [--renew-every S]]");
  if (o.session_binary[0] != '/') throw Error("shimlet: --session-binary must be absolute: " + o.session_binary);
  if (!o.hook_exec.empty() && (o.hook_exec[0] != '/' || o.id.empty()))
    throw Error("shimlet: --hook needs an absolute path and --id");
  if (!o.hook_config.empty() && o.hook_config[0] != '/') throw Error("shimlet: --hook-config must be absolute");
  if (o.renew_every_s && (o.hook_exec.empty() || o.hook_config.empty()))
    throw Error("shimlet: --renew-every needs --hook and --hook-config");
  return o;
}

Fd listen_on(const std::string& addr) {
  auto colon = addr.rfind(':');
  if (colon == std::string::npos) throw Error("listen address needs HOST:PORT: " + addr);
  std::string host = addr.substr(0, colon);
  auto port = to_num(std::string_view(addr).substr(colon + 1), 0, 65535);
  if (!port) throw Error("bad port in listen address: " + addr);
  sockaddr_storage ss{};
  socklen_t len;
  int family;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    auto* s6 = reinterpret_cast<sockaddr_in6*>(&ss);
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons(static_cast<uint16_t>(*port));
    if (inet_pton(AF_INET6, host.substr(1, host.size() - 2).c_str(), &s6->sin6_addr) != 1)
      throw Error("bad IPv6 address in listen address: " + addr);
    len = sizeof *s6;
    family = AF_INET6;
  } else {
    auto* s4 = reinterpret_cast<sockaddr_in*>(&ss);
    s4->sin_family = AF_INET;
    s4->sin_port = htons(static_cast<uint16_t>(*port));
    if (inet_pton(AF_INET, host.c_str(), &s4->sin_addr) != 1)
      throw Error("bad IPv4 address in listen address (use [v6]:port for IPv6): " + addr);
    len = sizeof *s4;
    family = AF_INET;
  }
  Fd s(::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!s) throw sys_error("socket for " + addr);
  int one = 1;
  if (::setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) throw sys_error("SO_REUSEADDR");
  if (::bind(s.get(), reinterpret_cast<sockaddr*>(&ss), len) < 0) throw sys_error("bind " + addr);
  // The kernel's largest queue (net.core.somaxconn): a burst of connections
  // waits for the gate's accept rather than having SYNs dropped (a dropped
  // SYN costs a legitimate client a 1 s retransmission).
  if (::listen(s.get(), SOMAXCONN) < 0) throw sys_error("listen " + addr);
  return s;
}

Fd listen_local(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos || slash + 1 == path.size()) throw Error("bad local socket path: " + path);
  std::string dir = slash ? path.substr(0, slash) : "/", name = path.substr(slash + 1);
  Fd d(::open(dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!d) throw sys_error("open " + dir);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::string via = "/proc/self/fd/" + std::to_string(d.get()) + "/" + name;
  if (via.size() >= sizeof sa.sun_path) throw Error("local socket name too long: " + path);
  memcpy(sa.sun_path, via.c_str(), via.size() + 1);
  struct stat st {};
  if (::fstatat(d.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0) {
    if (!S_ISSOCK(st.st_mode)) throw Error(path + " exists and is not a socket (refusing to replace it)");
    if (::unlinkat(d.get(), name.c_str(), 0) < 0) throw sys_error("unlink stale " + path);
  }
  Fd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!s) throw sys_error("socket for " + path);
  // Created 0600: nobody but root may connect (the directory is 0700 too).
  mode_t old = ::umask(0177);
  int r = ::bind(s.get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  int e = errno;
  ::umask(old);
  errno = e;
  if (r < 0) throw sys_error("bind " + path);
  if (::listen(s.get(), 64) < 0) throw sys_error("listen " + path);
  return s;
}

unsigned short bound_port(int sock) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getsockname(sock, reinterpret_cast<sockaddr*>(&ss), &len) < 0) throw sys_error("getsockname");
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
  return ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
}

Held open_container(pid_t pid) {
  Held h;
  h.pidfd = Fd(sys_pidfd_open(pid));  // pidfds are always CLOEXEC
  if (!h.pidfd) throw sys_error("pidfd_open pid " + std::to_string(pid));
  std::string dir = "/proc/" + std::to_string(pid);
  Fd procdir(::open(dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!procdir) throw sys_error("open " + dir);
  for (const char* t : kNsTypes) {
    std::string rel = std::string("ns/") + t;
    struct stat mine {};
    if (::stat(("/proc/self/" + rel).c_str(), &mine) < 0) {
      if (errno == ENOENT) continue;  // kernel without this namespace type
      throw sys_error("stat /proc/self/" + rel);
    }
    Fd fd(::openat(procdir.get(), rel.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) throw sys_error("open " + dir + "/" + rel);
    struct stat theirs {};
    if (::fstat(fd.get(), &theirs) < 0) throw sys_error("fstat " + dir + "/" + rel);
    if (theirs.st_dev == mine.st_dev && theirs.st_ino == mine.st_ino) continue;  // shared with us: not needed
    h.ns.emplace_back(t, std::move(fd));
  }
  // /proc/PID could have been a recycled pid opened after init died; if the
  // pidfd's process is still alive now, every fd above is really its.
  if (sys_pidfd_signal(h.pidfd.get(), 0) < 0) throw sys_error("container init pid " + std::to_string(pid) + " is gone");
  return h;
}

void protect_binary(const std::string& path) {
  if (::unshare(CLONE_NEWNS) < 0) throw sys_error("unshare(CLONE_NEWNS)");
  // Slave first: our bind mount must not propagate back to the host.
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_SLAVE, nullptr) < 0) throw sys_error("make / rslave");
  if (::mount(path.c_str(), path.c_str(), nullptr, MS_BIND, nullptr) < 0) throw sys_error("bind mount " + path);
  struct statvfs sv {};
  if (::statvfs(path.c_str(), &sv) < 0) throw sys_error("statvfs " + path);
  // A read-only remount must keep the locked per-mount flags of the source.
  unsigned long keep = 0;
  if (sv.f_flag & ST_NOSUID) keep |= MS_NOSUID;
  if (sv.f_flag & ST_NODEV) keep |= MS_NODEV;
  if (sv.f_flag & ST_NOEXEC) keep |= MS_NOEXEC;
  if (sv.f_flag & ST_NOATIME) keep |= MS_NOATIME;
  if (sv.f_flag & ST_NODIRATIME) keep |= MS_NODIRATIME;
  if (sv.f_flag & ST_RELATIME) keep |= MS_RELATIME;
  if (::mount(nullptr, path.c_str(), nullptr, MS_BIND | MS_REMOUNT | MS_RDONLY | keep, nullptr) < 0)
    throw sys_error("remount read-only " + path);
}

int run(const Options& opt) {
  g_id = opt.id;
  try {
    Shim s(opt);
    bool cleanup = false;
    int code = s.run(&cleanup);
    if (cleanup) s.exec_cleanup();
    return code;
  } catch (const std::exception& e) {
    log("error", "shim failed", {F("error", e.what())});
    return 1;
  }
}

}  // namespace shimlet::shim
