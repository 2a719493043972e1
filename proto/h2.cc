#include "proto/h2.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <openssl/err.h>
#include <string.h>

#include <algorithm>

#include "proto/tls.h"

namespace shimlet::proto {

const std::string* find_header(const Headers& h, const std::string& name) {
  for (auto& [k, v] : h)
    if (k == name) return &v;
  return nullptr;
}

namespace {
std::vector<nghttp2_nv> to_nv(const Headers& h) {
  std::vector<nghttp2_nv> nv;
  nv.reserve(h.size());
  for (auto& [k, v] : h)
    nv.push_back({reinterpret_cast<uint8_t*>(const_cast<char*>(k.data())),
                  reinterpret_cast<uint8_t*>(const_cast<char*>(v.data())), k.size(), v.size(), NGHTTP2_NV_FLAG_NONE});
  return nv;
}
uint32_t settings_max_header(const H2Settings& s) { return s.max_header_list; }
// Keep at most this much encoded output queued in the socket buffer before
// asking nghttp2 for more: bounds memory and keeps latency low.
constexpr size_t kSocketHighWater = 1u << 20;
}  // namespace

H2Conn::H2Conn(event_base* base, int fd, SSL* ssl, Role role, Handler* handler, H2Settings settings)
    : base_(base), ssl_(ssl), role_(role), handler_(handler), settings_(settings) {
  // A handshake already done by the caller (the session picks its front door
  // by ALPN first): start as connected, from the loop.
  bool open = SSL_is_init_finished(ssl);
  bev_ = bufferevent_openssl_socket_new(
      base, fd, ssl,
      open ? BUFFEREVENT_SSL_OPEN : (role == Role::Server ? BUFFEREVENT_SSL_ACCEPTING : BUFFEREVENT_SSL_CONNECTING),
      BEV_OPT_CLOSE_ON_FREE);
  bufferevent_openssl_set_allow_dirty_shutdown(bev_, 1);
  bufferevent_setcb(bev_, on_read, on_write, on_event, this);
  bufferevent_setwatermark(bev_, EV_WRITE, kSocketHighWater / 4, 0);
  timeval tv{settings_.handshake_timeout_s, 0};
  bufferevent_set_timeouts(bev_, &tv, &tv);
  bufferevent_enable(bev_, EV_READ | EV_WRITE);
  if (open) bufferevent_trigger_event(bev_, BEV_EVENT_CONNECTED, BEV_TRIG_DEFER_CALLBACKS);
}

H2Conn::~H2Conn() {
  if (ping_) event_free(ping_);
  if (eof_ev_) event_free(eof_ev_);
  if (h2_) nghttp2_session_del(h2_);
  if (bev_) bufferevent_free(bev_);  // frees ssl and closes fd (BEV_OPT_CLOSE_ON_FREE)
}

void H2Conn::on_event(bufferevent*, short what, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (what & BEV_EVENT_CONNECTED) {
    bufferevent_set_timeouts(self->bev_, nullptr, nullptr);
    const unsigned char* alpn = nullptr;
    unsigned alpn_len = 0;
    SSL_get0_alpn_selected(self->ssl_, &alpn, &alpn_len);
    if (alpn_len != 2 || memcmp(alpn, "h2", 2) != 0) return self->close("peer did not negotiate ALPN h2");
    std::string err = self->handler_->on_connected(self->ssl_);
    if (!err.empty()) return self->close(err);
    nghttp2_session_callbacks* cbs;
    nghttp2_session_callbacks_new(&cbs);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, frame_recv_cb);
    nghttp2_session_callbacks_set_on_header_callback(cbs, header_cb);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, begin_headers_cb);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, data_chunk_cb);
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, stream_close_cb);
    nghttp2_session_callbacks_set_data_source_read_length_callback(cbs, read_length_cb);
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, frame_send_cb);
    nghttp2_option* opt;
    nghttp2_option_new(&opt);
    // We return window only for bytes actually delivered (consume()): a slow
    // reader stops the peer instead of growing our buffers.
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_option_set_max_send_header_block_length(opt, settings_max_header(self->settings_));
    // We use no priorities: closed streams need not be kept for the
    // dependency tree (with no advertised stream limit nghttp2 would keep
    // every closed stream of a long-lived connection).
    nghttp2_option_set_no_closed_streams(opt, 1);
    // The server does not advertise its stream limit (see H2Settings): open
    // up to ours rather than nghttp2's default of 100 before queueing.
    if (self->role_ == Role::Client)
      nghttp2_option_set_peer_max_concurrent_streams(opt, self->settings_.max_concurrent_streams);
    int rv = self->role_ == Role::Server ? nghttp2_session_server_new2(&self->h2_, cbs, self, opt)
                                         : nghttp2_session_client_new2(&self->h2_, cbs, self, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cbs);
    if (rv != 0) return self->close(std::string("nghttp2 session: ") + nghttp2_strerror(rv));
    std::vector<nghttp2_settings_entry> iv = {
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, self->settings_.stream_window},
        {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, self->settings_.max_frame_size},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, self->settings_.max_header_list},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
    };
    // Server: the limit is enforced in begin_headers_cb with REFUSED_STREAM,
    // not advertised (see H2Settings::max_concurrent_streams). Client: limits
    // pushed streams only (push is off anyway).
    if (self->role_ == Role::Client)
      iv.push_back({NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, self->settings_.max_concurrent_streams});
    nghttp2_submit_settings(self->h2_, NGHTTP2_FLAG_NONE, iv.data(), iv.size());
    nghttp2_session_set_local_window_size(self->h2_, NGHTTP2_FLAG_NONE, 0,
                                          static_cast<int32_t>(self->settings_.connection_window));
    self->connected_ = true;
    if (self->settings_.ping_interval_s > 0) {
      self->ping_ = event_new(self->base_, -1, EV_PERSIST, on_ping_timer, self);
      timeval pt{self->settings_.ping_interval_s, 0};
      event_add(self->ping_, &pt);
    }
    self->pump();
    // The peer may have sent its preface with the handshake's last flight.
    on_read(self->bev_, self);
    return;
  }
  if (what & BEV_EVENT_TIMEOUT) return self->close("TLS handshake timed out");
  if (what & BEV_EVENT_ERROR) {
    unsigned long e = bufferevent_get_openssl_error(self->bev_);
    std::string why;
    if (e) {
      char buf[256];
      ERR_error_string_n(e, buf, sizeof buf);
      why = std::string("TLS error: ") + buf;
    } else {
      int err = EVUTIL_SOCKET_ERROR();
      why = err ? std::string("connection error: ") + evutil_socket_error_to_string(err) : "connection error";
    }
    if (!self->connected_) return self->close("TLS handshake failed: " + why);
    return self->close_after_input(why);
  }
  if (what & BEV_EVENT_EOF) return self->close_after_input("connection closed by peer");
}

