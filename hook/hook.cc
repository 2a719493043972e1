#include "hook/hook.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <charconv>
#include <filesystem>
#include <memory>

#include "common/error.h"
#include "common/fd.h"
#include "common/log.h"
#include "common/proc.h"
#include "masterclient/masterclient.h"
#include "masterclient/spool.h"
#include "proto/tls.h"

namespace shimlet::hook {
namespace {

using nlohmann::json;

constexpr size_t kMaxStateBytes = 1 << 20;
constexpr size_t kMaxPemBytes = 64 * 1024;
constexpr size_t kMaxRegistrationBytes = 256 * 1024;
constexpr int kStdinTimeoutMs = 5000;
constexpr size_t kEndsPerRenewal = 200;  // session end records posted per renewal (the rest: next tick)
constexpr int kPoststopFlushMs = 2000;   // poststop's final flush: the runtime is waiting

int64_t monotonic_ms() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// glibc 2.36's <sys/pidfd.h> lacks extern "C": use the syscalls directly.
int pidfd_open_(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }
int pidfd_signal_(int pidfd, int sig) {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
}

// For the SIGALRM deadline handler (async-signal-safe state only).
volatile sig_atomic_t g_shim_pidfd = -1;
volatile sig_atomic_t g_fail_exit = 0;
int64_t g_start_ms = 0;  // when main() started (the renewer's deadline is counted from it)

void on_deadline(int) {
  if (g_shim_pidfd >= 0) pidfd_signal_(g_shim_pidfd, SIGKILL);
  static const char msg[] =
      "{\"level\":\"error\",\"component\":\"hook\",\"msg\":\"shimlet-hook: overall deadline exceeded, giving up\"}\n";
  ssize_t r = ::write(2, msg, sizeof msg - 1);
  (void)r;
  _exit(g_fail_exit ? 1 : 0);
}

template <typename T, void (*F)(T*)>
struct Free {
  void operator()(T* p) const { F(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, Free<EVP_PKEY, EVP_PKEY_free>>;
using Bio = std::unique_ptr<BIO, Free<BIO, BIO_free_all>>;

std::string bio_string(BIO* b) {
  char* data = nullptr;
  long n = BIO_get_mem_data(b, &data);
  return std::string(data, static_cast<size_t>(n));
}

// Reads a regular file of at most max bytes.
std::string read_file(const std::string& path, size_t max) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY));
  if (!fd) throw sys_error("open " + path);
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) throw sys_error("fstat " + path);
  if (!S_ISREG(st.st_mode)) throw Error(path + ": not a regular file");
  if (static_cast<uint64_t>(st.st_size) > max)
    throw Error(path + ": " + std::to_string(st.st_size) + " bytes exceeds the limit of " + std::to_string(max));
  std::string out;
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw sys_error("read " + path);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max) throw Error(path + ": exceeds the limit of " + std::to_string(max) + " bytes");
  }
  return out;
}

std::string dirname_of(const std::string& p) {
  auto s = p.rfind('/');
  return s == std::string::npos ? "." : (s == 0 ? "/" : p.substr(0, s));
}

std::string self_dir() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) throw sys_error("readlink /proc/self/exe");
  return dirname_of(std::string(buf, static_cast<size_t>(n)));
}

std::string now_rfc3339() {
  time_t t = time(nullptr);
  tm tmv{};
  gmtime_r(&t, &tmv);
  char b[32];
  strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", &tmv);
  return b;
}

// Public key PEM of an Ed25519 key; refuses other key types.
std::string ed25519_public_pem(EVP_PKEY* k, const std::string& what) {
  if (EVP_PKEY_get_id(k) != EVP_PKEY_ED25519) throw Error(what + ": not an Ed25519 key");
  Bio b(BIO_new(BIO_s_mem()));
  if (PEM_write_bio_PUBKEY(b.get(), k) != 1) throw Error(what + ": cannot encode public key");
  return bio_string(b.get());
}

