#include "masterclient/masterclient.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/http.h>
#include <http_parser.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <charconv>
#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/hostport.h"
#include "common/openssl.h"
#include "common/text.h"

namespace shimlet::masterclient {
namespace {

BioPtr mem_bio(std::string_view pem) {
  BioPtr b(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!b) throw Error("BIO_new_mem_buf: " + openssl_error());
  return b;
}

// Every certificate of a PEM bundle; at least one.
std::vector<X509Ptr> read_certs(std::string_view pem, const std::string& what) {
  BioPtr b = mem_bio(pem);
  std::vector<X509Ptr> out;
  while (X509* c = PEM_read_bio_X509(b.get(), nullptr, nullptr, nullptr)) out.emplace_back(c);
  ERR_clear_error();  // the loop ends with a "no start line" error
  if (out.empty()) throw Error(what + ": no PEM certificate found");
  return out;
}

SslCtxPtr make_ctx(const Target& t) {
  SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
  if (!ctx) throw Error("SSL_CTX_new: " + openssl_error());
  SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
  static const unsigned char alpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  SSL_CTX_set_alpn_protos(ctx.get(), alpn, sizeof alpn);
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  if (t.ca_pem.empty()) {
    if (SSL_CTX_set_default_verify_paths(ctx.get()) != 1)
      throw Error("cannot load the system trust store: " + openssl_error());
  } else {
    X509_STORE* store = SSL_CTX_get_cert_store(ctx.get());
    for (auto& c : read_certs(t.ca_pem, "certificate authority"))
      if (X509_STORE_add_cert(store, c.get()) != 1) throw Error("certificate authority: " + openssl_error());
  }
  if (!t.cert_pem.empty() || !t.key_pem.empty()) {
    if (t.cert_pem.empty() || t.key_pem.empty())
      throw Error("a client certificate needs both the certificate and its key");
    auto certs = read_certs(t.cert_pem, "client certificate");
    if (SSL_CTX_use_certificate(ctx.get(), certs[0].get()) != 1) throw Error("client certificate: " + openssl_error());
    for (size_t i = 1; i < certs.size(); i++)
      if (SSL_CTX_add1_chain_cert(ctx.get(), certs[i].get()) != 1)
        throw Error("client certificate chain: " + openssl_error());
    BioPtr kb = mem_bio(t.key_pem);
    PkeyPtr key(PEM_read_bio_PrivateKey(kb.get(), nullptr, nullptr, nullptr));
    if (!key) throw Error("client key: not a PEM private key (" + openssl_error() + ")");
    if (SSL_CTX_use_PrivateKey(ctx.get(), key.get()) != 1 || SSL_CTX_check_private_key(ctx.get()) != 1)
      throw Error("client key does not match the client certificate: " + openssl_error());
  }
  return ctx;
}

// Waits for fd readiness until the deadline; throws on timeout.
void wait_fd(int fd, short events, int64_t deadline, const std::string& what) {
  for (;;) {
    int64_t left = deadline - monotonic_ms();
    if (left <= 0) throw Error("timed out " + what);
    pollfd p{fd, events, 0};
    int r = ::poll(&p, 1, static_cast<int>(left));
    if (r > 0) return;
    if (r < 0 && errno != EINTR) throw sys_error("poll");
  }
}

Fd connect_to(const Url& u, int64_t deadline, const std::string& where) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string port = std::to_string(u.port);
  if (int rc = getaddrinfo(u.host.c_str(), port.c_str(), &hints, &res); rc != 0)
    throw Error("cannot resolve " + where + ": " + gai_strerror(rc));
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> guard(res, freeaddrinfo);
  std::string last = "no address";
  for (addrinfo* a = res; a; a = a->ai_next) {
    Fd s(::socket(a->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!s) {
      last = strerror(errno);
      continue;
    }
    int one = 1;
    setsockopt(s.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (::connect(s.get(), a->ai_addr, a->ai_addrlen) < 0) {
      if (errno != EINPROGRESS) {
        last = strerror(errno);
        continue;
      }
      wait_fd(s.get(), POLLOUT, deadline, "connecting to " + where);
      int err = 0;
      socklen_t len = sizeof err;
      getsockopt(s.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      if (err) {
        last = strerror(err);
        continue;
      }
    }
    return s;
  }
  throw Error("cannot connect to " + where + ": " + last);
}

// Drives one non-blocking SSL call to completion before the deadline.
template <typename F>
int ssl_io(SSL* ssl, int fd, int64_t deadline, const std::string& what, F call) {
  for (;;) {
    ERR_clear_error();
    int r = call();
    if (r > 0) return r;
    int e = SSL_get_error(ssl, r);
    if (e == SSL_ERROR_WANT_READ)
      wait_fd(fd, POLLIN, deadline, what);
    else if (e == SSL_ERROR_WANT_WRITE)
      wait_fd(fd, POLLOUT, deadline, what);
    else if (e == SSL_ERROR_ZERO_RETURN)
      return 0;
    else if (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)
      return errno == 0 || errno == ECONNRESET ? 0 : -1;  // EOF without close_notify
    else
      throw Error(what + ": " + openssl_error());
  }
}

bool is_ip(const std::string& h) {
  in6_addr a;
  return inet_pton(AF_INET, h.c_str(), &a) == 1 || inet_pton(AF_INET6, h.c_str(), &a) == 1;
}

}  // namespace

// ---------------------------------------------------------------- URL

Url parse_url(std::string_view s) {
  auto bad = [&](const std::string& why) { return Error("bad master URL '" + one_line(s, 256) + "': " + why); };
  constexpr std::string_view scheme = "https://";
  if (s.substr(0, scheme.size()) != scheme) throw bad("must start with https://");
  std::string_view rest = s.substr(scheme.size());
  if (rest.find_first_of("?#@ \t\r\n") != std::string_view::npos)
    throw bad("no user info, query, fragment or spaces allowed");
  size_t slash = rest.find('/');
  std::string_view hostport = rest.substr(0, slash);
  Url u;
  if (slash != std::string_view::npos) {
    u.prefix = rest.substr(slash);
    while (!u.prefix.empty() && u.prefix.back() == '/') u.prefix.pop_back();
  }
  try {
    HostPort hp = parse_host_port(hostport);
    u.host = std::move(hp.host);
    if (hp.port) u.port = *hp.port;
  } catch (const Error& e) {
    throw bad(e.what());
  }
  return u;
}

std::string path_segment(std::string_view s) {
  char* e = evhttp_uriencode(s.data(), static_cast<ev_ssize_t>(s.size()), 0);
  if (!e) throw Error("cannot encode a URL path segment");
  std::string out(e);
  free(e);
  return out;
}

// ---------------------------------------------------------------- response parser

struct ResponseParser::Cb {
  static ResponseParser* self(http_parser* p) { return static_cast<ResponseParser*>(p->data); }
  static int on_header(http_parser* p, const char*, size_t len) {
    auto* s = self(p);
    s->header_bytes_ += len;
    if (s->header_bytes_ > kMaxResponseHeaders) {
      s->err_ = "response headers exceed " + std::to_string(kMaxResponseHeaders) + " bytes";
      return 1;
    }
    return 0;
  }
  static int on_headers_complete(http_parser* p) {
    auto* s = self(p);
    if (p->status_code / 100 == 1) return 0;  // 100 Continue etc.: skip
    s->resp_.status = p->status_code;
    return 0;
  }
  static int on_body(http_parser* p, const char* at, size_t len) {
    auto* s = self(p);
    if (s->resp_.body.size() + len > kMaxResponseBody) {
      s->err_ = "response body exceeds " + std::to_string(kMaxResponseBody) + " bytes";
      return 1;
    }
    s->resp_.body.append(at, len);
    return 0;
  }
  static int on_message_complete(http_parser* p) {
    auto* s = self(p);
    if (p->status_code / 100 == 1) return 0;
    s->done_ = true;
    return 0;
  }
};

namespace {
const http_parser_settings& settings() {
  static const http_parser_settings st = [] {
    http_parser_settings x{};
    x.on_status = &ResponseParser::Cb::on_header;
    x.on_header_field = &ResponseParser::Cb::on_header;
    x.on_header_value = &ResponseParser::Cb::on_header;
    x.on_headers_complete = &ResponseParser::Cb::on_headers_complete;
    x.on_body = &ResponseParser::Cb::on_body;
    x.on_message_complete = &ResponseParser::Cb::on_message_complete;
    return x;
  }();
  return st;
}
}  // namespace

ResponseParser::ResponseParser() : p_(std::make_unique<http_parser>()) {
  http_parser_init(p_.get(), HTTP_RESPONSE);
  p_->data = this;
}
ResponseParser::~ResponseParser() = default;

bool ResponseParser::feed(const char* data, size_t len) {
  if (!err_.empty()) return false;
  if (done_) return true;  // anything after the one response is ignored (Connection: close)
  size_t n = http_parser_execute(p_.get(), &settings(), data, len);
  if (!err_.empty()) return false;
  if (done_) return true;
  if (len == 0) {
    err_ = "connection closed before the response was complete";
    return false;
  }
  if (HTTP_PARSER_ERRNO(p_.get()) != HPE_OK || n != len) {
    err_ = std::string("malformed HTTP response: ") + http_errno_description(HTTP_PARSER_ERRNO(p_.get()));
    return false;
  }
  return true;
}

// ---------------------------------------------------------------- request

namespace {

struct Conn {
  Fd sock;
  SslPtr ssl;
  Url url;
};

// Connects, handshakes and verifies the master's certificate before the
// deadline (and t.connect_timeout_ms, when set).
Conn open_conn(const Target& t, int64_t deadline, const std::string& where) {
  if (t.connect_timeout_ms > 0) deadline = std::min(deadline, monotonic_ms() + t.connect_timeout_ms);
  Url u = parse_url(t.server);
  SslCtxPtr ctx = make_ctx(t);  // the SSL keeps its own reference
  Fd sock = connect_to(u, deadline, where);
  SslPtr ssl(SSL_new(ctx.get()));
  if (!ssl) throw Error("SSL_new: " + openssl_error());
  // The identity check: the certificate must name the host (DNS SAN) or the
  // IP address (IP SAN) we connected to.
  if (is_ip(u.host)) {
    if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl.get()), u.host.c_str()) != 1)
      throw Error("bad IP address " + u.host);
  } else {
    if (SSL_set1_host(ssl.get(), u.host.c_str()) != 1) throw Error("bad host name " + u.host);
    SSL_set_tlsext_host_name(ssl.get(), u.host.c_str());
  }
  if (SSL_set_fd(ssl.get(), sock.get()) != 1) throw Error("SSL_set_fd: " + openssl_error());
  SSL* s = ssl.get();
  try {
    ssl_io(s, sock.get(), deadline, "TLS handshake with " + where, [&] { return SSL_connect(s); });
  } catch (const Error& e) {
    long v = SSL_get_verify_result(s);
    if (v != X509_V_OK)
      throw Error("TLS handshake with " + where +
                  ": server certificate not trusted: " + X509_verify_cert_error_string(v));
    throw;
  }
  return Conn{std::move(sock), std::move(ssl), std::move(u)};
}

std::string request_head(const Target& t, const Url& u, const std::string& method, const std::string& path) {
  std::string host_hdr = u.host.find(':') != std::string::npos ? "[" + u.host + "]" : u.host;
  if (u.port != 443) host_hdr += ":" + std::to_string(u.port);
  std::string req = method + " " + u.prefix + path + " HTTP/1.1\r\nHost: " + host_hdr +
                    "\r\nUser-Agent: " + t.user_agent + "\r\nAccept: application/json\r\n";
  if (!t.token.empty()) {
    if (t.token.find_first_of("\r\n") != std::string::npos) throw Error("the token contains a line break");
    req += "Authorization: Bearer " + t.token + "\r\n";
  }
  return req;
}

void send_all(Conn& c, const std::string& data, int64_t deadline, const std::string& where) {
  SSL* s = c.ssl.get();
  size_t off = 0;
  while (off < data.size()) {
    int n = ssl_io(s, c.sock.get(), deadline, "sending to " + where, [&] {
      return SSL_write(s, data.data() + off, static_cast<int>(std::min<size_t>(data.size() - off, 1 << 20)));
    });
    if (n <= 0) throw Error("sending to " + where + ": connection closed");
    off += static_cast<size_t>(n);
  }
}

}  // namespace

