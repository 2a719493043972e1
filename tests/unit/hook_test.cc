#include "hook/hook.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/error.h"
#include "shim/shim.h"
#include "tests/unit/temp_dir.h"

using namespace shimlet;
using namespace shimlet::hook;
namespace fs = std::filesystem;

namespace {
struct TempDir : shimlet::test::TempDir {
  TempDir() : shimlet::test::TempDir("hook_test") {}
};

}  // namespace

TEST(ContainerId, AcceptsRuntimeIdsRefusesPathTricks) {
  EXPECT_TRUE(valid_container_id("abc"));
  EXPECT_TRUE(valid_container_id("shimlet-t-0123456789"));
  EXPECT_TRUE(valid_container_id(std::string(64, 'f')));
  EXPECT_TRUE(valid_container_id("a.b_c-D"));
  EXPECT_TRUE(valid_container_id(std::string(128, 'x')));
  EXPECT_FALSE(valid_container_id(std::string(129, 'x')));
  EXPECT_FALSE(valid_container_id(""));
  EXPECT_FALSE(valid_container_id("."));
  EXPECT_FALSE(valid_container_id(".."));
  EXPECT_FALSE(valid_container_id("../x"));
  EXPECT_FALSE(valid_container_id("a/b"));
  EXPECT_FALSE(valid_container_id("a b"));
  EXPECT_FALSE(valid_container_id(std::string("a\0b", 3)));
  EXPECT_FALSE(valid_container_id("ä"));
}

TEST(Stage, FromNameAndStatus) {
  EXPECT_EQ(stage_from_name("createRuntime"), Stage::Start);
  EXPECT_EQ(stage_from_name("createContainer"), Stage::Start);
  EXPECT_EQ(stage_from_name("prestart"), Stage::Start);
  EXPECT_EQ(stage_from_name("poststop"), Stage::Cleanup);
  EXPECT_FALSE(stage_from_name("poststart"));
  EXPECT_EQ(stage_from_status("creating"), Stage::Start);
  EXPECT_EQ(stage_from_status("created"), Stage::Start);
  EXPECT_EQ(stage_from_status("stopped"), Stage::Cleanup);
  EXPECT_FALSE(stage_from_status("running"));
}

TEST(Names, KubernetesThenCriThenFallbacks) {
  Names n = names_from("cid", {});
  EXPECT_EQ(n.ns, "default");
  EXPECT_EQ(n.pod, "cid");
  EXPECT_EQ(n.container, "cid");

  n = names_from("cid", {{"io.kubernetes.cri.sandbox-namespace", "ns2"},
                         {"io.kubernetes.cri.sandbox-name", "pod2"},
                         {"io.kubernetes.cri.container-name", "c2"}});
  EXPECT_EQ(n.ns, "ns2");
  EXPECT_EQ(n.pod, "pod2");
  EXPECT_EQ(n.container, "c2");

  n = names_from("cid", {{"io.kubernetes.pod.namespace", "ns1"},
                         {"io.kubernetes.pod.name", "pod1"},
                         {"io.kubernetes.container.name", "c1"},
                         {"io.kubernetes.cri.sandbox-namespace", "ns2"},
                         {"io.kubernetes.cri.sandbox-name", "pod2"},
                         {"io.kubernetes.cri.container-name", "c2"}});
  EXPECT_EQ(n.ns, "ns1");
  EXPECT_EQ(n.pod, "pod1");
  EXPECT_EQ(n.container, "c1");

  n = names_from("cid", {{"io.kubernetes.cri-o.ContainerName", "web"}, {"io.kubernetes.pod.name", ""}});
  EXPECT_EQ(n.pod, "web");  // empty annotations do not count
  EXPECT_EQ(n.container, "web");
}

