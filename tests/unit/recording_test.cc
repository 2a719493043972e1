// recording/: the asciicast encoder and reader, the byte mapping, the
// recorder's files and the node's outbox.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "recording/asciicast.h"
#include "recording/recorder.h"
#include "recording/spool.h"
#include "tests/unit/file_size_limit.h"
#include "tests/unit/temp_dir.h"

using namespace shimlet::recording;
using nlohmann::json;

namespace {

// What a JSON parser makes of the encoded string, mapped back to bytes.
std::string roundtrip(std::string_view bytes) {
  std::string lit;
  append_json_bytes(lit, bytes);
  json j = json::parse(lit);  // throws on anything that is not a valid JSON string
  return text_to_bytes(j.get<std::string>());
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

struct Parsed {
  json header;
  std::vector<Event> events;
  Summary sum;
};
Parsed parse_all(std::string_view text, bool strict = true) {
  Reader r(Reader::Limits{4u << 20, strict});
  Parsed p;
  auto on = [&](Event&& e) {
    p.sum.add(e);
    p.events.push_back(std::move(e));
  };
  EXPECT_TRUE(r.feed(text, on)) << r.error();
  EXPECT_TRUE(r.finish(on)) << r.error();
  p.header = r.header();
  return p;
}

std::string concat(const std::vector<Event>& ev, const std::string& code) {
  std::string s;
  for (const auto& e : ev)
    if (e.code == code) s += e.data;
  return s;
}

struct TempDir : shimlet::test::TempDir {
  TempDir() : shimlet::test::TempDir("shimlet-rec") {}
};

Header test_header(bool tty = true) {
  Header h;
  h.width = 100;
  h.height = 30;
  h.timestamp = 1790000000;
  h.term = tty ? "xterm-256color" : "";
  h.command = {"sh", "-c", "echo 'hi there'"};
  h.shimlet = {{"user", "alice"},      {"namespace", "default"}, {"pod", "p1"}, {"container", "app"},
               {"container_id", "c1"}, {"session_id", "s1"},     {"tty", tty}};
  return h;
}

Recorder::Options options(const std::string& dir, const std::string& id, bool tty) {
  Recorder::Options o;
  o.dir = dir;
  o.id = id;
  o.header = test_header(tty);
  o.tty = tty;
  return o;
}

}  // namespace

TEST(RecordingMapping, EveryByteSequenceRoundTrips) {
  std::string all;
  for (int b = 0; b < 256; b++) all += static_cast<char>(b);
  EXPECT_EQ(roundtrip(all), all);
  std::mt19937 rng(42);
  for (int i = 0; i < 500; i++) {
    std::string s(rng() % 300, '\0');
    for (char& c : s) c = static_cast<char>(rng());
    ASSERT_EQ(roundtrip(s), s);
  }
}

TEST(RecordingMapping, TextStaysText) {
  const std::string text = "héllo wörld ✓ 𝄞 \x1b[1;31mred\x1b[0m\r\n";
  std::string lit;
  append_json_bytes(lit, text);
  std::string decoded = json::parse(lit).get<std::string>();
  EXPECT_EQ(decoded, text);  // no placeholder anywhere
  EXPECT_EQ(roundtrip(text), text);
}

TEST(RecordingMapping, BadBytesBecomePrivateUseCharacters) {
  // A stray continuation byte, an overlong encoding, a surrogate, a cut
  // sequence, and the mapped range's own encoding (U+EF80).
  for (std::string bad : {std::string("\x80"), std::string("\xC0\xAF"), std::string("\xED\xA0\x80"),
                          std::string("\xE2\x82"), std::string("\xEE\xBE\x80"), std::string("\xF4\x90\x80\x80")}) {
    std::string lit;
    append_json_bytes(lit, bad);
    std::string text = json::parse(lit).get<std::string>();
    EXPECT_EQ(text.size(), 3 * bad.size()) << lit;  // every byte: one U+EFxx (3 bytes of UTF-8)
    EXPECT_EQ(text_to_bytes(text), bad);
  }
}

TEST(RecordingMapping, UnfinishedSuffix) {
  EXPECT_EQ(unfinished_utf8_suffix("abc"), 0u);
  EXPECT_EQ(unfinished_utf8_suffix("ab\xE2"), 1u);
  EXPECT_EQ(unfinished_utf8_suffix("ab\xE2\x82"), 2u);
  EXPECT_EQ(unfinished_utf8_suffix("ab\xE2\x82\xAC"), 0u);  // complete
  EXPECT_EQ(unfinished_utf8_suffix("\xF0\x9D\x84"), 3u);    // 3 of 4
  EXPECT_EQ(unfinished_utf8_suffix("\xE0\x80"), 0u);        // overlong: never completes
  EXPECT_EQ(unfinished_utf8_suffix("\xC0"), 0u);            // invalid lead
  EXPECT_EQ(unfinished_utf8_suffix("\x80\x80\x80"), 0u);    // continuation bytes only
}

TEST(RecordingEncoder, ACharacterSplitAcrossReadsStaysOneCharacter) {
  Encoder enc(1 << 20);
  std::string out;
  enc.header(out, test_header());
  const std::string euro = "\xE2\x82\xAC";
  enc.data(out, 1000, Code::Output, "price: \xE2");
  enc.data(out, 2000, Code::Output, "\x82");
  enc.data(out, 3000, Code::Output, "\xAC!");
  enc.finish(out, 4000, end_marker(0, 0));
  Parsed p = parse_all(out);
  EXPECT_EQ(concat(p.events, "o"), "price: " + euro + "!");
  EXPECT_EQ(out.find("\xEE\xBE"), std::string::npos);  // no placeholder in the file
  EXPECT_EQ(enc.recorded(Code::Output), 11u);
  EXPECT_TRUE(p.sum.complete());
  EXPECT_EQ(*p.sum.terminal, "end: exit code 0");
}

TEST(RecordingEncoder, HeaderCarriesShimletKeysAndPlaysInAsciinema) {
  std::string out;
  Encoder enc(1 << 20);
  enc.header(out, test_header());
  json h = json::parse(out);
  EXPECT_EQ(h["version"], 2);
  EXPECT_EQ(h["width"], 100);
  EXPECT_EQ(h["height"], 30);
  EXPECT_EQ(h["timestamp"], 1790000000);
  EXPECT_EQ(h["command"], "sh -c 'echo '\\''hi there'\\'''");
  EXPECT_EQ(h["env"]["TERM"], "xterm-256color");
  EXPECT_EQ(h["shimlet"]["user"], "alice");
  EXPECT_EQ(h["title"], "alice in default/p1/app: sh -c 'echo '\\''hi there'\\'''");
}

// A tty exec whose client sent no size yet (Kubernetes/CRI exec: 0x0 until
// the first resize) has no initial size: the header says 80x24, as the spec
// requires a size and the master refuses 0 (it dropped the whole recording).
TEST(RecordingEncoder, AnUnknownTerminalSizeStillMakesAValidHeader) {
  Header h = test_header();
  h.width = h.height = 0;
  Encoder enc(1 << 20);
  std::string out;
  enc.header(out, h);
  enc.resize(out, 1000, 120, 40);
  enc.finish(out, 2000, end_marker(0, 0));
  Parsed p = parse_all(out);
  EXPECT_EQ(p.header["width"], 80);
  EXPECT_EQ(p.header["height"], 24);
  EXPECT_EQ(p.sum.resizes, 1u);
}

TEST(RecordingEncoder, EventsAndTimes) {
  std::string out;
  Encoder enc(1 << 20);
  enc.header(out, test_header(false));
  enc.data(out, 1500000, Code::Output, "out\n");
  enc.data(out, 1000000, Code::Stderr, "err\n");  // earlier time: clamped, never backwards
  enc.data(out, 2000001, Code::Input, std::string("in\0x", 4));
  enc.resize(out, 3000000, 120, 40);
  enc.finish(out, 4000000, end_marker(137, 9));
  EXPECT_NE(out.find("[1.500000, \"o\", \"out\\n\"]\n"), std::string::npos) << out;
  EXPECT_NE(out.find("[1.500000, \"e\", \"err\\n\"]\n"), std::string::npos) << out;
  EXPECT_NE(out.find("[2.000001, \"i\", \"in\\u0000x\"]\n"), std::string::npos) << out;
  EXPECT_NE(out.find("[3.000000, \"r\", \"120x40\"]\n"), std::string::npos) << out;
  EXPECT_NE(out.find("[4.000000, \"m\", \"end: killed by signal 9 (exit code 137)\"]\n"), std::string::npos) << out;
  Parsed p = parse_all(out);
  EXPECT_EQ(p.sum.out_bytes, 4u);
  EXPECT_EQ(p.sum.err_bytes, 4u);
  EXPECT_EQ(p.sum.in_bytes, 4u);
  EXPECT_EQ(p.sum.resizes, 1u);
  EXPECT_EQ(p.sum.duration_us, 4000000);
  EXPECT_EQ(enc.bytes(), out.size());
}

TEST(RecordingEncoder, TruncationIsMarkedAndBounded) {
  const uint64_t max = Encoder::kMinMaxBytes;
  std::string out;
  Encoder enc(max);
  enc.header(out, test_header());
  std::string chunk(1000, 'x');
  for (int i = 0; i < 200; i++) enc.data(out, i * 1000, Code::Output, chunk);
  enc.finish(out, 300000, end_marker(0, 0));
  EXPECT_TRUE(enc.truncated());
  EXPECT_LE(out.size(), max);
  EXPECT_EQ(enc.bytes(), out.size());
  Parsed p = parse_all(out);
  EXPECT_TRUE(p.sum.truncated);
  EXPECT_TRUE(p.sum.complete());  // the command's end is still recorded
  EXPECT_EQ(p.sum.out_bytes, enc.recorded(Code::Output));
  EXPECT_LT(p.sum.out_bytes, 200000u);
  EXPECT_EQ(p.events.back().data, "end: exit code 0");
  EXPECT_EQ(p.events[p.events.size() - 2].data.rfind("truncated:", 0), 0u);
}

// A read larger than what is left (the engine reads up to hundreds of KiB at
// once): its longest prefix that fits is kept, cut before a character, then
// the marker; the recording is not left without the output.
TEST(RecordingEncoder, TruncationKeepsThePrefixOfABigEvent) {
  for (const std::string unit : {"x", "\xc3\xa9", "\xff", "\n"}) {
    const uint64_t max = Encoder::kMinMaxBytes;
    std::string out;
    Encoder enc(max);
    enc.header(out, test_header());
    std::string big;
    while (big.size() < 300000) big += unit;
    enc.data(out, 1000, Code::Output, big);
    enc.data(out, 2000, Code::Stderr, "later");
    enc.finish(out, 3000, end_marker(0, 0));
    EXPECT_TRUE(enc.truncated());
    EXPECT_LE(out.size(), max);
    EXPECT_EQ(enc.bytes(), out.size());
    Parsed p = parse_all(out);
    ASSERT_EQ(p.events.size(), 3u) << unit;
    std::string kept = concat(p.events, "o");
    EXPECT_EQ(kept, big.substr(0, kept.size())) << unit;
    EXPECT_EQ(kept.size() % unit.size(), 0u) << unit;  // whole characters only
    // The prefix is the longest that fits, to one character (at most 6 bytes encoded).
    size_t cut = out.rfind('\n', out.find("truncated:")) + 1;
    EXPECT_LE(cut, max - Encoder::kReserve) << unit;
    EXPECT_GT(cut + 6, max - Encoder::kReserve) << unit;
    EXPECT_EQ(enc.recorded(Code::Output), kept.size());
    EXPECT_EQ(enc.recorded(Code::Stderr), 0u);
    EXPECT_EQ(p.events[1].data.rfind("truncated:", 0), 0u);
    EXPECT_EQ(p.events[2].data, "end: exit code 0");
  }
}

// One stdin message can be 1 MiB (a WebSocket message, the SPDY early
// stdin): NUL bytes encode 6x, a 6 MiB line the master's reader (4 MiB
// lines) refused, with the whole recording, so a user could have their
// session's recording deleted. Events are cut into lines readers take,
// between characters.
TEST(RecordingEncoder, AHugeEventIsCutIntoLinesReadersTake) {
  for (const std::string& unit : {std::string(1, '\0'), std::string("\xe2\x82\xac"), std::string("\xff")}) {
    std::string big;
    while (big.size() < (1u << 20)) big += unit;
    std::string out;
    Encoder enc(64u << 20);
    enc.header(out, test_header(false));
    enc.data(out, 1000, Code::Input, big);
    enc.finish(out, 2000, end_marker(0, 0));
    Parsed p = parse_all(out);  // strict, 4 MiB lines: the master's reader
    EXPECT_EQ(concat(p.events, "i"), big);
    for (const Event& e : p.events) {
      if (e.code == "i") {
        EXPECT_EQ(e.data.size() % unit.size(), 0u);  // whole characters
      }
    }
    EXPECT_EQ(enc.recorded(Code::Input), big.size());
  }
}

TEST(RecordingReader, PiecesOfAnySizeGiveTheSameEvents) {
  std::string out;
  Encoder enc(1 << 20);
  enc.header(out, test_header());
  std::mt19937 rng(7);
  std::string all;
  for (int i = 0; i < 50; i++) {
    std::string s(rng() % 500, '\0');
    for (char& c : s) c = static_cast<char>(rng());
    all += s;
    enc.data(out, i * 10, Code::Output, s);
  }
  enc.finish(out, 1000, incomplete_marker("the connection to the client was lost"));
  Reader r(Reader::Limits{4u << 20, true});
  std::string got;
  Summary sum;
  for (size_t i = 0; i < out.size(); i += 7)
    ASSERT_TRUE(r.feed(std::string_view(out).substr(i, 7), [&](Event&& e) {
      sum.add(e);
      if (e.code == "o") got += e.data;
    })) << r.error();
  ASSERT_TRUE(r.finish(nullptr));
  EXPECT_EQ(got, all);
  EXPECT_EQ(r.consumed(), out.size());
  EXPECT_FALSE(sum.complete());
  EXPECT_EQ(*sum.terminal, "incomplete: the connection to the client was lost");
}

TEST(RecordingReader, StrictRefusals) {
  const std::string head = R"({"version":2,"width":80,"height":24,"shimlet":{}})"
                           "\n";
  auto refused = [](const std::string& text) {
    Reader r(Reader::Limits{1024, true});
    return !r.feed(text, nullptr) || !r.finish(nullptr);
  };
  EXPECT_FALSE(refused(head + "[1.0, \"o\", \"x\"]\n"));
  EXPECT_TRUE(refused(R"({"version":1,"width":80,"height":24,"shimlet":{}})"
                      "\n"));
  EXPECT_TRUE(refused(R"({"version":2,"width":0,"height":24,"shimlet":{}})"
                      "\n"));
  EXPECT_TRUE(refused(R"({"version":2,"width":80,"height":24})"
                      "\n"));                                                 // no shimlet keys
  EXPECT_TRUE(refused(head + "[1.0, \"x\", \"x\"]\n"));                       // unknown code
  EXPECT_TRUE(refused(head + "[2.0, \"o\", \"x\"]\n[1.0, \"o\", \"x\"]\n"));  // backwards
  EXPECT_TRUE(refused(head + "[1.0, \"r\", \"80by24\"]\n"));
  EXPECT_TRUE(refused(head + "[1.0, \"o\", \"x\", 4]\n"));
  EXPECT_TRUE(refused(head + "[-1, \"o\", \"x\"]\n"));
  EXPECT_TRUE(refused(head + "[1.0, \"o\", \"x\"]"));  // cut line
  EXPECT_TRUE(refused(head + "\n"));
  EXPECT_TRUE(refused(head + "[1.0, \"o\", \"" + std::string(2000, 'a') + "\"]\n"));  // longer than the limit
  EXPECT_TRUE(refused(head + "[1.0, \"o\", \"\xff\"]\n"));                            // not UTF-8
  // Lenient (the player): unknown codes pass, a last line without '\n' is read.
  Reader lenient;
  std::vector<Event> ev;
  ASSERT_TRUE(lenient.feed(head + "[1.0, \"x\", \"y\"]\n[2.0, \"o\", \"z\"]", [&](Event&& e) { ev.push_back(e); }));
  ASSERT_TRUE(lenient.finish([&](Event&& e) { ev.push_back(e); }));
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[1].data, "z");
}

