// nsenter's seccomp translation (nsenter/seccomp.h) and the zygote's request
// wire format (nsenter/internal.h), tested without a container. The plan
// (what is taken from the config and the state) is nsenter_plan_test.cc; the
// child's syscalls run in the integration tests (test_parity.py against runc
// exec).
#include <gtest/gtest.h>
#include <linux/seccomp.h>
#include <unistd.h>

#include <system_error>

#include "common/error.h"
#include "nsenter/internal.h"
#include "nsenter/plan.h"
#include "nsenter/seccomp.h"
#include "tests/unit/nsenter_fixtures.h"

namespace ns = shimlet::nsenter;
namespace oci = shimlet::oci;

namespace {

using shimlet::test::container;
using shimlet::test::pipes;
using shimlet::test::request;

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