TEST(Names, PodmanHostnameNamesItWhenChosen) {
  const std::string id = "e355302960d8393e7ee7a4c0d3c957b7d3296746d23761898d922bbeeaedad49";
  std::map<std::string, std::string> podman = {{"io.container.manager", "libpod"}};
  // podman 4.3: no name annotation; its default hostname is the id's prefix.
  Names n = names_from(id, podman, id.substr(0, 12));
  EXPECT_EQ(n.pod, id);
  EXPECT_EQ(n.container, id);
  n = names_from(id, podman, "web");  // podman run --hostname web
  EXPECT_EQ(n.ns, "default");
  EXPECT_EQ(n.pod, "web");
  EXPECT_EQ(n.container, "web");
  // Only podman's: another runtime's hostname is the container's business.
  EXPECT_EQ(names_from(id, {}, "web").pod, id);
  // Not a usable name: ignored.
  EXPECT_EQ(names_from(id, podman, "a/b").pod, id);
  // A Kubernetes name still wins.
  podman["io.kubernetes.container.name"] = "app";
  EXPECT_EQ(names_from(id, podman, "web").container, "app");
}

TEST(Config, DefaultsNextToTheHook) {
  Config c = parse_config("{}", "/opt/shimlet/bin");
  EXPECT_EQ(c.state_dir, "/run/shimlet");
  EXPECT_EQ(c.shim_binary, "/opt/shimlet/bin/shimlet");
  EXPECT_EQ(c.session_binary, "/opt/shimlet/bin/shimlet-session");
  EXPECT_EQ(c.listen, "127.0.0.1:0");
  EXPECT_FALSE(c.fail_container_on_error);
  EXPECT_EQ(c.ready_timeout_ms, 2000);
  EXPECT_EQ(c.max_sessions, 256);
  EXPECT_EQ(c.max_local_sessions, 256);
  EXPECT_EQ(c.preauth_timeout_ms, 5000);
  EXPECT_EQ(c.preauth_max_connections, 4096);
  EXPECT_EQ(c.preauth_max_per_source, 2048);
  EXPECT_EQ(c.preauth_max_memory, 32 << 20);
  EXPECT_TRUE(c.trusted_keys.empty());
}

TEST(Config, PreauthLimitsReachShimJson) {
  Config c = parse_config(R"({"preauth_timeout_ms":1500,"preauth_max_connections":100,"preauth_max_per_source":10,
    "preauth_max_memory":8388608,"max_local_sessions":4})",
                          "/x");
  EXPECT_EQ(c.max_local_sessions, 4);
  oci::State st;
  st.id = "c1";
  st.pid = 1;
  st.bundle = "/b";
  auto j = shim_json(c, st, "/run/shimlet/c1", {});
  EXPECT_EQ(j["preauth_timeout_ms"], 1500);
  EXPECT_EQ(j["preauth_max_connections"], 100);
  EXPECT_EQ(j["preauth_max_per_source"], 10);
  EXPECT_EQ(j["preauth_max_memory"], 8388608);
  for (const char* bad :
       {R"({"preauth_timeout_ms":99})", R"({"preauth_timeout_ms":60001})", R"({"preauth_max_connections":0})",
        R"({"preauth_max_per_source":70000})", R"({"preauth_max_memory":1000})", R"({"max_local_sessions":0})"})
    EXPECT_THROW(parse_config(bad, "/x"), shimlet::Error) << bad;
}

TEST(Config, AllFields) {
  Config c = parse_config(R"({"state_dir":"/run/x/","shim_binary":"/a/shim","session_binary":"/a/sess",
    "listen":"[::1]:0","trusted_keys":["/etc/k/master.pub",{"kid":"m2","path":"/etc/k/2.pem"}],
    "fail_container_on_error":true,"ready_timeout_ms":500,"max_ticket_lifetime_s":60,"clock_leeway_s":0,
    "drain_timeout_ms":10,"max_sessions":3})",
                          "/x");
  EXPECT_EQ(c.state_dir, "/run/x");
  EXPECT_EQ(c.shim_binary, "/a/shim");
  EXPECT_EQ(c.session_binary, "/a/sess");
  EXPECT_EQ(c.listen, "[::1]:0");
  ASSERT_EQ(c.trusted_keys.size(), 2u);
  EXPECT_EQ(c.trusted_keys[0].kid, "master");
  EXPECT_EQ(c.trusted_keys[0].path, "/etc/k/master.pub");
  EXPECT_EQ(c.trusted_keys[1].kid, "m2");
  EXPECT_TRUE(c.fail_container_on_error);
  EXPECT_EQ(c.ready_timeout_ms, 500);
  EXPECT_EQ(c.max_ticket_lifetime_s, 60);
  EXPECT_EQ(c.clock_leeway_s, 0);
  EXPECT_EQ(c.drain_timeout_ms, 10);
  EXPECT_EQ(c.max_sessions, 3);
}

