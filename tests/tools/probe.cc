// shimlet-probe: a test client that sends a shim one deliberately chosen
// (usually bad) request and prints ONE JSON line describing what came back, so
// tests/integration/test_badinput.py can assert on real outcomes.
//
// Two engines:
//  * request mode (default, --repeat-ticket, --also): proto::H2Conn in the
//    client role, exactly like shimctl, with any headers/ticket we like;
//  * raw modes (--garbage-after-tls, --bad-h2, --raw-garbage, --streams):
//    hand-written HTTP/2 frames over a blocking TLS socket, because a correct
//    HTTP/2 library (nghttp2) refuses to send malformed frames or to exceed the
//    peer's stream limit. HPACK is still nghttp2's (nghttp2_hd_*).
#include <arpa/inet.h>
#include <errno.h>
#include <event2/event.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/base64.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/openssl.h"
#include "proto/frames.h"
#include "proto/h2.h"
#include "proto/tls.h"
#include "ticket/ticket.h"

namespace {

using json = nlohmann::json;
using shimlet::Error;
using shimlet::Fd;
using shimlet::openssl_error;
namespace proto = shimlet::proto;

constexpr size_t kMaxBody = 4u << 20;  // bound on what we keep of any response

const char* kUsage =
    "usage: shimlet-probe (--endpoint HOST:PORT --pin PIN | --state-dir S --id ID)\n"
    "  [--no-client-cert] [--local-socket] [--identity PREFIX] [--timeout S]\n"
    "      --local-socket: request mode over the registration's local socket (HTTP/2, no TLS)\n"
    "      --identity: client key/cert from PREFIX.key/PREFIX.crt, created there if absent\n"
    "      (so a grant from shimlet-master can be bound to this probe's key)\n"
    "  [--ticket TOKEN | --mint --key PEM [--kid KID] --claims JSON] [--mint-only]\n"
    "      claims: arbitrary JSON; iat/exp/jti default to now/now+30/random;\n"
    "      \"cnf_jkt\":\"self\" binds to this probe's key (any other value is used as is)\n"
    "  [--method M] [--path P] [--header k:v ...] [--stdin-text TEXT] [--also PATH]\n"
    "  modes: (default: one request) --repeat-ticket | --garbage-after-tls [--bytes N] |\n"
    "         --bad-h2 headers-stream0|bad-length|oversize|data-stream0|window-zero |\n"
    "         --raw-garbage [--bytes N] | --streams N (port-forward streams on --path)\n";

struct Opts {
  std::string endpoint, pin, state_dir, id, identity;
  bool no_client_cert = false;
  std::string local_socket;  // --local-socket: request mode over the shim's unix socket, no TLS
  int timeout_s = 20;
  std::string ticket;
  bool mint = false, mint_only = false;
  std::string key, kid = "local", claims = "{}";
  std::string method = "POST", path = proto::kExecPath, also;
  std::vector<std::pair<std::string, std::string>> headers;
  std::optional<std::string> stdin_text;
  std::string mode = "request";
  std::string bad_h2;
  size_t bytes = 4096;
  int streams = 0;
};

Opts parse(int argc, char** argv) {
  Opts o;
  auto need = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw Error(std::string("missing value for ") + argv[i]);
    return argv[++i];
  };
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--endpoint")
      o.endpoint = need(i);
    else if (a == "--pin")
      o.pin = need(i);
    else if (a == "--state-dir")
      o.state_dir = need(i);
    else if (a == "--id")
      o.id = need(i);
    else if (a == "--no-client-cert")
      o.no_client_cert = true;
    else if (a == "--local-socket")
      o.local_socket = "registration";
    else if (a == "--identity")
      o.identity = need(i);
    else if (a == "--timeout")
      o.timeout_s = std::stoi(need(i));
    else if (a == "--ticket")
      o.ticket = need(i);
    else if (a == "--mint")
      o.mint = true;
    else if (a == "--mint-only")
      o.mint = o.mint_only = true;
    else if (a == "--key")
      o.key = need(i);
    else if (a == "--kid")
      o.kid = need(i);
    else if (a == "--claims")
      o.claims = need(i);
    else if (a == "--method")
      o.method = need(i);
    else if (a == "--path")
      o.path = need(i);
    else if (a == "--also")
      o.also = need(i);
    else if (a == "--header") {
      std::string h = need(i);
      // Pseudo-headers start with ':': the separator is the next ':'.
      size_t colon = h.find(':', h.size() && h[0] == ':' ? 1 : 0);
      if (colon == std::string::npos) throw Error("--header wants name:value, got " + h);
      o.headers.emplace_back(h.substr(0, colon), h.substr(colon + 1));
    } else if (a == "--stdin-text")
      o.stdin_text = need(i);
    else if (a == "--repeat-ticket")
      o.mode = "repeat-ticket";
    else if (a == "--garbage-after-tls")
      o.mode = "garbage-after-tls";
    else if (a == "--raw-garbage")
      o.mode = "raw-garbage";
    else if (a == "--bad-h2") {
      o.mode = "bad-h2";
      o.bad_h2 = need(i);
    } else if (a == "--streams") {
      o.mode = "streams";
      o.streams = std::stoi(need(i));
    } else if (a == "--bytes")
      o.bytes = std::stoul(need(i));
    else if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      exit(0);
    } else
      throw Error("unknown argument " + a + "\n" + kUsage);
  }
  return o;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path + ": " + strerror(errno));
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Untrusted server bytes in our JSON: valid UTF-8 is kept, the rest replaced.
json text(const std::string& s) { return json::parse(json(s).dump(-1, ' ', false, json::error_handler_t::replace)); }

