#include "master/http.h"

#include <arpa/inet.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>
#include <http_parser.h>
#include <netdb.h>
#include <nghttp2/nghttp2.h>
#include <sys/queue.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/log.h"
#include "proto/http1.h"

namespace shimlet::master {

// ---------------------------------------------------------------- helpers

std::string Request::header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (k == name) return v;
  return "";
}

std::multimap<std::string, std::string> Request::query_params() const {
  std::multimap<std::string, std::string> out;
  if (query.empty()) return out;
  evkeyvalq q;
  TAILQ_INIT(&q);
  if (evhttp_parse_query_str(query.c_str(), &q) == 0)
    for (evkeyval* kv = q.tqh_first; kv; kv = kv->next.tqe_next) out.emplace(kv->key, kv->value);
  evhttp_clear_headers(&q);
  return out;
}

std::string status_reason(int code) {
  switch (code) {
    case 400:
      return "BadRequest";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "NotFound";
    case 405:
      return "MethodNotAllowed";
    case 406:
      return "NotAcceptable";
    case 408:
      return "Timeout";
    case 409:
      return "Conflict";
    case 413:
      return "RequestEntityTooLarge";
    case 415:
      return "UnsupportedMediaType";
    case 422:
      return "Invalid";
    case 429:
      return "TooManyRequests";
    case 431:
      return "RequestHeaderFieldsTooLarge";
    case 503:
      return "ServiceUnavailable";
    default:
      return code >= 500 ? "InternalError" : "BadRequest";
  }
}

Response status_error(int code, const std::string& message, const std::string& reason) {
  nlohmann::json j = {
      {"kind", "Status"},    {"apiVersion", "v1"}, {"metadata", nlohmann::json::object()},
      {"status", "Failure"}, {"message", message}, {"reason", reason.empty() ? status_reason(code) : reason},
      {"code", code}};
  Response r;
  r.status = code;
  r.body = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  return r;
}

std::string serialize_http1(const Response& r, bool keep_alive, bool head_request) {
  const char* phrase = http_status_str(static_cast<http_status>(r.status));
  std::string out = "HTTP/1.1 " + std::to_string(r.status) + " " + phrase + "\r\n";
  out += "Content-Type: " + r.content_type + "\r\n";
  out += "Content-Length: " + std::to_string(r.body.size()) + "\r\n";
  out += "Cache-Control: no-cache, private\r\n";
  for (const auto& [k, v] : r.headers) out += k + ": " + v + "\r\n";
  if (!keep_alive) out += "Connection: close\r\n";
  out += "\r\n";
  if (!head_request) out += r.body;
  return out;
}

// ---------------------------------------------------------------- HTTP/1.1

namespace {
proto::http1::Limits h1_limits(const Limits& l) {
  // One header line may use the whole head budget: bearer tokens (OIDC
  // JWTs) can be long, and that was the bound before the shared reader.
  return {.max_head_bytes = l.max_header_bytes,
          .max_headers = l.max_headers,
          .max_header_line_bytes = l.max_header_bytes,
          .max_body_bytes = l.max_body_bytes};
}

Request from_http1(proto::http1::Request&& in) {
  Request r;
  r.method = std::move(in.method);
  r.target = std::move(in.target);
  r.path = std::move(in.path);
  r.query = std::move(in.query);
  r.headers = std::move(in.headers);
  r.body = std::move(in.body);
  r.protocol = "http/1.1";
  r.upgrade = in.upgrade;
  return r;
}
}  // namespace

// ---------------------------------------------------------------- server

struct Server::Impl {
  event_base* base;
  SSL_CTX* ctx;
  Handler handler;
  Limits limits;
  evconnlistener* listener = nullptr;
  std::map<Conn*, std::unique_ptr<Conn>> conns;
  void close(Conn* c);
};

namespace {
constexpr size_t kMaxPendingOutput = 4 << 20;  // stop reading while a client doesn't read its responses

struct H2Stream {
  Request req;
  size_t header_bytes = 0;
  int err_status = 0;
  std::string err;
  bool responded = false;
  std::string out;
  size_t out_off = 0;
};
}  // namespace