TEST(Config, RefusesBadInputWithOneClearLine) {
  for (const char* bad : {"",
                          "[]",
                          "nope",
                          R"({"fail_container_on_errror":true})",
                          R"({"state_dir":"rel"})",
                          R"({"state_dir":5})",
                          R"({"ready_timeout_ms":0})",
                          R"({"ready_timeout_ms":1.5})",
                          R"({"ready_timeout_ms":99999999999999999999})",
                          R"({"max_sessions":-1})",
                          R"({"fail_container_on_error":"yes"})",
                          R"({"listen":"nocolon"})",
                          R"({"trusted_keys":"/a"})",
                          R"({"trusted_keys":[{"kid":"local","path":"/a"}]})",
                          R"({"trusted_keys":[{"kid":"x"}]})",
                          R"({"trusted_keys":[{"path":"/a","x":1}]})",
                          R"({"a":[[[[[[[[[[[[]]]]]]]]]]]]})",
                          R"({"isolation":[]})",
                          R"({"isolation":{"landlock":"on"}})",
                          R"({"isolation":{"cgroup":1}})",
                          R"({"isolation":{"selinux_categories":"c1000.c1024"}})",
                          R"({"isolation":{"x":1}})",
                          R"({"isolation":{"limits":{"pids":-1}}})",
                          R"({"isolation":{"max_limits":{"cpu":1}}})"}) {
    try {
      parse_config(bad, "/x");
      ADD_FAILURE() << "accepted: " << bad;
    } catch (const shimlet::Error& e) {
      std::string m = e.what();
      EXPECT_EQ(m.find('\n'), std::string::npos) << m;
      EXPECT_EQ(m.rfind("hook config", 0), 0u) << m;
    }
  }
  EXPECT_THROW(parse_config(std::string(kMaxConfigBytes + 1, ' '), "/x"), shimlet::Error);
}

TEST(Registration, HasTheContractFields) {
  oci::State st;
  st.id = "c1";
  st.pid = 42;
  st.bundle = "/b";
  st.annotations = {{"io.kubernetes.pod.name", "p"}};
  Started s{"127.0.0.1:4000", "sha256/abc", "/run/shimlet/c1/shim.sock", 77, 1234, "2026-01-01T00:00:00Z", 999, {},
            "127.0.0.1:4001"};
  auto j = registration_json(st, s);
  EXPECT_EQ(j["pid_start_time"], 999);
  EXPECT_EQ(j["id"], "c1");
  EXPECT_EQ(j["pid"], 42);
  EXPECT_EQ(j["bundle"], "/b");
  EXPECT_EQ(j["runtime_root"], "");
  EXPECT_EQ(j["namespace"], "default");
  EXPECT_EQ(j["pod"], "p");
  EXPECT_EQ(j["container"], "c1");
  EXPECT_EQ(j["endpoint"], "127.0.0.1:4000");
  EXPECT_EQ(j["pin"], "sha256/abc");
  EXPECT_EQ(j["local_socket"], "/run/shimlet/c1/shim.sock");
  EXPECT_EQ(j["cri_endpoint"], "127.0.0.1:4001");
  EXPECT_EQ(j["shim_pid"], 77);
  EXPECT_EQ(j["shim_start_time"], 1234);
  EXPECT_EQ(j["created"], "2026-01-01T00:00:00Z");
  EXPECT_EQ(j["annotations"]["io.kubernetes.pod.name"], "p");

  Config c = parse_config(R"({"max_sessions":9})", "/bin");
  auto sj = shim_json(c, st, "/run/shimlet/c1", {{"local", "PEM"}});
  EXPECT_EQ(sj["tls_cert"], "/run/shimlet/c1/tls.crt");
  EXPECT_EQ(sj["tls_key"], "/run/shimlet/c1/tls.key");
  EXPECT_EQ(sj["trusted_keys"][0]["kid"], "local");
  EXPECT_EQ(sj["max_ticket_lifetime_s"], 300);
  EXPECT_EQ(sj["session_binary"], "/bin/shimlet-session");
}