// ---- tickets ----

std::string mint(const Opts& o, const std::string& own_jkt) {
  json c = json::parse(o.claims);
  if (!c.is_object()) throw Error("--claims must be a JSON object");
  int64_t now = time(nullptr);
  if (!c.contains("iat")) c["iat"] = now;
  if (!c.contains("exp") && c["iat"].is_number_integer()) c["exp"] = c["iat"].get<int64_t>() + 30;
  if (!c.contains("jti")) c["jti"] = shimlet::base64url_encode(shimlet::random_bytes(16));
  if (c.contains("cnf_jkt")) {
    json v = c["cnf_jkt"];
    c.erase("cnf_jkt");
    c["cnf"] = {{"jkt", v == "self" ? json(own_jkt) : v}};
  }
  json h = {{"alg", "EdDSA"}, {"typ", "shimlet-ticket+jwt"}};
  if (!o.kid.empty()) h["kid"] = o.kid;
  auto key = shimlet::ticket::PrivateKey::load(o.key);
  std::string input = shimlet::base64url_encode(h.dump()) + "." + shimlet::base64url_encode(c.dump());
  return input + "." + shimlet::base64url_encode(key.sign_data(input));
}

std::pair<std::string, std::string> split_endpoint(const std::string& ep) {
  if (!ep.empty() && ep[0] == '[') {
    auto close = ep.find("]:");
    if (close == std::string::npos) throw Error("bad endpoint " + ep);
    return {ep.substr(1, close - 1), ep.substr(close + 2)};
  }
  auto colon = ep.rfind(':');
  if (colon == std::string::npos) throw Error("bad endpoint " + ep + " (want host:port)");
  return {ep.substr(0, colon), ep.substr(colon + 1)};
}

Fd tcp_connect(const std::string& ep, bool nonblock) {
  auto [host, port] = split_endpoint(ep);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0)
    throw Error("resolve " + ep + ": " + gai_strerror(rc));
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> guard(res, freeaddrinfo);
  Fd fd(::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) throw shimlet::sys_error("socket");
  if (::connect(fd.get(), res->ai_addr, res->ai_addrlen) < 0) throw shimlet::sys_error("connect " + ep);
  int one = 1;
  setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (nonblock) evutil_make_socket_nonblocking(fd.get());
  return fd;
}

// The shim's local socket (short paths only: the tests' state dirs are).
Fd unix_connect(const std::string& path) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.size() >= sizeof sa.sun_path) throw Error("local socket path too long: " + path);
  memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) throw shimlet::sys_error("socket");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0) throw shimlet::sys_error("connect " + path);
  evutil_make_socket_nonblocking(fd.get());
  return fd;
}

struct Ctx {
  Opts o;
  proto::Identity id;
  std::string jkt;
  proto::SslCtx ssl_ctx;
  std::string ticket;

  SSL* new_ssl() const {
    SSL* ssl = SSL_new(ssl_ctx.get());
    if (!ssl) throw Error("SSL_new: " + openssl_error());
    // No certificate at all: the server asks for one, we answer with none.
    if (o.no_client_cert) SSL_certs_clear(ssl);
    return ssl;
  }
  proto::Headers request_headers(const std::string& path) const {
    proto::Headers h = {{":method", o.method}, {":scheme", "https"}, {":authority", o.endpoint}, {":path", path}};
    if (!ticket.empty()) h.emplace_back("authorization", "Bearer " + ticket);
    for (auto& kv : o.headers) h.push_back(kv);
    return h;
  }
};

// ---- request engine: H2Conn, like shimctl ----

class Request : public proto::H2Conn::Handler {
 public:
  explicit Request(const Ctx& c) : c_(c) {}

