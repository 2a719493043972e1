#include "oci/oci.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "common/error.h"

using namespace shimlet;
using namespace shimlet::oci;

namespace {

// What `runc spec` writes, trimmed, plus the fields we read.
const char* kConfig = R"({
  "ociVersion": "1.0.2-dev",
  "process": {
    "terminal": true,
    "user": {"uid": 1000, "gid": 1001, "umask": 18, "additionalGids": [5, 2001]},
    "args": ["sh"],
    "env": ["PATH=/usr/bin:/bin", "TERM=xterm"],
    "cwd": "/home/user",
    "capabilities": {
      "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL"],
      "effective": ["CAP_KILL"],
      "permitted": ["CAP_KILL"],
      "ambient": ["CAP_KILL"]
    },
    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
    "noNewPrivileges": true,
    "oomScoreAdj": -100,
    "apparmorProfile": "prof",
    "selinuxLabel": "system_u:system_r:container_t:s0:c1,c2"
  },
  "root": {"path": "rootfs", "readonly": true},
  "hostname": "runc",
  "annotations": {"io.kubernetes.pod.name": "p"},
  "linux": {
    "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
    "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
    "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}, {"type": "user"}],
    "cgroupsPath": "/kubepods/x",
    "mountLabel": "ml",
    "seccomp": {
      "defaultAction": "SCMP_ACT_ERRNO",
      "defaultErrnoRet": 38,
      "architectures": ["SCMP_ARCH_X86_64"],
      "flags": ["SECCOMP_FILTER_FLAG_LOG"],
      "syscalls": [
        {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
      ]
    }
  }
})";

std::string with(const std::string& from, const std::string& to) {
  std::string s = kConfig;
  auto pos = s.find(from);
  EXPECT_NE(pos, std::string::npos) << from;
  return s.replace(pos, from.size(), to);
}

// Runs f and returns the Error message ("" when it did not throw Error).
template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(OciConfig, ParsesEverythingWeUse) {
  Config c = parse_config(kConfig);
  EXPECT_EQ(c.oci_version, "1.0.2-dev");
  EXPECT_TRUE(c.process.terminal);
  EXPECT_EQ(c.process.uid, 1000u);
  EXPECT_EQ(c.process.gid, 1001u);
  EXPECT_EQ(c.process.umask, 18u);
  EXPECT_EQ(c.process.additional_gids, (std::vector<uint32_t>{5, 2001}));
  EXPECT_EQ(c.process.args, std::vector<std::string>{"sh"});
  EXPECT_EQ(c.process.env.size(), 2u);
  EXPECT_EQ(c.process.cwd, "/home/user");
  EXPECT_EQ(c.process.caps.bounding, (std::vector<std::string>{"CAP_AUDIT_WRITE", "CAP_KILL"}));
  EXPECT_EQ(c.process.caps.ambient, std::vector<std::string>{"CAP_KILL"});
  EXPECT_TRUE(c.process.caps.inheritable.empty());
  ASSERT_EQ(c.process.rlimits.size(), 1u);
  EXPECT_EQ(c.process.rlimits[0].resource, RLIMIT_NOFILE);
  EXPECT_EQ(c.process.rlimits[0].soft, 512u);
  EXPECT_EQ(c.process.rlimits[0].hard, 1024u);
  EXPECT_TRUE(c.process.no_new_privileges);
  EXPECT_EQ(c.process.oom_score_adj, -100);
  EXPECT_EQ(c.process.apparmor_profile, "prof");
  EXPECT_EQ(c.process.selinux_label, "system_u:system_r:container_t:s0:c1,c2");
  EXPECT_EQ(c.root_path, "rootfs");
  EXPECT_TRUE(c.root_readonly);
  EXPECT_EQ(c.annotations.at("io.kubernetes.pod.name"), "p");
  ASSERT_EQ(c.namespaces.size(), 3u);
  EXPECT_EQ(c.namespaces[1].type, "network");
  EXPECT_EQ(c.namespaces[1].path, "/var/run/netns/x");
  ASSERT_EQ(c.uid_mappings.size(), 1u);
  EXPECT_EQ(c.uid_mappings[0].host_id, 100000u);
  EXPECT_EQ(c.gid_mappings[0].size, 65536u);
  EXPECT_EQ(c.cgroups_path, "/kubepods/x");
  EXPECT_EQ(c.mount_label, "ml");
  ASSERT_TRUE(c.seccomp);
  EXPECT_EQ(c.seccomp->default_action, "SCMP_ACT_ERRNO");
  EXPECT_EQ(c.seccomp->default_errno_ret, 38u);
  EXPECT_EQ(c.seccomp->architectures, std::vector<std::string>{"SCMP_ARCH_X86_64"});
  EXPECT_EQ(c.seccomp->flags, std::vector<std::string>{"SECCOMP_FILTER_FLAG_LOG"});
  ASSERT_EQ(c.seccomp->syscalls.size(), 3u);
  EXPECT_EQ(c.seccomp->syscalls[0].names, (std::vector<std::string>{"read", "write"}));
  ASSERT_EQ(c.seccomp->syscalls[1].args.size(), 1u);
  EXPECT_EQ(c.seccomp->syscalls[1].args[0].value, 8u);
  EXPECT_EQ(c.seccomp->syscalls[1].args[0].op, "SCMP_CMP_EQ");
  EXPECT_EQ(c.seccomp->syscalls[2].errno_ret, 1u);
}