TEST(Cleanup, SerializedAndQuietWhenAnotherDidIt) {
  TempDir d;
  Config c = parse_config("{}", "/x");
  c.state_dir = d.path;
  const std::string dir = d.path + "/c1";
  fs::create_directory(dir);
  std::ofstream(dir + "/tls.key") << "k";
  // This process plays the cleanup that runs first (the shim's own after
  // its container's exit): it holds the directory's lock.
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX), 0);
  pid_t child = fork();
  if (child == 0) {
    ::close(fd);  // our copy of the holder's open file (its lock goes when the parent's closes)
    try {
      cleanup(c, "c1");  // the later one (poststop): waits for the lock
    } catch (...) {
      _exit(1);
    }
    _exit(0);
  }
  // Its wait shows in /proc/locks ("-> FLOCK ... PID").
  auto waiting = [&] {
    std::ifstream locks("/proc/locks");
    std::string line;
    while (std::getline(locks, line))
      if (line.find("->") != std::string::npos && line.find(" " + std::to_string(child) + " ") != std::string::npos)
        return true;
    return false;
  };
  for (int i = 0; i < 1000 && !waiting(); i++) usleep(10000);
  ASSERT_TRUE(waiting());
  // The first cleanup finishes; meanwhile a new container took the same id.
  fs::remove_all(dir);
  fs::create_directory(dir);
  std::ofstream(dir + "/registration.json") << "{}";
  ::close(fd);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_TRUE(fs::exists(dir + "/registration.json"));  // not the waiter's to remove
}

TEST(Cleanup, IdempotentAndRefusesBadIds) {
  TempDir d;
  Config c = parse_config("{}", "/x");
  c.state_dir = d.path;
  EXPECT_NO_THROW(cleanup(c, "nothing-here"));
  fs::create_directory(d.path + "/half");
  std::ofstream(d.path + "/half/tls.key") << "k";
  EXPECT_NO_THROW(cleanup(c, "half"));  // start interrupted before registration
  EXPECT_FALSE(fs::exists(d.path + "/half"));
  EXPECT_THROW(cleanup(c, ".."), shimlet::Error);
  EXPECT_THROW(cleanup(c, "a/b"), shimlet::Error);
  fs::create_symlink("/tmp", d.path + "/link");
  EXPECT_THROW(cleanup(c, "link"), shimlet::Error);  // never follows a symlinked dir
  EXPECT_TRUE(fs::exists("/tmp"));
}

TEST(ShimArgs, ParsesAndRefuses) {
  const char* ok[] = {"shimlet",    "--config", "/s/c/shim.json", "--pid", "12",       "--session-binary", "/b/s",
                      "--ready-fd", "3",        "--max-sessions", "2",     "--listen", "0.0.0.0:1",        "--id",
                      "c"};
  auto o = shim::parse_args(15, ok);
  EXPECT_EQ(o.config, "/s/c/shim.json");
  EXPECT_EQ(o.pid, 12);
  EXPECT_EQ(o.ready_fd, 3);
  EXPECT_EQ(o.max_sessions, 2u);
  EXPECT_EQ(o.listen, "0.0.0.0:1");
  const char* bad_pid[] = {"shimlet", "--config", "/c", "--pid", "12x", "--session-binary", "/b"};
  EXPECT_THROW(shim::parse_args(7, bad_pid), shim::Error);
  const char* rel[] = {"shimlet", "--config", "/c", "--pid", "1", "--session-binary", "b"};
  EXPECT_THROW(shim::parse_args(7, rel), shim::Error);
  const char* missing[] = {"shimlet", "--config"};
  EXPECT_THROW(shim::parse_args(2, missing), shim::Error);
  const char* hook[] = {"shimlet", "--config", "/c", "--pid",         "1",       "--session-binary",     "/b", "--id",
                        "c",       "--hook",   "/h", "--hook-config", "/h.json", "--max-local-sessions", "5"};
  o = shim::parse_args(15, hook);
  EXPECT_EQ(o.hook_exec, "/h");
  EXPECT_EQ(o.hook_config, "/h.json");
  EXPECT_EQ(o.max_local_sessions, 5u);
  const char* renew_without_config[] = {"shimlet", "--config", "/c", "--pid",  "1",  "--session-binary",
                                        "/b",      "--id",     "c",  "--hook", "/h", "--renew-every",
                                        "5"};
  EXPECT_THROW(shim::parse_args(13, renew_without_config), shim::Error);
  const char* relative_hook[] = {"shimlet", "--config", "/c", "--pid",  "1", "--session-binary",
                                 "/b",      "--id",     "c",  "--hook", "h"};
  EXPECT_THROW(shim::parse_args(11, relative_hook), shim::Error);
}

