#include "recording/asciicast.h"

#include <cmath>
#include <cstdio>
#include <cstring>

namespace shimlet::recording {
namespace {

// Length (2..4) of the valid UTF-8 sequence at p, or 0.
size_t utf8_len(const unsigned char* p, size_t n) {
  unsigned c = p[0];
  auto cont = [&](size_t i) { return i < n && (p[i] & 0xC0) == 0x80; };
  if (c < 0xC2) return 0;  // ASCII, a continuation byte, or an overlong C0/C1 lead
  if (c < 0xE0) return cont(1) ? 2 : 0;
  if (c < 0xF0) {
    if (!cont(1) || !cont(2)) return 0;
    if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] >= 0xA0)) return 0;  // overlong, surrogate
    return 3;
  }
  if (c < 0xF5) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    if ((c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] >= 0x90)) return 0;  // overlong, > U+10FFFF
    return 4;
  }
  return 0;
}

// The 3-byte sequences of U+EF80..U+EFFF: the range raw bytes map to.
bool is_mapped_range(const unsigned char* p) { return p[0] == 0xEE && (p[1] == 0xBE || p[1] == 0xBF); }

// What one byte becomes when it is not the start of a valid multi-byte
// sequence: itself, its JSON escape, or (>= 0x80) U+EF00 + byte in UTF-8
// (EE, BE|BF, 80 + low six bits). At most 6 bytes; padded to 8 for one store.
struct Mapped {
  std::array<std::array<char, 8>, 256> bytes{};
  std::array<uint8_t, 256> len{};
};
constexpr Mapped kMapped = [] {
  Mapped m{};
  const char* hex = "0123456789abcdef";
  for (int b = 0; b < 256; b++) {
    auto& o = m.bytes[b];
    auto put = [&](std::initializer_list<int> cs) {
      int i = 0;
      for (int c : cs) o[i++] = static_cast<char>(c);
      m.len[b] = static_cast<uint8_t>(i);
    };
    if (b >= 0x80)
      put({0xEE, b >= 0xC0 ? 0xBF : 0xBE, 0x80 | (b & 0x3F)});
    else if (b == '"' || b == '\\')
      put({'\\', b});
    else if (b == '\n' || b == '\r' || b == '\t' || b == '\b' || b == '\f')
      put({'\\', b == '\n' ? 'n' : b == '\r' ? 'r' : b == '\t' ? 't' : b == '\b' ? 'b' : 'f'});
    else if (b < 0x20)
      put({'\\', 'u', '0', '0', hex[b >> 4], hex[b & 15]});
    else
      put({b});
  }
  return m;
}();

// Eight bytes that are all copied as is (printable ASCII but '"' and '\\').
bool plain8(uint64_t x) {
  constexpr uint64_t k01 = 0x0101010101010101ull, k80 = 0x8080808080808080ull;
  auto zero_byte = [](uint64_t v) { return (v - k01) & ~v & k80; };
  return !((x & k80) | ((x - 0x20 * k01) & ~x & k80) | zero_byte(x ^ (0x22 * k01)) | zero_byte(x ^ (0x5C * k01)));
}

// Appends the mapping of p[0..n) (no quotes) to out. Writes through a raw
// pointer into room reserved up front, eight plain bytes at a time and one
// table store per other byte: per-byte appends and branches made random
// binary output about 20 times slower than text.
void put_bytes(std::string& out, const unsigned char* p, size_t n) {
  size_t base = out.size();
  out.resize(base + 6 * n + 8);
  char* d = out.data() + base;
  size_t i = 0, next_try = 0;  // after a failed try, the next 8 bytes go one by one (binary data)
  while (i < n) {
    if (i >= next_try && i + 8 <= n) {
      uint64_t x;
      memcpy(&x, p + i, 8);
      if (plain8(x)) {
        memcpy(d, &x, 8);
        d += 8;
        i += 8;
        continue;
      }
      next_try = i + 8;
    }
    unsigned char c = p[i];
    // A lead byte followed by a continuation byte (rare in binary data, so
    // this branch stays predictable) may start a valid sequence.
    if (c - 0xC2u <= 0xF4u - 0xC2u && i + 1 < n && (p[i + 1] & 0xC0) == 0x80) {
      size_t len = utf8_len(p + i, n - i);
      if (len && !(len == 3 && is_mapped_range(p + i))) {
        memcpy(d, p + i, len);
        d += len;
        i += len;
        continue;
      }
    }
    memcpy(d, kMapped.bytes[c].data(), 8);
    d += kMapped.len[c];
    i++;
  }
  out.resize(static_cast<size_t>(d - out.data()));
}

