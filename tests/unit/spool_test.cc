// spool/spool.h: the session-end outbox (docs/design.md "Session end records").
#include "spool/spool.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "common/error.h"
#include "hook/hook.h"
#include "tests/unit/temp_dir.h"

namespace spool = shimlet::spool;
namespace fs = std::filesystem;

namespace {

struct TempDir : shimlet::test::TempDir {
  TempDir() : shimlet::test::TempDir("spool-test") {}
};

void set_mtime(const std::string& p, time_t t) {
  timespec ts[2] = {{t, 0}, {t, 0}};
  ASSERT_EQ(utimensat(AT_FDCWD, p.c_str(), ts, 0), 0) << p;
}

}  // namespace

TEST(Spool, ValidSid) {
  EXPECT_TRUE(spool::valid_sid("abc-DEF_019"));
  EXPECT_TRUE(spool::valid_sid(std::string(64, 'a')));
  EXPECT_FALSE(spool::valid_sid(""));
  EXPECT_FALSE(spool::valid_sid(std::string(65, 'a')));
  for (const char* bad : {"../x", "a/b", ".hidden", "a.json", "a b", "a\n"}) EXPECT_FALSE(spool::valid_sid(bad)) << bad;
}

TEST(Spool, WriteIsAtomic0600AndListedBack) {
  TempDir d;
  nlohmann::json rec = {{"session_id", "s1"}, {"exit_code", 3}, {"command", {"sh", "-c", "exit 3"}}};
  EXPECT_TRUE(spool::write(d.path, "s1", rec).empty());
  struct stat st {};
  ASSERT_EQ(stat((d.path + "/s1.json").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  size_t n = 0;
  for (auto& e : fs::directory_iterator(d.path)) {
    (void)e;
    n++;
  }
  EXPECT_EQ(n, 1u) << "no temp file left behind";
  auto l = spool::list(d.path, 10);
  ASSERT_EQ(l.size(), 1u);
  EXPECT_EQ(l[0].sid, "s1");
  EXPECT_EQ(l[0].record, rec);
}

TEST(Spool, RefusesBadSidAndHugeRecords) {
  TempDir d;
  EXPECT_THROW(spool::write(d.path, "../escape", nlohmann::json::object()), shimlet::Error);
  nlohmann::json big = {{"error", std::string(spool::kMaxRecordBytes, 'x')}};
  EXPECT_THROW(spool::write(d.path, "big", big), shimlet::Error);
  EXPECT_THROW(spool::write(d.path + "/missing", "s", nlohmann::json::object()), std::exception);
  EXPECT_TRUE(spool::list(d.path, 10).empty());
}

TEST(Spool, ListIsOldestFirstBoundedAndSkipsJunk) {
  TempDir d;
  for (int i = 0; i < 5; i++) {
    std::string sid = "s" + std::to_string(i);
    spool::write(d.path, sid, {{"i", i}});
    set_mtime(d.path + "/" + sid + ".json", 1000000 - i);  // s4 oldest
  }
  std::ofstream(d.path + "/.s9.abcdef") << "{}";       // a writer's temp file
  std::ofstream(d.path + "/not a sid.json") << "{}";   // not ours
  fs::create_directory(d.path + "/dir.json");          // not a regular file
  std::ofstream(d.path + "/garbage.json") << "{nope";  // unreadable: listed, discarded
  set_mtime(d.path + "/garbage.json", 2000000);
  auto l = spool::list(d.path, 3);
  ASSERT_EQ(l.size(), 3u);
  EXPECT_EQ(l[0].sid, "s4");
  EXPECT_EQ(l[1].sid, "s3");
  EXPECT_EQ(l[2].sid, "s2");
  auto all = spool::list(d.path, 100);
  ASSERT_EQ(all.size(), 6u);
  EXPECT_EQ(all.back().sid, "garbage");
  EXPECT_TRUE(all.back().record.is_discarded());
  EXPECT_TRUE(spool::list(d.path + "/nope", 10).empty());
}

TEST(Spool, DropsTheOldestBeyondTheBound) {
  TempDir d;
  for (int i = 0; i < 4; i++) {
    std::string sid = "s" + std::to_string(i);
    spool::write(d.path, sid, {{"i", i}}, 4);
    set_mtime(d.path + "/" + sid + ".json", 1000 + i);  // s0 oldest
  }
  auto dropped = spool::write(d.path, "s4", {{"i", 4}}, 4);
  ASSERT_EQ(dropped, std::vector<std::string>{"s0"});
  auto l = spool::list(d.path, 100);
  ASSERT_EQ(l.size(), 4u);
  EXPECT_EQ(l[0].sid, "s1");
  // The record just written survives even when it is not the newest by mtime.
  set_mtime(d.path + "/s4.json", 1);
  dropped = spool::write(d.path, "s4", {{"i", 44}}, 2);
  EXPECT_EQ(dropped.size(), 2u);
  l = spool::list(d.path, 100);
  ASSERT_EQ(l.size(), 2u);
  bool has_s4 = false;
  for (auto& p : l) has_s4 |= p.sid == "s4";
  EXPECT_TRUE(has_s4);
}

TEST(Spool, OpenRecordIsPromotedOnlyOnceItsLockIsFree) {
  TempDir d;
  auto finish = [](nlohmann::json& r) { r["end"] = "2026-11-27T16:00:00Z"; };
  shimlet::Fd lock = spool::write_open(d.path, "s1", {{"session_id", "g1"}, {"error", "killed"}});
  ASSERT_TRUE(lock);
  struct stat st {};
  ASSERT_EQ(stat((d.path + "/s1.open").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_TRUE(spool::list(d.path, 10).empty());  // not pending while provisional
  // Locked: a live session, left alone.
  auto pr = spool::promote_orphans(d.path, finish);
  EXPECT_EQ(pr.promoted, 0u);
  EXPECT_TRUE(fs::exists(d.path + "/s1.open"));
  // The lock's holder is gone (as when the session process is killed).
  lock.reset();
  pr = spool::promote_orphans(d.path, finish);
  EXPECT_EQ(pr.promoted, 1u);
  EXPECT_FALSE(fs::exists(d.path + "/s1.open"));
  auto p = spool::list(d.path, 10);
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].sid, "s1");
  EXPECT_EQ(p[0].record["session_id"], "g1");
  EXPECT_EQ(p[0].record["end"], "2026-11-27T16:00:00Z");
}

TEST(Spool, FinalRecordWinsOverAnOrphanedOpenOne) {
  TempDir d;
  spool::write(d.path, "s2", {{"session_id", "g2"}, {"exit_code", 0}});
  spool::write_open(d.path, "s2", {{"session_id", "g2"}, {"error", "killed"}}).reset();
  { std::ofstream(d.path + "/s3.open") << "not json"; }
  auto pr = spool::promote_orphans(d.path, [](nlohmann::json&) {});
  EXPECT_EQ(pr.promoted, 0u);
  EXPECT_EQ(pr.dropped, 2u);
  EXPECT_FALSE(fs::exists(d.path + "/s2.open"));
  EXPECT_FALSE(fs::exists(d.path + "/s3.open"));
  auto p = spool::list(d.path, 10);
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].record["exit_code"], 0);
  // remove_open: gone or never there, both fine
  spool::remove_open(d.path, "s2");
  EXPECT_THROW(spool::write_open(d.path, "../x", {}), shimlet::Error);
}

