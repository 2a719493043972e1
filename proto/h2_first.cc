#include "proto/h2_first.h"

#include <string.h>

#include <algorithm>
#include <new>
#include <vector>

namespace shimlet::proto {

H2FirstRequest::H2FirstRequest(const H2Settings& settings) {
  nghttp2_session_callbacks* cbs;
  if (nghttp2_session_callbacks_new(&cbs) != 0) throw std::bad_alloc();
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, begin_headers_cb);
  nghttp2_session_callbacks_set_on_header_callback(cbs, header_cb);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, frame_recv_cb);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, stream_close_cb);
  nghttp2_session_callbacks_set_on_frame_send_callback(cbs, frame_send_cb);
  nghttp2_option* opt;
  if (nghttp2_option_new(&opt) != 0) {
    nghttp2_session_callbacks_del(cbs);
    throw std::bad_alloc();
  }
  // As the session's H2Conn: no automatic WINDOW_UPDATE, no closed-stream
  // bookkeeping. Nothing is sent unless refuse()/goaway() asks.
  nghttp2_option_set_no_auto_window_update(opt, 1);
  nghttp2_option_set_no_closed_streams(opt, 1);
  int rv = nghttp2_session_server_new2(&h2_, cbs, this, opt);
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cbs);
  if (rv != 0) throw std::bad_alloc();
  std::vector<nghttp2_settings_entry> iv = server_settings(settings);
  nghttp2_submit_settings(h2_, NGHTTP2_FLAG_NONE, iv.data(), iv.size());
  max_header_list_ = settings.max_header_list;
}

H2FirstRequest::~H2FirstRequest() { nghttp2_session_del(h2_); }

H2FirstRequest::State H2FirstRequest::feed(const uint8_t* data, size_t len) {
  if (state_ != State::Incomplete || len == 0) return state_;
  if ((fed_ += len) > kMaxBytes) {
    state_ = State::Error;
    error_ = "HTTP/2 protocol error: no request within the first " + std::to_string(kMaxBytes) + " bytes";
    nghttp2_session_terminate_session(h2_, NGHTTP2_ENHANCE_YOUR_CALM);
    return state_;
  }
  ssize_t n = nghttp2_session_mem_recv(h2_, data, len);
  if (n < 0 && state_ != State::Error) {
    state_ = State::Error;
    error_ = std::string("HTTP/2 protocol error: ") + nghttp2_strerror(static_cast<int>(n));
    return state_;  // a bad client preface: nghttp2 has nothing more to say (goaway() sends our SETTINGS)
  }
  // A connection error of the peer's shows as the GOAWAY nghttp2 queued:
  // frame_send_cb names it while this collects it.
  out_ += drain();
  if (state_ == State::Incomplete && !nghttp2_session_want_read(h2_)) {
    state_ = State::Error;
    if (error_.empty()) error_ = "peer ended the HTTP/2 session before its first request";
  }
  return state_;
}

std::string H2FirstRequest::refuse(int status, const std::string& content_type, const std::string& body) {
  if (state_ != State::Request) return goaway();
  std::string st = std::to_string(status);
  std::vector<nghttp2_nv> nv = {{reinterpret_cast<uint8_t*>(const_cast<char*>(":status")),
                                 reinterpret_cast<uint8_t*>(st.data()), 7, st.size(), NGHTTP2_NV_FLAG_NONE},
                                {reinterpret_cast<uint8_t*>(const_cast<char*>("content-type")),
                                 reinterpret_cast<uint8_t*>(const_cast<char*>(content_type.data())), 12,
                                 content_type.size(), NGHTTP2_NV_FLAG_NONE}};
  body_ = body;
  body_off_ = 0;
  nghttp2_data_provider p{};
  p.read_callback = [](nghttp2_session*, int32_t, uint8_t* buf, size_t length, uint32_t* flags, nghttp2_data_source*,
                       void* user) -> ssize_t {
    auto* self = static_cast<H2FirstRequest*>(user);
    size_t n = std::min(length, self->body_.size() - self->body_off_);
    memcpy(buf, self->body_.data() + self->body_off_, n);
    self->body_off_ += n;
    if (self->body_off_ == self->body_.size()) *flags |= NGHTTP2_DATA_FLAG_EOF;
    return static_cast<ssize_t>(n);
  };
  std::string out = std::move(out_);
  out_.clear();
  if (nghttp2_submit_response(h2_, stream_, nv.data(), nv.size(), &p) == 0) out += drain();
  // After the response: a GOAWAY that ends the connection cleanly (the
  // refused peer gets no second request on it).
  nghttp2_submit_goaway(h2_, NGHTTP2_FLAG_NONE, stream_, NGHTTP2_NO_ERROR, nullptr, 0);
  out += drain();
  state_ = State::Error;  // answered: nothing more
  return out;
}