TEST(RecordingPacer, IdleLimitThenSpeed) {
  Pacer p(2.0, 1000000);
  EXPECT_EQ(p.at(0), 0);
  EXPECT_EQ(p.at(500000), 250000);
  EXPECT_EQ(p.at(10500000), 750000);  // a 10 s pause cut to 1 s, then halved
  EXPECT_EQ(p.at(10600000), 800000);
  Pacer plain(1.0, 0);
  EXPECT_EQ(plain.at(5000000), 5000000);
}

TEST(RecordingEcho, OnlyHiddenLineInputIsRecorded) {
  EXPECT_FALSE(tty_input_recorded(ICANON | ECHO));  // a cooked terminal echoes
  EXPECT_FALSE(tty_input_recorded(0));              // raw: the program draws it (readline, vi)
  EXPECT_FALSE(tty_input_recorded(ECHO));
  EXPECT_TRUE(tty_input_recorded(ICANON));  // a password prompt
}

TEST(Recorder, WritesALockedFileThenACast) {
  TempDir d;
  Recorder::Options o = options(d.path, "sess-1", true);
  std::string result_path;
  {
    Recorder r(o);
    const std::string rec = d.path + "/sess-1.rec";
    ASSERT_TRUE(std::filesystem::exists(rec));
    // Locked while the session lives.
    int fd = ::open(rec.c_str(), O_RDONLY);
    EXPECT_EQ(::flock(fd, LOCK_EX | LOCK_NB), -1);
    ::close(fd);
    r.output(Code::Output, "$ ", 2);
    r.input("ls\r", 3, ICANON | ECHO);  // echoed: not recorded
    r.input("secret\r", 7, ICANON);     // hidden prompt: recorded once
    r.input("q", 1, 0);                 // raw mode: not recorded
    r.resize(120, 40);
    r.output(Code::Output, "done\r\n", 6);
    Recorder::Result res = r.finish(end_marker(0, 0));
    EXPECT_TRUE(res.complete);
    EXPECT_TRUE(res.error.empty());
    EXPECT_EQ(res.out_bytes, 8u);
    EXPECT_EQ(res.in_bytes, 7u);
    result_path = res.path;
  }
  EXPECT_EQ(result_path, d.path + "/sess-1.cast");
  EXPECT_FALSE(std::filesystem::exists(d.path + "/sess-1.rec"));
  Parsed p = parse_all(slurp(result_path));
  EXPECT_EQ(concat(p.events, "o"), "$ done\r\n");
  EXPECT_EQ(concat(p.events, "i"), "secret\r");
  EXPECT_EQ(p.sum.resizes, 1u);
  EXPECT_TRUE(p.sum.complete());
  auto ready = spool::ready(d.path);
  ASSERT_EQ(ready.size(), 1u);
  EXPECT_EQ(ready[0].id, "sess-1");
}