// libevent's bufferevent_openssl reports EOF/errors from inside its read
// before it commits the bytes read in the same call to the input buffer: the
// peer's last frames (a response, its GOAWAY) would be lost. Process them from
// the loop first, then close.
void H2Conn::close_after_input(const std::string& why) {
  if (closed_ || eof_ev_) return;
  if (!h2_) return close(why);
  eof_why_ = why;
  eof_ev_ = evtimer_new(base_, on_eof_timer, this);
  timeval zero{0, 0};
  evtimer_add(eof_ev_, &zero);
}

void H2Conn::on_eof_timer(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (self->closed_) return;
  on_read(self->bev_, self);
  if (!self->closed_) self->close(self->eof_why_);
}

void H2Conn::on_read(bufferevent* bev, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (!self->h2_ || self->closed_) return;
  evbuffer* in = bufferevent_get_input(bev);
  size_t len = evbuffer_get_length(in);
  if (len == 0) return;
  unsigned char* data = evbuffer_pullup(in, -1);
  self->in_pump_ = true;
  ssize_t n = nghttp2_session_mem_recv(self->h2_, data, len);
  self->in_pump_ = false;
  if (n < 0) return self->close(std::string("HTTP/2 protocol error: ") + nghttp2_strerror(static_cast<int>(n)));
  self->bytes_in_ += static_cast<uint64_t>(n);
  evbuffer_drain(in, static_cast<size_t>(n));
  self->pump();
}