int code_index(Code c) { return c == Code::Output ? 0 : c == Code::Stderr ? 1 : 2; }

}  // namespace

void append_json_bytes(std::string& out, std::string_view bytes) {
  out += '"';
  put_bytes(out, reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  out += '"';
}

std::string text_to_bytes(std::string_view utf8) {
  std::string out;
  out.reserve(utf8.size());
  auto* p = reinterpret_cast<const unsigned char*>(utf8.data());
  size_t n = utf8.size(), i = 0;
  while (i < n) {
    if (p[i] < 0x80) {
      out += static_cast<char>(p[i++]);
      continue;
    }
    size_t len = utf8_len(p + i, n - i);
    if (len == 3 && is_mapped_range(p + i)) {
      out += static_cast<char>((p[i + 1] == 0xBF ? 0xC0 : 0x80) | (p[i + 2] & 0x3F));
    } else if (len == 0) {
      len = 1;  // not from a JSON parser: byte for byte
      out += static_cast<char>(p[i]);
    } else {
      out.append(utf8.substr(i, len));
    }
    i += len;
  }
  return out;
}

size_t unfinished_utf8_suffix(std::string_view bytes) {
  auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t n = bytes.size();
  for (size_t back = 1; back <= 3 && back <= n; back++) {
    unsigned c = p[n - back];
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte: the lead is further back
    size_t need = c >= 0xC2 && c < 0xE0 ? 2 : c >= 0xE0 && c < 0xF0 ? 3 : c >= 0xF0 && c < 0xF5 ? 4 : 0;
    if (need <= back) return 0;  // ASCII, an invalid lead, or a sequence that is complete (or bad)
    // The second byte's range rules, when it is there.
    if (back >= 2) {
      unsigned c1 = p[n - back + 1];
      if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 >= 0xA0) || (c == 0xF0 && c1 < 0x90) ||
          (c == 0xF4 && c1 >= 0x90))
        return 0;
    }
    return back;
  }
  return 0;
}

std::string format_time(int64_t t_us) {
  if (t_us < 0) t_us = 0;
  char buf[32];
  int n = snprintf(buf, sizeof buf, "%lld.%06lld", static_cast<long long>(t_us / 1000000),
                   static_cast<long long>(t_us % 1000000));
  return std::string(buf, static_cast<size_t>(n));
}

std::string shell_join(const std::vector<std::string>& argv) {
  std::string out;
  for (const std::string& a : argv) {
    if (!out.empty()) out += ' ';
    bool plain = !a.empty();
    for (char c : a)
      if (!(isalnum(static_cast<unsigned char>(c)) || std::string_view("_@%+=:,./-").find(c) != std::string_view::npos))
        plain = false;
    if (plain) {
      out += a;
      continue;
    }
    out += '\'';
    for (char c : a) {
      if (c == '\'')
        out += "'\\''";
      else
        out += c;
    }
    out += '\'';
  }
  return out;
}

std::string header_line(const Header& h) {
  // In the spec's order ("version" first: some tools sniff the first bytes).
  // A tty with no size yet (0x0 until the client's first resize) gets the
  // non-tty size: the spec requires one, and readers refuse 0.
  const bool sized = h.width && h.height;
  nlohmann::ordered_json j = {{"version", 2},
                              {"width", sized ? h.width : uint16_t{80}},
                              {"height", sized ? h.height : uint16_t{24}},
                              {"timestamp", h.timestamp}};
  if (!h.command.empty()) j["command"] = shell_join(h.command);
  if (!h.term.empty()) j["env"] = {{"TERM", h.term}};
  // A title players show: who, where, what.
  const auto& s = h.shimlet;
  auto str = [&](const char* k) { return s.contains(k) && s[k].is_string() ? s[k].get<std::string>() : std::string(); };
  std::string where = str("namespace") + "/" + str("pod") + "/" + str("container");
  std::string title = str("user") + " in " + where;
  if (!h.command.empty()) title += ": " + shell_join(h.command);
  j["title"] = title.substr(0, 256);
  j["shimlet"] = s;
  // Strings from the ticket (argv) need not be UTF-8: replaced, never thrown.
  return j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
}