std::string load_public_key(const std::string& path) {
  std::string pem = read_file(path, kMaxPemBytes);
  Bio b(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Pkey k(PEM_read_bio_PUBKEY(b.get(), nullptr, nullptr, nullptr));
  if (!k) throw Error(path + ": not a PEM public key (" + proto::ssl_error_string() + ")");
  return ed25519_public_pem(k.get(), path);
}

// STATE_DIR/local.key (created once, race-safe: the key is written to a
// private temp file and link()ed into place, which never replaces a key
// another hook created first) and local.pub, always derived from local.key.
std::string ensure_local_key(const std::string& dir) {
  const std::string key_path = dir + "/local.key", pub_path = dir + "/local.pub";
  if (::access(key_path.c_str(), F_OK) != 0) {
    Pkey k(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
    if (!k) throw Error("Ed25519 keygen: " + proto::ssl_error_string());
    Bio b(BIO_new(BIO_s_mem()));
    if (PEM_write_bio_PrivateKey(b.get(), k.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1)
      throw Error("encode local key: " + proto::ssl_error_string());
    std::string pem = bio_string(b.get());
    std::string tmp = dir + "/.local.key.XXXXXX";
    Fd fd(::mkostemp(tmp.data(), O_CLOEXEC));  // mode 0600
    if (!fd) throw sys_error("create temp key in " + dir);
    try {
      write_all(fd.get(), pem.data(), pem.size());
      if (::fsync(fd.get()) < 0) throw sys_error("fsync " + tmp);
      if (::link(tmp.c_str(), key_path.c_str()) < 0 && errno != EEXIST) throw sys_error("link " + key_path);
    } catch (...) {
      ::unlink(tmp.c_str());
      throw;
    }
    ::unlink(tmp.c_str());
  }
  struct stat st {};
  if (::lstat(key_path.c_str(), &st) < 0) throw sys_error("lstat " + key_path);
  if (!S_ISREG(st.st_mode) || (st.st_mode & 077)) throw Error(key_path + ": must be a regular file with mode 0600");
  std::string pem = read_file(key_path, kMaxPemBytes);
  Bio b(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Pkey k(PEM_read_bio_PrivateKey(b.get(), nullptr, nullptr, nullptr));
  if (!k) throw Error(key_path + ": not a PEM private key (" + proto::ssl_error_string() + ")");
  std::string pub = ed25519_public_pem(k.get(), key_path);
  std::string have;
  try {
    have = read_file(pub_path, kMaxPemBytes);
  } catch (const std::exception&) {
  }
  if (have != pub) write_file_atomic(pub_path, pub, 0644);
  return pub;
}

// Creates a private file that must not exist yet (fresh container directory).
void write_new_file(const std::string& path, std::string_view content, mode_t mode) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode));
  if (!fd) throw sys_error("create " + path);
  write_all(fd.get(), content.data(), content.size());
}

// Makes sure `dir` is a real directory owned by us and not writable by others.
void check_private_dir(const std::string& dir) {
  struct stat st {};
  if (::lstat(dir.c_str(), &st) < 0) throw sys_error("lstat " + dir);
  if (!S_ISDIR(st.st_mode)) throw Error(dir + ": not a directory (symlinks are refused)");
  if (st.st_uid != ::geteuid()) throw Error(dir + ": owned by uid " + std::to_string(st.st_uid) + ", not by us");
  if (st.st_mode & 022) throw Error(dir + ": writable by group/others");
}

void ensure_state_dir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0700) < 0) {
    if (errno == ENOENT) {
      std::error_code ec;
      std::filesystem::create_directories(dirname_of(dir), ec);
      if (ec) throw Error("create " + dirname_of(dir) + ": " + ec.message());
      if (::mkdir(dir.c_str(), 0700) < 0 && errno != EEXIST) throw sys_error("mkdir " + dir);
    } else if (errno != EEXIST) {
      throw sys_error("mkdir " + dir);
    }
  }
  check_private_dir(dir);
}

uint64_t proc_start_time(pid_t pid) {
  auto ps = proc_stat(pid);
  if (!ps) throw Error("process " + std::to_string(pid) + " is gone");
  return ps->start_time;
}

// Waits until the pidfd's process has exited, at most timeout_ms.
bool wait_exit(int pidfd, int timeout_ms) {
  pollfd p{pidfd, POLLIN, 0};
  timespec start{};
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    timespec now{};
    clock_gettime(CLOCK_MONOTONIC, &now);
    long left = timeout_ms - ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000);
    if (left <= 0) return false;
    int r = ::poll(&p, 1, static_cast<int>(left));
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) return false;
  }
}

// SIGTERM, then SIGKILL after 1 s; bounded.
void terminate(int pidfd) {
  if (pidfd_signal_(pidfd, SIGTERM) < 0) return;  // ESRCH: gone already
  if (wait_exit(pidfd, 1000)) return;
  pidfd_signal_(pidfd, SIGKILL);
  wait_exit(pidfd, 1000);
}

// Stops the shim registered for a container if the pid is still that shim:
// same start time and the same --config on its command line.
void stop_shim(pid_t pid, uint64_t start_time, const std::string& shim_config) {
  if (pid <= 0) return;
  Fd pidfd(pidfd_open_(pid));
  if (!pidfd) {
    if (errno == ESRCH) return;  // already gone (it exits when the container does)
    throw sys_error("pidfd_open shim pid " + std::to_string(pid));
  }
  std::string cmdline;
  uint64_t st = 0;
  try {
    cmdline = read_file("/proc/" + std::to_string(pid) + "/cmdline", 64 * 1024);
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
  if (pidfd_signal_(pidfd.get(), 0) < 0) return;
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
      pidfd_signal_(shim_pidfd.get(), SIGKILL);
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

// Reads "ready PORT\n" (bounded bytes and time).
unsigned wait_ready(int fd, int timeout_ms, const std::string& log_path) {
  std::string line;
  timespec start{};
  clock_gettime(CLOCK_MONOTONIC, &start);
  while (line.find('\n') == std::string::npos) {
    timespec now{};
    clock_gettime(CLOCK_MONOTONIC, &now);
    long left = timeout_ms - ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000);
    if (left <= 0) throw Error("shim not ready after " + std::to_string(timeout_ms) + " ms (see " + log_path + ")");
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left));
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
        tail = read_file(log_path, 1 << 20);
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
  unsigned port = 0;
  if (line.rfind("ready ", 0) != 0) throw Error("shim wrote an unexpected ready line: " + line);
  auto [p, ec] = std::from_chars(line.data() + 6, line.data() + line.size(), port);
  if (ec != std::errc() || p != line.data() + line.size() || port == 0 || port > 65535)
    throw Error("shim wrote a bad port: " + line);
  return port;
}

std::string canonical_binary(const std::string& path, const char* what) {
  if (path.empty() || path[0] != '/') throw Error(std::string(what) + " must be an absolute path: " + path);
  char buf[PATH_MAX];
  if (!::realpath(path.c_str(), buf)) throw sys_error(std::string(what) + " " + path);
  if (::access(buf, X_OK) != 0) throw sys_error(std::string(what) + " " + buf + " is not executable");
  return buf;
}