struct Server::Conn {
  Impl* srv;
  bufferevent* bev = nullptr;
  SSL* ssl = nullptr;
  std::string peer_ip;
  uint16_t peer_port = 0;
  std::unique_ptr<proto::http1::RequestReader> h1;
  nghttp2_session* h2 = nullptr;
  std::map<int32_t, H2Stream> streams;
  EventPtr deadline, linger;
  bool closing = false;
  std::deque<std::pair<Request, bool>> pending;  // completed HTTP/1.1 requests, not answered yet
  UpgradeHandler takeover;                       // set: hand the connection over after this read
  // HTTP/1.1 deferred answer (Response::deferred): nothing more is read or
  // answered until it comes.
  bool waiting = false;
  bool waiting_keep = false, waiting_head = false;
  bool error_after_wait = false;  // the reader failed meanwhile: answer its error after the reply
  std::shared_ptr<bool> alive = std::make_shared<bool>(true);  // Replies hold a weak_ptr

  ~Conn() {
    if (h2) nghttp2_session_del(h2);
    deadline.reset();
    linger.reset();
    if (bev) bufferevent_free(bev);  // frees the SSL and closes the socket
  }

  evbuffer* output() { return bufferevent_get_output(bev); }

  Response run(const Request& r) {
    try {
      return srv->handler(r);
    } catch (const std::exception& e) {
      log::error("request handler failed", {{"path", r.path}, {"error", e.what()}});
      return status_error(500, "internal error");
    }
  }

  // --- HTTP/1.1
  void h1_write(const Response& resp, bool keep, bool head) {
    std::string s = serialize_http1(resp, keep, head);
    evbuffer_add(output(), s.data(), s.size());
    if (!keep) closing = true;
  }

  void h1_write_reader_error() {
    if (h1->error_status()) {
      std::string s = serialize_http1(status_error(h1->error_status(), h1->error()), false, false);
      evbuffer_add(output(), s.data(), s.size());
    }
    closing = true;
  }

  // Answers the completed requests in order; stops at an upgrade taken over
  // or at an answer that comes later (then nothing is read until it does).
  void h1_serve() {
    while (!pending.empty() && !waiting && !closing && !takeover) {
      auto [req, keep] = std::move(pending.front());
      pending.pop_front();
      req.peer_ip = peer_ip;
      req.peer_port = peer_port;
      req.ssl = ssl;
      Response resp = run(req);
      if (closing) continue;
      if (req.upgrade && resp.upgrade) {
        takeover = std::move(resp.upgrade);
        pending.clear();
        return;
      }
      if (resp.deferred) {
        waiting = true;
        waiting_keep = keep;
        waiting_head = req.method == "HEAD";
        evtimer_del(deadline.get());
        bufferevent_disable(bev, EV_READ);
        auto start = std::move(resp.deferred);
        start(h1_reply());
        return;
      }
      h1_write(resp, keep, req.method == "HEAD");
    }
  }

  Reply h1_reply() {
    return [this, weak = std::weak_ptr<bool>(alive)](Response resp) {
      if (weak.expired() || !waiting) return;
      waiting = false;
      h1_write(resp, waiting_keep, waiting_head);
      h1_serve();
      if (waiting || takeover) return;  // takeover: only after a read (an upgrade is never deferred)
      if (error_after_wait && !closing) h1_write_reader_error();
      if (!closing) {
        bufferevent_enable(bev, EV_READ);
        // Bytes that arrived meanwhile wait in the input buffer.
        if (evbuffer_get_length(bufferevent_get_input(bev))) {
          on_read(bev, this);  // may close (and free) the connection
          return;
        }
      }
      after_io();  // may close (and free) the connection
    };
  }

  // Returns the bytes used; fewer than len only when the connection is being
  // taken over (the rest belongs to the upgraded protocol).
  size_t h1_input(const char* data, size_t len) {
    bool ok = h1->feed(data, len) != proto::http1::RequestReader::State::Error;
    size_t used = h1->consumed();
    h1_serve();
    if (takeover) return used;
    if (waiting) {
      if (!ok) error_after_wait = true;
      return len;
    }
    if (h1->state() == proto::http1::RequestReader::State::Done)
      closing = true;  // an upgrade that was answered, not taken over
    if (!ok && !closing) h1_write_reader_error();
    if (closing) return len;  // input is drained while the answer goes out (see linger)
    if (h1->in_request()) {
      if (!evtimer_pending(deadline.get(), nullptr)) {
        timeval tv{srv->limits.request_timeout_s, 0};
        evtimer_add(deadline.get(), &tv);
      }
    } else {
      evtimer_del(deadline.get());
    }
    return len;
  }

