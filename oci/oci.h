// The OCI inputs we read: the runtime state (hook stdin) and the bundle's
// config.json (process, user, caps, seccomp, rlimits, ...). Both are untrusted
// input: parse errors throw shimlet::Error with the JSON path that was wrong.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace shimlet::oci {

struct State {  // runtime-spec "State"
  std::string oci_version, id, status, bundle;
  pid_t pid = 0;
  std::map<std::string, std::string> annotations;
};
State parse_state(std::string_view json);

struct Rlimit {
  int resource;  // RLIMIT_* value
  uint64_t soft, hard;
};

struct SeccompArg {
  unsigned index;
  uint64_t value, value_two;
  std::string op;  // SCMP_CMP_NE, ...
};
struct SeccompRule {
  std::vector<std::string> names;
  std::string action;  // SCMP_ACT_ALLOW, SCMP_ACT_ERRNO, ...
  std::optional<unsigned> errno_ret;
  std::vector<SeccompArg> args;
};
struct Seccomp {
  std::string default_action;
  std::optional<unsigned> default_errno_ret;
  std::vector<std::string> architectures;  // SCMP_ARCH_X86_64, ...
  std::vector<std::string> flags;          // SECCOMP_FILTER_FLAG_*
  std::vector<SeccompRule> syscalls;
};

struct Capabilities {  // names as in the spec: "CAP_CHOWN", ...
  std::vector<std::string> bounding, effective, inheritable, permitted, ambient;
};

struct IdMapping {
  uint32_t container_id, host_id, size;
};

struct Process {
  bool terminal = false;
  uint32_t uid = 0, gid = 0;
  std::optional<uint32_t> umask;
  std::vector<uint32_t> additional_gids;
  std::vector<std::string> args, env;
  std::string cwd = "/";
  Capabilities caps;
  std::vector<Rlimit> rlimits;
  bool no_new_privileges = false;
  std::optional<int> oom_score_adj;
  std::string apparmor_profile, selinux_label;
};

struct Namespace {
  std::string type;  // pid network mount ipc uts user cgroup time
  std::string path;
};

struct Config {
  std::string oci_version;
  Process process;
  std::string root_path;
  bool root_readonly = false;
  std::string hostname;  // "" when unset
  std::map<std::string, std::string> annotations;
  std::vector<Namespace> namespaces;
  std::vector<IdMapping> uid_mappings, gid_mappings;
  std::optional<Seccomp> seccomp;
  std::string mount_label;
  std::string cgroups_path;
};
Config parse_config(std::string_view json);
// Reads BUNDLE/config.json (bounded size) and parses it.
Config load_config(const std::string& bundle);

// "CAP_NET_ADMIN" -> 12; nullopt when unknown.
std::optional<int> capability_from_name(std::string_view name);
// "RLIMIT_NOFILE" -> RLIMIT_NOFILE; nullopt when unknown.
std::optional<int> rlimit_from_name(std::string_view name);

}  // namespace shimlet::oci