void append_hook_log(const std::string& state_dir, const json& line) {
  Fd fd(::open((state_dir + "/hook.log").c_str(), O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!fd) return;
  std::string s = line.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  ssize_t r = ::write(fd.get(), s.data(), s.size());
  (void)r;
}

std::string read_stdin_bounded(int timeout_ms) {
  std::string out;
  timespec start{};
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    timespec now{};
    clock_gettime(CLOCK_MONOTONIC, &now);
    long left = timeout_ms - ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000);
    if (left <= 0) throw Error("OCI state on stdin not complete after " + std::to_string(timeout_ms) + " ms");
    pollfd p{0, POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left));
    if (r < 0 && errno != EINTR) throw sys_error("poll stdin");
    if (r <= 0) continue;
    char buf[16384];
    ssize_t n = ::read(0, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) throw sys_error("read stdin");
    if (n == 0) return out;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > kMaxStateBytes)
      throw Error("OCI state on stdin exceeds " + std::to_string(kMaxStateBytes) + " bytes");
  }
}

// master.node / container ids as the master accepts them ([A-Za-z0-9][A-Za-z0-9_.-]{0,127}).
bool valid_node(std::string_view n) {
  if (n.empty() || n.size() > 128 || !isalnum(static_cast<unsigned char>(n[0]))) return false;
  for (char ch : n)
    if (!isalnum(static_cast<unsigned char>(ch)) && ch != '_' && ch != '.' && ch != '-') return false;
  return true;
}

template <typename Str, typename Path, typename Num>
MasterConfig parse_master(const json& v, Str str, Path abs_path, Num num) {
  if (!v.is_object()) throw Error("hook config: master must be an object");
  MasterConfig m;
  for (auto& [k, e] : v.items()) {
    const std::string key = "master." + k;
    if (k == "url") {
      m.url = str(e, key);
      try {
        masterclient::parse_url(m.url);
      } catch (const Error& err) {
        throw Error("hook config: " + key + ": " + err.what());
      }
    } else if (k == "node") {
      m.node = str(e, key);
      if (!valid_node(m.node)) throw Error("hook config: master.node must match [A-Za-z0-9][A-Za-z0-9_.-]{0,127}");
    } else if (k == "ca") {
      m.ca = abs_path(e, key);
    } else if (k == "token") {
      m.token = str(e, key);
      if (m.token.empty() || m.token.size() > 4096) throw Error("hook config: master.token must be 1..4096 chars");
      for (unsigned char ch : m.token)
        if (ch <= 0x20 || ch == 0x7f) throw Error("hook config: master.token contains spaces or control characters");
    } else if (k == "token_file") {
      m.token_file = abs_path(e, key);
    } else if (k == "client_cert") {
      m.client_cert = abs_path(e, key);
    } else if (k == "client_key") {
      m.client_key = abs_path(e, key);
    } else if (k == "timeout_ms") {
      m.timeout_ms = static_cast<int>(num(e, key, 100, 60000));
    } else if (k == "renew_interval_s") {
      m.renew_interval_s = static_cast<int>(num(e, key, 1, 3600));
    } else {
      throw Error("hook config: master: unknown key " + k);
    }
  }
  if (m.url.empty()) throw Error("hook config: master.url is required");
  int creds = !m.token.empty() + !m.token_file.empty() + (!m.client_cert.empty() || !m.client_key.empty());
  if (creds != 1)
    throw Error("hook config: master needs exactly one credential: token, token_file, or client_cert + client_key");
  if (m.client_cert.empty() != m.client_key.empty())
    throw Error("hook config: master.client_cert and master.client_key go together");
  if (m.node.empty()) {
    char host[256] = {};
    if (::gethostname(host, sizeof host - 1) < 0 || !valid_node(host))
      throw Error("hook config: master.node is required (the host name is not usable as a node name)");
    m.node = host;
  }
  return m;
}

// The master's address and our node credential, files read now (small, bounded).
masterclient::Target master_target(const MasterConfig& m) {
  masterclient::Target t;
  t.server = m.url;
  t.timeout_ms = m.timeout_ms;
  t.user_agent = "shimlet-hook";
  if (!m.ca.empty()) t.ca_pem = read_file(m.ca, kMaxPemBytes * 16);
  if (!m.token.empty()) t.token = m.token;
  if (!m.token_file.empty()) {
    t.token = read_file(m.token_file, 4096);
    while (!t.token.empty() && isspace(static_cast<unsigned char>(t.token.back()))) t.token.pop_back();
    if (t.token.empty()) throw Error(m.token_file + ": empty token file");
  }
  if (!m.client_cert.empty()) {
    t.cert_pem = read_file(m.client_cert, kMaxPemBytes);
    t.key_pem = read_file(m.client_key, kMaxPemBytes);
  }
  return t;
}

std::string node_path(const MasterConfig& m, const std::string& id) {
  return "/apis/shimlet.io/v1/nodes/" + masterclient::path_segment(m.node) + "/containers/" +
         masterclient::path_segment(id);
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

bool valid_container_id(std::string_view id) {
  if (id.empty() || id.size() > 128 || id == "." || id == "..") return false;
  for (char c : id)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
          c == '-'))
      return false;
  return true;
}

std::optional<Stage> stage_from_name(std::string_view n) {
  if (n == "createRuntime" || n == "createContainer" || n == "prestart") return Stage::Start;
  if (n == "poststop") return Stage::Cleanup;
  return std::nullopt;
}

std::optional<Stage> stage_from_status(std::string_view s) {
  if (s == "creating" || s == "created") return Stage::Start;
  if (s == "stopped") return Stage::Cleanup;
  return std::nullopt;
}

