// Pure SELinux label arithmetic and category allocation; runs on hosts with
// SELinux off (the enforcing behaviour is tested in the VM:
// tests/integration/test_selinux_vm.py).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <set>

#include "common/error.h"
#include "selinux/label.h"

namespace sl = shimlet::selinux;

TEST(SelinuxLevel, ParsesAndPrintsCanonically) {
  EXPECT_EQ(sl::Level::parse("s0").str(), "s0");
  EXPECT_EQ(sl::Level::parse("s0:c2,c1").str(), "s0:c1,c2");
  EXPECT_EQ(sl::Level::parse("s0:c0.c3,c9").str(), "s0:c0.c3,c9");
  EXPECT_EQ(sl::Level::parse("s0:c1,c2,c3").str(), "s0:c1.c3");  // kernel prints runs of 3+ with '.'
  EXPECT_EQ(sl::Level::parse("s0:c1,c2,c1000").str(), "s0:c1,c2,c1000");
  EXPECT_EQ(sl::Level::parse("s0:c0.c1023").categories.size(), 1024u);
}

TEST(SelinuxLevel, RejectsMalformed) {
  for (const char* bad : {"", "s", "x0", "s0:", "s0:c", "s0:c1,", "s0:1", "s0:c1024", "s0:c5.c1", "s0:c1.c",
                          "s0:c99999999999", "s-1", "s0:c1,,c2", "s0:c1:c2"}) {
    EXPECT_THROW(sl::Level::parse(bad), shimlet::Error) << bad;
  }
}

TEST(SelinuxLevel, Dominance) {
  auto L = sl::Level::parse;
  EXPECT_TRUE(L("s0:c1,c2,c1000").dominates(L("s0:c1,c2")));
  EXPECT_TRUE(L("s0:c1,c2").dominates(L("s0")));
  EXPECT_FALSE(L("s0:c1,c2").dominates(L("s0:c1,c2,c1000")));
  EXPECT_FALSE(L("s0:c1,c2,c1001").dominates(L("s0:c1,c2,c1000")));
}

TEST(SelinuxContext, ParsesFields) {
  auto c = sl::Context::parse("system_u:system_r:shimlet_container_t:s0:c1,c2");
  EXPECT_EQ(c.user, "system_u");
  EXPECT_EQ(c.role, "system_r");
  EXPECT_EQ(c.type, "shimlet_container_t");
  EXPECT_EQ(c.level.str(), "s0:c1,c2");
  EXPECT_EQ(c.str(), "system_u:system_r:shimlet_container_t:s0:c1,c2");
  // /proc/PID/attr/current ends in NUL (and sometimes newline).
  EXPECT_EQ(sl::Context::parse(std::string("u:r:t:s0:c1,c2\0", 15)).str(), "u:r:t:s0:c1,c2");
  // A degenerate range is one level.
  EXPECT_EQ(sl::Context::parse("u:r:t:s0:c1,c2-s0:c1,c2").str(), "u:r:t:s0:c1,c2");
}

TEST(SelinuxContext, RejectsMalformedAndRanges) {
  for (const char* bad : {"", "u:r:t", "u:r:t:", "u::t:s0", "u:r:t:s0:c1,c2-s0:c0.c1023", "u:r:t y:s0", "u:r:t:s0-"}) {
    EXPECT_THROW(sl::Context::parse(bad), shimlet::Error) << bad;
  }
}

TEST(SelinuxCategoryRange, Parses) {
  auto r = sl::CategoryRange::parse("c1000.c1023");
  EXPECT_EQ(r.first, 1000u);
  EXPECT_EQ(r.last, 1023u);
  EXPECT_EQ(r.size(), 24u);
  EXPECT_EQ(sl::CategoryRange::parse("c10-c12").str(), "c10.c12");
  EXPECT_THROW(sl::CategoryRange::parse("c12.c10"), shimlet::Error);
  EXPECT_THROW(sl::CategoryRange::parse("c1000"), shimlet::Error);
  EXPECT_THROW(sl::CategoryRange::parse("c1000.c2000"), shimlet::Error);
}

TEST(SelinuxSession, SupersetOfContainer) {
  auto ctr = sl::Context::parse("system_u:system_r:shimlet_container_t:s0:c1,c2");
  sl::CategoryRange r;
  auto s = sl::session_context(ctr, 1005, r);
  EXPECT_EQ(s.str(), "system_u:system_r:shimlet_container_t:s0:c1,c2,c1005");
  EXPECT_TRUE(s.level.dominates(ctr.level));
  EXPECT_FALSE(ctr.level.dominates(s.level));
  EXPECT_THROW(sl::session_context(ctr, 999, r), shimlet::Error);
  EXPECT_THROW(sl::session_context(ctr, 1024, r), shimlet::Error);
  // A container whose pair intersects the reserved range is refused.
  auto bad = sl::Context::parse("system_u:system_r:shimlet_container_t:s0:c1,c1010");
  EXPECT_THROW(sl::session_context(bad, 1005, r), shimlet::Error);
}

