// The hook's side of session recordings: its config, shim.json's
// "recording", the spool directories, and the flush without a master.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/error.h"
#include "hook/hook.h"
#include "recording/recorder.h"
#include "recording/spool.h"
#include "session/session_recording.h"
#include "tests/unit/temp_dir.h"

using namespace shimlet;
using namespace shimlet::hook;
namespace fs = std::filesystem;

namespace {
struct TempDir : shimlet::test::TempDir {
  TempDir() : shimlet::test::TempDir("hook_rec_test") {}
};

}  // namespace

TEST(HookRecording, ConfigDefaultsAndValidation) {
  Config c = parse_config(R"({"state_dir":"/run/x"})", "/bin");
  EXPECT_EQ(recording_root(c), "/run/x/recordings");
  EXPECT_EQ(c.recording.local, "none");
  EXPECT_TRUE(c.recording.fail_closed);
  c = parse_config(R"({"recording":{"dir":"/var/rec/","local":"tty","disk_full":"fail-open","max_bytes":65536,
                      "spool_max_bytes":1048576}})",
                   "/bin");
  EXPECT_EQ(recording_root(c), "/var/rec");
  EXPECT_EQ(c.recording.local, "tty");
  EXPECT_FALSE(c.recording.fail_closed);
  EXPECT_EQ(c.recording.max_bytes, 65536u);
  for (const char* bad : {R"({"recording":[]})", R"({"recording":{"dir":"rel"}})", R"({"recording":{"local":"some"}})",
                          R"({"recording":{"disk_full":"maybe"}})", R"({"recording":{"max_bytes":10}})",
                          R"({"recording":{"spool_max_bytes":-1}})", R"({"recording":{"typo":1}})"})
    EXPECT_THROW(parse_config(bad, "/bin"), Error) << bad;
}

TEST(HookRecording, ShimJsonCarriesItAndTheSessionReadsIt) {
  Config c = parse_config(R"({"state_dir":"/run/x","recording":{"local":"all","disk_full":"fail-open"}})", "/bin");
  session::RecordingSettings s = session::parse_recording_settings(recording_shim_json(c, "c1"));
  EXPECT_EQ(s.dir, "/run/x/recordings/c1");
  EXPECT_EQ(s.root, "/run/x/recordings");
  EXPECT_EQ(s.local, "all");
  EXPECT_FALSE(s.fail_closed);
  EXPECT_EQ(s.max_bytes, 256u << 20);
  // An older shim.json without it: nothing can be recorded.
  EXPECT_TRUE(session::parse_recording_settings(nlohmann::json()).dir.empty());
}

TEST(HookRecording, SpoolDirectoriesArePrivate) {
  TempDir d;
  recording::spool::prepare(d.path + "/rec", d.path + "/rec/c1");
  struct stat st {};
  ASSERT_EQ(stat((d.path + "/rec/c1").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  recording::spool::prepare(d.path + "/rec", d.path + "/rec/c1");  // again: fine
  chmod((d.path + "/rec").c_str(), 0755);
  EXPECT_THROW(recording::spool::prepare(d.path + "/rec", d.path + "/rec/c2"), Error);
}

TEST(HookRecording, WithoutAMasterKilledSessionsAreFinishedAndKept) {
  TempDir d;
  Config c =
      parse_config(R"({"state_dir":")" + d.path + R"(/state","recording":{"dir":")" + d.path + R"(/rec"}})", "/bin");
  recording::spool::prepare(d.path + "/rec", d.path + "/rec/c1");
  recording::Recorder::Options o;
  o.dir = d.path + "/rec/c1";
  o.id = "s1";
  o.header.shimlet = {{"container_id", "c1"}};
  recording::Recorder r(o);
  r.output(recording::Code::Output, "hello\n", 6);
  r.abandon();  // as if the session was killed
  RecordingFlush f = flush_recordings(c, "c1", 1000, true);
  EXPECT_EQ(f.sent, 0u);
  EXPECT_TRUE(f.error.empty());
  EXPECT_TRUE(fs::exists(d.path + "/rec/c1/s1.cast"));  // the node's archive
  EXPECT_THROW(flush_recordings(c, "../x", 1000, false), Error);
}