void H2Conn::on_write(bufferevent*, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (!self->h2_ || self->closed_) return;
  self->pump();
}

void H2Conn::on_ping_timer(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (!self->h2_ || self->closed_) return;
  // A peer (or path) that stopped answering: give up instead of hanging until
  // TCP's retransmission timeout.
  if (self->ping_outstanding_)
    return self->close("no reply to keepalive PING within " + std::to_string(self->settings_.ping_interval_s) + " s");
  self->ping_outstanding_ = true;
  nghttp2_submit_ping(self->h2_, NGHTTP2_FLAG_NONE, nullptr);
  self->pump();
}

void H2Conn::pump() {
  if (!h2_ || closed_ || in_pump_) return;
  evbuffer* out = bufferevent_get_output(bev_);
  std::vector<int32_t> drained;
  in_pump_ = true;
  while (evbuffer_get_length(out) < kSocketHighWater) {
    const uint8_t* data;
    ssize_t n = nghttp2_session_mem_send(h2_, &data);
    if (n < 0) {
      in_pump_ = false;
      return close(std::string("HTTP/2 send error: ") + nghttp2_strerror(static_cast<int>(n)));
    }
    if (n == 0) break;
    bytes_out_ += static_cast<uint64_t>(n);
    evbuffer_add(out, data, static_cast<size_t>(n));
  }
  in_pump_ = false;
  // Tell handlers whose buffers drained (outside nghttp2 callbacks).
  for (auto& [id, o] : out_) {
    size_t left = o.buf.size() - o.off;
    if (!o.below_low && left <= settings_.out_low_water) {
      o.below_low = true;
      drained.push_back(id);
    }
  }
  if (total_high_ && total_out_ <= settings_.total_high_water / 2) {
    total_high_ = false;
    drained.push_back(0);
  }
  for (int32_t id : drained) {
    handler_->on_drain(id);
    if (closed_) return;
  }
  if (closed_) return;
  if (!nghttp2_session_want_read(h2_) && !nghttp2_session_want_write(h2_) && evbuffer_get_length(out) == 0)
    close(closing_ ? "connection shut down" : !proto_error_.empty() ? proto_error_ : "peer ended the HTTP/2 session");
}

void H2Conn::flush() { pump(); }

void H2Conn::close(const std::string& why) {
  if (closed_) return;
  closed_ = true;
  if (ping_) {
    event_free(ping_);
    ping_ = nullptr;
  }
  bufferevent_disable(bev_, EV_READ | EV_WRITE);
  handler_->on_closed(why);
}

int H2Conn::begin_headers_cb(nghttp2_session* session, const nghttp2_frame* f, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (f->hd.type != NGHTTP2_HEADERS) return 0;
  int32_t id = f->hd.stream_id;
  if (self->role_ == Role::Server && f->headers.cat == NGHTTP2_HCAT_REQUEST) {
    if (self->open_in_ >= self->settings_.max_concurrent_streams) {
      // A stream error, not a connection error (RFC 9113 5.1.2): the
      // client may retry it later; its other streams go on. Our RST marks
      // the stream closing, so nghttp2 adds no INTERNAL_ERROR reset of its own
      // for the callback failure, which makes it skip this header block.
      nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, id, NGHTTP2_REFUSED_STREAM);
      self->handler_->on_stream_refused(id);
      return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    self->open_in_++;
    nghttp2_session_set_stream_user_data(session, id, self);  // counted: uncounted on close
  }
  self->in_headers_[id].clear();
  return 0;
}