Names names_from(const std::string& id, const std::map<std::string, std::string>& a, const std::string& hostname) {
  auto pick = [&](std::initializer_list<const char*> keys, const std::string& fallback) {
    for (const char* k : keys) {
      auto it = a.find(k);
      if (it != a.end() && !it->second.empty()) return it->second;
    }
    return fallback;
  };
  // podman 4.3 sets no name annotation; its default hostname is the id's
  // 12-digit prefix (reachable as a unique id prefix anyway), so only a
  // hostname the user chose names the container.
  std::string fallback = id;
  auto mgr = a.find("io.container.manager");
  if (mgr != a.end() && mgr->second == "libpod" && !hostname.empty() && hostname.size() <= 253 &&
      id.compare(0, hostname.size(), hostname) != 0 && valid_container_id(hostname))
    fallback = hostname;
  // CRI-O/podman's own container name annotation, when present, beats the id.
  std::string own = pick({"io.kubernetes.cri-o.ContainerName"}, fallback);
  return Names{pick({"io.kubernetes.pod.namespace", "io.kubernetes.cri.sandbox-namespace"}, "default"),
               pick({"io.kubernetes.pod.name", "io.kubernetes.cri.sandbox-name"}, own),
               pick({"io.kubernetes.container.name", "io.kubernetes.cri.container-name"}, own)};
}

json parse_isolation(const json& v) {
  auto num = [](const json& x, const std::string& k, uint64_t lo, uint64_t hi) {
    if (!x.is_number_unsigned() || x.get<uint64_t>() < lo || x.get<uint64_t>() > hi)
      throw Error("hook config: " + k + " must be an integer in " + std::to_string(lo) + ".." + std::to_string(hi));
  };
  if (!v.is_object()) throw Error("hook config: isolation must be an object");
  for (auto& [k, x] : v.items()) {
    if (k == "cgroup" || k == "selinux") {
      if (!x.is_boolean()) throw Error("hook config: isolation." + k + " must be a boolean");
    } else if (k == "landlock") {
      if (!x.is_string() || (x != "strict" && x != "compat" && x != "off"))
        throw Error("hook config: isolation.landlock must be \"strict\", \"compat\" or \"off\"");
    } else if (k == "selinux_categories") {
      // cA.cB or cA-cB inside c0..c1023 (checked again by the session's parser).
      std::string s = x.is_string() ? x.get<std::string>() : "";
      unsigned a = 0, b = 0;
      char sep = 0, c1 = 0, c2 = 0;
      int used = 0;
      if (s.size() > 16 || sscanf(s.c_str(), "%c%u%c%c%u%n", &c1, &a, &sep, &c2, &b, &used) != 5 ||
          used != static_cast<int>(s.size()) || c1 != 'c' || c2 != 'c' || (sep != '.' && sep != '-') || a > b ||
          b > 1023)
        throw Error("hook config: isolation.selinux_categories must be cA.cB with A <= B <= 1023");
    } else if (k == "limits" || k == "max_limits") {
      if (!x.is_object()) throw Error("hook config: isolation." + k + " must be an object");
      for (auto& [lk, lv] : x.items()) {
        std::string name = "isolation." + k + "." + lk;
        if (lk == "pids")
          num(lv, name, 0, 4194304);
        else if (lk == "memory")
          num(lv, name, 0, uint64_t{1} << 50);
        else if (lk == "cpu_weight")
          num(lv, name, 0, 10000);
        else
          throw Error("hook config: isolation." + k + ": unknown key " + lk);
      }
    } else {
      throw Error("hook config: isolation: unknown key " + k);
    }
  }
  return v;
}