TEST(HookFlush, WithoutMasterNothingIsTouched) {
  TempDir d;
  shimlet::hook::Config c;
  c.state_dir = d.path;
  fs::create_directories(d.path + "/ctr/ends");
  spool::write(d.path + "/ctr/ends", "s1", {{"session_id", "s1"}});
  auto r = shimlet::hook::flush_session_ends(c, "ctr", 10, 1000);
  EXPECT_EQ(r.posted + r.kept + r.dropped, 0u);
  EXPECT_EQ(spool::list(d.path + "/ctr/ends", 10).size(), 1u);
}

TEST(HookFlush, UnreachableMasterKeepsRecordsAndDropsJunk) {
  TempDir d;
  shimlet::hook::Config c;
  c.state_dir = d.path;
  shimlet::hook::MasterConfig m;
  m.urls = {"https://127.0.0.1:1"};
  m.node = "n1";
  m.token = "t";
  m.timeout_ms = 1000;
  c.master = m;
  fs::create_directories(d.path + "/ctr/ends");
  std::ofstream(d.path + "/ctr/ends/junk.json") << "not json";
  set_mtime(d.path + "/ctr/ends/junk.json", 1);
  spool::write(d.path + "/ctr/ends", "s1", {{"session_id", "s1"}});
  spool::write(d.path + "/ctr/ends", "s2", {{"session_id", "s2"}});
  auto r = shimlet::hook::flush_session_ends(c, "ctr", 10, 2000);
  EXPECT_EQ(r.posted, 0u);
  EXPECT_EQ(r.dropped, 1u);
  EXPECT_EQ(r.kept, 2u);
  EXPECT_FALSE(r.error.empty());
  EXPECT_EQ(spool::list(d.path + "/ctr/ends", 10).size(), 2u);
  EXPECT_THROW(shimlet::hook::flush_session_ends(c, "../x", 10, 1000), shimlet::Error);
}