  json run() {
    std::unique_ptr<event_base, decltype(&event_base_free)> base(event_base_new(), event_base_free);
    base_ = base.get();
    bool local = !c_.o.local_socket.empty();
    Fd fd = local ? unix_connect(c_.o.local_socket) : tcp_connect(c_.o.endpoint, true);
    conn_ = std::make_unique<proto::H2Conn>(base_, fd.release(), local ? nullptr : c_.new_ssl(),
                                            proto::H2Conn::Role::Client, this);
    event* deadline = evtimer_new(base_, on_timeout, this);
    timeval tv{c_.o.timeout_s, 0};
    evtimer_add(deadline, &tv);
    event_base_dispatch(base_);
    event_free(deadline);
    if (start_) event_free(start_);
    if (grace_) event_free(grace_);
    if (conn_ && conn_->ssl() && closed_clean_) SSL_shutdown(conn_->ssl());
    conn_.reset();
    json out = results_.empty() ? json::object() : results_[0];
    if (results_.size() > 1) out["second"] = results_[1];
    if (results_.empty() || !done_) out["incomplete"] = true;
    if (!closed_reason_.empty()) out["closed"] = closed_reason_;
    if (timed_out_) out["timeout"] = true;
    return out;
  }

 private:
  struct Result {
    int status = 0;
    std::string body;
    uint32_t rst = 0;
    bool closed = false;
  };

  std::optional<std::string> on_connected(SSL* ssl) override {
    if (ssl && !c_.o.pin.empty())
      if (auto e = proto::pin_mismatch(ssl, c_.o.pin)) return *e;
    // The HTTP/2 session exists once this returns: submit from the loop.
    start_ = evtimer_new(base_, on_start, this);
    timeval zero{0, 0};
    evtimer_add(start_, &zero);
    return std::nullopt;
  }

  static void on_start(evutil_socket_t, short, void* arg) { static_cast<Request*>(arg)->submit(0); }

  void submit(size_t idx) {
    const std::string& path = idx == 0 ? c_.o.path : c_.o.also;
    int32_t id = conn_->request(c_.request_headers(path), true);
    if (id < 0) {
      closed_reason_ = "cannot submit request";
      return finish();
    }
    streams_.push_back(id);
    res_.emplace_back();
    if (c_.o.stdin_text && idx == 0) {
      std::string body;
      proto::append_frame(body, proto::FrameType::Stdin, *c_.o.stdin_text);
      proto::append_frame(body, proto::FrameType::StdinEof, {});
      conn_->send(id, body.data(), body.size());
    }
    conn_->end(id);
  }

  int index(int32_t stream) const {
    for (size_t i = 0; i < streams_.size(); i++)
      if (streams_[i] == stream) return static_cast<int>(i);
    return -1;
  }

  void on_headers(int32_t stream, const proto::Headers& h, bool) override {
    int i = index(stream);
    if (i < 0) return;
    if (const std::string* s = proto::find_header(h, ":status")) res_[i].status = std::atoi(s->c_str());
  }
  void on_data(int32_t stream, const uint8_t* data, size_t len) override {
    int i = index(stream);
    if (i >= 0 && res_[i].body.size() + len <= kMaxBody) res_[i].body.append(reinterpret_cast<const char*>(data), len);
    conn_->consume(stream, len);
  }
  void on_remote_end(int32_t) override {}
  void on_stream_close(int32_t stream, uint32_t code) override {
    int i = index(stream);
    if (i < 0) return;
    res_[i].rst = code;
    res_[i].closed = true;
    results_.push_back(describe(res_[i]));
    if (i == 0 && !c_.o.also.empty()) {
      // Second request on the same connection: from the loop, not from inside nghttp2.
      event_free(start_);
      start_ = evtimer_new(
          base_, [](evutil_socket_t, short, void* arg) { static_cast<Request*>(arg)->submit(1); }, this);
      timeval zero{0, 0};
      evtimer_add(start_, &zero);
      return;
    }
    done_ = true;
    closed_clean_ = true;
    conn_->shutdown();
    // The GOAWAY needs a moment to leave; don't wait for the peer forever.
    grace_ = evtimer_new(base_, on_grace, this);
    timeval tv{0, 500000};
    evtimer_add(grace_, &tv);
  }
  void on_closed(const std::string& why) override {
    if (!done_) closed_reason_ = why;
    finish();
  }
  static void on_grace(evutil_socket_t, short, void* arg) { static_cast<Request*>(arg)->finish(); }
  static void on_timeout(evutil_socket_t, short, void* arg) {
    auto* self = static_cast<Request*>(arg);
    self->timed_out_ = true;
    self->finish();
  }
  void finish() { event_base_loopexit(base_, nullptr); }

