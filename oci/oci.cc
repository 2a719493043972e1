#include "oci/oci.h"

#include <fcntl.h>
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "common/error.h"
#include "common/fd.h"

namespace shimlet::oci {
namespace {

using nlohmann::json;

constexpr size_t kMaxConfigBytes = 4 << 20;  // config.json
constexpr size_t kMaxStateBytes = 1 << 20;   // hook stdin
constexpr int kMaxDepth = 64;                // real configs nest < 10 deep

// Parses with a nesting bound (the parser itself is iterative, but deep
// documents still cost memory and are never legitimate here).
json parse_bounded(std::string_view text, size_t max_bytes, const char* what) {
  if (text.size() > max_bytes)
    throw Error(std::string(what) + ": " + std::to_string(text.size()) + " bytes exceeds the limit of " +
                std::to_string(max_bytes));
  json::parser_callback_t depth_check = [](int depth, json::parse_event_t, json&) {
    if (depth > kMaxDepth) throw Error("nested deeper than " + std::to_string(kMaxDepth) + " levels");
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), depth_check);
  } catch (const json::exception& e) {
    throw Error(std::string(what) + ": invalid JSON: " + e.what());
  } catch (const Error& e) {
    throw Error(std::string(what) + ": " + e.what());
  }
}

// A cursor into the document that knows its JSON path for error messages.
class Node {
 public:
  Node(const json& j, std::string path) : j_(j), path_(std::move(path)) {}

  [[noreturn]] void fail(const std::string& why) const { throw Error(path_ + ": " + why); }

  const json& raw() const { return j_; }
  const std::string& path() const { return path_; }

  bool is_null() const { return j_.is_null(); }
  void expect_object() const {
    if (!j_.is_object()) fail("expected an object, got " + std::string(j_.type_name()));
  }
  void expect_array() const {
    if (!j_.is_array()) fail("expected an array, got " + std::string(j_.type_name()));
  }

  // Optional member of an object (absent and null are the same).
  std::optional<Node> get(const char* key) const {
    expect_object();
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return std::nullopt;
    return Node(*it, path_ + "." + key);
  }
  Node need(const char* key) const {
    auto n = get(key);
    if (!n) fail(std::string("missing required field \"") + key + "\"");
    return *n;
  }

  std::vector<Node> items() const {
    expect_array();
    std::vector<Node> out;
    out.reserve(j_.size());
    for (size_t i = 0; i < j_.size(); i++) out.emplace_back(j_[i], path_ + "[" + std::to_string(i) + "]");
    return out;
  }

  std::string str() const {
    if (!j_.is_string()) fail("expected a string, got " + std::string(j_.type_name()));
    const auto& s = j_.get_ref<const std::string&>();
    // Strings end up in argv/env/paths: an embedded NUL would silently truncate.
    if (s.find('\0') != std::string::npos) fail("string contains a NUL byte");
    return s;
  }
  bool boolean() const {
    if (!j_.is_boolean()) fail("expected a boolean, got " + std::string(j_.type_name()));
    return j_.get<bool>();
  }
  uint64_t u64(uint64_t max = std::numeric_limits<uint64_t>::max()) const {
    if (!j_.is_number_unsigned()) fail("expected a non-negative integer, got " + describe_number());
    uint64_t v = j_.get<uint64_t>();
    if (v > max) fail("value " + std::to_string(v) + " exceeds the maximum " + std::to_string(max));
    return v;
  }
  uint32_t u32() const { return static_cast<uint32_t>(u64(std::numeric_limits<uint32_t>::max())); }
  int64_t i64(int64_t min, int64_t max) const {
    if (!j_.is_number_integer()) fail("expected an integer, got " + describe_number());
    int64_t v;
    if (j_.is_number_unsigned()) {
      uint64_t u = j_.get<uint64_t>();
      if (u > static_cast<uint64_t>(max)) fail("value " + std::to_string(u) + " out of range");
      v = static_cast<int64_t>(u);
    } else {
      v = j_.get<int64_t>();
    }
    if (v < min || v > max) fail("value " + std::to_string(v) + " out of range");
    return v;
  }

