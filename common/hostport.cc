#include "common/hostport.h"

#include <arpa/inet.h>

#include <charconv>

#include "common/error.h"

namespace shimlet {

HostPort parse_host_port(std::string_view s) {
  HostPort hp;
  std::string_view port;
  bool has_port = false;
  if (!s.empty() && s.front() == '[') {
    size_t close = s.find(']');
    if (close == std::string_view::npos) throw Error("unterminated [IPv6]");
    hp.host = s.substr(1, close - 1);
    if (close + 1 < s.size()) {
      if (s[close + 1] != ':') throw Error("junk after ]");
      port = s.substr(close + 2);
      has_port = true;
    }
    in6_addr a;
    if (inet_pton(AF_INET6, hp.host.c_str(), &a) != 1) throw Error("not an IPv6 address in []");
  } else {
    size_t colon = s.rfind(':');
    hp.host = s.substr(0, colon);
    if (colon != std::string_view::npos) {
      port = s.substr(colon + 1);
      has_port = true;
    }
    if (hp.host.find(':') != std::string::npos) throw Error("IPv6 addresses go in []");
  }
  if (hp.host.empty() || hp.host.size() > 253) throw Error("missing host");
  if (has_port) {
    unsigned v = 0;
    auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), v);
    if (port.empty() || ec != std::errc() || p != port.data() + port.size() || v < 1 || v > 65535)
      throw Error("port must be 1-65535");
    hp.port = static_cast<uint16_t>(v);
  }
  return hp;
}

}  // namespace shimlet