// The scheme's guarantee, exhaustively over a small universe: for containers
// with distinct pairs outside the reserved range, a session of one container
// never dominates another container or another container's/sibling session.
TEST(SelinuxSession, NoCrossDominance) {
  sl::CategoryRange r{20, 23};
  std::vector<sl::Context> ctrs;
  for (unsigned a = 0; a < 8; ++a)
    for (unsigned b = a + 1; b < 8; ++b)
      ctrs.push_back(sl::Context::parse("u:r:t:s0:c" + std::to_string(a) + ",c" + std::to_string(b)));
  for (size_t i = 0; i < ctrs.size(); ++i) {
    for (unsigned si = r.first; si <= r.last; ++si) {
      auto s = sl::session_context(ctrs[i], si, r);
      for (size_t j = 0; j < ctrs.size(); ++j) {
        EXPECT_EQ(s.level.dominates(ctrs[j].level), i == j);
        for (unsigned sj = r.first; sj <= r.last; ++sj) {
          bool same = i == j && si == sj;
          EXPECT_EQ(s.level.dominates(sl::session_context(ctrs[j], sj, r).level), same);
        }
      }
    }
  }
}

TEST(SelinuxObject, RelabelKeepsType) {
  auto lvl = sl::Level::parse("s0:c1,c2,c1000");
  EXPECT_EQ(sl::object_label_at("system_u:object_r:devpts_t:s0", lvl), "system_u:object_r:devpts_t:s0:c1,c2,c1000");
  EXPECT_THROW(sl::object_label_at("garbage", lvl), shimlet::Error);
}

TEST(SelinuxObject, LockNameIsAFileName) {
  auto n = sl::lock_name(sl::Level::parse("s0:c1,c2"), 1000);
  EXPECT_EQ(n, "s0_c1,c2.c1000.lock");
  EXPECT_EQ(n.find('/'), std::string::npos);
}

class SelinuxAlloc : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/shimlet-selinux-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir); }
  std::string dir;
};

TEST_F(SelinuxAlloc, ConcurrentSessionsGetDistinctCategories) {
  const std::string d = dir + "/state/selinux";  // parents are created
  auto lvl = sl::Level::parse("s0:c1,c2");
  sl::CategoryRange r{1000, 1003};
  std::vector<sl::SessionCategory> held;
  std::set<unsigned> got;
  for (int i = 0; i < 4; ++i) {
    held.push_back(sl::SessionCategory::allocate(d, lvl, r));
    EXPECT_TRUE(r.contains(held.back().category()));
    got.insert(held.back().category());
  }
  EXPECT_EQ(got.size(), 4u);
  EXPECT_THROW(sl::SessionCategory::allocate(d, lvl, r), shimlet::Error);  // exhausted: clear error
  // Another container level has its own set.
  auto other = sl::SessionCategory::allocate(d, sl::Level::parse("s0:c3,c4"), r);
  EXPECT_TRUE(r.contains(other.category()));
  // Releasing one makes exactly that one available again.
  unsigned freed = held[1].category();
  held.erase(held.begin() + 1);
  EXPECT_EQ(sl::SessionCategory::allocate(d, lvl, r).category(), freed);
}

TEST_F(SelinuxAlloc, LockIsHeldAcrossProcessesAndFreedOnExit) {
  auto lvl = sl::Level::parse("s0:c5,c6");
  sl::CategoryRange r{1000, 1001};
  int ready[2], done[2];
  ASSERT_EQ(pipe(ready), 0);
  ASSERT_EQ(pipe(done), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // A separate "session" process holds one category until told to exit.
    auto c = sl::SessionCategory::allocate(dir, lvl, r);
    unsigned char v = static_cast<unsigned char>(c.category() - 1000);
    if (write(ready[1], &v, 1) != 1) _exit(2);
    char x;
    if (read(done[0], &x, 1) < 0) _exit(3);
    _exit(0);
  }
  unsigned char v = 0;
  ASSERT_EQ(read(ready[0], &v, 1), 1);
  unsigned child_cat = 1000u + v;
  auto mine = sl::SessionCategory::allocate(dir, lvl, r);
  EXPECT_NE(mine.category(), child_cat);
  EXPECT_THROW(sl::SessionCategory::allocate(dir, lvl, r), shimlet::Error);
  ASSERT_EQ(write(done[1], "x", 1), 1);
  int st = 0;
  ASSERT_EQ(waitpid(pid, &st, 0), pid);
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  EXPECT_EQ(sl::SessionCategory::allocate(dir, lvl, r).category(), child_cat);  // freed by the kernel at exit
  for (int fd : {ready[0], ready[1], done[0], done[1]}) close(fd);
}

TEST(SelinuxHost, DisabledBackendSaysSoAndDoesNothing) {
  if (sl::enabled()) {
    EXPECT_NE(sl::status().find("SELinux "), std::string::npos);
    return;  // the enforcing behaviour is covered by the VM test
  }
  EXPECT_EQ(sl::status(), "SELinux disabled on this host: session labels not applied");
  EXPECT_NO_THROW(sl::set_exec_label("system_u:system_r:shimlet_container_t:s0:c1,c2,c1000"));
  EXPECT_EQ(sl::process_label(getpid()), "");
  EXPECT_EQ(sl::fd_label(0), "");
  EXPECT_NO_THROW(sl::ScopedSockCreate("system_u:system_r:shimlet_container_t:s0:c1,c2,c1000"));
  EXPECT_NO_THROW(sl::label_fd_level(0, sl::Level::parse("s0:c1")));
}