std::string end_marker(int exit_code, int signal) {
  if (signal)
    return "end: killed by signal " + std::to_string(signal) + " (exit code " + std::to_string(exit_code) + ")";
  return "end: exit code " + std::to_string(exit_code);
}

std::string incomplete_marker(std::string_view why) { return "incomplete: " + std::string(why.substr(0, 1000)); }

std::string truncated_marker(uint64_t max_bytes) {
  return "truncated: the recording reached its limit of " + std::to_string(max_bytes) +
         " bytes; later events are not recorded";
}

std::string gap_marker(uint64_t events, uint64_t bytes) {
  return "gap: " + std::to_string(events) + " events (" + std::to_string(bytes) +
         " bytes) were not recorded: the recorder fell behind";
}

Encoder::Encoder(uint64_t max_bytes) : max_(std::max(max_bytes, kMinMaxBytes)) {}

uint64_t Encoder::recorded(Code c) const {
  if (c != Code::Output && c != Code::Stderr && c != Code::Input) return 0;
  return recorded_[code_index(c)];
}

int64_t Encoder::clamp(int64_t t_us) {
  if (t_us < last_t_) t_us = last_t_;
  last_t_ = t_us;
  return t_us;
}

void Encoder::header(std::string& out, const Header& h) {
  std::string l = header_line(h);
  bytes_ += l.size();
  out += l;
}

bool Encoder::fits(uint64_t line) const { return bytes_ + line + kReserve <= max_; }

// The line appended since `mark` fits, or it is taken back and the
// truncated marker written in its place (once).
bool Encoder::room_for(std::string& out, size_t mark, int64_t t_us) {
  uint64_t line = out.size() - mark;
  if (fits(line)) {
    bytes_ += line;
    return true;
  }
  out.resize(mark);
  truncate(out, t_us);
  return false;
}

void Encoder::truncate(std::string& out, int64_t t_us) {
  truncated_ = true;
  for (auto& h : held_) h.clear();
  std::string m = "[" + format_time(t_us) + ", \"m\", ";
  append_json_bytes(m, truncated_marker(max_));
  m += "]\n";
  bytes_ += m.size();
  out += m;
}

namespace {
void append_data_line(std::string& out, const std::string& time, Code c, std::string_view bytes) {
  out += '[';
  out += time;
  out += ", \"";
  out += static_cast<char>(c);
  out += "\", ";
  append_json_bytes(out, bytes);
  out += "]\n";
}
}  // namespace

// A data event that does not fit whole keeps its longest prefix that does
// (cut before a character the prefix would split), then the truncated
// marker: a read is up to hundreds of KiB, so dropping it whole could leave
// a small limit's recording without any of the output.
void Encoder::put_data(std::string& out, int64_t t_us, Code c, std::string_view bytes) {
  size_t mark = out.size();
  const std::string time = format_time(t_us);
  append_data_line(out, time, c, bytes);
  if (fits(out.size() - mark)) {
    bytes_ += out.size() - mark;
    recorded_[code_index(c)] += bytes.size();
    return;
  }
  out.resize(mark);
  if (bytes.empty()) return truncate(out, t_us);
  std::string line;
  auto prefix_fits = [&](size_t n) {
    line.clear();
    append_data_line(line, time, c, bytes.substr(0, n));
    return fits(line.size());
  };
  size_t lo = 0, hi = bytes.size() - 1;  // a prefix of lo bytes fits (0: nothing); bytes.size() does not
  while (lo < hi) {
    size_t mid = lo + (hi - lo + 1) / 2;
    if (prefix_fits(mid))
      lo = mid;
    else
      hi = mid - 1;
  }
  size_t n = lo - unfinished_utf8_suffix(bytes.substr(0, lo));
  if (n && prefix_fits(n)) {
    bytes_ += line.size();
    out += line;
    recorded_[code_index(c)] += n;
  }
  truncate(out, t_us);
}