  std::vector<std::string> strings() const {
    std::vector<std::string> out;
    for (const auto& n : items()) out.push_back(n.str());
    return out;
  }
  std::map<std::string, std::string> string_map() const {
    expect_object();
    std::map<std::string, std::string> out;
    for (const auto& [k, v] : j_.items()) {
      if (k.find('\0') != std::string::npos) fail("key contains a NUL byte");
      out.emplace(k, Node(v, path_ + "[" + json(k).dump(-1, ' ', true, json::error_handler_t::replace) + "]").str());
    }
    return out;
  }

 private:
  std::string describe_number() const {
    if (j_.is_number_float()) return "a fractional number";
    if (j_.is_number_integer()) return "a negative integer";
    return std::string(j_.type_name());
  }
  const json& j_;
  std::string path_;
};

std::vector<uint32_t> u32s(const Node& n) {
  std::vector<uint32_t> out;
  for (const auto& i : n.items()) out.push_back(i.u32());
  return out;
}

constexpr std::array<std::string_view, 8> kSeccompActions = {
    "SCMP_ACT_KILL",  "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE",        "SCMP_ACT_ALLOW",       "SCMP_ACT_LOG"};
constexpr std::array<std::string_view, 7> kSeccompOps = {
    "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ"};

template <size_t N>
std::string one_of(const Node& n, const std::array<std::string_view, N>& allowed) {
  std::string s = n.str();
  for (auto a : allowed)
    if (s == a) return s;
  // The value is untrusted: name it only when it is short and printable.
  bool printable = s.size() <= 64;
  for (unsigned char c : s) printable = printable && c >= 0x20 && c < 0x7f;
  n.fail("unsupported value" + (printable ? " \"" + s + "\"" : std::string()));
}

Seccomp parse_seccomp(const Node& n) {
  Seccomp s;
  s.default_action = one_of(n.need("defaultAction"), kSeccompActions);
  if (auto e = n.get("defaultErrnoRet")) s.default_errno_ret = static_cast<unsigned>(e->u64(4095));
  if (auto a = n.get("architectures")) s.architectures = a->strings();
  if (auto f = n.get("flags")) s.flags = f->strings();
  if (auto l = n.get("listenerPath"); l && !l->str().empty())
    l->fail("seccomp user notification (listenerPath) is not supported");
  if (auto calls = n.get("syscalls")) {
    for (const auto& c : calls->items()) {
      SeccompRule r;
      r.names = c.need("names").strings();
      r.action = one_of(c.need("action"), kSeccompActions);
      if (auto e = c.get("errnoRet")) r.errno_ret = static_cast<unsigned>(e->u64(4095));
      if (auto args = c.get("args")) {
        for (const auto& a : args->items()) {
          SeccompArg sa;
          sa.index = static_cast<unsigned>(a.need("index").u64(5));
          sa.value = a.get("value") ? a.get("value")->u64() : 0;
          sa.value_two = a.get("valueTwo") ? a.get("valueTwo")->u64() : 0;
          sa.op = one_of(a.need("op"), kSeccompOps);
          r.args.push_back(std::move(sa));
        }
      }
      s.syscalls.push_back(std::move(r));
    }
  }
  return s;
}

Process parse_process(const Node& n) {
  Process p;
  if (auto t = n.get("terminal")) p.terminal = t->boolean();
  Node user = n.need("user");
  p.uid = user.need("uid").u32();
  p.gid = user.need("gid").u32();
  if (auto u = user.get("umask")) p.umask = static_cast<uint32_t>(u->u64(07777));
  if (auto g = user.get("additionalGids")) {
    p.additional_gids = u32s(*g);
    if (p.additional_gids.size() > 65536) g->fail("more than 65536 groups (NGROUPS_MAX)");
  }
  if (auto a = n.get("args")) p.args = a->strings();
  if (auto e = n.get("env")) p.env = e->strings();
  if (auto c = n.get("cwd")) {
    p.cwd = c->str();
    if (p.cwd.empty() || p.cwd[0] != '/') c->fail("cwd must be an absolute path");
  }
  if (auto caps = n.get("capabilities")) {
    caps->expect_object();
    auto list = [&](const char* k, std::vector<std::string>& out) {
      if (auto l = caps->get(k)) out = l->strings();
    };
    list("bounding", p.caps.bounding);
    list("effective", p.caps.effective);
    list("inheritable", p.caps.inheritable);
    list("permitted", p.caps.permitted);
    list("ambient", p.caps.ambient);
  }
  if (auto rl = n.get("rlimits")) {
    for (const auto& r : rl->items()) {
      Node type = r.need("type");
      auto res = rlimit_from_name(type.str());
      if (!res) type.fail("unknown rlimit type");
      Rlimit lim{*res, r.need("soft").u64(), r.need("hard").u64()};
      if (lim.soft > lim.hard) r.fail("soft limit exceeds hard limit");
      p.rlimits.push_back(lim);
    }
  }
  if (auto v = n.get("noNewPrivileges")) p.no_new_privileges = v->boolean();
  if (auto v = n.get("oomScoreAdj")) p.oom_score_adj = static_cast<int>(v->i64(-1000, 1000));
  if (auto v = n.get("apparmorProfile")) p.apparmor_profile = v->str();
  if (auto v = n.get("selinuxLabel")) p.selinux_label = v->str();
  return p;
}