int H2Conn::header_cb(nghttp2_session*, const nghttp2_frame* f, const uint8_t* name, size_t namelen,
                      const uint8_t* value, size_t valuelen, uint8_t, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (f->hd.type != NGHTTP2_HEADERS) return 0;
  auto& h = self->in_headers_[f->hd.stream_id];
  h.emplace_back(std::string(reinterpret_cast<const char*>(name), namelen),
                 std::string(reinterpret_cast<const char*>(value), valuelen));
  return 0;
}

int H2Conn::frame_recv_cb(nghttp2_session*, const nghttp2_frame* f, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  int32_t id = f->hd.stream_id;
  bool end = f->hd.flags & NGHTTP2_FLAG_END_STREAM;
  if (f->hd.type == NGHTTP2_HEADERS && (f->hd.flags & NGHTTP2_FLAG_END_HEADERS)) {
    auto it = self->in_headers_.find(id);
    Headers h = it == self->in_headers_.end() ? Headers{} : std::move(it->second);
    if (it != self->in_headers_.end()) self->in_headers_.erase(it);
    self->handler_->on_headers(id, h, end);
    if (end) self->handler_->on_remote_end(id);
  } else if (f->hd.type == NGHTTP2_DATA && end) {
    self->handler_->on_remote_end(id);
  } else if (f->hd.type == NGHTTP2_PING && (f->hd.flags & NGHTTP2_FLAG_ACK)) {
    self->ping_outstanding_ = false;
  }
  return 0;
}

int H2Conn::data_chunk_cb(nghttp2_session*, uint8_t, int32_t id, const uint8_t* data, size_t len, void* arg) {
  static_cast<H2Conn*>(arg)->handler_->on_data(id, data, len);
  return 0;
}

int H2Conn::stream_close_cb(nghttp2_session* session, int32_t id, uint32_t code, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (self->open_in_ > 0 && nghttp2_session_get_stream_user_data(session, id) == self) self->open_in_--;
  if (auto it = self->out_.find(id); it != self->out_.end()) {
    self->total_out_ -= it->second.buf.size() - it->second.off;
    self->out_.erase(it);
  }
  self->in_headers_.erase(id);
  self->handler_->on_stream_close(id, code);
  return 0;
}

int H2Conn::frame_send_cb(nghttp2_session*, const nghttp2_frame* f, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  // nghttp2 ends the session itself on a connection error of the peer's
  // (malformed frame, bad preface...): remember why for the close reason.
  if (f->hd.type == NGHTTP2_GOAWAY && f->goaway.error_code != NGHTTP2_NO_ERROR && self->proto_error_.empty()) {
    std::string debug(reinterpret_cast<const char*>(f->goaway.opaque_data), f->goaway.opaque_data_len);
    self->proto_error_ = std::string("HTTP/2 protocol error: ") + nghttp2_http2_strerror(f->goaway.error_code);
    if (!debug.empty()) self->proto_error_ += ": " + debug;
  }
  return 0;
}

ssize_t H2Conn::read_length_cb(nghttp2_session*, uint8_t, int32_t, int32_t session_window, int32_t stream_window,
                               uint32_t remote_max_frame, void*) {
  // Bigger DATA frames than nghttp2's 16 KiB default: fewer frames, fewer
  // TLS records per byte.
  int64_t n = std::min<int64_t>({session_window, stream_window, remote_max_frame, 65536});
  return static_cast<ssize_t>(std::max<int64_t>(n, 1));
}