Config parse_config(std::string_view text, const std::string& dir) {
  if (text.size() > kMaxConfigBytes)
    throw Error("hook config: " + std::to_string(text.size()) + " bytes exceeds the limit of " +
                std::to_string(kMaxConfigBytes));
  json j;
  try {
    // Depth-bounded: nothing legitimate nests deeper than 3.
    j = json::parse(text.begin(), text.end(), [](int depth, json::parse_event_t, json&) {
      if (depth > 8) throw Error("hook config: nested too deeply");
      return true;
    });
  } catch (const json::exception& e) {
    throw Error(std::string("hook config: invalid JSON: ") + e.what());
  }
  if (!j.is_object()) throw Error("hook config: expected a JSON object");
  Config c;
  c.shim_binary = dir + "/shimlet";
  c.session_binary = dir + "/shimlet-session";
  auto str = [](const json& v, const std::string& k) {
    if (!v.is_string()) throw Error("hook config: " + k + " must be a string");
    return v.get<std::string>();
  };
  auto abs_path = [&](const json& v, const std::string& k) {
    std::string s = str(v, k);
    if (s.empty() || s[0] != '/' || s.size() > 1024 || s.find('\0') != std::string::npos)
      throw Error("hook config: " + k + " must be an absolute path");
    return s;
  };
  auto num = [](const json& v, const std::string& k, int64_t lo, int64_t hi) {
    if (!v.is_number_integer()) throw Error("hook config: " + k + " must be an integer");
    int64_t x = v.is_number_unsigned() ? (v.get<uint64_t>() > static_cast<uint64_t>(hi) ? hi + 1 : v.get<int64_t>())
                                       : v.get<int64_t>();
    if (x < lo || x > hi)
      throw Error("hook config: " + k + " must be in " + std::to_string(lo) + ".." + std::to_string(hi));
    return x;
  };
  for (auto& [k, v] : j.items()) {
    if (k == "state_dir") {
      c.state_dir = abs_path(v, k);
      while (c.state_dir.size() > 1 && c.state_dir.back() == '/') c.state_dir.pop_back();
    } else if (k == "shim_binary") {
      c.shim_binary = abs_path(v, k);
    } else if (k == "session_binary") {
      c.session_binary = abs_path(v, k);
    } else if (k == "listen") {
      c.listen = str(v, k);
      if (c.listen.size() > 64 || c.listen.find(':') == std::string::npos)
        throw Error("hook config: listen must be HOST:PORT (e.g. 127.0.0.1:0)");
    } else if (k == "trusted_keys") {
      if (!v.is_array() || v.size() > 64) throw Error("hook config: trusted_keys must be an array (at most 64)");
      for (const auto& e : v) {
        KeyRef r;
        if (e.is_string()) {
          r.path = abs_path(e, "trusted_keys[]");
          std::string base = r.path.substr(r.path.rfind('/') + 1);
          auto dot = base.rfind('.');
          r.kid = dot == std::string::npos || dot == 0 ? base : base.substr(0, dot);
        } else if (e.is_object()) {
          for (auto& [ek, ev] : e.items()) {
            if (ek == "kid")
              r.kid = str(ev, "trusted_keys[].kid");
            else if (ek == "path")
              r.path = abs_path(ev, "trusted_keys[].path");
            else
              throw Error("hook config: trusted_keys[]: unknown key " + ek);
          }
          if (r.path.empty()) throw Error("hook config: trusted_keys[] needs a path");
        } else {
          throw Error("hook config: trusted_keys[] must be a path or {\"kid\",\"path\"}");
        }
        if (r.kid.empty() || r.kid.size() > 128 || r.kid == "local")
          throw Error("hook config: trusted key id must be 1..128 chars and not \"local\": " + r.kid);
        c.trusted_keys.push_back(std::move(r));
      }
    } else if (k == "master") {
      c.master = parse_master(v, str, abs_path, num);
    } else if (k == "isolation") {
      c.isolation = parse_isolation(v);
    } else if (k == "fail_container_on_error") {
      if (!v.is_boolean()) throw Error("hook config: fail_container_on_error must be a boolean");
      c.fail_container_on_error = v.get<bool>();
    } else if (k == "ready_timeout_ms") {
      c.ready_timeout_ms = static_cast<int>(num(v, k, 1, 60000));
    } else if (k == "max_ticket_lifetime_s") {
      c.max_ticket_lifetime_s = num(v, k, 1, 86400);
    } else if (k == "clock_leeway_s") {
      c.clock_leeway_s = num(v, k, 0, 3600);
    } else if (k == "drain_timeout_ms") {
      c.drain_timeout_ms = static_cast<int>(num(v, k, 0, 600000));
    } else if (k == "max_sessions") {
      c.max_sessions = static_cast<int>(num(v, k, 1, 65536));
    } else if (k == "max_local_sessions") {
      c.max_local_sessions = static_cast<int>(num(v, k, 1, 65536));
    } else if (k == "preauth_timeout_ms") {
      c.preauth_timeout_ms = static_cast<int>(num(v, k, 100, 60000));
    } else if (k == "preauth_max_connections") {
      c.preauth_max_connections = static_cast<int>(num(v, k, 1, 65536));
    } else if (k == "preauth_max_per_source") {
      c.preauth_max_per_source = static_cast<int>(num(v, k, 1, 65536));
    } else if (k == "preauth_max_memory") {
      c.preauth_max_memory = num(v, k, 1 << 20, int64_t{1} << 34);
    } else if (k == "warm_idle_s") {
      c.warm_idle_s = static_cast<int>(num(v, k, 0, 3600));
    } else {
      throw Error("hook config: unknown key " + k);
    }
  }
  return c;
}

Config load_config(const std::string& path, const std::string& dir) {
  return parse_config(read_file(path, kMaxConfigBytes), dir);
}

json registration_json(const oci::State& st, const Started& s) {
  Names n = s.names.pod.empty() ? names_from(st.id, st.annotations) : s.names;
  return json{{"id", st.id},
              {"pid", st.pid},
              {"pid_start_time", s.pid_start_time},
              {"bundle", st.bundle},
              {"runtime_root", ""},
              {"namespace", n.ns},
              {"pod", n.pod},
              {"container", n.container},
              {"endpoint", s.endpoint},
              {"pin", s.pin},
              {"local_socket", s.local_socket},
              {"shim_pid", s.shim_pid},
              {"shim_start_time", s.shim_start_time},
              {"created", s.created},
              {"annotations", st.annotations}};
}

json shim_json(const Config& c, const oci::State& st, const std::string& dir,
               const std::vector<std::pair<std::string, std::string>>& trusted, const std::optional<Names>& names) {
  json keys = json::array();
  for (const auto& [kid, pem] : trusted) keys.push_back({{"kid", kid}, {"pem", pem}});
  json j{{"id", st.id},
         {"pid", st.pid},
         {"bundle", st.bundle},
         {"listen", c.listen},
         {"trusted_keys", keys},
         {"max_ticket_lifetime_s", c.max_ticket_lifetime_s},
         {"clock_leeway_s", c.clock_leeway_s},
         {"drain_timeout_ms", c.drain_timeout_ms},
         {"max_sessions", c.max_sessions},
         {"preauth_timeout_ms", c.preauth_timeout_ms},
         {"preauth_max_connections", c.preauth_max_connections},
         {"preauth_max_per_source", c.preauth_max_per_source},
         {"preauth_max_memory", c.preauth_max_memory},
         {"tls_cert", dir + "/tls.crt"},
         {"tls_key", dir + "/tls.key"},
         {"session_binary", c.session_binary},
         {"isolation", [&] {
            json iso = c.isolation;
            iso["selinux_lock_dir"] = c.state_dir + "/selinux";
            return iso;
          }()}};
  // Container ids are unique per node only: the session refuses a ticket
  // whose `node` claim names another node.
  if (c.master) {
    j["node"] = c.master->node;
    // Session end records for the master (docs/design.md "Session end records").
    j["ends_dir"] = dir + "/ends";
  }
  // The Kubernetes front door refuses requests naming another pod/container.
  Names n = names ? *names : names_from(st.id, st.annotations);
  j["namespace"] = n.ns;
  j["pod"] = n.pod;
  j["container"] = n.container;
  return j;
}