std::string H2FirstRequest::server_preface() { return drain(); }

std::string H2FirstRequest::goaway() {
  std::string out = std::move(out_);
  out_.clear();
  // A bad client preface gets nothing but our SETTINGS (as H2Conn: nghttp2
  // sends no GOAWAY to a peer that never spoke HTTP/2).
  out += drain();
  return out;
}

std::string H2FirstRequest::drain() {
  std::string out;
  for (;;) {
    const uint8_t* data = nullptr;
    ssize_t n = nghttp2_session_mem_send(h2_, &data);
    if (n <= 0) break;
    out.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
    if (out.size() > (1u << 20)) break;  // never: our answers are a few frames
  }
  return out;
}

int H2FirstRequest::begin_headers_cb(nghttp2_session*, const nghttp2_frame* f, void* arg) {
  auto* self = static_cast<H2FirstRequest*>(arg);
  if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST || self->stream_ != 0) return 0;
  self->stream_ = f->hd.stream_id;
  return 0;
}

int H2FirstRequest::header_cb(nghttp2_session*, const nghttp2_frame* f, const uint8_t* name, size_t namelen,
                              const uint8_t* value, size_t valuelen, uint8_t, void* arg) {
  auto* self = static_cast<H2FirstRequest*>(arg);
  if (f->hd.type != NGHTTP2_HEADERS || f->hd.stream_id != self->stream_ || self->state_ != State::Incomplete) return 0;
  // Decoded size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 6.5.2):
  // HPACK references can make a small block decode into a large list.
  self->header_bytes_ += namelen + valuelen + 32;
  if (self->header_bytes_ > self->max_header_list_) {
    self->state_ = State::Error;
    self->error_ =
        "HTTP/2 protocol error: request header list larger than " + std::to_string(self->max_header_list_) + " bytes";
    nghttp2_session_terminate_session(self->h2_, NGHTTP2_ENHANCE_YOUR_CALM);
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  }
  self->headers_.emplace_back(std::string(reinterpret_cast<const char*>(name), namelen),
                              std::string(reinterpret_cast<const char*>(value), valuelen));
  return 0;
}

int H2FirstRequest::frame_recv_cb(nghttp2_session*, const nghttp2_frame* f, void* arg) {
  auto* self = static_cast<H2FirstRequest*>(arg);
  if (self->state_ == State::Incomplete && f->hd.type == NGHTTP2_HEADERS && f->hd.stream_id == self->stream_ &&
      f->headers.cat == NGHTTP2_HCAT_REQUEST && (f->hd.flags & NGHTTP2_FLAG_END_HEADERS))
    self->state_ = State::Request;
  return 0;
}

int H2FirstRequest::stream_close_cb(nghttp2_session*, int32_t stream, uint32_t code, void* arg) {
  auto* self = static_cast<H2FirstRequest*>(arg);
  if (self->state_ != State::Incomplete || stream != self->stream_) return 0;
  // Reset before its headers were complete (by the peer, or by nghttp2 for a
  // malformed header block): there is no request to answer.
  self->state_ = State::Error;
  self->error_ =
      std::string("HTTP/2 protocol error: the first request's stream was reset (") + nghttp2_http2_strerror(code) + ")";
  nghttp2_session_terminate_session(self->h2_, NGHTTP2_PROTOCOL_ERROR);
  return 0;
}

int H2FirstRequest::frame_send_cb(nghttp2_session*, const nghttp2_frame* f, void* arg) {
  auto* self = static_cast<H2FirstRequest*>(arg);
  // nghttp2 ends the session itself on a connection error of the peer's:
  // the GOAWAY it sends says why (worded as H2Conn words it).
  if (f->hd.type == NGHTTP2_GOAWAY && f->goaway.error_code != NGHTTP2_NO_ERROR && self->error_.empty()) {
    std::string debug(reinterpret_cast<const char*>(f->goaway.opaque_data), f->goaway.opaque_data_len);
    self->error_ = std::string("HTTP/2 protocol error: ") + nghttp2_http2_strerror(f->goaway.error_code);
    if (!debug.empty()) self->error_ += ": " + debug;
  }
  return 0;
}

}  // namespace shimlet::proto
