// The master's recording policy, the ticket's "rec" claim, and the store the
// nodes upload recordings into.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/error.h"
#include "master/recording_policy.h"
#include "master/recordings.h"
#include "recording/asciicast.h"
#include "tests/unit/file_size_limit.h"
#include "tests/unit/temp_dir.h"
#include "ticket/ticket.h"

using namespace shimlet;
using namespace shimlet::master;
using nlohmann::json;

namespace {

const char* kPolicy = R"(
apiVersion: shimlet.io/v1
kind: RecordingPolicy
default: tty
diskFull: fail-closed
maxBytes: 1048576
rules:
- namespaces: [scratch]
  record: none
- users: [auditor]
  record: none
- namespaces: [prod]
  groups: [contractors]
  record: all
  diskFull: fail-open
  maxBytes: 2097152
)";

struct TempDir : shimlet::test::TempDir {
  TempDir() : shimlet::test::TempDir("shimlet-store") {}
};

std::string a_recording(const std::string& cid, const std::string& ns = "default", bool complete = true,
                        size_t out_bytes = 100) {
  recording::Encoder enc(1 << 20);
  recording::Header h;
  h.command = {"sh"};
  h.shimlet = {{"user", "alice"},     {"namespace", ns},    {"pod", "p1"}, {"container", "app"},
               {"container_id", cid}, {"session_id", "s1"}, {"tty", true}, {"start", "2026-12-01T10:00:00Z"}};
  std::string out;
  enc.header(out, h);
  enc.data(out, 1000, recording::Code::Output, std::string(out_bytes, 'x'));
  enc.resize(out, 2000, 100, 40);
  if (complete) enc.finish(out, 3000, recording::end_marker(0, 0));
  return out;
}

RecordingStore::OwnerOf owner_is(std::optional<std::string> node) {
  return [node](const std::string&) { return node; };
}

}  // namespace

TEST(RecordingPolicy, FirstMatchingRuleDecides) {
  RecordingPolicy p = RecordingPolicy::parse(kPolicy, "policy.yaml");
  // default: tty sessions only
  auto d = p.decide("alice", {"system:authenticated"}, "default", true);
  ASSERT_TRUE(d.rec);
  EXPECT_TRUE(d.rec->fail_closed);
  EXPECT_EQ(d.rec->max_bytes, 1048576u);
  EXPECT_EQ(d.rule, "default");
  EXPECT_FALSE(p.decide("alice", {}, "default", false).rec);
  d = p.decide("alice", {}, "scratch", true);
  EXPECT_FALSE(d.rec);
  EXPECT_EQ(d.rule, "rule 1");
  EXPECT_FALSE(p.decide("auditor", {}, "prod", true).rec);
  d = p.decide("bob", {"contractors"}, "prod", false);
  ASSERT_TRUE(d.rec);
  EXPECT_FALSE(d.rec->fail_closed);
  EXPECT_EQ(d.rec->max_bytes, 2097152u);
  EXPECT_EQ(d.rule, "rule 3");
  EXPECT_FALSE(p.decide("bob", {"staff"}, "prod", false).rec);  // group selector does not match: default tty
  EXPECT_EQ(p.largest_max_bytes(), 2097152u);
  EXPECT_TRUE(p.records_anything());
  EXPECT_FALSE(RecordingPolicy().records_anything());
  EXPECT_FALSE(RecordingPolicy().decide("alice", {}, "default", true).rec);
}

TEST(RecordingPolicy, MalformedPoliciesAreRefused) {
  for (const char* bad :
       {"kind: RecordingPolicy\ndefault: sometimes\n", "kind: Role\n",
        "kind: RecordingPolicy\nrules:\n- namespaces: [a]\n",  // no record
        "kind: RecordingPolicy\nrules:\n- record: all\n  user: [typo]\n", "kind: RecordingPolicy\nmaxBytes: 12\n",
        "kind: RecordingPolicy\ndiskFull: maybe\n", "kind: RecordingPolicy\ndefualt: all\n", "[1, 2]\n"})
    EXPECT_THROW(RecordingPolicy::parse(bad, "p.yaml"), Error) << bad;
}

