#include "session/session_http1.h"

#include <openssl/sha.h>

#include <algorithm>
#include <cctype>
#include <nlohmann/json.hpp>

#include "common/base64.h"

namespace shimlet::session::http1 {
namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool has_token(const std::vector<std::string>& list, std::string_view token) {
  for (auto& v : list)
    if (lower(v) == lower(token)) return true;
  return false;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  size_t start = 0;
  for (;;) {
    size_t p = s.find(sep, start);
    out.push_back(s.substr(start, p == std::string_view::npos ? std::string_view::npos : p - start));
    if (p == std::string_view::npos) return out;
    start = p + 1;
  }
}

int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Percent-decoding by hand: libevent's evhttp decoder returns C strings and
// would silently truncate a value at %00.
std::optional<std::string> form_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); i++) {
    char c = s[i];
    if (c == '+') {
      out += ' ';
    } else if (c == '%') {
      if (i + 2 >= s.size()) return std::nullopt;
      int h = hexval(s[i + 1]), l = hexval(s[i + 2]);
      if (h < 0 || l < 0) return std::nullopt;
      out += static_cast<char>(h * 16 + l);
      i += 2;
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------- query, routes

std::optional<std::vector<std::pair<std::string, std::string>>> parse_query(std::string_view q) {
  std::vector<std::pair<std::string, std::string>> out;
  if (q.empty()) return out;
  for (auto part : split(q, '&')) {
    if (part.empty()) continue;
    size_t eq = part.find('=');
    auto k = form_decode(part.substr(0, eq));
    auto v = form_decode(eq == std::string_view::npos ? std::string_view() : part.substr(eq + 1));
    if (!k || !v) return std::nullopt;
    out.emplace_back(std::move(*k), std::move(*v));
  }
  return out;
}

std::optional<bool> parse_bool(std::string_view v) {
  for (const char* t : {"1", "t", "T", "TRUE", "true", "True"})
    if (v == t) return true;
  for (const char* f : {"0", "f", "F", "FALSE", "false", "False"})
    if (v == f) return false;
  return std::nullopt;
}

Route route(std::string_view path) {
  Route r;
  auto seg = split(path, '/');
  auto verb_of = [](std::string_view v) -> std::optional<Verb> {
    if (v == "exec") return Verb::Exec;
    if (v == "portforward") return Verb::PortForward;
    if (v == "attach") return Verb::Attach;
    return std::nullopt;
  };
  // /api/v1/namespaces/NS/pods/POD/VERB
  if (seg.size() == 8 && seg[0].empty() && seg[1] == "api" && seg[2] == "v1" && seg[3] == "namespaces" &&
      !seg[4].empty() && seg[5] == "pods" && !seg[6].empty()) {
    if (auto v = verb_of(seg[7])) {
      r.verb = *v;
      r.kube_api = true;
      r.ns = seg[4];
      r.pod = seg[6];
    } else {
      r.status = 404;
    }
  } else if (seg.size() == 3 && seg[0].empty() && !seg[2].empty()) {  // /VERB/<ticket> (CRI streaming server)
    if (auto v = verb_of(seg[1])) {
      r.verb = *v;
      r.token = seg[2];
    } else {
      r.status = 404;
    }
  } else {
    r.status = 404;
  }
  if (r.status == 404) {
    r.why = "no such endpoint: " + loggable_path(path);
  } else if (r.verb == Verb::Attach) {
    r.status = 501;
    r.why = "attach is not supported: a shim cannot attach to the container's main process (use exec)";
  }
  return r;
}

std::string loggable_path(std::string_view path) {
  auto seg = split(path, '/');
  std::string p;
  if (seg.size() == 3 && seg[0].empty() && (seg[1] == "exec" || seg[1] == "portforward" || seg[1] == "attach"))
    p = "/" + std::string(seg[1]) + "/<ticket>";
  else
    p = std::string(path.substr(0, 512));
  // One clear line: no control characters from the client in our answers and logs.
  for (auto& c : p)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  return p;
}

// ---------------------------------------------------------------- negotiation

Negotiation negotiate(const Request& r, Verb verb) {
  Negotiation n;
  auto fail = [&n](std::string why) {
    n.status = 400;
    n.why = std::move(why);
    return n;
  };
  auto upgrade = r.header_list("upgrade");
  bool conn_upgrade = has_token(r.header_list("connection"), "upgrade");
  if (has_token(upgrade, "websocket")) {
    if (r.method != "GET") return fail("a WebSocket upgrade needs GET");
    if (!conn_upgrade) return fail("WebSocket upgrade without Connection: Upgrade");
    if (r.header("sec-websocket-version").value_or("") != "13")
      return fail("unsupported Sec-WebSocket-Version (need 13)");
    std::string key(trim(r.header("sec-websocket-key").value_or("")));
    auto raw = base64_decode(key);
    if (!raw || raw->size() != 16) return fail("missing or malformed Sec-WebSocket-Key");
    n.transport = Transport::WebSocket;
    n.ws_key = key;
    std::vector<std::string> ours = verb == Verb::Exec
                                        ? std::vector<std::string>{"v5.channel.k8s.io", "v4.channel.k8s.io"}
                                        : std::vector<std::string>{"SPDY/3.1+portforward.k8s.io"};
    auto offered = r.header_list("sec-websocket-protocol");
    for (auto& o : offered)
      if (std::find(ours.begin(), ours.end(), o) != ours.end()) {
        n.protocol = o;
        return n;
      }
    std::string list;
    for (auto& o : ours) list += (list.empty() ? "" : ", ") + o;
    return fail("no supported WebSocket subprotocol offered (this endpoint serves " + list + ")");
  }
  if (has_token(upgrade, "SPDY/3.1")) {
    if (r.method != "POST" && r.method != "GET") return fail("a SPDY upgrade needs POST");
    if (!conn_upgrade) return fail("SPDY upgrade without Connection: Upgrade");
    n.transport = Transport::Spdy;
    std::vector<std::string> ours =
        verb == Verb::Exec
            ? std::vector<std::string>{"v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"}
            : std::vector<std::string>{"portforward.k8s.io"};
    for (auto& o : r.header_list("x-stream-protocol-version"))
      if (std::find(ours.begin(), ours.end(), o) != ours.end()) {
        n.protocol = o;
        return n;
      }
    std::string list;
    for (auto& o : ours) list += (list.empty() ? "" : ", ") + o;
    return fail("no supported X-Stream-Protocol-Version offered (this endpoint serves " + list + ")");
  }
  return fail("this endpoint needs an upgrade to WebSocket or SPDY/3.1");
}

std::string ws_accept(std::string_view key) {
  std::string s = std::string(key) + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
  unsigned char md[SHA_DIGEST_LENGTH];
  SHA1(reinterpret_cast<const unsigned char*>(s.data()), s.size(), md);
  return base64_encode(std::string_view(reinterpret_cast<char*>(md), sizeof md));
}

// ---------------------------------------------------------------- channels

ChannelMessage decode_channel(const uint8_t* data, size_t len, bool v5) {
  ChannelMessage m;
  if (len == 0) return m;  // empty message: nothing (some clients open channels this way)
  uint8_t ch = data[0];
  switch (ch) {
    case 0:
      m.kind = ChannelMessage::Kind::Stdin;
      m.data = std::string_view(reinterpret_cast<const char*>(data + 1), len - 1);
      return m;
    case 4: {
      // {"Width":W,"Height":H} (remotecommand.TerminalSize)
      auto j = nlohmann::json::parse(data + 1, data + len, nullptr, false);
      if (!j.is_object() || !j.contains("Width") || !j.contains("Height") || !j["Width"].is_number_unsigned() ||
          !j["Height"].is_number_unsigned()) {
        m.kind = ChannelMessage::Kind::Bad;
        m.why = "malformed resize message (want {\"Width\":W,\"Height\":H})";
        return m;
      }
      m.kind = ChannelMessage::Kind::Resize;
      m.cols = static_cast<uint16_t>(std::min<uint64_t>(j["Width"].get<uint64_t>(), 65535));
      m.rows = static_cast<uint16_t>(std::min<uint64_t>(j["Height"].get<uint64_t>(), 65535));
      return m;
    }
    case 255:
      if (!v5) return m;
      if (len != 2) {
        m.kind = ChannelMessage::Kind::Bad;
        m.why = "malformed close message (want [255, channel])";
        return m;
      }
      m.kind = data[1] == 0 ? ChannelMessage::Kind::CloseStdin : ChannelMessage::Kind::CloseOther;
      return m;
    default:
      // Output/error channels flow server → client only: a client writing
      // them is ignored, as the Kubernetes server does.
      return m;
  }
}

}  // namespace shimlet::session::http1