TEST(OciConfig, MinimalDocumentHasDefaults) {
  Config c = parse_config(R"({"ociVersion":"1.0.0"})");
  EXPECT_EQ(c.process.cwd, "/");
  EXPECT_EQ(c.process.uid, 0u);
  EXPECT_FALSE(c.seccomp);
  EXPECT_FALSE(c.process.umask);
  // Unknown fields are extensions, not errors.
  EXPECT_NO_THROW(parse_config(R"({"process":{"user":{"uid":0,"gid":0},"x-vendor":{"a":[1]}},"solaris":{}})"));
}

TEST(OciConfig, ErrorsNameTheJsonPath) {
  EXPECT_EQ(error_of([] { parse_config(with("\"uid\": 1000", "\"uid\": \"1000\"")); }),
            "$.process.user.uid: expected a non-negative integer, got string");
  EXPECT_EQ(error_of([] { parse_config(with("\"uid\": 1000", "\"uid\": -1")); }),
            "$.process.user.uid: expected a non-negative integer, got a negative integer");
  EXPECT_EQ(error_of([] { parse_config(with("\"uid\": 1000", "\"uid\": 4294967296")); }),
            "$.process.user.uid: value 4294967296 exceeds the maximum 4294967295");
  EXPECT_EQ(error_of([] { parse_config(with("\"uid\": 1000", "\"uid\": 1.5")); }),
            "$.process.user.uid: expected a non-negative integer, got a fractional number");
  EXPECT_EQ(error_of([] { parse_config(with("\"args\": [\"sh\"]", "\"args\": [\"sh\", 3]")); }),
            "$.process.args[1]: expected a string, got number");
  EXPECT_EQ(error_of([] { parse_config(with("\"RLIMIT_NOFILE\"", "\"RLIMIT_BOGUS\"")); }),
            "$.process.rlimits[0].type: unknown rlimit type");
  EXPECT_EQ(error_of([] { parse_config(with("\"hard\": 1024", "\"hard\": 10")); }),
            "$.process.rlimits[0]: soft limit exceeds hard limit");
  EXPECT_EQ(error_of([] { parse_config(with("\"cwd\": \"/home/user\"", "\"cwd\": \"rel\"")); }),
            "$.process.cwd: cwd must be an absolute path");
  EXPECT_EQ(error_of([] { parse_config(with("\"op\": \"SCMP_CMP_EQ\"", "\"op\": \"SCMP_CMP_XX\"")); }),
            "$.linux.seccomp.syscalls[1].args[0].op: unsupported value \"SCMP_CMP_XX\"");
  EXPECT_EQ(error_of([] { parse_config(with("\"index\": 0", "\"index\": 6")); }),
            "$.linux.seccomp.syscalls[1].args[0].index: value 6 exceeds the maximum 5");
  EXPECT_EQ(error_of([] { parse_config(with("\"action\": \"SCMP_ACT_ALLOW\"", "\"action\": \"SCMP_ACT_NOTIFY\"")); }),
            "$.linux.seccomp.syscalls[0].action: unsupported value \"SCMP_ACT_NOTIFY\"");
  EXPECT_EQ(error_of([] { parse_config(with("\"type\": \"pid\"", "\"type\": \"pidx\"")); }),
            "$.linux.namespaces[0].type: unsupported value \"pidx\"");
  EXPECT_EQ(error_of([] { parse_config(with("\"user\": {", "\"usr\": {")); }),
            "$.process: missing required field \"user\"");
  EXPECT_EQ(error_of([] { parse_config(with("\"noNewPrivileges\": true", "\"noNewPrivileges\": 1")); }),
            "$.process.noNewPrivileges: expected a boolean, got number");
  EXPECT_EQ(error_of([] { parse_config(with("\"oomScoreAdj\": -100", "\"oomScoreAdj\": -1001")); }),
            "$.process.oomScoreAdj: value -1001 out of range");
  EXPECT_EQ(error_of([] { parse_config(with("\"size\": 65536}]", "\"size\": 0}]")); }),
            "$.linux.uidMappings[0]: size must be positive");
  EXPECT_EQ(error_of([] { parse_config(with("\"io.kubernetes.pod.name\": \"p\"", "\"k\": 1")); }),
            "$.annotations[\"k\"]: expected a string, got number");
  EXPECT_EQ(error_of([] { parse_config("[]"); }), "$: expected an object, got array");
}