  // Detaches the connection from the server and gives it to the upgrade
  // handler; `this` is gone afterwards.
  void hand_over() {
    UpgradeHandler h = std::move(takeover);
    evtimer_del(deadline.get());
    bufferevent_setcb(bev, nullptr, nullptr, nullptr, nullptr);
    bufferevent_set_timeouts(bev, nullptr, nullptr);
    bufferevent_disable(bev, EV_READ);
    Upgraded up{srv->base, BevPtr(bev)};
    bev = nullptr;
    srv->close(this);
    try {
      h(std::move(up));
    } catch (const std::exception& e) {
      // The handler owned the connection; it is closed with `up`.
      log::error("upgrade handler failed", {{"error", e.what()}});
    }
  }

  // --- HTTP/2
  static Conn* self(void* ud) { return static_cast<Conn*>(ud); }

  static int on_begin_headers(nghttp2_session*, const nghttp2_frame* f, void* ud) {
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
    auto* c = self(ud);
    H2Stream& s = c->streams[f->hd.stream_id];
    s.req.protocol = "h2";
    s.req.peer_ip = c->peer_ip;
    s.req.peer_port = c->peer_port;
    s.req.ssl = c->ssl;
    return 0;
  }
  static int on_header(nghttp2_session*, const nghttp2_frame* f, const uint8_t* name, size_t namelen,
                       const uint8_t* value, size_t valuelen, uint8_t, void* ud) {
    auto* c = self(ud);
    auto it = c->streams.find(f->hd.stream_id);
    if (it == c->streams.end()) return 0;  // trailers of an unknown stream: ignore
    H2Stream& s = it->second;
    if (s.err_status) return 0;
    s.header_bytes += namelen + valuelen + 32;  // RFC 9113 header list size accounting
    if (s.header_bytes > c->srv->limits.max_header_bytes) {
      s.err_status = 431;
      s.err = "request headers too large";
      return 0;
    }
    std::string n(reinterpret_cast<const char*>(name), namelen), v(reinterpret_cast<const char*>(value), valuelen);
    if (n == ":method") {
      s.req.method = v;
    } else if (n == ":path") {
      s.req.target = v;
      size_t q = v.find('?');
      s.req.path = v.substr(0, q);
      if (q != std::string::npos) s.req.query = v.substr(q + 1);
    } else if (n == ":authority") {
      s.req.headers.emplace_back("host", v);
    } else if (n[0] != ':') {
      if (s.req.headers.size() >= c->srv->limits.max_headers) {
        s.err_status = 431;
        s.err = "too many request headers";
        return 0;
      }
      s.req.headers.emplace_back(std::move(n), std::move(v));
    }
    return 0;
  }
  static int on_data_chunk(nghttp2_session*, uint8_t, int32_t id, const uint8_t* data, size_t len, void* ud) {
    auto* c = self(ud);
    auto it = c->streams.find(id);
    if (it == c->streams.end()) return 0;
    H2Stream& s = it->second;
    if (s.responded || s.err_status) return 0;
    if (s.req.body.size() + len > c->srv->limits.max_body_bytes) {
      s.err_status = 413;
      s.err = "request body too large";
      c->h2_respond(id, s, status_error(413, s.err));  // answer now; the rest is dropped
      return 0;
    }
    s.req.body.append(reinterpret_cast<const char*>(data), len);
    return 0;
  }
  static int on_frame_recv(nghttp2_session*, const nghttp2_frame* f, void* ud) {
    auto* c = self(ud);
    if ((f->hd.type == NGHTTP2_HEADERS || f->hd.type == NGHTTP2_DATA) && (f->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
      auto it = c->streams.find(f->hd.stream_id);
      if (it == c->streams.end() || it->second.responded) return 0;
      H2Stream& s = it->second;
      if (s.err_status)
        c->h2_respond(f->hd.stream_id, s, status_error(s.err_status, s.err));
      else if (s.req.method.empty() || s.req.path.empty())
        c->h2_respond(f->hd.stream_id, s, status_error(400, "missing :method or :path"));
      else if (s.req.method == "CONNECT")
        c->h2_respond(f->hd.stream_id, s, status_error(400, "CONNECT is not supported"));
      else
        c->h2_answer(f->hd.stream_id, s);
    }
    return 0;
  }

  void h2_answer(int32_t id, H2Stream& s) {
    Response r = run(s.req);
    if (!r.deferred) {
      h2_respond(id, s, r);
      return;
    }
    auto start = std::move(r.deferred);
    start([this, id, weak = std::weak_ptr<bool>(alive)](Response resp) {
      if (weak.expired()) return;
      auto it = streams.find(id);
      if (it == streams.end() || it->second.responded) return;  // the client reset the stream
      h2_respond(id, it->second, resp);
      after_io();  // may close (and free) the connection
    });
  }
  static int on_stream_close(nghttp2_session*, int32_t id, uint32_t, void* ud) {
    self(ud)->streams.erase(id);
    return 0;
  }
  static ssize_t read_body(nghttp2_session* sess, int32_t id, uint8_t* buf, size_t len, uint32_t* flags,
                           nghttp2_data_source*, void*) {
    auto* c = static_cast<Conn*>(nghttp2_session_get_stream_user_data(sess, id));
    auto it = c ? c->streams.find(id) : decltype(c->streams.end()){};
    if (!c || it == c->streams.end()) {
      *flags |= NGHTTP2_DATA_FLAG_EOF;
      return 0;
    }
    H2Stream& s = it->second;
    size_t n = std::min(len, s.out.size() - s.out_off);
    memcpy(buf, s.out.data() + s.out_off, n);
    s.out_off += n;
    if (s.out_off == s.out.size()) *flags |= NGHTTP2_DATA_FLAG_EOF;
    return static_cast<ssize_t>(n);
  }

  void h2_respond(int32_t id, H2Stream& s, const Response& r) {
    s.responded = true;
    s.out = r.body;
    s.out_off = 0;
    std::string status = std::to_string(r.status), len = std::to_string(r.body.size());
    std::vector<nghttp2_nv> nv;
    auto add = [&](const std::string& k, const std::string& v) {
      nv.push_back({reinterpret_cast<uint8_t*>(const_cast<char*>(k.data())),
                    reinterpret_cast<uint8_t*>(const_cast<char*>(v.data())), k.size(), v.size(), NGHTTP2_NV_FLAG_NONE});
    };
    const std::string kStatus = ":status", kCt = "content-type", kCl = "content-length", kCc = "cache-control",
                      kCcv = "no-cache, private";
    add(kStatus, status);
    add(kCt, r.content_type);
    add(kCl, len);
    add(kCc, kCcv);
    std::vector<std::pair<std::string, std::string>> extra;
    for (const auto& [k, v] : r.headers) {
      std::string lk = k;
      for (auto& ch : lk) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      extra.emplace_back(lk, v);
    }
    for (const auto& [k, v] : extra) add(k, v);
    nghttp2_session_set_stream_user_data(h2, id, this);
    nghttp2_data_provider prd{};
    prd.read_callback = read_body;
    int rv = nghttp2_submit_response(h2, id, nv.data(), nv.size(), s.req.method != "HEAD" ? &prd : nullptr);
    if (rv != 0) log::warn("nghttp2_submit_response failed", {{"error", nghttp2_strerror(rv)}});
  }

  bool h2_flush() {
    for (;;) {
      const uint8_t* data = nullptr;
      ssize_t n = nghttp2_session_mem_send(h2, &data);
      if (n < 0) return false;
      if (n == 0) break;
      evbuffer_add(output(), data, static_cast<size_t>(n));
    }
    return nghttp2_session_want_read(h2) || nghttp2_session_want_write(h2) || evbuffer_get_length(output()) > 0;
  }

  void start_h2() {
    nghttp2_session_callbacks* cbs = nullptr;
    nghttp2_session_callbacks_new(&cbs);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
    nghttp2_option* opt = nullptr;
    nghttp2_option_new(&opt);
    // Bound the HPACK dynamic table and the number of streams a peer keeps open.
    nghttp2_option_set_max_deflate_dynamic_table_size(opt, 4096);
    nghttp2_session_server_new2(&h2, cbs, this, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cbs);
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, srv->limits.max_concurrent_streams},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, static_cast<uint32_t>(srv->limits.max_header_bytes)},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
    };
    nghttp2_submit_settings(h2, NGHTTP2_FLAG_NONE, iv, sizeof iv / sizeof iv[0]);
  }

  // --- libevent callbacks
  static void on_read(bufferevent* bev, void* arg) {
    auto* c = static_cast<Conn*>(arg);
    evbuffer* in = bufferevent_get_input(bev);
    if (c->waiting) {  // an HTTP/1.1 answer is deferred: read on after it
      bufferevent_disable(bev, EV_READ);
      return;
    }
    if (evbuffer_get_length(c->output()) > kMaxPendingOutput) {
      bufferevent_disable(bev, EV_READ);  // resumed by on_write once the client reads
      return;
    }
    while (size_t n = evbuffer_get_length(in)) {
      if (c->closing) {
        evbuffer_drain(in, n);
        break;
      }
      evbuffer_iovec v;
      if (evbuffer_peek(in, -1, nullptr, &v, 1) < 1) break;
      const char* data = static_cast<const char*>(v.iov_base);
      size_t len = v.iov_len;
      if (c->h2) {
        ssize_t rv = nghttp2_session_mem_recv(c->h2, reinterpret_cast<const uint8_t*>(data), len);
        evbuffer_drain(in, len);
        if (rv < 0) {
          c->closing = true;
          break;
        }
      } else {
        size_t used = c->h1_input(data, len);
        evbuffer_drain(in, used);
        if (c->takeover) {
          c->hand_over();  // `c` is gone
          return;
        }
        if (c->waiting) break;
      }
    }
    c->after_io();
  }

  void after_io() {
    if (h2 && !closing && !h2_flush()) closing = true;
    if (h2 && closing) h2_flush();
    if (closing && evbuffer_get_length(output()) == 0) finish();
  }

  // Closes once the answer is out. HTTP/1.1 lingers (as nginx's
  // lingering_close) for a bounded time, discarding input, so a client still
  // sending an oversized request reads our error instead of a reset.
  void finish() {
    if (h2 || !h1 || linger) {
      if (!linger) srv->close(this);  // `this` is gone
      return;
    }
    linger.reset(evtimer_new(srv->base, on_linger_done, this));
    if (!linger) {       // no memory (inside a libevent callback: no throw): close without lingering
      srv->close(this);  // `this` is gone
      return;
    }
    timeval tv{1, 0};
    evtimer_add(linger.get(), &tv);
  }

  static void on_linger_done(evutil_socket_t, short, void* arg) {
    auto* c = static_cast<Conn*>(arg);
    c->srv->close(c);
  }

  static void on_write(bufferevent* bev, void* arg) {
    auto* c = static_cast<Conn*>(arg);
    if (c->closing && evbuffer_get_length(c->output()) == 0) {
      c->finish();
      return;
    }
    if (!c->closing && !c->waiting) bufferevent_enable(bev, EV_READ);
  }

  static void on_event(bufferevent* bev, short what, void* arg) {
    auto* c = static_cast<Conn*>(arg);
    if (what & BEV_EVENT_CONNECTED) {
      const unsigned char* alpn = nullptr;
      unsigned alpnlen = 0;
      SSL_get0_alpn_selected(c->ssl, &alpn, &alpnlen);
      timeval idle{c->srv->limits.idle_timeout_s, 0}, wr{30, 0};
      bufferevent_set_timeouts(bev, &idle, &wr);
      if (alpnlen == 2 && memcmp(alpn, "h2", 2) == 0) {
        c->start_h2();
      } else {
        c->h1 = std::make_unique<proto::http1::RequestReader>(h1_limits(c->srv->limits), proto::http1::Mode::Messages,
                                                              [c](proto::http1::Request&& r) {
                                                                bool keep = r.keep_alive;
                                                                c->pending.emplace_back(from_http1(std::move(r)), keep);
                                                              });
      }
      c->after_io();
      return;
    }
    // EOF, error, or timeout: a request that timed out mid-way gets no answer
    // (the peer is not reading or not sending); just close.
    c->srv->close(c);
  }

  static void on_accept(evconnlistener*, evutil_socket_t fd, sockaddr* sa, int salen, void* arg);

  static void on_deadline(evutil_socket_t, short, void* arg) {
    auto* c = static_cast<Conn*>(arg);
    std::string s = serialize_http1(status_error(408, "request not received in time"), false, false);
    evbuffer_add(c->output(), s.data(), s.size());
    c->closing = true;
  }
};

