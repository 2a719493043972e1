// session/session_isolation: shim.json "isolation" parsing, effective limits
// (ticket, default, cap), and the byte formatting of the client's error line.
#include "session/session_isolation.h"

#include <gtest/gtest.h>

#include "common/error.h"

using namespace shimlet;
using namespace shimlet::session;
using nlohmann::json;

TEST(SessionIsolation, DefaultsAndParse) {
  Isolation d = parse_isolation(json());
  EXPECT_TRUE(d.cgroup);
  EXPECT_TRUE(d.selinux);
  EXPECT_EQ(d.landlock, "strict");
  EXPECT_EQ(d.categories.first, 1000u);
  Isolation i = parse_isolation(json::parse(
      R"({"cgroup":false,"landlock":"off","selinux":false,"selinux_categories":"c10.c20","selinux_lock_dir":"/s/selinux",
          "limits":{"pids":5,"memory":1048576,"cpu_weight":7},"max_limits":{"pids":9}})"));
  EXPECT_FALSE(i.cgroup);
  EXPECT_FALSE(i.selinux);
  EXPECT_EQ(i.landlock, "off");
  EXPECT_EQ(i.categories.first, 10u);
  EXPECT_EQ(i.categories.last, 20u);
  EXPECT_EQ(i.selinux_lock_dir, "/s/selinux");
  EXPECT_EQ(i.limits.pids_max, 5u);
  EXPECT_EQ(i.limits.memory_max, 1048576u);
  EXPECT_EQ(i.limits.cpu_weight, 7u);
  EXPECT_EQ(i.max_limits.pids_max, 9u);
  for (const char* bad : {R"([])", R"({"landlock":"yes"})", R"({"cgroup":"no"})", R"({"limits":{"pids":-1}})",
                          R"({"limits":{"cpu":1}})", R"({"selinux_lock_dir":"rel"})", R"({"other":1})"})
    EXPECT_THROW(parse_isolation(json::parse(bad)), Error) << bad;
}

TEST(SessionIsolation, EffectiveLimitsTicketThenDefaultCappedByMax) {
  Isolation iso;
  iso.limits = {100, 0, 0};
  iso.max_limits = {200, 64u << 20, 0};
  auto l = effective_limits(iso, {});
  EXPECT_EQ(l.pids_max, 100u);         // default
  EXPECT_EQ(l.memory_max, 64u << 20);  // no default, but a max: capped "unlimited"
  EXPECT_EQ(l.cpu_weight, 0u);         // neither
  l = effective_limits(iso, {150, 1u << 30, 50});
  EXPECT_EQ(l.pids_max, 150u);         // the ticket's, within the max
  EXPECT_EQ(l.memory_max, 64u << 20);  // the ticket's, capped
  EXPECT_EQ(l.cpu_weight, 50u);
  l = effective_limits(iso, {500, 0, 0});
  EXPECT_EQ(l.pids_max, 200u);
}

TEST(SessionIsolation, FormatBytes) {
  EXPECT_EQ(format_bytes(64u << 20), "64 MiB");
  EXPECT_EQ(format_bytes(1u << 30), "1 GiB");
  EXPECT_EQ(format_bytes(1536u << 10), "1536 KiB");
  EXPECT_EQ(format_bytes(1000), "1000 bytes");
}