void write_file_atomic(const std::string& path, std::string_view content, mode_t mode) {
  std::string tmp = dirname_of(path) + "/." + path.substr(path.rfind('/') + 1) + ".XXXXXX";
  Fd fd(::mkostemp(tmp.data(), O_CLOEXEC));
  if (!fd) throw sys_error("create temp file for " + path);
  try {
    if (::fchmod(fd.get(), mode) < 0) throw sys_error("fchmod " + tmp);
    write_all(fd.get(), content.data(), content.size());
    if (::fsync(fd.get()) < 0) throw sys_error("fsync " + tmp);
    if (::rename(tmp.c_str(), path.c_str()) < 0) throw sys_error("rename " + tmp + " -> " + path);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
}

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
  if (c.master) {
    // Lease renewal (docs/design.md "Master registration"): the TLS-free shim
    // runs `shimlet-hook --config CFG renew ID` every renew_interval_s.
    if (c.config_path.empty()) throw Error("master registration needs the hook's --config path");
    args.insert(args.end(), {"--renew-every", std::to_string(c.master->renew_interval_s)});
  }
  s.shim_pid = spawn_shim(shim_bin, args, log_fd.get(), ready.write.get());
  ready.write.reset();
  guard.shim_pidfd = Fd(pidfd_open_(s.shim_pid));
  if (guard.shim_pidfd) g_shim_pidfd = guard.shim_pidfd.get();
  unsigned port = wait_ready(ready.read.get(), c.ready_timeout_ms, log_path);
  if (!guard.shim_pidfd) throw sys_error("pidfd_open shim pid " + std::to_string(s.shim_pid));
  s.shim_start_time = proc_start_time(s.shim_pid);

  std::string host = c.listen.substr(0, c.listen.rfind(':'));
  s.endpoint = host + ":" + std::to_string(port);
  s.local_socket = dir + "/shim.sock";
  s.created = now_rfc3339();
  write_file_atomic(dir + "/registration.json", registration_json(st, s).dump(1) + "\n", 0600);
  guard.committed = true;
  g_shim_pidfd = -1;
  return s;
}

void cleanup(const Config& c, const std::string& id) {
  if (!valid_container_id(id)) throw Error("refusing container id (want [A-Za-z0-9_.-]{1,128}): " + id);
  const std::string dir = c.state_dir + "/" + id;
  struct stat sb {};
  if (::lstat(dir.c_str(), &sb) < 0) {
    if (errno == ENOENT) return;  // nothing started, or cleaned up already
    throw sys_error("lstat " + dir);
  }
  if (!S_ISDIR(sb.st_mode)) throw Error(dir + ": not a directory (refusing to touch it)");
  // One cleanup at a time (the runtime's poststop and the shim's own, after
  // its container's exit, can overlap): a lock on the directory itself. One
  // that waited finds it gone, and there is nothing left to do.
  Fd lock(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!lock) {
    if (errno == ENOENT) return;
    throw sys_error("open " + dir);
  }
  while (::flock(lock.get(), LOCK_EX) < 0)
    if (errno != EINTR) throw sys_error("flock " + dir);
  struct stat locked {
  }, now{};
  if (::fstat(lock.get(), &locked) < 0) throw sys_error("fstat " + dir);
  if (::lstat(dir.c_str(), &now) < 0 || now.st_ino != locked.st_ino || now.st_dev != locked.st_dev) return;
  std::string first_error;
  try {
    json reg = json::parse(read_file(dir + "/registration.json", kMaxRegistrationBytes));
    pid_t pid = reg.value("shim_pid", 0);
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
      FlushResult f = flush_session_ends(c, id, masterclient::spool::kMaxPending, kPoststopFlushMs);
      if (f.kept)
        log::warn("session end records not delivered to the master (lost with the state directory)",
                  {{"kept", f.kept}, {"posted", f.posted}, {"error", f.error}});
    } catch (const std::exception& e) {
      log::warn("session end records not delivered to the master", {{"error", e.what()}});
    }
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  if (ec) throw Error("remove " + dir + ": " + ec.message());
  if (!first_error.empty()) throw Error("registration of " + id + ": " + first_error);
}

void poststop(const Config& c, const std::string& id) {
  bool registered = c.master && valid_container_id(id) &&
                    ::access((c.state_dir + "/" + id + "/registration.json").c_str(), F_OK) == 0;
  std::string err;
  try {
    cleanup(c, id);  // first: the shim (and its renewer) must be gone before the DELETE
  } catch (const std::exception& e) {
    err = e.what();
  }
  if (registered) {
    try {
      unregister_container(c, id);
    } catch (const std::exception& e) {
      err += (err.empty() ? "" : "; ") + std::string(e.what());
    }
  }
  if (!err.empty()) throw Error(err);
}

json register_container(const Config& c, const std::string& id) {
  if (!c.master) throw Error("no master in the hook config");
  if (!valid_container_id(id)) throw Error("refusing container id (want [A-Za-z0-9_.-]{1,128}): " + id);
  json reg = json::parse(read_file(c.state_dir + "/" + id + "/registration.json", kMaxRegistrationBytes));
  reg["node"] = c.master->node;
  masterclient::Response r =
      masterclient::request(master_target(*c.master), "PUT", node_path(*c.master, id), reg.dump());
  if (r.status != 200 && r.status != 201)
    throw Error("master registration of " + id + " refused (HTTP " + std::to_string(r.status) +
                "): " + masterclient::error_message(r));
  json lease = json::parse(r.body, nullptr, false);
  return lease.is_object() ? lease : json::object();
}