Response request(const Target& t, const std::string& method, const std::string& path, const std::string& body) {
  const std::string where = "the master at " + one_line(t.server, 256);
  const int64_t deadline = monotonic_ms() + t.timeout_ms;
  Conn c = open_conn(t, deadline, where);
  SSL* s = c.ssl.get();
  std::string req = request_head(t, c.url, method, path) + "Connection: close\r\n";
  if (!body.empty() || method == "PUT" || method == "POST")
    req += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  req += "\r\n";
  req += body;
  send_all(c, req, deadline, where);

  ResponseParser parser;
  char buf[16384];
  while (!parser.done()) {
    int n = ssl_io(s, c.sock.get(), deadline, "reading the answer of " + where,
                   [&] { return SSL_read(s, buf, sizeof buf); });
    if (n < 0) throw Error("reading the answer of " + where + ": " + strerror(errno));
    if (!parser.feed(buf, static_cast<size_t>(n))) throw Error(where + ": " + parser.error());
    if (n == 0) break;
  }
  return std::move(parser.response());
}

Upgraded upgrade(const Target& t, const std::string& method, const std::string& path, const std::string& protocol) {
  const std::string where = "the master at " + one_line(t.server, 256);
  const int64_t deadline = monotonic_ms() + t.timeout_ms;
  if (protocol.empty() || protocol.find_first_of("\r\n ,") != std::string::npos)
    throw Error("bad upgrade protocol name");
  Conn c = open_conn(t, deadline, where);
  SSL* s = c.ssl.get();
  send_all(c,
           request_head(t, c.url, method, path) + "Connection: Upgrade\r\nUpgrade: " + protocol +
               "\r\nContent-Length: 0\r\n\r\n",
           deadline, where);
  // Only the response head is read here: after a 101 the next bytes belong to
  // the tunnel. The head is bounded like any response's headers.
  std::string head;
  size_t end = std::string::npos;
  char buf[16384];
  while (end == std::string::npos) {
    int n = ssl_io(s, c.sock.get(), deadline, "reading the answer of " + where,
                   [&] { return SSL_read(s, buf, sizeof buf); });
    if (n <= 0) throw Error(where + ": connection closed before the upgrade answer");
    head.append(buf, static_cast<size_t>(n));
    end = head.find("\r\n\r\n");
    if (end == std::string::npos && head.size() > kMaxResponseHeaders)
      throw Error(where + ": response headers exceed " + std::to_string(kMaxResponseHeaders) + " bytes");
  }
  int status = 0;
  if (head.size() >= 12 && head.compare(0, 5, "HTTP/") == 0) {
    size_t sp = head.find(' ');
    if (sp != std::string::npos && sp + 4 <= head.size())
      std::from_chars(head.data() + sp + 1, head.data() + sp + 4, status);
  }
  if (status == 101) {
    Upgraded u;
    u.leftover = head.substr(end + 4);
    u.sock = std::move(c.sock);
    u.ssl = std::move(c.ssl);
    return u;
  }
  // A refusal: read the whole (bounded) response for its Status message.
  ResponseParser parser;
  bool ok = parser.feed(head.data(), head.size());
  while (ok && !parser.done()) {
    int n = ssl_io(s, c.sock.get(), deadline, "reading the answer of " + where,
                   [&] { return SSL_read(s, buf, sizeof buf); });
    if (n < 0) break;
    ok = parser.feed(buf, static_cast<size_t>(n));
    if (n == 0) break;
  }
  Response r = parser.response();
  if (r.status == 0) r.status = status;
  throw UpgradeRefused(error_message(r));
}