  static json describe(const Result& r) {
    json j = {{"status", r.status}};
    if (r.rst) j["rst"] = r.rst;
    if (r.status != 200) {
      j["body"] = text(r.body);
      json b = json::parse(r.body, nullptr, false);
      if (b.is_object() && b.contains("error")) j["error"] = b["error"];
      return j;
    }
    // An exec's body is frames (proto/frames.h); anything else is kept raw.
    proto::FrameDecoder dec;
    dec.feed(r.body);
    std::string out, err;
    bool framed = false;
    while (auto f = dec.next()) {
      framed = true;
      if (f->type == proto::FrameType::Stdout)
        out += f->payload;
      else if (f->type == proto::FrameType::Stderr)
        err += f->payload;
      else if (f->type == proto::FrameType::Status) {
        json st = json::parse(f->payload, nullptr, false);
        if (st.is_object())
          for (auto& [k, v] : st.items()) j[k == "error" ? "exec_error" : k] = v;
      }
    }
    if (framed && dec.error().empty()) {
      j["stdout"] = text(out);
      j["stderr"] = text(err);
    } else {
      j["body"] = text(r.body);
    }
    return j;
  }

  const Ctx& c_;
  event_base* base_ = nullptr;
  std::unique_ptr<proto::H2Conn> conn_;
  event *start_ = nullptr, *grace_ = nullptr;
  std::vector<int32_t> streams_;
  std::vector<Result> res_;
  std::vector<json> results_;
  std::string closed_reason_;
  bool done_ = false, timed_out_ = false, closed_clean_ = false;
};

// ---- raw engine: our own frames over blocking TLS ----

using Clock = std::chrono::steady_clock;

class Raw {
 public:
  Raw(const Ctx& c, bool tls) : c_(c) {
    fd_ = tcp_connect(c.o.endpoint, false);
    // Reads wake up regularly so deadlines hold even inside SSL_read.
    timeval tv{0, 200000};
    setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (!tls) return;
    ssl_.reset(c.new_ssl());
    SSL_set_fd(ssl_.get(), fd_.get());
    auto deadline = Clock::now() + std::chrono::seconds(c.o.timeout_s);
    for (;;) {
      int r = SSL_connect(ssl_.get());
      if (r == 1) break;
      int e = SSL_get_error(ssl_.get(), r);
      if ((e == SSL_ERROR_WANT_READ || e == SSL_ERROR_SYSCALL) && (errno == EAGAIN || errno == EWOULDBLOCK) &&
          Clock::now() < deadline)
        continue;
      throw Error("TLS handshake failed: " + openssl_error());
    }
    if (!c.o.pin.empty())
      if (auto e = proto::pin_mismatch(ssl_.get(), c.o.pin)) throw Error(*e);
    const unsigned char* alpn = nullptr;
    unsigned alpn_len = 0;
    SSL_get0_alpn_selected(ssl_.get(), &alpn, &alpn_len);
    if (alpn_len != 2 || memcmp(alpn, "h2", 2) != 0) throw Error("server did not select ALPN h2");
  }
  ~Raw() {
    if (ssl_ && !eof_) SSL_shutdown(ssl_.get());
  }

  void write(const std::string& data) {
    size_t off = 0;
    while (off < data.size()) {
      int chunk = static_cast<int>(std::min<size_t>(data.size() - off, 16384));
      ssize_t n = ssl_ ? SSL_write(ssl_.get(), data.data() + off, chunk)
                       : ::send(fd_.get(), data.data() + off, static_cast<size_t>(chunk), MSG_NOSIGNAL);
      if (n <= 0) {
        write_error_ = ssl_ ? openssl_error() : std::string(strerror(errno));
        if (write_error_.empty()) write_error_ = strerror(errno);
        return;
      }
      off += static_cast<size_t>(n);
    }
  }

  // Appends what arrives within ms to in; false on EOF/error.
  bool read_some(std::string& in, int ms) {
    auto deadline = Clock::now() + std::chrono::milliseconds(ms);
    char buf[65536];
    while (!eof_) {
      ssize_t n;
      if (ssl_) {
        n = SSL_read(ssl_.get(), buf, sizeof buf);
        if (n <= 0) {
          int e = SSL_get_error(ssl_.get(), static_cast<int>(n));
          if ((e == SSL_ERROR_WANT_READ || e == SSL_ERROR_SYSCALL) && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            ERR_clear_error();
            if (Clock::now() >= deadline) return true;
            continue;
          }
          eof_ = true;
          eof_how_ = e == SSL_ERROR_ZERO_RETURN ? "tls close_notify"
                     : e == SSL_ERROR_SSL       ? "tls error: " + openssl_error()
                                                : "connection closed";
          return false;
        }
      } else {
        n = ::recv(fd_.get(), buf, sizeof buf, 0);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
          if (Clock::now() >= deadline) return true;
          continue;
        }
        if (n <= 0) {
          eof_ = true;
          eof_how_ = n == 0 ? "connection closed" : std::string("connection error: ") + strerror(errno);
          return false;
        }
      }
      in.append(buf, static_cast<size_t>(n));
      return true;
    }
    return false;
  }

  bool eof() const { return eof_; }
  const std::string& eof_how() const { return eof_how_; }
  const std::string& write_error() const { return write_error_; }

 private:
  struct SslFree {
    void operator()(SSL* s) const { SSL_free(s); }
  };
  const Ctx& c_;
  Fd fd_;
  std::unique_ptr<SSL, SslFree> ssl_;
  bool eof_ = false;
  std::string eof_how_, write_error_;
};

