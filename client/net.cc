#include "client/net.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "common/error.h"

namespace shimlet::client {

std::string one_line(std::string_view s, size_t max) {
  std::string out;
  for (unsigned char c : s) out += (c < 0x20 || c == 0x7f) ? ' ' : static_cast<char>(c);
  if (out.size() > max) out.resize(max);
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

std::pair<std::string, std::string> split_endpoint(const std::string& ep) {
  std::string host, port;
  if (!ep.empty() && ep[0] == '[') {
    auto close = ep.find(']');
    if (close == std::string::npos || close + 1 >= ep.size() || ep[close + 1] != ':')
      throw Error("bad shim endpoint '" + ep + "'");
    host = ep.substr(1, close - 1);
    port = ep.substr(close + 2);
  } else {
    auto colon = ep.rfind(':');
    if (colon == std::string::npos) throw Error("bad shim endpoint '" + ep + "' (want host:port)");
    host = ep.substr(0, colon);
    port = ep.substr(colon + 1);
  }
  if (host.empty() || port.empty()) throw Error("bad shim endpoint '" + ep + "'");
  return {host, port};
}

Fd start_connect(const std::string& endpoint) {
  auto [host, port] = split_endpoint(endpoint);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0)
    throw Error("cannot resolve shim endpoint " + endpoint + ": " + gai_strerror(rc));
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> guard(res, freeaddrinfo);
  Fd sock(socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!sock) throw sys_error("socket");
  int one = 1;
  setsockopt(sock.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // interactive keystrokes, small requests
  if (connect(sock.get(), res->ai_addr, res->ai_addrlen) < 0 && errno != EINPROGRESS)
    throw sys_error("cannot connect to shim at " + endpoint);
  return sock;
}

}  // namespace shimlet::client
