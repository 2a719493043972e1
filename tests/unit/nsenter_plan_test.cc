// nsenter's plan building (nsenter/plan.h): what a command's start takes
// from the OCI config and the container's state (namespaces, capabilities,
// rlimits, user and groups, seccomp, environment, cwd, labels), and in what
// order, computed before anything is forked. Pure functions of the config,
// the request and /proc: no container needed. The child that applies a plan
// runs in the integration tests (test_parity.py against runc exec).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "nsenter/nsenter.h"
#include "nsenter/plan.h"
#include "nsenter/seccomp.h"
#include "tests/unit/nsenter_fixtures.h"

namespace ns = shimlet::nsenter;
namespace oci = shimlet::oci;

namespace {

using shimlet::test::container;
using shimlet::test::pipes;
using shimlet::test::request;

std::vector<std::string> strings(const std::vector<char*>& v) {
  std::vector<std::string> out;
  for (char* p : v)
    if (p) out.emplace_back(p);
  return out;
}

TEST(NsenterEnv, LaterEntriesReplaceInPlace) {
  std::vector<std::string> env;
  ns::set_env(env, "A=1");
  ns::set_env(env, "B=2");
  ns::set_env(env, "A=3");
  ns::set_env(env, "AB=4");  // a longer key is another variable
  EXPECT_EQ(env, (std::vector<std::string>{"A=3", "B=2", "AB=4"}));
  EXPECT_EQ(ns::env_get(env, "A"), "3");
  EXPECT_EQ(ns::env_get(env, "AB"), "4");
  EXPECT_FALSE(ns::env_get(env, "C"));
  ns::set_env(env, "E=");
  EXPECT_EQ(ns::env_get(env, "E"), "");
  EXPECT_THROW(ns::set_env(env, "NOEQUALS"), shimlet::Error);
  EXPECT_THROW(ns::set_env(env, "=value"), shimlet::Error);
}

TEST(NsenterEnv, HomeFromPasswd) {
  const char* passwd =
      "root:x:0:0:root:/root:/bin/sh\n"
      "broken line\n"
      "short:x:7\n"
      "nohome:x:1001:1001:gecos::/bin/sh\n"
      "user:x:1000:1000:user:/home/user:/bin/sh";  // no final newline
  EXPECT_EQ(ns::home_from_passwd(passwd, 0), "/root");
  EXPECT_EQ(ns::home_from_passwd(passwd, 1000), "/home/user");
  EXPECT_EQ(ns::home_from_passwd(passwd, 1001), "/");  // empty home: runc's default
  EXPECT_EQ(ns::home_from_passwd(passwd, 7), "/");     // too few fields: skipped
  EXPECT_EQ(ns::home_from_passwd(passwd, 4242), "/");  // unknown uid
  EXPECT_EQ(ns::home_from_passwd("", 0), "/");
}

TEST(NsenterPlan, ValidateRefusesBadCommands) {
  EXPECT_THROW(ns::validate(request({})), shimlet::Error);
  EXPECT_THROW(ns::validate(request({"sh", std::string("a\0b", 3)})), shimlet::Error);
  try {
    ns::validate(request({""}));
    FAIL() << "empty command name accepted";
  } catch (const ns::ExecError& e) {
    EXPECT_EQ(e.exit_code, 127);
  }
  EXPECT_NO_THROW(ns::validate(request({"true"})));
}

TEST(NsenterPlan, ContainerPart) {
  ns::Container c = container();
  oci::Process& p = c.config.process;
  p.env = {"A=1", "B=2", "A=3"};
  p.uid = 1000;
  p.gid = 1000;
  p.additional_gids = {10, 20};
  p.cwd = "";
  p.no_new_privileges = true;
  p.oom_score_adj = 500;
  p.rlimits = {{RLIMIT_NOFILE, 1024, 2048}};
  p.caps.bounding = {"CAP_CHOWN", "CAP_NOT_A_CAPABILITY", "CAP_KILL", "CAP_CHOWN"};
  p.caps.effective = {"CAP_KILL"};
  p.caps.permitted = {"CAP_KILL", "CAP_CHOWN"};
  c.ns_fds = {{"user", 11}, {"mnt", 12}, {"pid", 13}, {"net", 14}};
  ns::Plan plan = ns::prepare_container(c);
  EXPECT_EQ(plan.env_s, (std::vector<std::string>{"A=3", "B=2"}));
  EXPECT_EQ(plan.userns_fd, 11);
  // The pid namespace applies through fork, not setns.
  EXPECT_EQ(plan.ns, (std::vector<std::pair<int, int>>{{12, CLONE_NEWNS}, {14, CLONE_NEWNET}}));
  // Unknown capability names are ignored (runc: it only ever grants less); numbers sorted, once.
  EXPECT_EQ(plan.bounding, (std::vector<int>{CAP_CHOWN, CAP_KILL}));
  EXPECT_EQ(plan.effective, (std::vector<int>{CAP_KILL}));
  EXPECT_EQ(plan.permitted, (std::vector<int>{CAP_CHOWN, CAP_KILL}));
  EXPECT_FALSE(plan.cap_sys_admin_granted);
  EXPECT_EQ(plan.uid, 1000u);
  EXPECT_EQ(plan.gid, 1000u);
  EXPECT_EQ(plan.groups, (std::vector<gid_t>{10, 20}));
  EXPECT_EQ(plan.cwd, "/");  // empty cwd: the root
  EXPECT_TRUE(plan.nnp);
  EXPECT_EQ(plan.umask, 022);  // runc exec's, not process.user.umask
  EXPECT_EQ(plan.oom_score_adj, 500);
  ASSERT_EQ(plan.rlimits.size(), 1u);
  EXPECT_EQ(plan.rlimits[0].hard, 2048u);
  EXPECT_FALSE(plan.seccomp);
  // Our own user namespace allows setgroups (/proc/PID/setgroups says "allow").
  EXPECT_TRUE(plan.allow_setgroups);

  p.caps.ambient = {"CAP_SYS_ADMIN"};  // granted in any set counts
  EXPECT_TRUE(ns::prepare_container(c).cap_sys_admin_granted);
}

TEST(NsenterPlan, ContainerPartRefusesBadNamespaces) {
  ns::Container c = container();
  c.ns_fds = {{"bogus", 3}};
  EXPECT_THROW(ns::prepare_container(c), shimlet::Error);
  c.ns_fds = {{"net", -1}};
  EXPECT_THROW(ns::prepare_container(c), shimlet::Error);
  c.ns_fds.clear();
  for (int i = 0; i < 9; i++) c.ns_fds.emplace_back("net", 20 + i);
  EXPECT_THROW(ns::prepare_container(c), shimlet::Error);
}

TEST(NsenterPlan, RequestPartPathSearchAndEnv) {
  ns::Container c = container();
  ns::Plan plan = ns::prepare_container(c);
  ns::Request r = request({"ls", "-l"});
  r.extra_env = {"TERM=xterm", "X=1"};
  ns::prepare_request(plan, c, r, pipes());
  EXPECT_EQ(strings(plan.argv), (std::vector<std::string>{"ls", "-l"}));
  EXPECT_EQ(plan.argv.back(), nullptr);
  EXPECT_EQ(plan.envp.back(), nullptr);
  // The request's env overrides in place; HOME from passwd (uid 0 here) when unset.
  std::vector<std::string> env = strings(plan.envp);
  EXPECT_EQ(env[1], "TERM=xterm");
  EXPECT_EQ(ns::env_get(env, "X"), "1");
  EXPECT_EQ(ns::env_get(env, "HOME"), "/root");  // the host's passwd here (Debian's root)
  // Go's LookPath: absolute PATH entries in order; relative and empty ones skipped.
  EXPECT_TRUE(plan.searched);
  EXPECT_EQ(plan.candidates_s, (std::vector<std::string>{"/usr/local/bin/ls", "/usr/bin/ls"}));
  ASSERT_EQ(plan.candidates.size(), 2u);
  EXPECT_STREQ(plan.candidates[1], "/usr/bin/ls");
  EXPECT_FALSE(plan.tty);
  EXPECT_EQ(plan.out, 1);
  EXPECT_FALSE(plan.landlock);
  EXPECT_FALSE(plan.pty_exclusive);
}

TEST(NsenterPlan, RequestPartNameWithSlashAndHomeKept) {
  ns::Container c = container();
  c.config.process.env.push_back("HOME=/custom");
  c.config.process.selinux_label = "system_u:system_r:container_t:s0:c1,c2";
  ns::Plan plan = ns::prepare_container(c);
  ns::Request r = request({"./bin/tool"});
  r.landlock = shimlet::landlock::Options{};
  ns::Stdio io;
  io.tty = true;
  io.cols = 132;
  io.rows = 43;
  ns::prepare_request(plan, c, r, io);
  EXPECT_FALSE(plan.searched);
  EXPECT_EQ(plan.candidates_s, (std::vector<std::string>{"./bin/tool"}));
  EXPECT_EQ(ns::env_get(strings(plan.envp), "HOME"), "/custom");
  EXPECT_TRUE(plan.tty);
  EXPECT_EQ(plan.ws.ws_col, 132);
  EXPECT_EQ(plan.ws.ws_row, 43);
  // Without a request label: the config's; a Landlock domain makes the pty exclusive.
  EXPECT_EQ(plan.selinux_label, "system_u:system_r:container_t:s0:c1,c2");
  EXPECT_TRUE(plan.landlock);
  EXPECT_TRUE(plan.pty_exclusive);
}

TEST(NsenterPlan, RequestPartNeedsStdioWithoutTty) {
  ns::Container c = container();
  ns::Plan plan = ns::prepare_container(c);
  EXPECT_THROW(ns::prepare_request(plan, c, request({"true"}), ns::Stdio{}), shimlet::Error);
}

// A child in namespaces of its own (unshare flags), stopped until destroyed.
struct Unshared {
  explicit Unshared(int flags, bool deny_setgroups = false) {
    shimlet::Pipe ready = shimlet::make_pipe();
    pid = ::fork();
    if (pid == 0) {
      char ok = 1;
      if (::unshare(flags) < 0) ok = 0;
      if (ok && deny_setgroups) {
        int fd = ::open("/proc/self/setgroups", O_WRONLY | O_CLOEXEC);
        ok = fd >= 0 && ::write(fd, "deny", 4) == 4;
      }
      (void)!::write(ready.write.get(), &ok, 1);
      for (;;) ::pause();
    }
    char ok = 0;
    ready.write.reset();
    EXPECT_EQ(::read(ready.read.get(), &ok, 1), 1);
    EXPECT_EQ(ok, 1) << "unshare";
  }
  ~Unshared() {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
  pid_t pid = -1;
};

TEST(NsenterPlan, StateNamespacesThatDifferInAFixedOrder) {
  // The shim holds what differs from its own namespaces, in kNsTypes' order
  // (user first), whatever order they were made in.
  EXPECT_TRUE(ns::open_container(getpid()).ns.empty());
  Unshared child(CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET);
  ns::OpenedContainer oc = ns::open_container(child.pid);
  std::vector<std::string> names;
  for (const auto& [name, fd] : oc.ns) {
    names.push_back(name);
    EXPECT_TRUE(fd) << name;
  }
  EXPECT_EQ(names, (std::vector<std::string>{"net", "ipc", "uts"}));
  EXPECT_TRUE(oc.pidfd);
}

TEST(NsenterPlan, NamespacesUserApartPidThroughForkOthersInOrder) {
  // The child joins plan.ns in order around the user namespace (once before
  // it, again after for those that failed): the order given is kept.
  ns::Container c = container();
  c.ns_fds = {{"user", 10}, {"mnt", 11}, {"pid", 12},    {"net", 13},
              {"ipc", 14},  {"uts", 15}, {"cgroup", 16}, {"time", 17}};
  ns::Plan plan = ns::prepare_container(c);
  EXPECT_EQ(plan.userns_fd, 10);
  EXPECT_EQ(plan.ns, (std::vector<std::pair<int, int>>{{11, CLONE_NEWNS},
                                                       {13, CLONE_NEWNET},
                                                       {14, CLONE_NEWIPC},
                                                       {15, CLONE_NEWUTS},
                                                       {16, CLONE_NEWCGROUP},
                                                       {17, CLONE_NEWTIME}}));
  c.ns_fds = {{"net", 3}};  // no user namespace: none joined
  EXPECT_EQ(ns::prepare_container(c).userns_fd, -1);
}

TEST(NsenterPlan, RlimitsInTheConfigsOrderAndUserAsConfigured) {
  ns::Container c = container();
  oci::Process& p = c.config.process;
  p.rlimits = {{RLIMIT_NPROC, 10, 20}, {RLIMIT_NOFILE, 1024, 2048}, {RLIMIT_CORE, 0, 0}};
  p.uid = 65534;
  p.gid = 65533;
  p.cwd = "/work";
  ns::Plan plan = ns::prepare_container(c);
  ASSERT_EQ(plan.rlimits.size(), 3u);
  EXPECT_EQ(plan.rlimits[0].resource, RLIMIT_NPROC);
  EXPECT_EQ(plan.rlimits[1].resource, RLIMIT_NOFILE);
  EXPECT_EQ(plan.rlimits[1].soft, 1024u);
  EXPECT_EQ(plan.rlimits[2].resource, RLIMIT_CORE);
  EXPECT_EQ(plan.uid, 65534u);
  EXPECT_EQ(plan.gid, 65533u);
  EXPECT_TRUE(plan.groups.empty());
  EXPECT_EQ(plan.cwd, "/work");
  EXPECT_FALSE(plan.oom_score_adj);  // not configured: left as inherited
  EXPECT_FALSE(plan.nnp);
  // No capability configured: every set empty (all dropped).
  EXPECT_TRUE(plan.bounding.empty() && plan.effective.empty() && plan.permitted.empty() && plan.inheritable.empty() &&
              plan.ambient.empty());
}

TEST(NsenterPlan, SetgroupsFollowsTheUserNamespace) {
  // "deny" in the container's /proc/PID/setgroups: setgroups is skipped (runc).
  Unshared child(CLONE_NEWUSER, /*deny_setgroups=*/true);
  ns::Container c = container();
  c.init_pid = child.pid;
  c.config.process.additional_gids = {5};
  ns::Plan plan = ns::prepare_container(c);
  EXPECT_FALSE(plan.allow_setgroups);
  EXPECT_EQ(plan.groups, (std::vector<gid_t>{5}));
}

TEST(NsenterPlan, SeccompFromTheConfig) {
  ns::Container c = container();
  oci::Seccomp s;
  s.default_action = "SCMP_ACT_ERRNO";
  s.default_errno_ret = 1;
  s.flags = {"SECCOMP_FILTER_FLAG_LOG"};
  oci::SeccompRule allow;
  allow.names = {"read", "write", "exit_group"};
  allow.action = "SCMP_ACT_ALLOW";
  s.syscalls = {allow};
  c.config.seccomp = s;
  ns::Plan plan = ns::prepare_container(c);
  ns::SeccompProgram want = ns::compile_seccomp(s);
  EXPECT_TRUE(plan.seccomp);
  EXPECT_EQ(plan.seccomp_flags, unsigned{SECCOMP_FILTER_FLAG_LOG});
  ASSERT_EQ(plan.bpf.size(), want.bpf.size());
  for (size_t i = 0; i < want.bpf.size(); i++) {
    EXPECT_EQ(plan.bpf[i].code, want.bpf[i].code) << i;
    EXPECT_EQ(plan.bpf[i].k, want.bpf[i].k) << i;
  }
  c.config.seccomp.reset();  // none configured: none loaded
  EXPECT_FALSE(ns::prepare_container(c).seccomp);
}

TEST(NsenterPlan, TheRequestsLabelOverTheConfigs) {
  ns::Container c = container();
  c.config.process.selinux_label = "system_u:system_r:container_t:s0:c1,c2";
  ns::Plan plan = ns::prepare_container(c);
  ns::Request r = request({"/bin/true"});
  r.selinux_exec_label = "system_u:system_r:shimlet_container_t:s0:c1,c2,c1000";
  ns::prepare_request(plan, c, r, pipes());
  EXPECT_EQ(plan.selinux_label, r.selinux_exec_label);
}

}  // namespace