TEST(OciConfig, RejectsNulBytesInStrings) {
  EXPECT_EQ(error_of([] { parse_config(with("\"sh\"", "\"s\\u0000h\"")); }),
            "$.process.args[0]: string contains a NUL byte");
}

TEST(OciConfig, RejectsMalformedAndOversizedInput) {
  EXPECT_NE(error_of([] { parse_config("{\"ociVersion\":"); }).find("config.json: invalid JSON"), std::string::npos);
  EXPECT_NE(error_of([] { parse_config("{\"a\":\"\xff\"}"); }).find("invalid JSON"), std::string::npos);
  std::string deep = std::string(100, '[') + std::string(100, ']');
  EXPECT_NE(error_of([&] { parse_config(deep); }).find("nested deeper than 64 levels"), std::string::npos);
  std::string big = "{\"x\":\"" + std::string(4 << 20, 'a') + "\"}";
  EXPECT_NE(error_of([&] { parse_config(big); }).find("exceeds the limit of 4194304"), std::string::npos);
}

TEST(OciConfig, LoadConfigReadsBundle) {
  auto dir = std::filesystem::temp_directory_path() / ("oci-test-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << kConfig;
  EXPECT_EQ(load_config(dir.string()).process.uid, 1000u);
  std::ofstream(dir / "config.json") << "{\"process\": 1}";
  std::string err = error_of([&] { load_config(dir.string()); });
  EXPECT_EQ(err, (dir / "config.json").string() + ": $.process: expected an object, got number");
  std::filesystem::remove_all(dir);
  EXPECT_THROW(load_config(dir.string()), std::system_error);
}

TEST(OciState, ParsesHookState) {
  State s = parse_state(R"({"ociVersion":"1.0.2","id":"c1","status":"creating","pid":4242,"bundle":"/b/c1",)"
                        R"("annotations":{"io.kubernetes.cri.container-name":"web"}})");
  EXPECT_EQ(s.id, "c1");
  EXPECT_EQ(s.status, "creating");
  EXPECT_EQ(s.pid, 4242);
  EXPECT_EQ(s.bundle, "/b/c1");
  EXPECT_EQ(s.annotations.at("io.kubernetes.cri.container-name"), "web");
}

TEST(OciState, RejectsBadState) {
  EXPECT_EQ(error_of([] { parse_state(R"({"status":"creating","bundle":"/b"})"); }),
            "$: missing required field \"id\"");
  EXPECT_EQ(error_of([] { parse_state(R"({"id":"c","status":"x","bundle":"rel"})"); }),
            "$.bundle: must be an absolute path");
  EXPECT_EQ(error_of([] { parse_state(R"({"id":"c","status":"x","bundle":"/b","pid":-5})"); }),
            "$.pid: value -5 out of range");
  EXPECT_EQ(error_of([] { parse_state(R"({"id":"c","status":"x","bundle":"/b","pid":99999999999})"); }),
            "$.pid: value 99999999999 out of range");
  EXPECT_EQ(error_of([] { parse_state(R"({"id":"","status":"x","bundle":"/b"})"); }), "$.id: must not be empty");
  EXPECT_NE(error_of([] { parse_state(std::string(2 << 20, ' ')); }).find("exceeds the limit"), std::string::npos);
}

TEST(OciNames, CapabilitiesAndRlimits) {
  EXPECT_EQ(capability_from_name("CAP_CHOWN"), 0);
  EXPECT_EQ(capability_from_name("CAP_NET_ADMIN"), 12);
  EXPECT_EQ(capability_from_name("CAP_SYS_ADMIN"), 21);
  EXPECT_EQ(capability_from_name("CAP_CHECKPOINT_RESTORE"), 40);
  EXPECT_FALSE(capability_from_name("CAP_BOGUS"));
  EXPECT_FALSE(capability_from_name("cap_chown"));
  EXPECT_EQ(rlimit_from_name("RLIMIT_NOFILE"), RLIMIT_NOFILE);
  EXPECT_EQ(rlimit_from_name("RLIMIT_RTTIME"), RLIMIT_RTTIME);
  EXPECT_FALSE(rlimit_from_name("RLIMIT_X"));
}