std::vector<IdMapping> parse_mappings(const Node& n) {
  std::vector<IdMapping> out;
  for (const auto& m : n.items()) {
    IdMapping im{m.need("containerID").u32(), m.need("hostID").u32(), m.need("size").u32()};
    if (im.size == 0) m.fail("size must be positive");
    out.push_back(im);
  }
  return out;
}

constexpr std::array<std::string_view, 8> kNamespaceTypes = {"pid", "network", "mount",  "ipc",
                                                             "uts", "user",    "cgroup", "time"};

}  // namespace

State parse_state(std::string_view text) {
  json j = parse_bounded(text, kMaxStateBytes, "OCI state");
  Node root(j, "$");
  root.expect_object();
  State s;
  if (auto v = root.get("ociVersion")) s.oci_version = v->str();
  s.id = root.need("id").str();
  if (s.id.empty()) root.need("id").fail("must not be empty");
  s.status = root.need("status").str();
  if (auto v = root.get("pid")) {
    int64_t pid = v->i64(0, std::numeric_limits<pid_t>::max());
    s.pid = static_cast<pid_t>(pid);
  }
  s.bundle = root.need("bundle").str();
  if (s.bundle.empty() || s.bundle[0] != '/') root.need("bundle").fail("must be an absolute path");
  if (auto a = root.get("annotations")) s.annotations = a->string_map();
  return s;
}

Config parse_config(std::string_view text) {
  json j = parse_bounded(text, kMaxConfigBytes, "config.json");
  Node root(j, "$");
  root.expect_object();
  Config c;
  if (auto v = root.get("ociVersion")) c.oci_version = v->str();
  if (auto p = root.get("process")) {
    p->expect_object();
    c.process = parse_process(*p);
  }
  if (auto r = root.get("root")) {
    c.root_path = r->need("path").str();
    if (auto ro = r->get("readonly")) c.root_readonly = ro->boolean();
  }
  if (auto h = root.get("hostname")) c.hostname = h->str();
  if (auto a = root.get("annotations")) c.annotations = a->string_map();
  if (auto lx = root.get("linux")) {
    lx->expect_object();
    if (auto ns = lx->get("namespaces")) {
      for (const auto& n : ns->items()) {
        Namespace x;
        x.type = one_of(n.need("type"), kNamespaceTypes);
        if (auto p = n.get("path")) x.path = p->str();
        c.namespaces.push_back(std::move(x));
      }
    }
    if (auto m = lx->get("uidMappings")) c.uid_mappings = parse_mappings(*m);
    if (auto m = lx->get("gidMappings")) c.gid_mappings = parse_mappings(*m);
    if (auto s = lx->get("seccomp")) {
      s->expect_object();
      c.seccomp = parse_seccomp(*s);
    }
    if (auto m = lx->get("mountLabel")) c.mount_label = m->str();
    if (auto cp = lx->get("cgroupsPath")) c.cgroups_path = cp->str();
  }
  return c;
}