ssize_t H2Conn::data_read_cb(nghttp2_session*, int32_t id, uint8_t* buf, size_t length, uint32_t* flags,
                             nghttp2_data_source*, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  auto it = self->out_.find(id);
  if (it == self->out_.end()) {
    *flags |= NGHTTP2_DATA_FLAG_EOF;
    return 0;
  }
  Out& o = it->second;
  size_t avail = o.buf.size() - o.off;
  size_t n = std::min(length, avail);
  if (n == 0 && !o.eof) {
    o.deferred = true;
    return NGHTTP2_ERR_DEFERRED;
  }
  memcpy(buf, o.buf.data() + o.off, n);
  o.off += n;
  self->total_out_ -= n;
  if (o.off == o.buf.size()) {
    o.buf.clear();
    o.off = 0;
  } else if (o.off > (1u << 20)) {
    o.buf.erase(0, o.off);
    o.off = 0;
  }
  if (o.eof && o.off == o.buf.size()) *flags |= NGHTTP2_DATA_FLAG_EOF;
  return static_cast<ssize_t>(n);
}

nghttp2_data_provider H2Conn::provider() {
  nghttp2_data_provider p{};
  p.read_callback = data_read_cb;
  return p;
}

int32_t H2Conn::request(const Headers& h, bool has_body) {
  if (!h2_ || closed_) return -1;
  auto nv = to_nv(h);
  nghttp2_data_provider p = provider();
  int32_t id = nghttp2_submit_request(h2_, nullptr, nv.data(), nv.size(), has_body ? &p : nullptr, nullptr);
  if (id < 0) return -1;
  if (has_body) out_[id].has_provider = true;
  pump();
  return id;
}

bool H2Conn::respond(int32_t stream, const Headers& h, bool has_body) {
  if (!h2_ || closed_) return false;
  auto nv = to_nv(h);
  nghttp2_data_provider p = provider();
  if (has_body) out_[stream].has_provider = true;
  int rv = nghttp2_submit_response(h2_, stream, nv.data(), nv.size(), has_body ? &p : nullptr);
  if (rv != 0) {
    out_.erase(stream);
    return false;
  }
  pump();
  return true;
}

void H2Conn::respond_simple(int32_t stream, int status, const std::string& content_type, const std::string& body) {
  if (!respond(stream, {{":status", std::to_string(status)}, {"content-type", content_type}}, true)) return;
  send(stream, body.data(), body.size());
  end(stream);
}

size_t H2Conn::send(int32_t stream, const void* data, size_t len) {
  auto it = out_.find(stream);
  if (it == out_.end() || closed_) return 0;
  Out& o = it->second;
  o.buf.append(static_cast<const char*>(data), len);
  total_out_ += len;
  if (total_out_ > settings_.total_high_water) total_high_ = true;
  size_t left = o.buf.size() - o.off;
  if (left > settings_.out_low_water) o.below_low = false;
  if (o.deferred) {
    o.deferred = false;
    nghttp2_session_resume_data(h2_, stream);
  }
  pump();
  return left;
}

void H2Conn::end(int32_t stream) {
  auto it = out_.find(stream);
  if (it == out_.end() || closed_) return;
  it->second.eof = true;
  if (it->second.deferred) {
    it->second.deferred = false;
    nghttp2_session_resume_data(h2_, stream);
  }
  pump();
}

size_t H2Conn::outbound(int32_t stream) const {
  auto it = out_.find(stream);
  return it == out_.end() ? 0 : it->second.buf.size() - it->second.off;
}

bool H2Conn::is_open(int32_t stream) const {
  return h2_ && !closed_ && nghttp2_session_find_stream(h2_, stream) != nullptr;
}

void H2Conn::reset(int32_t stream, uint32_t code) {
  if (!h2_ || closed_) return;
  nghttp2_submit_rst_stream(h2_, NGHTTP2_FLAG_NONE, stream, code);
  pump();
}

void H2Conn::consume(int32_t stream, size_t len) {
  if (!h2_ || closed_ || len == 0) return;
  nghttp2_session_consume(h2_, stream, len);
  pump();
}

void H2Conn::shutdown() {
  if (!h2_ || closed_) {
    if (!closed_) close("connection shut down");
    return;
  }
  closing_ = true;
  nghttp2_session_terminate_session(h2_, NGHTTP2_NO_ERROR);
  pump();
}

}  // namespace shimlet::proto
