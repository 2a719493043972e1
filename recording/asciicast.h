// asciicast v2 (newline-delimited JSON: a header object, then one
// [time, code, data] array per event) for session recordings
// (docs/recording.md): the encoder the session writes with, and the reader
// the master's ingest and shimctl's player parse with. Pure: no I/O, no
// clock (times come in as microseconds since the session started). Fuzzed:
// tests/fuzz/asciicast_fuzz.cc.
//
// Event codes: tty sessions use the spec's "o" (terminal output), "i" (input
// the terminal did not echo, see recording/recorder.h), "r" ("COLSxROWS") and
// "m" (marker); non-tty sessions "o" stdout, "e" stderr, "i" stdin. asciinema
// plays "o" events and skips the other codes, so a non-tty recording plays its
// stdout there.
//
// Bytes, not text. An event's data is a JSON string (Unicode), but what a
// command writes is bytes, not always UTF-8 (binary output, a character split
// across two reads). The mapping is one-to-one, so data reassembles to the
// exact bytes (checksums match):
//   * a valid UTF-8 sequence (shortest form, no surrogates, <= U+10FFFF)
//     stays the character it encodes, except U+EF80..U+EFFF;
//   * every other byte 0x80..0xFF (stray continuation bytes, bad or cut
//     sequences, and the three bytes of a real U+EF80..U+EFFF) becomes the
//     character U+EF00 + byte: the private-use range MirBSD's OPTU-8 gives raw
//     octets, so a player shows a placeholder glyph where a terminal shows its
//     replacement character;
//   * '"', '\\' and control characters are JSON-escaped.
// Decoding maps U+EF80..U+EFFF back to the byte and every other character to
// its UTF-8. Size: text 1x; bytes that are not UTF-8 3x; \n \r \t \b \f 2x,
// other control bytes 6x (\u00XX). Sizes and limits count the encoded file.
//
// A UTF-8 sequence cut at the end of a read is held back (at most 3 bytes per
// code) and joins the next data of the same code, so text never shows as
// placeholders because of where a read ended; finish() flushes what is held.
//
// Markers the recorder writes (and the master reads, docs/recording.md); the
// recorded command cannot make one, its bytes only ever land in data:
//   "truncated: ..."   the recording reached its size limit; nothing but the
//                      terminal marker follows
//   "gap: ..."         events were dropped (the recorder fell behind)
//   "end: ..."         terminal: the command's exit was recorded (complete)
//   "incomplete: ..."  terminal: the recording stops early (connection lost,
//                      session or shim killed, container gone, disk full)
// A recording without a terminal marker is incomplete.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace shimlet::recording {

enum class Code : char { Output = 'o', Stderr = 'e', Input = 'i', Resize = 'r', Marker = 'm' };

// Appends `bytes` as a JSON string literal (quotes included) with the byte
// mapping above. Bytes of an unfinished sequence at the end are mapped too
// (the Encoder holds them back before calling this).
void append_json_bytes(std::string& out, std::string_view bytes);
// Inverse of the mapping, on the UTF-8 a JSON parser made of such a string.
// Input that is not valid UTF-8 (never produced by a JSON parser) is taken
// byte for byte.
std::string text_to_bytes(std::string_view utf8);
// Length of the longest suffix of `bytes` (0..3) that is the start of a valid
// multi-byte UTF-8 sequence still missing bytes.
size_t unfinished_utf8_suffix(std::string_view bytes);

// "S.UUUUUU" for microseconds (asciinema's precision), never negative.
std::string format_time(int64_t t_us);

struct Header {
  // A tty's size may be 0x0 (none yet): the header line then says 80x24.
  uint16_t width = 80, height = 24;  // tty: the initial size; non-tty: 80x24 (the spec requires both)
  int64_t timestamp = 0;             // unix seconds of the start
  std::string term;                  // env.TERM (tty only)
  std::vector<std::string> command;  // the header's "command" is its shell-quoted join
  // shimlet's own keys, under "shimlet" (asciinema ignores unknown keys):
  // user, namespace, pod, container, container_id, node, session_id,
  // shim_session, jti, start (RFC 3339), command (argv), tty, stdin.
  nlohmann::json shimlet = nlohmann::json::object();
};
// The header line (JSON object + '\n').
std::string header_line(const Header& h);
// "a b 'c d'": argv joined for the spec's "command" string.
std::string shell_join(const std::vector<std::string>& argv);

// Marker labels (prefix then detail).
std::string end_marker(int exit_code, int signal);
std::string incomplete_marker(std::string_view why);
std::string truncated_marker(uint64_t max_bytes);
std::string gap_marker(uint64_t events, uint64_t bytes);