Config load_config(const std::string& bundle) {
  std::string path = bundle + "/config.json";
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK));
  if (!fd) throw sys_error("open " + path);
  struct stat st;
  if (::fstat(fd.get(), &st) < 0) throw sys_error("fstat " + path);
  if (!S_ISREG(st.st_mode)) throw Error(path + ": not a regular file");
  if (static_cast<uint64_t>(st.st_size) > kMaxConfigBytes)
    throw Error(path + ": " + std::to_string(st.st_size) + " bytes exceeds the limit of " +
                std::to_string(kMaxConfigBytes));
  // Read up to the size seen + 1 (within the bound) so a file growing under us
  // is still caught; sized from fstat to avoid zeroing 4 MiB per session.
  std::string buf(std::min<size_t>(static_cast<size_t>(st.st_size), kMaxConfigBytes) + 1, '\0');
  size_t got = 0;
  while (got < buf.size()) {
    ssize_t n = ::read(fd.get(), buf.data() + got, buf.size() - got);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw sys_error("read " + path);
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  buf.resize(got);
  try {
    return parse_config(buf);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
}

std::optional<int> capability_from_name(std::string_view name) {
  static constexpr std::pair<std::string_view, int> kCaps[] = {
      {"CAP_CHOWN", 0},
      {"CAP_DAC_OVERRIDE", 1},
      {"CAP_DAC_READ_SEARCH", 2},
      {"CAP_FOWNER", 3},
      {"CAP_FSETID", 4},
      {"CAP_KILL", 5},
      {"CAP_SETGID", 6},
      {"CAP_SETUID", 7},
      {"CAP_SETPCAP", 8},
      {"CAP_LINUX_IMMUTABLE", 9},
      {"CAP_NET_BIND_SERVICE", 10},
      {"CAP_NET_BROADCAST", 11},
      {"CAP_NET_ADMIN", 12},
      {"CAP_NET_RAW", 13},
      {"CAP_IPC_LOCK", 14},
      {"CAP_IPC_OWNER", 15},
      {"CAP_SYS_MODULE", 16},
      {"CAP_SYS_RAWIO", 17},
      {"CAP_SYS_CHROOT", 18},
      {"CAP_SYS_PTRACE", 19},
      {"CAP_SYS_PACCT", 20},
      {"CAP_SYS_ADMIN", 21},
      {"CAP_SYS_BOOT", 22},
      {"CAP_SYS_NICE", 23},
      {"CAP_SYS_RESOURCE", 24},
      {"CAP_SYS_TIME", 25},
      {"CAP_SYS_TTY_CONFIG", 26},
      {"CAP_MKNOD", 27},
      {"CAP_LEASE", 28},
      {"CAP_AUDIT_WRITE", 29},
      {"CAP_AUDIT_CONTROL", 30},
      {"CAP_SETFCAP", 31},
      {"CAP_MAC_OVERRIDE", 32},
      {"CAP_MAC_ADMIN", 33},
      {"CAP_SYSLOG", 34},
      {"CAP_WAKE_ALARM", 35},
      {"CAP_BLOCK_SUSPEND", 36},
      {"CAP_AUDIT_READ", 37},
      {"CAP_PERFMON", 38},
      {"CAP_BPF", 39},
      {"CAP_CHECKPOINT_RESTORE", 40},
  };
  for (const auto& [n, v] : kCaps)
    if (n == name) return v;
  return std::nullopt;
}

std::optional<int> rlimit_from_name(std::string_view name) {
  static constexpr std::pair<std::string_view, int> kLimits[] = {
      {"RLIMIT_CPU", RLIMIT_CPU},           {"RLIMIT_FSIZE", RLIMIT_FSIZE},
      {"RLIMIT_DATA", RLIMIT_DATA},         {"RLIMIT_STACK", RLIMIT_STACK},
      {"RLIMIT_CORE", RLIMIT_CORE},         {"RLIMIT_RSS", RLIMIT_RSS},
      {"RLIMIT_NPROC", RLIMIT_NPROC},       {"RLIMIT_NOFILE", RLIMIT_NOFILE},
      {"RLIMIT_MEMLOCK", RLIMIT_MEMLOCK},   {"RLIMIT_AS", RLIMIT_AS},
      {"RLIMIT_LOCKS", RLIMIT_LOCKS},       {"RLIMIT_SIGPENDING", RLIMIT_SIGPENDING},
      {"RLIMIT_MSGQUEUE", RLIMIT_MSGQUEUE}, {"RLIMIT_NICE", RLIMIT_NICE},
      {"RLIMIT_RTPRIO", RLIMIT_RTPRIO},     {"RLIMIT_RTTIME", RLIMIT_RTTIME},
  };
  for (const auto& [n, v] : kLimits)
    if (n == name) return v;
  return std::nullopt;
}

}  // namespace shimlet::oci