TEST(Recorder, RefusesAnIdInUseAndBadIds) {
  TempDir d;
  Recorder::Options o = options(d.path, "dup", true);
  Recorder a(o);
  EXPECT_THROW(Recorder b(o), std::exception);
  o.id = "../x";
  EXPECT_THROW(Recorder c(o), std::exception);
}

TEST(RecorderSpool, AKilledSessionsRecordingIsFinishedIncomplete) {
  TempDir root;
  const std::string dir = root.path + "/ctr1";
  std::filesystem::create_directory(dir);
  auto r = std::make_unique<Recorder>(options(dir, "killed", false));
  r->output(Code::Output, "partial output\n", 15);
  // The live session's .rec is left alone.
  EXPECT_EQ(spool::finish_orphans(dir, "x").finished, 0u);
  r->abandon();  // as if killed: the lock goes, no terminal marker
  // A last whole event at a time whose double times 1e6 is just below
  // 1000001 (truncated, the marker went back in time and the master refused
  // the file), then half a line, as a SIGKILL in the middle of a write leaves it.
  {
    std::ofstream f(dir + "/killed.rec", std::ios::app);
    f << "[1.000001, \"o\", \"!\"]\n[9.0, \"o\", \"cut";
  }
  spool::Finished f = spool::finish_orphans(dir, "the session process was killed");
  EXPECT_EQ(f.finished, 1u);
  std::string text = slurp(dir + "/killed.cast");
  Parsed p = parse_all(text);
  EXPECT_EQ(concat(p.events, "o"), "partial output\n!");
  EXPECT_NE(text.find("[1.000001, \"m\", \"incomplete: "), std::string::npos) << text;
  EXPECT_FALSE(p.sum.complete());
  EXPECT_EQ(*p.sum.terminal, "incomplete: the session process was killed");
  EXPECT_GT(spool::usage(root.path), 0u);
  EXPECT_EQ(spool::container_dirs(root.path), std::vector<std::string>{"ctr1"});
  // A .rec without even its header line is dropped.
  { std::ofstream(dir + "/empty.rec") << "{\"version\""; }
  EXPECT_EQ(spool::finish_orphans(dir, "x").dropped, 1u);
  EXPECT_FALSE(std::filesystem::exists(dir + "/empty.rec"));
}