// At most kMaxEventBytes per line, cut between characters: readers take
// lines of 4 MiB, and one stdin message can be 1 MiB (6 MiB encoded).
void Encoder::put_pieces(std::string& out, int64_t t_us, Code c, std::string_view bytes) {
  while (!bytes.empty() && !truncated_) {
    size_t n = bytes.size();
    if (n > kMaxEventBytes) n = kMaxEventBytes - unfinished_utf8_suffix(bytes.substr(0, kMaxEventBytes));
    put_data(out, t_us, c, bytes.substr(0, n));
    bytes.remove_prefix(n);
  }
}

void Encoder::data(std::string& out, int64_t t_us, Code c, std::string_view bytes) {
  if (finished_ || truncated_ || bytes.empty()) return;
  if (c != Code::Output && c != Code::Stderr && c != Code::Input) return;
  t_us = clamp(t_us);
  std::string& held = held_[code_index(c)];
  if (held.empty()) {
    size_t keep = unfinished_utf8_suffix(bytes);
    if (keep) held.assign(bytes.substr(bytes.size() - keep));
    bytes.remove_suffix(keep);
    put_pieces(out, t_us, c, bytes);
    return;
  }
  // Rare: the previous read ended inside a character. Joining costs a copy.
  std::string joined = held + std::string(bytes);
  held.clear();
  size_t keep = unfinished_utf8_suffix(joined);
  if (keep) held.assign(joined, joined.size() - keep, keep);
  joined.resize(joined.size() - keep);
  put_pieces(out, t_us, c, joined);
}

void Encoder::resize(std::string& out, int64_t t_us, uint16_t cols, uint16_t rows) {
  if (finished_ || truncated_) return;
  t_us = clamp(t_us);
  size_t mark = out.size();
  out += "[" + format_time(t_us) + ", \"r\", \"" + std::to_string(cols) + "x" + std::to_string(rows) + "\"]\n";
  room_for(out, mark, t_us);
}

void Encoder::marker(std::string& out, int64_t t_us, std::string_view label) {
  if (finished_ || truncated_) return;
  t_us = clamp(t_us);
  size_t mark = out.size();
  out += "[" + format_time(t_us) + ", \"m\", ";
  append_json_bytes(out, label);
  out += "]\n";
  room_for(out, mark, t_us);
}

void Encoder::finish(std::string& out, int64_t t_us, std::string_view terminal_marker) {
  if (finished_) return;
  t_us = clamp(t_us);
  for (Code c : {Code::Output, Code::Stderr, Code::Input}) {
    std::string& held = held_[code_index(c)];
    if (held.empty() || truncated_) continue;
    std::string rest = std::move(held);
    held.clear();
    put_data(out, t_us, c, rest);
  }
  // The reserve is for this line (and the truncated marker): always written.
  std::string m = "[" + format_time(t_us) + ", \"m\", ";
  append_json_bytes(m, terminal_marker.substr(0, 1024));
  m += "]\n";
  bytes_ += m.size();
  out += m;
  finished_ = true;
}

// ---------------------------------------------------------------- reading

bool parse_size(std::string_view s, uint16_t& cols, uint16_t& rows) {
  size_t x = s.find('x');
  if (x == std::string_view::npos) return false;
  auto num = [](std::string_view d, uint16_t& v) {
    if (d.empty() || d.size() > 5) return false;
    uint32_t n = 0;
    for (char c : d) {
      if (c < '0' || c > '9') return false;
      n = n * 10 + static_cast<uint32_t>(c - '0');
    }
    if (n < 1 || n > 65535) return false;
    v = static_cast<uint16_t>(n);
    return true;
  };
  return num(s.substr(0, x), cols) && num(s.substr(x + 1), rows);
}

bool Reader::fail(std::string why) {
  err_ = "line " + std::to_string(lines_ + 1) + ": " + why;
  partial_.clear();
  partial_.shrink_to_fit();
  return false;
}