TEST(RecordingClaim, SignedAndVerified) {
  auto key = ticket::PrivateKey::generate();
  std::vector<ticket::TrustedKey> trusted{{"master", ticket::PublicKey::from_pem(key.public_pem())}};
  ticket::Claims c;
  c.aud = "c1";
  c.jti = "j1";
  c.verb = "exec";
  c.iat = 1000;
  c.exp = 1060;
  ticket::Expect e{"c1", "exec", 1010, 5, 300};
  ticket::Claims got = ticket::verify(key.sign(c, "master"), trusted, e);
  EXPECT_FALSE(got.rec);  // absent: nothing recorded
  EXPECT_EQ(got.verified_kid, "master");
  c.rec = ticket::Recording{false, 1 << 20};
  got = ticket::verify(key.sign(c, ""), trusted, e);  // no kid in the header: the key that verified
  ASSERT_TRUE(got.rec);
  EXPECT_EQ(*got.rec, *c.rec);
  EXPECT_EQ(got.verified_kid, "master");
  c.rec = ticket::Recording{true, 0};
  got = ticket::verify(key.sign(c, "master"), trusted, e);
  ASSERT_TRUE(got.rec);
  EXPECT_TRUE(got.rec->fail_closed);
  EXPECT_EQ(got.rec->max_bytes, 0u);
}

TEST(RecordingStore, ChunkedUploadResumesAndIsStoredOnce) {
  TempDir d;
  RecordingStore s(d.path, 1 << 20);
  const std::string rec = a_recording("c1");
  // A probe before anything: size 0.
  auto u = s.upload("n1", "rec1", 0, false, "", owner_is("n1"), 1000);
  EXPECT_EQ(u.code, 200);
  EXPECT_EQ(u.size, 0u);
  // Chunks cut anywhere, one of them repeated and one overlapping.
  u = s.upload("n1", "rec1", 0, false, rec.substr(0, 50), owner_is("n1"), 1000);
  ASSERT_EQ(u.code, 200) << u.error;
  EXPECT_EQ(u.size, 50u);
  u = s.upload("n1", "rec1", 0, false, rec.substr(0, 50), owner_is("n1"), 1000);
  EXPECT_EQ(u.size, 50u);
  u = s.upload("n1", "rec1", 100, false, rec.substr(100, 10), owner_is("n1"), 1000);
  EXPECT_EQ(u.code, 409);  // beyond what we have: resume from 50
  EXPECT_EQ(u.size, 50u);
  u = s.upload("n1", "rec1", 40, false, rec.substr(40, 160), owner_is("n1"), 1000);
  ASSERT_EQ(u.code, 200) << u.error;
  EXPECT_EQ(u.size, 200u);
  EXPECT_FALSE(s.get("rec1"));
  // Another node cannot take over the upload.
  EXPECT_EQ(s.upload("n2", "rec1", 200, false, rec.substr(200, 5), owner_is("n1"), 1000).code, 400);
  // The master restarted: a new store resumes from the part file.
  RecordingStore s2(d.path, 1 << 20);
  u = s2.upload("n1", "rec1", 200, true, rec.substr(200), owner_is("n1"), 1000);
  ASSERT_EQ(u.code, 200) << u.error;
  EXPECT_TRUE(u.complete);
  EXPECT_EQ(u.size, rec.size());
  EXPECT_EQ(u.stored["namespace"], "default");
  EXPECT_EQ(u.stored["complete"], true);
  EXPECT_EQ(u.stored["out_bytes"], 100);
  EXPECT_EQ(u.stored["resizes"], 1);
  EXPECT_EQ(u.stored["user"], "alice");
  EXPECT_EQ(u.stored["node"], "n1");
  EXPECT_EQ(u.stored["container_registered"], true);
  EXPECT_EQ(u.stored["path"], d.path + "/default/rec1.cast");
  // Stored byte for byte.
  std::ifstream f(d.path + "/default/rec1.cast", std::ios::binary);
  EXPECT_EQ(std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>()), rec);
  // A repeat of the last chunk (its answer was lost) is fine.
  u = s2.upload("n1", "rec1", 200, true, rec.substr(200), owner_is("n1"), 1000);
  EXPECT_EQ(u.code, 200);
  EXPECT_TRUE(u.complete);
  EXPECT_TRUE(u.stored.is_null());  // stored once: no second audit line
  // Read API.
  auto m = s2.get("rec1");
  ASSERT_TRUE(m);
  EXPECT_EQ((*m)["bytes"], rec.size());
  EXPECT_EQ(*s2.read("rec1", 0, 1 << 20), rec);
  EXPECT_EQ(*s2.read("rec1", 10, 5), rec.substr(10, 5));
  EXPECT_EQ(s2.list("", "", 10).size(), 1u);
  EXPECT_EQ(s2.list("default", "alice", 10).size(), 1u);
  EXPECT_EQ(s2.list("prod", "", 10).size(), 0u);
  EXPECT_EQ(s2.list("", "bob", 10).size(), 0u);
  // And an index rebuilt at start.
  RecordingStore s3(d.path, 1 << 20);
  EXPECT_TRUE(s3.get("rec1"));
  EXPECT_EQ(s3.upload("n2", "rec1", 0, true, rec, owner_is(std::nullopt), 1000).code, 400);  // id taken
}