void unregister_container(const Config& c, const std::string& id) {
  if (!c.master) throw Error("no master in the hook config");
  if (!valid_container_id(id)) throw Error("refusing container id (want [A-Za-z0-9_.-]{1,128}): " + id);
  masterclient::Response r = masterclient::request(master_target(*c.master), "DELETE", node_path(*c.master, id), "");
  if (r.status != 200 && r.status != 404)
    throw Error("master unregistration of " + id + " refused (HTTP " + std::to_string(r.status) +
                "): " + masterclient::error_message(r));
}

int renew(const Config& c, const std::string& id) {
  try {
    if (!valid_container_id(id)) throw Error("refusing container id (want [A-Za-z0-9_.-]{1,128}): " + id);
    if (::access((c.state_dir + "/" + id + "/registration.json").c_str(), F_OK) != 0) {
      log::info("no registration (container stopping?): not renewing");
      return 0;
    }
    register_container(c, id);
  } catch (const std::exception& e) {
    // Only logged: the next renewal retries, and the lease covers a few misses.
    log::error("lease renewal failed", {{"error", e.what()}});
    return 1;
  }
  // Within the renewer's deadline (alarm: timeout_ms + 5 s from its start),
  // keeping a second for the exit.
  int64_t started = g_start_ms ? g_start_ms : monotonic_ms();
  int budget = c.master->timeout_ms + 4000 - static_cast<int>(monotonic_ms() - started);
  FlushResult f;
  try {
    f = flush_session_ends(c, id, kEndsPerRenewal, budget);
  } catch (const std::exception& e) {
    f.error = e.what();
  }
  if (!f.error.empty()) {
    log::error("posting session end records failed (kept for the next renewal)",
               {{"error", f.error}, {"posted", f.posted}, {"kept", f.kept}});
    return 1;
  }
  return 0;
}

FlushResult flush_session_ends(const Config& c, const std::string& id, size_t max, int budget_ms) {
  FlushResult res;
  if (!c.master) return res;
  if (!valid_container_id(id)) throw Error("refusing container id (want [A-Za-z0-9_.-]{1,128}): " + id);
  const int64_t deadline = monotonic_ms() + budget_ms;
  const std::string dir = c.state_dir + "/" + id;
  // Sessions killed before their end record: their provisional one, with
  // the time we noticed as the end (docs/design.md "Session end records").
  // A failure here must not hold back the records already pending.
  const std::string noticed = now_rfc3339();
  try {
    masterclient::spool::Promoted pr =
        masterclient::spool::promote_orphans(dir + "/ends", [&](json& r) { r["end"] = noticed; });
    if (pr.promoted)
      log::warn("sessions ended without an end record (killed): sending their provisional records",
                {{"sessions", pr.promoted}});
  } catch (const std::exception& e) {
    log::error("cannot check for killed sessions' provisional records", {{"error", e.what()}});
  }
  std::vector<masterclient::spool::Pending> pending = masterclient::spool::list(dir + "/ends", max);
  if (pending.empty()) return res;
  // Names the session cannot know: from the registration (as the master has them).
  json names = json::object();
  try {
    json reg = json::parse(read_file(dir + "/registration.json", kMaxRegistrationBytes));
    for (const char* k : {"namespace", "pod", "container"})
      if (reg.contains(k) && reg[k].is_string()) names[k] = reg[k];
  } catch (const std::exception&) {
    // Posted without names; the container id is in the record.
  }
  masterclient::Target t;
  try {
    t = master_target(*c.master);
  } catch (const std::exception& e) {
    res.error = e.what();
    res.kept = pending.size();
    return res;
  }
  for (size_t i = 0; i < pending.size(); i++) {
    auto& p = pending[i];
    if (p.record.is_discarded()) {
      // Never deliverable: it would block the outbox forever.
      log::error("dropping an unreadable session end record", {{"path", p.path}});
      ::unlink(p.path.c_str());
      res.dropped++;
      continue;
    }
    int64_t left = deadline - monotonic_ms();
    if (left < 100) {
      res.kept += pending.size() - i;
      if (res.error.empty()) res.error = "deadline reached";
      break;
    }
    t.timeout_ms = static_cast<int>(std::min<int64_t>(c.master->timeout_ms, left));
    std::string sid = p.record.value("session_id", std::string());
    if (!masterclient::spool::valid_sid(sid)) sid = p.sid;
    json body = p.record;
    for (auto& [k, v] : names.items())
      if (!body.contains(k)) body[k] = v;
    std::string path = "/apis/shimlet.io/v1/nodes/" + masterclient::path_segment(c.master->node) + "/sessions/" +
                       masterclient::path_segment(sid);
    try {
      masterclient::Response r = masterclient::request(t, "POST", path, body.dump());
      if (r.status >= 200 && r.status < 300) {
        ::unlink(p.path.c_str());
        res.posted++;
        continue;
      }
      if (r.status == 400 || r.status == 413) {
        log::error("the master refused a session end record as malformed: dropped",
                   {{"session_id", sid}, {"status", r.status}, {"error", masterclient::error_message(r)}});
        ::unlink(p.path.c_str());
        res.dropped++;
        continue;
      }
      res.error = "POST " + path + ": HTTP " + std::to_string(r.status) + ": " + masterclient::error_message(r);
    } catch (const std::exception& e) {
      res.error = e.what();
    }
    // The master is down or refuses us: the rest waits for the next try.
    res.kept += pending.size() - i;
    break;
  }
  if (res.posted || res.dropped)
    log::info("session end records flushed", {{"posted", res.posted}, {"dropped", res.dropped}});
  return res;
}