void Server::Impl::close(Conn* c) { conns.erase(c); }

void Server::Conn::on_accept(evconnlistener*, evutil_socket_t fd, sockaddr* sa, int salen, void* arg) {
  auto* srv = static_cast<Server::Impl*>(arg);
  if (srv->conns.size() >= srv->limits.max_connections) {
    evutil_closesocket(fd);
    return;
  }
  auto c = std::make_unique<Server::Conn>();
  c->srv = srv;
  char host[NI_MAXHOST] = "", port[NI_MAXSERV] = "";
  if (getnameinfo(sa, static_cast<socklen_t>(salen), host, sizeof host, port, sizeof port,
                  NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
    c->peer_ip = host;
    c->peer_port = static_cast<uint16_t>(atoi(port));
  }
  if (c->peer_ip.rfind("::ffff:", 0) == 0) c->peer_ip = c->peer_ip.substr(7);
  c->ssl = SSL_new(srv->ctx);
  if (!c->ssl) {
    evutil_closesocket(fd);
    return;
  }
  c->bev = bufferevent_openssl_socket_new(srv->base, fd, c->ssl, BUFFEREVENT_SSL_ACCEPTING,
                                          BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
  if (!c->bev) {
    SSL_free(c->ssl);
    evutil_closesocket(fd);
    return;
  }
  bufferevent_openssl_set_allow_dirty_shutdown(c->bev, 1);
  c->deadline.reset(evtimer_new(srv->base, Server::Conn::on_deadline, c.get()));
  if (!c->deadline) return;  // no memory: ~Conn frees the bufferevent, its SSL and socket
  timeval hs{srv->limits.handshake_timeout_s, 0};
  bufferevent_set_timeouts(c->bev, &hs, &hs);
  bufferevent_setwatermark(c->bev, EV_READ, 0, 256 * 1024);
  bufferevent_setcb(c->bev, Server::Conn::on_read, Server::Conn::on_write, Server::Conn::on_event, c.get());
  bufferevent_enable(c->bev, EV_READ | EV_WRITE);
  Server::Conn* raw = c.get();
  srv->conns.emplace(raw, std::move(c));
}

Server::Server(event_base* base, SSL_CTX* ctx, Handler handler, Limits limits)
    : impl_(std::make_unique<Impl>(Impl{base, ctx, std::move(handler), limits, nullptr, {}})) {}

Server::~Server() {
  impl_->conns.clear();
  if (impl_->listener) evconnlistener_free(impl_->listener);
}

size_t Server::connections() const { return impl_->conns.size(); }

uint16_t Server::listen(const std::string& address, uint16_t port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV;
  std::string ps = std::to_string(port);
  int rv = getaddrinfo(address.empty() ? nullptr : address.c_str(), ps.c_str(), &hints, &res);
  if (rv != 0) throw Error("bad bind address " + address + ": " + gai_strerror(rv));
  impl_->listener = evconnlistener_new_bind(impl_->base, Conn::on_accept, impl_.get(),
                                            LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_EXEC, 128,
                                            res->ai_addr, static_cast<int>(res->ai_addrlen));
  freeaddrinfo(res);
  if (!impl_->listener) throw sys_error("cannot listen on " + address + ":" + ps);
  sockaddr_storage ss{};
  socklen_t sl = sizeof ss;
  getsockname(evconnlistener_get_fd(impl_->listener), reinterpret_cast<sockaddr*>(&ss), &sl);
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
  return ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
}

}  // namespace shimlet::master