// Turns events into lines, bounded: once the next line would take the file
// past max_bytes - kReserve, a "truncated" marker is written instead (after
// the longest prefix of a data event that fits) and every later event is
// dropped; the reserve keeps room for that marker and the terminal one. Times are clamped to be non-decreasing.
class Encoder {
 public:
  static constexpr uint64_t kReserve = 4096;
  static constexpr uint64_t kMinMaxBytes = 64 * 1024;
  static constexpr size_t kMaxEventBytes = 64 * 1024;  // raw bytes per data line (longer data: several lines)
  explicit Encoder(uint64_t max_bytes);

  // The header line: first.
  void header(std::string& out, const Header& h);
  // Output/Stderr/Input data (Resize and Marker have their own calls).
  void data(std::string& out, int64_t t_us, Code c, std::string_view bytes);
  void resize(std::string& out, int64_t t_us, uint16_t cols, uint16_t rows);
  void marker(std::string& out, int64_t t_us, std::string_view label);
  // Flushes held-back bytes, then the terminal marker ("end: ..." or
  // "incomplete: ..."). Nothing may follow.
  void finish(std::string& out, int64_t t_us, std::string_view terminal_marker);

  uint64_t bytes() const { return bytes_; }  // everything appended so far
  bool truncated() const { return truncated_; }
  bool finished() const { return finished_; }
  uint64_t max_bytes() const { return max_; }
  // Raw bytes recorded per data code (held-back bytes count once flushed).
  uint64_t recorded(Code c) const;

 private:
  bool fits(uint64_t line) const;
  bool room_for(std::string& out, size_t mark, int64_t t_us);
  void truncate(std::string& out, int64_t t_us);
  void put_data(std::string& out, int64_t t_us, Code c, std::string_view bytes);
  void put_pieces(std::string& out, int64_t t_us, Code c, std::string_view bytes);
  int64_t clamp(int64_t t_us);
  uint64_t max_, bytes_ = 0;
  int64_t last_t_ = 0;
  bool truncated_ = false, finished_ = false;
  std::array<std::string, 3> held_;     // o, e, i
  std::array<uint64_t, 3> recorded_{};  // o, e, i
};

// One parsed line after the header. data: decoded bytes for o/e/i, the
// string as is for every other code.
struct Event {
  int64_t t_us = 0;
  std::string code;
  std::string data;
};

// Newline-delimited reader: feed bytes in any pieces; each complete line is
// parsed (nlohmann/json), the first as the header. Limits bound memory.
class Reader {
 public:
  struct Limits {
    size_t max_line = 4u << 20;  // the encoder's longest line is 6 x 64 KiB + a few bytes
    // Master ingest: only shimlet's codes (o e i r m), times non-decreasing,
    // "r" data COLSxROWS, the header's "shimlet" object present.
    bool strict = false;
  };
  using OnEvent = std::function<void(Event&&)>;
  explicit Reader(Limits l) : lim_(l) {}
  Reader() : Reader(Limits{}) {}

  // False once an error was found (error() says which line and why); the
  // reader then refuses further input.
  bool feed(std::string_view bytes, const OnEvent& on_event);
  // End of input: a last line without '\n' is an error in strict mode
  // (uploads are cut at line ends) and parsed otherwise.
  bool finish(const OnEvent& on_event);

  bool has_header() const { return !header_.is_null(); }
  const nlohmann::json& header() const { return header_; }
  const std::string& error() const { return err_; }
  uint64_t lines() const { return lines_; }
  // Bytes of complete lines taken so far (what follows is a partial line).
  uint64_t consumed() const { return consumed_; }

 private:
  bool line(std::string_view l, const OnEvent& on_event);
  bool fail(std::string why);
  Limits lim_;
  std::string partial_;
  nlohmann::json header_;
  std::string err_;
  uint64_t lines_ = 0, consumed_ = 0;
  int64_t last_t_ = 0;
};

// What a recording says about itself, from its events: the master's
// metadata and the player's closing note.
struct Summary {
  int64_t duration_us = 0;
  uint64_t events = 0, resizes = 0;
  uint64_t out_bytes = 0, err_bytes = 0, in_bytes = 0;  // decoded data of o / e / i
  bool truncated = false;
  uint64_t gaps = 0;
  std::optional<std::string> terminal;  // the "end: ..." or "incomplete: ..." marker
  bool complete() const { return terminal && terminal->rfind("end:", 0) == 0; }
  void add(const Event& e);
};

// Playback timing (shimctl sessions play): an event's offset from the start
// of playback, with every pause longer than idle_limit_us cut to it, then
// divided by speed (asciinema's order). Feed events in order.
class Pacer {
 public:
  Pacer(double speed, int64_t idle_limit_us) : speed_(speed > 0 ? speed : 1.0), idle_(idle_limit_us) {}
  int64_t at(int64_t t_us);

 private:
  double speed_;
  int64_t idle_;
  int64_t last_in_ = 0, compressed_ = 0;
};

// Parses "COLSxROWS" (1..65535 each).
bool parse_size(std::string_view s, uint16_t& cols, uint16_t& rows);

}  // namespace shimlet::recording