Masters::Masters(std::vector<Target> targets) : targets_(std::move(targets)) {
  if (targets_.empty()) throw Error("no master configured");
}

void Masters::set_timeout_ms(int ms) {
  for (auto& t : targets_) t.timeout_ms = ms;
}

template <typename F>
auto Masters::first_reachable(F&& attempt) -> decltype(attempt(std::declval<const Target&>())) {
  std::string failures;
  const size_t n = targets_.size();
  for (size_t i = 0; i < n; i++) {
    const size_t idx = (current_ + i) % n;
    Target t = targets_[idx];
    if (i + 1 < n && (t.connect_timeout_ms <= 0 || t.connect_timeout_ms > kFailoverConnectMs))
      t.connect_timeout_ms = std::min(t.timeout_ms, kFailoverConnectMs);
    try {
      auto out = attempt(t);
      current_ = idx;
      return out;
    } catch (const Error& e) {
      if (n == 1) throw;
      if (!failures.empty()) failures += "; ";
      failures += e.what();
    }
  }
  throw Error("no master could be reached: " + failures);
}

Response Masters::request(const std::string& method, const std::string& path, const std::string& body) {
  return first_reachable([&](const Target& t) { return masterclient::request(t, method, path, body); });
}

Upgraded Masters::upgrade(const std::string& method, const std::string& path, const std::string& protocol) {
  // A refusal is an answer: out of first_reachable without trying the next.
  struct Refused {
    std::string message;
  };
  try {
    return first_reachable([&](const Target& t) -> Upgraded {
      try {
        return masterclient::upgrade(t, method, path, protocol);
      } catch (const UpgradeRefused& e) {
        throw Refused{e.what()};
      }
    });
  } catch (const Refused& r) {
    throw UpgradeRefused(r.message);
  }
}

std::string error_message(const Response& r) {
  nlohmann::json j = nlohmann::json::parse(r.body, nullptr, false);
  if (j.is_object())
    if (auto m = j.find("message"); m != j.end() && m->is_string() && !m->get<std::string>().empty())
      return one_line(m->get<std::string>());
  return "the master answered HTTP " + std::to_string(r.status);
}

}  // namespace shimlet::masterclient