std::string frame(uint8_t type, uint8_t flags, uint32_t stream, const std::string& payload,
                  std::optional<uint32_t> claimed_len = std::nullopt) {
  uint32_t len = claimed_len.value_or(static_cast<uint32_t>(payload.size()));
  std::string f;
  f += static_cast<char>(len >> 16);
  f += static_cast<char>(len >> 8);
  f += static_cast<char>(len);
  f += static_cast<char>(type);
  f += static_cast<char>(flags);
  uint32_t s = htonl(stream & 0x7fffffff);
  f.append(reinterpret_cast<char*>(&s), 4);
  return f + payload;
}

uint32_t be32(const std::string& s, size_t off) {
  return (static_cast<uint32_t>(static_cast<uint8_t>(s[off])) << 24) |
         (static_cast<uint32_t>(static_cast<uint8_t>(s[off + 1])) << 16) |
         (static_cast<uint32_t>(static_cast<uint8_t>(s[off + 2])) << 8) | static_cast<uint8_t>(s[off + 3]);
}

constexpr const char* kPreface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
enum : uint8_t { kData = 0, kHeaders = 1, kRst = 3, kSettings = 4, kPing = 6, kGoaway = 7, kWinUpdate = 8, kCont = 9 };
enum : uint8_t { kEndStream = 1, kAck = 1, kEndHeaders = 4, kPadded = 8, kPriority = 0x20 };

// HPACK encoder (nghttp2's) for our hand-made HEADERS frames.
class Deflater {
 public:
  Deflater() {
    if (nghttp2_hd_deflate_new(&d_, 4096) != 0) throw Error("nghttp2_hd_deflate_new failed");
  }
  ~Deflater() { nghttp2_hd_deflate_del(d_); }
  std::string encode(const proto::Headers& h) {
    std::vector<nghttp2_nv> nv;
    for (auto& [k, v] : h)
      nv.push_back({reinterpret_cast<uint8_t*>(const_cast<char*>(k.data())),
                    reinterpret_cast<uint8_t*>(const_cast<char*>(v.data())), k.size(), v.size(), NGHTTP2_NV_FLAG_NONE});
    std::string out(nghttp2_hd_deflate_bound(d_, nv.data(), nv.size()), '\0');
    ssize_t n = nghttp2_hd_deflate_hd(d_, reinterpret_cast<uint8_t*>(out.data()), out.size(), nv.data(), nv.size());
    if (n < 0) throw Error(std::string("HPACK encode: ") + nghttp2_strerror(static_cast<int>(n)));
    out.resize(static_cast<size_t>(n));
    return out;
  }

 private:
  nghttp2_hd_deflater* d_ = nullptr;
};

// Parses the server's frames; answers SETTINGS and PING through `reply`.
class FrameReader {
 public:
  struct Stream {
    int status = 0;
    uint32_t rst = 0;
    bool rst_seen = false, ended = false;
    std::string body;
  };
  FrameReader() {
    if (nghttp2_hd_inflate_new(&inf_) != 0) throw Error("nghttp2_hd_inflate_new failed");
  }
  ~FrameReader() { nghttp2_hd_inflate_del(inf_); }

  void feed(const std::string& bytes, std::string& reply) {
    buf_ += bytes;
    for (;;) {
      if (buf_.size() < 9) return;
      uint32_t len =
          (static_cast<uint8_t>(buf_[0]) << 16) | (static_cast<uint8_t>(buf_[1]) << 8) | static_cast<uint8_t>(buf_[2]);
      if (buf_.size() < 9 + len) return;
      uint8_t type = static_cast<uint8_t>(buf_[3]), flags = static_cast<uint8_t>(buf_[4]);
      uint32_t sid = be32(buf_, 5) & 0x7fffffff;
      std::string p = buf_.substr(9, len);
      buf_.erase(0, 9 + len);
      types_[type]++;
      handle(type, flags, sid, p, reply);
    }
  }