int main(int argc, char** argv) {
  g_start_ms = monotonic_ms();
  log::set_component("hook");
  // The runtime waits for us: whatever happens, exit within a bound.
  signal(SIGALRM, on_deadline);
  alarm(30);
  signal(SIGPIPE, SIG_IGN);

  std::string config_path, stage_arg, renew_id;
  for (int i = 1; i < argc; i++) {
    std::string_view a = argv[i];
    if (a == "--config" && i + 1 < argc) {
      config_path = argv[++i];
    } else if (a == "--help" || a == "-h") {
      fprintf(stdout,
              "usage: shimlet-hook --config PATH [createRuntime|createContainer|prestart|poststop]\n"
              "       shimlet-hook --config PATH renew CONTAINER_ID\n"
              "       shimlet-hook --config PATH cleanup CONTAINER_ID\n");
      return 0;
    } else if (stage_arg.empty() && a.substr(0, 1) != "-") {
      stage_arg = a;
    } else if ((stage_arg == "renew" || stage_arg == "cleanup") && renew_id.empty() && a.substr(0, 1) != "-") {
      renew_id = a;
    } else {
      log::error("shimlet-hook: unexpected argument", {{"arg", a}});
      return 2;
    }
  }

  Config cfg;
  try {
    cfg = config_path.empty() ? parse_config("{}", self_dir()) : load_config(config_path, self_dir());
  } catch (const std::exception& e) {
    // Without a config we cannot know whether to fail the container: the
    // contract's default (fail_container_on_error false) applies.
    log::error("shimlet-hook: cannot load config", {{"config", config_path}, {"error", e.what()}});
    return 0;
  }
  if (!config_path.empty()) {
    char buf[PATH_MAX];
    cfg.config_path = ::realpath(config_path.c_str(), buf) ? buf : config_path;
  }
  const unsigned master_s = cfg.master ? static_cast<unsigned>(cfg.master->timeout_ms / 1000 + 1) : 0;
  if (stage_arg == "renew") {
    log::set_component("hook-renew");
    log::set_context({{"id", renew_id}});
    alarm(master_s + 5);
    if (!cfg.master) {
      log::error("shimlet-hook renew: no master in the hook config", {{"config", config_path}});
      return 2;
    }
    return renew(cfg, renew_id);
  }
  if (stage_arg == "cleanup") {
    // Run by the shim when its container is gone (docs/design.md "Stale
    // state"): what poststop does, for a runtime that never calls it.
    log::set_component("hook-cleanup");
    log::set_context({{"id", renew_id}});
    alarm(kPoststopFlushMs / 1000 + 10 + master_s);
    try {
      poststop(cfg, renew_id);
      log::info("container gone: state cleaned up");
      return 0;
    } catch (const std::exception& e) {
      log::error("cleanup after the container failed", {{"error", e.what()}});
      if (::access(cfg.state_dir.c_str(), F_OK) == 0)
        append_hook_log(cfg.state_dir, json{{"ts", now_rfc3339()},
                                            {"component", "hook"},
                                            {"level", "error"},
                                            {"stage", "cleanup"},
                                            {"id", renew_id},
                                            {"error", e.what()}});
      return 1;
    }
  }
  g_fail_exit = cfg.fail_container_on_error ? 1 : 0;
  alarm(static_cast<unsigned>(kStdinTimeoutMs / 1000 + cfg.ready_timeout_ms / 1000 + 10) + master_s);
  const int fail_code = cfg.fail_container_on_error ? 1 : 0;

  std::string stage_name = stage_arg;
  std::string id;
  try {
    oci::State st = oci::parse_state(read_stdin_bounded(kStdinTimeoutMs));
    id = st.id;
    log::set_context({{"id", st.id}});
    std::optional<Stage> stage = stage_arg.empty() ? stage_from_status(st.status) : stage_from_name(stage_arg);
    if (!stage)
      throw Error(stage_arg.empty() ? "cannot tell the hook stage from state status \"" + st.status + "\""
                                    : "unknown hook stage " + stage_arg);
    if (stage_name.empty()) stage_name = st.status;
    if (*stage == Stage::Start) {
      Started s = start(cfg, st);
      log::info("shim started", {{"endpoint", s.endpoint}, {"shim_pid", s.shim_pid}});
      if (cfg.master) {
        try {
          json lease = register_container(cfg, st.id);
          int64_t every = lease.value("renewIntervalSeconds", int64_t{0});
          if (every > 0 && cfg.master->renew_interval_s > every)
            log::warn("master.renew_interval_s is longer than the master's renewIntervalSeconds: the lease may lapse",
                      {{"renew_interval_s", cfg.master->renew_interval_s}, {"master_renew_interval_s", every}});
        } catch (const std::exception& e) {
          // The shim's renewer registers it at its next tick; only a config
          // that insists fails the container (and then we undo the start).
          if (cfg.fail_container_on_error) {
            try {
              cleanup(cfg, st.id);
            } catch (const std::exception&) {
            }
          }
          throw;
        }
      }
    } else {
      poststop(cfg, st.id);
    }
    return 0;
  } catch (const std::exception& e) {
    json line = {{"ts", now_rfc3339()}, {"component", "hook"}, {"level", "error"}, {"stage", stage_name}, {"id", id},
                 {"error", e.what()}};
    log::error("shimlet-hook failed", {{"stage", stage_name}, {"error", e.what()}});
    if (::access(cfg.state_dir.c_str(), F_OK) == 0) append_hook_log(cfg.state_dir, line);
    return fail_code;
  }
}

}  // namespace shimlet::hook