TEST(ShimListen, BindsLoopbackAndRefusesJunk) {
  auto s = shim::listen_on("127.0.0.1:0");
  EXPECT_GT(shim::bound_port(s.get()), 0);
  EXPECT_THROW(shim::listen_on("localhost:0"), shim::Error);
  EXPECT_THROW(shim::listen_on("127.0.0.1"), shim::Error);
  EXPECT_THROW(shim::listen_on("127.0.0.1:70000"), shim::Error);
}

TEST(Config, IsolationCopiedIntoShimJson) {
  Config c = parse_config(
      R"({"state_dir":"/run/s","isolation":{"landlock":"compat","cgroup":false,"selinux_categories":"c900.c999",
          "limits":{"pids":64,"memory":67108864},"max_limits":{"cpu_weight":500}}})",
      "/x");
  shimlet::oci::State st;
  st.id = "c1";
  st.pid = 1;
  st.bundle = "/b";
  auto j = shim_json(c, st, "/run/s/c1", {});
  EXPECT_EQ(j["isolation"]["landlock"], "compat");
  EXPECT_EQ(j["isolation"]["cgroup"], false);
  EXPECT_EQ(j["isolation"]["limits"]["pids"], 64);
  EXPECT_EQ(j["isolation"]["selinux_lock_dir"], "/run/s/selinux");
  EXPECT_EQ(shim_json(parse_config("{}", "/x"), st, "/d", {})["isolation"],
            nlohmann::json({{"selinux_lock_dir", "/run/shimlet/selinux"}}));
}

// argv (CLI11): what the runtime passes is accepted, anything else refused
// with exit 2 before the OCI state is read; -h prints the usage.
TEST(HookCli, ArgumentsParsedByCli11) {
  auto run = [](std::vector<std::string> args) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    int rc = shimlet::hook::main(static_cast<int>(argv.size()), argv.data());
    alarm(0);  // main's own deadline: not for this test process
    return rc;
  };
  EXPECT_EQ(run({"shimlet-hook", "--bogus"}), 2);
  EXPECT_EQ(run({"shimlet-hook", "--config", "/nonexistent", "poststop", "extra"}), 2);
  EXPECT_EQ(run({"shimlet-hook", "--config"}), 2);
  testing::internal::CaptureStdout();
  EXPECT_EQ(run({"shimlet-hook", "--help"}), 0);
  std::string help = testing::internal::GetCapturedStdout();
  EXPECT_NE(help.find("renew CONTAINER_ID"), std::string::npos) << help;
  EXPECT_NE(help.find("cleanup CONTAINER_ID"), std::string::npos) << help;
  // `cleanup ID` (the shim's, when its container is gone): poststop's work on
  // STATE_DIR/ID, no stdin; a second id is refused like any extra argument.
  TempDir d;
  const std::string config = d.path + "/hook.json";
  std::ofstream(config) << "{\"state_dir\": \"" << d.path << "/state\"}";
  fs::create_directories(d.path + "/state/c1");
  std::ofstream(d.path + "/state/c1/tls.key") << "k";
  EXPECT_EQ(run({"shimlet-hook", "--config", config, "cleanup", "c1", "c2"}), 2);
  EXPECT_TRUE(fs::exists(d.path + "/state/c1"));
  EXPECT_EQ(run({"shimlet-hook", "--config", config, "cleanup", "c1"}), 0);
  EXPECT_FALSE(fs::exists(d.path + "/state/c1"));
  EXPECT_EQ(run({"shimlet-hook", "--config", config, "cleanup", ".."}), 1);
}