  std::map<uint32_t, Stream> streams;
  std::optional<json> goaway;
  bool settings_seen = false;
  std::map<int, int> types_;
  std::string error;

 private:
  static std::string unpad(uint8_t flags, std::string p, bool prio) {
    size_t pad = 0;
    if (flags & kPadded) {
      if (p.empty()) return {};
      pad = static_cast<uint8_t>(p[0]);
      p.erase(0, 1);
    }
    if (prio) p.erase(0, std::min<size_t>(5, p.size()));
    if (pad > p.size()) return {};
    p.resize(p.size() - pad);
    return p;
  }

  void handle(uint8_t type, uint8_t flags, uint32_t sid, const std::string& p, std::string& reply) {
    switch (type) {
      case kData: {
        auto& s = streams[sid];
        std::string d = unpad(flags, p, false);
        if (s.body.size() + d.size() <= kMaxBody) s.body += d;
        if (flags & kEndStream) s.ended = true;
        // Keep the server able to send: return the window at once.
        if (!p.empty()) {
          uint32_t inc = htonl(static_cast<uint32_t>(p.size()));
          std::string w(reinterpret_cast<char*>(&inc), 4);
          reply += frame(kWinUpdate, 0, 0, w);
          reply += frame(kWinUpdate, 0, sid, w);
        }
        break;
      }
      case kHeaders:
      case kCont: {
        if (type == kHeaders) {
          block_ = unpad(flags, p, flags & kPriority);
          block_sid_ = sid;
          block_end_ = flags & kEndStream;
        } else {
          block_ += p;
        }
        if (!(flags & kEndHeaders)) break;
        auto& s = streams[block_sid_];
        inflate(block_, s);
        if (block_end_) s.ended = true;
        block_.clear();
        break;
      }
      case kRst:
        if (p.size() == 4) {
          streams[sid].rst = be32(p, 0);
          streams[sid].rst_seen = true;
        }
        break;
      case kSettings:
        if (!(flags & kAck)) {
          settings_seen = true;
          reply += frame(kSettings, kAck, 0, "");
        }
        break;
      case kPing:
        if (!(flags & kAck)) reply += frame(kPing, kAck, 0, p);
        break;
      case kGoaway:
        if (p.size() >= 8)
          goaway =
              json{{"last_stream", be32(p, 0) & 0x7fffffff}, {"error_code", be32(p, 4)}, {"debug", text(p.substr(8))}};
        break;
      default:
        break;
    }
  }

  void inflate(const std::string& block, Stream& s) {
    const uint8_t* in = reinterpret_cast<const uint8_t*>(block.data());
    size_t left = block.size();
    for (;;) {
      nghttp2_nv nv;
      int fl = 0;
      ssize_t n = nghttp2_hd_inflate_hd2(inf_, &nv, &fl, in, left, 1);
      if (n < 0) {
        error = "HPACK decode failed";
        return;
      }
      in += n;
      left -= static_cast<size_t>(n);
      if (fl & NGHTTP2_HD_INFLATE_EMIT) {
        std::string name(reinterpret_cast<char*>(nv.name), nv.namelen);
        if (name == ":status")
          s.status = std::atoi(std::string(reinterpret_cast<char*>(nv.value), nv.valuelen).c_str());
      }
      if (fl & NGHTTP2_HD_INFLATE_FINAL) {
        nghttp2_hd_inflate_end_headers(inf_);
        return;
      }
      if ((fl & NGHTTP2_HD_INFLATE_EMIT) == 0 && left == 0) return;
    }
  }

  nghttp2_hd_inflater* inf_ = nullptr;
  std::string buf_, block_;
  uint32_t block_sid_ = 0;
  bool block_end_ = false;
};

std::string our_settings() {
  // ENABLE_PUSH 0 (id 2).
  std::string p = {0, 2, 0, 0, 0, 0};
  return frame(kSettings, 0, 0, p);
}

// Reads and answers until pred() or EOF or ms pass.
template <typename Pred>
void pump_until(Raw& raw, FrameReader& fr, int ms, Pred pred) {
  auto deadline = Clock::now() + std::chrono::milliseconds(ms);
  while (!pred() && !raw.eof() && Clock::now() < deadline) {
    std::string in, reply;
    raw.read_some(in, 200);
    fr.feed(in, reply);
    if (!reply.empty()) raw.write(reply);
  }
}

json frames_summary(const FrameReader& fr) {
  json t = json::object();
  for (auto& [k, v] : fr.types_) t[std::to_string(k)] = v;
  return t;
}