bool Reader::line(std::string_view l, const OnEvent& on_event) {
  if (!l.empty() && l.back() == '\r') l.remove_suffix(1);
  if (l.empty()) {
    if (lim_.strict) return fail("empty line");
    lines_++;
    return true;
  }
  nlohmann::json j = nlohmann::json::parse(l.begin(), l.end(), nullptr, false);
  if (j.is_discarded()) return fail("not JSON");
  if (header_.is_null()) {
    if (!j.is_object()) return fail("the header is not a JSON object");
    auto v = j.find("version");
    if (v == j.end() || !v->is_number_integer() || v->get<int64_t>() != 2) return fail("not asciicast version 2");
    for (const char* k : {"width", "height"}) {
      auto d = j.find(k);
      if (d == j.end() || !d->is_number_integer() || d->get<int64_t>() < 1 || d->get<int64_t>() > 65535)
        return fail(std::string("header \"") + k + "\" must be an integer 1..65535");
    }
    if (lim_.strict) {
      auto s = j.find("shimlet");
      if (s == j.end() || !s->is_object()) return fail("header has no \"shimlet\" object");
    }
    header_ = std::move(j);
    lines_++;
    return true;
  }
  if (!j.is_array() || j.size() != 3) return fail("an event must be a [time, code, data] array");
  if (!j[0].is_number()) return fail("event time is not a number");
  double t = j[0].get<double>();
  if (!std::isfinite(t) || t < 0 || t > 1e10) return fail("event time out of range");
  if (!j[1].is_string() || !j[2].is_string()) return fail("event code and data must be strings");
  Event e;
  e.t_us = std::llround(t * 1e6);
  e.code = j[1].get<std::string>();
  if (lim_.strict) {
    if (e.t_us < last_t_) return fail("event time goes backwards");
    if (e.code.size() != 1 || std::string_view("oeirm").find(e.code[0]) == std::string_view::npos)
      return fail("unknown event code");
  }
  last_t_ = std::max(last_t_, e.t_us);
  const std::string& d = j[2].get_ref<const std::string&>();
  if (e.code == "o" || e.code == "e" || e.code == "i") {
    e.data = text_to_bytes(d);
  } else {
    e.data = d;
    uint16_t c, r;
    if (lim_.strict && e.code == "r" && !parse_size(e.data, c, r)) return fail("resize data is not COLSxROWS");
  }
  lines_++;
  if (on_event) on_event(std::move(e));
  return true;
}

bool Reader::feed(std::string_view bytes, const OnEvent& on_event) {
  if (!err_.empty()) return false;
  while (!bytes.empty()) {
    size_t nl = bytes.find('\n');
    if (nl == std::string_view::npos) {
      if (partial_.size() + bytes.size() > lim_.max_line)
        return fail("longer than " + std::to_string(lim_.max_line) + " bytes");
      partial_.append(bytes);
      return true;
    }
    if (partial_.size() + nl > lim_.max_line) return fail("longer than " + std::to_string(lim_.max_line) + " bytes");
    uint64_t took = partial_.size() + nl + 1;
    bool ok;
    if (partial_.empty()) {
      ok = line(bytes.substr(0, nl), on_event);
    } else {
      partial_.append(bytes.substr(0, nl));
      std::string l = std::move(partial_);
      partial_.clear();
      ok = line(l, on_event);
    }
    if (!ok) return false;
    consumed_ += took;
    bytes.remove_prefix(nl + 1);
  }
  return true;
}

bool Reader::finish(const OnEvent& on_event) {
  if (!err_.empty()) return false;
  if (partial_.empty()) return true;
  if (lim_.strict) return fail("the last line has no newline");
  std::string l = std::move(partial_);
  partial_.clear();
  if (!line(l, on_event)) return false;
  consumed_ += l.size();
  return true;
}

int64_t Pacer::at(int64_t t_us) {
  int64_t gap = std::max<int64_t>(0, t_us - last_in_);
  if (idle_ > 0) gap = std::min(gap, idle_);
  last_in_ = std::max(last_in_, t_us);
  compressed_ += gap;
  return static_cast<int64_t>(static_cast<double>(compressed_) / speed_);
}

void Summary::add(const Event& e) {
  events++;
  duration_us = std::max(duration_us, e.t_us);
  if (e.code == "o") {
    out_bytes += e.data.size();
  } else if (e.code == "e") {
    err_bytes += e.data.size();
  } else if (e.code == "i") {
    in_bytes += e.data.size();
  } else if (e.code == "r") {
    resizes++;
  } else if (e.code == "m") {
    if (e.data.rfind("truncated:", 0) == 0) truncated = true;
    if (e.data.rfind("gap:", 0) == 0) gaps++;
    if (e.data.rfind("end:", 0) == 0 || e.data.rfind("incomplete:", 0) == 0) terminal = e.data;
  }
}

}  // namespace shimlet::recording
