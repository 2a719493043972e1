// nsenter's plan building (nsenter/plan.h, nsenter/seccomp.h) and the
// zygote's request wire format (nsenter/internal.h): everything computed
// before fork, tested without a container. The child's syscalls themselves
// run in the integration tests (test_parity.py against runc exec).
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <system_error>

#include "common/error.h"
#include "nsenter/internal.h"
#include "nsenter/plan.h"
#include "nsenter/seccomp.h"

namespace ns = shimlet::nsenter;
namespace oci = shimlet::oci;

namespace {

// A container whose "init" is this test process: /proc/self/root is the
// host's /, so HOME comes from the host's /etc/passwd.
ns::Container container() {
  ns::Container c;
  c.init_pid = getpid();
  c.config.process.env = {"PATH=/usr/local/bin:relative:/usr/bin:", "TERM=dumb"};
  c.config.process.cwd = "/tmp";
  return c;
}

ns::Request request(std::vector<std::string> argv) {
  ns::Request r;
  r.argv = std::move(argv);
  return r;
}

ns::Stdio pipes() {
  ns::Stdio io;
  io.in = 0;
  io.out = 1;
  io.err = 2;
  return io;
}

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

TEST(NsenterSeccomp, CompilesAProfile) {
  oci::Seccomp s;
  s.default_action = "SCMP_ACT_ERRNO";
  s.default_errno_ret = 1;
  s.architectures = {"SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"};
  s.flags = {"SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_TSYNC"};
  oci::SeccompRule allow;
  allow.names = {"read", "write", "no_such_syscall_anywhere"};  // unknown names are skipped, as runc does
  allow.action = "SCMP_ACT_ALLOW";
  oci::SeccompRule personality;  // two conditions on one argument: one rule each (OR)
  personality.names = {"personality"};
  personality.action = "SCMP_ACT_ALLOW";
  personality.args = {{0, 0, 0, "SCMP_CMP_EQ"}, {0, 8, 0, "SCMP_CMP_EQ"}};
  oci::SeccompRule same_as_default;  // libseccomp refuses it; skipped
  same_as_default.names = {"mount"};
  same_as_default.action = "SCMP_ACT_ERRNO";
  same_as_default.errno_ret = 1;
  s.syscalls = {allow, personality, same_as_default};
  ns::SeccompProgram p = ns::compile_seccomp(s);
  EXPECT_GT(p.bpf.size(), 4u);
  EXPECT_EQ(p.flags, unsigned{SECCOMP_FILTER_FLAG_LOG});  // TSYNC: the child is single-threaded
  // The container's plan carries it.
  ns::Container c = container();
  c.config.seccomp = s;
  ns::Plan plan = ns::prepare_container(c);
  EXPECT_TRUE(plan.seccomp);
  EXPECT_EQ(plan.bpf.size(), p.bpf.size());
}

TEST(NsenterSeccomp, RefusesWhatItCannotHonour) {
  oci::Seccomp s;
  s.default_action = "SCMP_ACT_ALLOW";
  auto fails = [](oci::Seccomp x) {
    try {
      ns::compile_seccomp(x);
    } catch (const shimlet::Error& e) {
      return std::string(e.what());
    } catch (const std::system_error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  oci::Seccomp bad = s;
  bad.default_action = "SCMP_ACT_NOTIFY";
  EXPECT_NE(fails(bad).find("unsupported action"), std::string::npos);
  bad = s;
  bad.architectures = {"SCMP_ARCH_PDP11"};
  EXPECT_NE(fails(bad).find("unknown architecture"), std::string::npos);
  bad = s;
  bad.flags = {"SECCOMP_FILTER_FLAG_NEW_LISTENER"};
  EXPECT_NE(fails(bad).find("unsupported flag"), std::string::npos);
  bad = s;
  oci::SeccompRule r;
  r.names = {"read"};
  r.action = "SCMP_ACT_ERRNO";
  r.args = {{0, 1, 0, "SCMP_CMP_LIKE"}};
  bad.syscalls = {r};
  EXPECT_NE(fails(bad).find("unsupported operator"), std::string::npos);
}

TEST(NsenterWire, RequestRoundTrip) {
  ns::Request r = request({"sh", "-c", std::string("x\0y", 3)});
  r.extra_env = {"TERM=xterm", ""};
  r.selinux_exec_label = "system_u:system_r:shimlet_container_t:s0:c1,c2,c1000";
  shimlet::landlock::Options o;
  o.scope_signal = true;
  o.scope_abstract_unix = false;
  r.landlock = o;
  ns::Stdio io;
  io.tty = true;
  io.cols = 200;
  io.rows = 50;
  std::string wire = ns::encode(r, io);
  ns::Request got;
  ns::Stdio gio;
  ASSERT_TRUE(ns::decode(wire.data(), wire.size(), got, gio));
  EXPECT_EQ(got.argv, r.argv);
  EXPECT_EQ(got.extra_env, r.extra_env);
  EXPECT_EQ(got.selinux_exec_label, r.selinux_exec_label);
  ASSERT_TRUE(got.landlock);
  EXPECT_TRUE(got.landlock->scope_signal);
  EXPECT_FALSE(got.landlock->scope_abstract_unix);
  EXPECT_TRUE(gio.tty);
  EXPECT_EQ(gio.cols, 200);
  EXPECT_EQ(gio.rows, 50);
}

TEST(NsenterWire, MalformedRequestsAreRefused) {
  std::string wire = ns::encode(request({"true"}), pipes());
  ns::Request r;
  ns::Stdio io;
  for (size_t n = 0; n < wire.size(); n++)  // every truncation
    EXPECT_FALSE(ns::decode(wire.data(), n, r, io)) << n;
  std::string longer = wire + "x";  // trailing bytes
  EXPECT_FALSE(ns::decode(longer.data(), longer.size(), r, io));
  std::string huge = wire;
  huge[8] = '\xff';  // argv's count beyond what the message could hold
  huge[9] = '\xff';
  EXPECT_FALSE(ns::decode(huge.data(), huge.size(), r, io));
  // Too large to send at all.
  ns::Request big = request({std::string(ns::kMaxRequestBytes, 'a')});
  EXPECT_THROW(ns::encode(big, pipes()), shimlet::Error);
}

}  // namespace