json run_garbage_after_tls(const Ctx& c) {
  Raw raw(c, true);
  raw.write(shimlet::random_bytes(c.o.bytes));
  FrameReader fr;
  pump_until(raw, fr, c.o.timeout_s * 1000, [] { return false; });
  json j = {
      {"mode", "garbage-after-tls"}, {"closed", raw.eof()}, {"how", raw.eof_how()}, {"frames", frames_summary(fr)}};
  j["goaway"] = fr.goaway ? *fr.goaway : json(nullptr);
  return j;
}

json run_bad_h2(const Ctx& c) {
  Raw raw(c, true);
  Deflater def;
  std::string out = std::string(kPreface) + our_settings();
  const std::string& kind = c.o.bad_h2;
  if (kind == "headers-stream0") {
    out += frame(kHeaders, kEndHeaders | kEndStream, 0, def.encode(c.request_headers(c.o.path)));
  } else if (kind == "bad-length") {
    out += frame(kPing, 0, 0, std::string(7, 'x'));  // PING payload must be 8 bytes
  } else if (kind == "oversize") {
    // A DATA frame that claims 16 MiB - 1 (> SETTINGS_MAX_FRAME_SIZE); only its start follows.
    out += frame(kData, 0, 1, std::string(1024, 'x'), 0xffffff);
  } else if (kind == "data-stream0") {
    out += frame(kData, 0, 0, "hello");
  } else if (kind == "window-zero") {
    out += frame(kWinUpdate, 0, 0, std::string(4, '\0'));
  } else {
    throw Error("unknown --bad-h2 kind " + kind);
  }
  raw.write(out);
  FrameReader fr;
  pump_until(raw, fr, c.o.timeout_s * 1000, [] { return false; });
  json j = {{"mode", "bad-h2"},
            {"kind", kind},
            {"closed", raw.eof()},
            {"how", raw.eof_how()},
            {"frames", frames_summary(fr)}};
  j["goaway"] = fr.goaway ? *fr.goaway : json(nullptr);
  return j;
}

json run_raw_garbage(const Ctx& c) {
  Raw raw(c, false);
  // Not a TLS record: the first byte is no TLS content type.
  std::string junk = "hello shim, this is not TLS\r\n" + shimlet::random_bytes(c.o.bytes);
  raw.write(junk);
  std::string in;
  auto deadline = Clock::now() + std::chrono::seconds(c.o.timeout_s);
  while (!raw.eof() && Clock::now() < deadline && in.size() < 65536) raw.read_some(in, 200);
  json j = {{"mode", "raw-garbage"}, {"closed", raw.eof()}, {"how", raw.eof_how()}, {"received", in.size()}};
  j["received_hex"] = shimlet::hex_encode(in.substr(0, 16));
  // 0x15: a TLS alert record.
  j["tls_alert"] = !in.empty() && static_cast<uint8_t>(in[0]) == 0x15;
  return j;
}

// Opens N request streams at once (HEADERS without END_STREAM: port-forward
// streams that stay open), then checks the first accepted one still works.
json run_streams(const Ctx& c) {
  Raw raw(c, true);
  FrameReader fr;
  Deflater def;
  raw.write(std::string(kPreface) + our_settings());
  // As a real client: the server's SETTINGS are known and acknowledged first
  // (nghttp2 applies its own limits once we ACK).
  pump_until(raw, fr, c.o.timeout_s * 1000, [&] { return fr.settings_seen; });
  if (!fr.settings_seen) throw Error("no SETTINGS from the server");
  std::string batch;
  std::vector<uint32_t> ids;
  for (int i = 0; i < c.o.streams; i++) {
    uint32_t sid = 1 + 2 * static_cast<uint32_t>(i);
    ids.push_back(sid);
    batch += frame(kHeaders, kEndHeaders, sid, def.encode(c.request_headers(c.o.path)));
  }
  raw.write(batch);
  auto answered = [&] {
    if (fr.goaway) return true;
    for (uint32_t id : ids) {
      auto it = fr.streams.find(id);
      if (it == fr.streams.end() || (!it->second.status && !it->second.rst_seen)) return false;
    }
    return true;
  };
  pump_until(raw, fr, c.o.timeout_s * 1000, answered);
  json statuses = json::object(), rst = json::object(), refused_ids = json::array();
  size_t unanswered = 0, refused = 0;
  uint32_t first_ok = 0;
  for (uint32_t id : ids) {
    auto& s = fr.streams[id];
    if (s.status) statuses[std::to_string(s.status)] = statuses.value(std::to_string(s.status), 0) + 1;
    if (s.rst_seen) rst[std::to_string(s.rst)] = rst.value(std::to_string(s.rst), 0) + 1;
    if (s.rst_seen && s.rst == NGHTTP2_REFUSED_STREAM) {
      refused++;
      if (refused_ids.size() < 16) refused_ids.push_back(id);
    }
    if (!s.status && !s.rst_seen) unanswered++;
    if (s.status == 200 && !s.rst_seen && !first_ok) first_ok = id;
  }
  // The connection and an accepted stream survive the refusal: echo through it.
  bool echo_ok = false;
  if (first_ok && !fr.goaway && !raw.eof()) {
    std::string ping = "probe-echo-" + std::to_string(first_ok) + "\n";
    raw.write(frame(kData, 0, first_ok, ping));
    pump_until(raw, fr, c.o.timeout_s * 1000,
               [&] { return fr.streams[first_ok].body.find(ping) != std::string::npos || fr.goaway.has_value(); });
    echo_ok = fr.streams[first_ok].body.find(ping) != std::string::npos;
  }
  json j = {{"mode", "streams"},       {"requested", c.o.streams},   {"status", statuses},       {"rst", rst},
            {"refused", refused},      {"refused_ids", refused_ids}, {"unanswered", unanswered}, {"echo_ok", echo_ok},
            {"echo_stream", first_ok}, {"closed", raw.eof()},        {"how", raw.eof_how()}};
  j["goaway"] = fr.goaway ? *fr.goaway : json(nullptr);
  if (!raw.eof()) raw.write(frame(kGoaway, 0, 0, std::string(8, '\0')));
  return j;
}