TEST(Recorder, AWriteFailureIsReportedNotBlocking) {
  TempDir d;
  Recorder r(options(d.path, "full", false));
  int ready;
  {
    shimlet::test::FileSizeLimit full(4096);  // writes past it fail with EFBIG
    std::string big(64 * 1024, 'x');
    r.output(Code::Output, big.data(), big.size());
    pollfd pfd{r.failure_fd(), POLLIN, 0};
    ready = poll(&pfd, 1, 10000);
  }
  ASSERT_EQ(ready, 1);
  EXPECT_TRUE(r.failed());
  EXPECT_NE(r.failure().find("File too large"), std::string::npos) << r.failure();
  r.output(Code::Output, "more", 4);  // dropped quietly
  Recorder::Result res = r.finish(end_marker(0, 0));
  EXPECT_FALSE(res.complete);
  EXPECT_EQ(res.path, d.path + "/full.rec");  // left for the spool to finish as incomplete
}

// The disk fills up in the middle of the incomplete marker (a short write,
// errno untouched): the .rec is still finished, without the marker, as on
// ENOSPC. It threw instead, with a stale errno, before any recording of the
// directory was sent: the uploads that would free the disk never ran.
TEST(RecorderSpool, AMarkerCutByAFullDiskStillFinishesTheRecording) {
  TempDir d;
  { std::ofstream(d.path + "/cut.rec") << "{\"version\": 2, \"width\": 80, \"height\": 24}\n[1.0, \"o\", \"x\"]\n"; }
  off_t size = static_cast<off_t>(std::filesystem::file_size(d.path + "/cut.rec"));
  std::string error;
  spool::Finished f;
  {
    shimlet::test::FileSizeLimit full(static_cast<rlim_t>(size) + 10);  // room for 10 bytes of the marker
    errno = 0;
    try {
      f = spool::finish_orphans(d.path, "killed");
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  EXPECT_EQ(error, "");
  EXPECT_EQ(f.finished, 1u);
  EXPECT_EQ(slurp(d.path + "/cut.cast"), "{\"version\": 2, \"width\": 80, \"height\": 24}\n[1.0, \"o\", \"x\"]\n");
}