TEST(RecordingStore, RefusesWhatItCannotTrust) {
  TempDir d;
  RecordingStore s(d.path, 4096);
  // Another node's container.
  auto u = s.upload("n1", "a", 0, true, a_recording("c1"), owner_is("n2"), 1000);
  EXPECT_EQ(u.code, 403);
  // Not asciicast.
  EXPECT_EQ(s.upload("n1", "b", 0, true, "hello\n", owner_is("n1"), 1000).code, 400);
  // Larger than the store's limit.
  EXPECT_EQ(s.upload("n1", "c", 0, true, a_recording("c1", "default", true, 8000), owner_is("n1"), 1000).code, 413);
  // A cut last line at the end.
  std::string cut = a_recording("c1");
  cut.pop_back();
  EXPECT_EQ(s.upload("n1", "d", 0, true, cut, owner_is("n1"), 1000).code, 400);
  EXPECT_EQ(s.upload("n1", "../e", 0, true, a_recording("c1"), owner_is("n1"), 1000).code, 400);
  // Nothing of these was kept.
  EXPECT_EQ(s.list("", "", 10).size(), 0u);
  EXPECT_TRUE(std::filesystem::is_empty(d.path + "/.uploads"));
  // An unregistered container's recording is kept and marked; no terminal marker = incomplete.
  u = s.upload("n1", "f", 0, true, a_recording("c9", "default", false), owner_is(std::nullopt), 1000);
  ASSERT_EQ(u.code, 200) << u.error;
  EXPECT_EQ(u.stored["container_registered"], false);
  EXPECT_EQ(u.stored["complete"], false);
  EXPECT_EQ(RecordingStore().upload("n1", "g", 0, true, "x", owner_is("n1"), 1000).code, 404);
}

// The upload's owner file (.node) cannot be written (disk full; here a file
// size limit): the node keeps its copy and sends again later, and that must
// work. A .part left without a whole .node was taken for another node's
// upload (400: the node deleted its recording), and a reader fed with a chunk
// that was not stored refused the chunk sent again (400 as well).
TEST(RecordingStore, AnOwnerFileThatCannotBeWrittenLosesNothing) {
  TempDir d;
  const std::string rec = a_recording("c1");
  // One request under a file size limit: 500 when it throws.
  auto limited = [&](RecordingStore& s, const std::string& id, uint64_t off, bool final, std::string_view body,
                     rlim_t limit) {
    shimlet::test::FileSizeLimit full(limit);
    try {
      return s.upload("n1", id, off, final, body, owner_is("n1"), 1000).code;
    } catch (const std::exception&) {
      return 500;
    }
  };
  // What the node does next: probe, then send the rest.
  auto resume = [&](RecordingStore& s, const std::string& id, uint64_t expect_size) {
    auto u = s.upload("n1", id, 0, false, "", owner_is("n1"), 1000);
    ASSERT_EQ(u.code, 200) << u.error;
    ASSERT_EQ(u.size, expect_size);
    u = s.upload("n1", id, u.size, true, rec.substr(u.size), owner_is("n1"), 1000);
    ASSERT_EQ(u.code, 200) << u.error;
    EXPECT_TRUE(u.complete);
    EXPECT_EQ(u.stored["container_registered"], true);
  };
  {
    RecordingStore s(d.path, 1 << 20);
    // The first chunk: .node cannot be written.
    EXPECT_GE(limited(s, "a", 0, false, rec.substr(0, 20), 5), 500);
    resume(s, "a", 0);
    // The chunk that completes the header: .node (now with the container id) cannot be rewritten.
    ASSERT_EQ(s.upload("n1", "b", 0, false, rec.substr(0, 20), owner_is("n1"), 1000).code, 200);
    EXPECT_GE(limited(s, "b", 20, true, rec.substr(20), 30), 500);
    resume(s, "b", 20);
    ASSERT_EQ(s.upload("n1", "c", 0, false, rec.substr(0, 20), owner_is("n1"), 1000).code, 200);
    EXPECT_GE(limited(s, "c", 20, true, rec.substr(20), 30), 500);
  }
  // And after a restart.
  RecordingStore s(d.path, 1 << 20);
  resume(s, "c", 20);
}