// A stable identity lets a test ask the master for a ticket bound to the key
// this probe will present; without --identity every run has a fresh key.
proto::Identity load_or_create_identity(const std::string& prefix) {
  if (prefix.empty()) return proto::generate_identity("shimlet-probe");
  if (::access((prefix + ".key").c_str(), F_OK) == 0)
    return proto::Identity{read_file(prefix + ".key"), read_file(prefix + ".crt")};
  proto::Identity id = proto::generate_identity("shimlet-probe");
  for (auto [path, pem] : {std::pair{prefix + ".key", &id.key_pem}, std::pair{prefix + ".crt", &id.cert_pem}}) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << *pem;
    if (!f.flush()) throw Error("write " + path + " failed");
  }
  if (::chmod((prefix + ".key").c_str(), 0600) < 0) throw shimlet::sys_error("chmod " + prefix + ".key");
  return id;
}

int real_main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  Ctx c;
  c.o = parse(argc, argv);
  if (!c.o.state_dir.empty() && !c.o.mint_only) {
    if (c.o.id.empty()) throw Error("--state-dir needs --id");
    json reg = json::parse(read_file(c.o.state_dir + "/" + c.o.id + "/registration.json"));
    if (c.o.endpoint.empty()) c.o.endpoint = reg.at("endpoint").get<std::string>();
    if (c.o.pin.empty()) c.o.pin = reg.at("pin").get<std::string>();
    if (!c.o.local_socket.empty()) c.o.local_socket = reg.at("local_socket").get<std::string>();
  }
  if (c.o.mint && c.o.key.empty()) {
    if (c.o.state_dir.empty()) throw Error("--mint needs --key (or --state-dir for STATE/local.key)");
    c.o.key = c.o.state_dir + "/local.key";
  }
  c.id = load_or_create_identity(c.o.identity);
  c.jkt = shimlet::ticket::jkt_of_public_pem(shimlet::ticket::PrivateKey::from_pem(c.id.key_pem).public_pem());
  c.ticket = c.o.mint ? mint(c.o, c.jkt) : c.o.ticket;
  if (c.o.mint_only) {
    std::cout << json{{"ticket", c.ticket}, {"jkt", c.jkt}}.dump() << "\n";
    return 0;
  }
  if (c.o.endpoint.empty()) throw Error("no endpoint: --endpoint HOST:PORT or --state-dir S --id ID");
  c.ssl_ctx = proto::make_client_ctx(c.id);
  json out;
  try {
    if (c.o.mode == "request") {
      out = Request(c).run();
    } else if (c.o.mode == "repeat-ticket") {
      out = {{"first", Request(c).run()}, {"second", Request(c).run()}};
    } else if (c.o.mode == "garbage-after-tls") {
      out = run_garbage_after_tls(c);
    } else if (c.o.mode == "bad-h2") {
      out = run_bad_h2(c);
    } else if (c.o.mode == "raw-garbage") {
      out = run_raw_garbage(c);
    } else if (c.o.mode == "streams") {
      out = run_streams(c);
    }
  } catch (const std::exception& e) {
    out = {{"probe_error", e.what()}};
  }
  std::cout << out.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return real_main(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "shimlet-probe: " << e.what() << "\n";
    return 2;
  }
}
