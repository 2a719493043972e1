#include "proto/http1.h"

#include <http_parser.h>

#include <cctype>

namespace shimlet::proto::http1 {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

}  // namespace

std::optional<std::string> Request::header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (k == name) return v;
  return std::nullopt;
}

std::vector<std::string> Request::header_list(std::string_view name) const {
  std::vector<std::string> out;
  for (const auto& [k, v] : headers) {
    if (k != name) continue;
    std::string_view rest = v;
    for (;;) {
      size_t comma = rest.find(',');
      std::string_view part = trim(rest.substr(0, comma));
      if (!part.empty()) out.emplace_back(part);
      if (comma == std::string_view::npos) break;
      rest.remove_prefix(comma + 1);
    }
  }
  return out;
}

struct RequestReader::Cb {
  static RequestReader* self(http_parser* p) { return static_cast<RequestReader*>(p->data); }
  static int on_message_begin(http_parser* p) {
    auto* s = self(p);
    s->req_ = Request{};
    s->field_.clear();
    s->value_.clear();
    s->last_was_value_ = false;
    s->in_message_ = true;
    s->head_bytes_ = 0;
    return 0;
  }
  static int on_url(http_parser* p, const char* at, size_t len) {
    auto* s = self(p);
    s->head_bytes_ += len;
    if (s->head_bytes_ > s->limits_.max_head_bytes) return s->fail(414, "request URI too long");
    s->req_.target.append(at, len);
    return 0;
  }
  static int on_header_field(http_parser* p, const char* at, size_t len) {
    auto* s = self(p);
    if (s->last_was_value_) s->finish_header();
    if (s->err_status_) return -1;
    s->last_was_value_ = false;
    s->head_bytes_ += len;
    if (s->head_bytes_ > s->limits_.max_head_bytes) return s->fail(431, "request headers too large");
    if (s->field_.size() + len > s->limits_.max_header_line_bytes) return s->fail(431, "request header line too long");
    s->field_.append(at, len);
    return 0;
  }
  static int on_header_value(http_parser* p, const char* at, size_t len) {
    auto* s = self(p);
    s->last_was_value_ = true;
    s->head_bytes_ += len;
    if (s->head_bytes_ > s->limits_.max_head_bytes) return s->fail(431, "request headers too large");
    if (s->field_.size() + s->value_.size() + len > s->limits_.max_header_line_bytes)
      return s->fail(431, "request header line too long");
    s->value_.append(at, len);
    return 0;
  }
  static int on_headers_complete(http_parser* p) {
    auto* s = self(p);
    if (!s->field_.empty() || s->last_was_value_) s->finish_header();
    if (s->err_status_) return -1;
    Request& r = s->req_;
    r.method = http_method_str(static_cast<http_method>(p->method));
    size_t q = r.target.find('?');
    r.path = r.target.substr(0, q);
    if (q != std::string::npos) r.query = r.target.substr(q + 1);
    r.upgrade = p->upgrade;
    r.keep_alive = http_should_keep_alive(p) && !p->upgrade;
    if (s->mode_ == Mode::HeadOnly) {
      // Only this head: stop here; whatever follows belongs to the upgraded
      // protocol (or is ignored).
      s->state_ = State::Done;
      s->in_message_ = false;
      http_parser_pause(p, 1);
      return 0;
    }
    if ((p->flags & F_CONTENTLENGTH) && p->content_length > s->limits_.max_body_bytes)
      return s->fail(413, "request body too large");
    return 0;
  }
  static int on_body(http_parser* p, const char* at, size_t len) {
    auto* s = self(p);
    if (s->req_.body.size() + len > s->limits_.max_body_bytes) return s->fail(413, "request body too large");
    s->req_.body.append(at, len);
    return 0;
  }
  static int on_message_complete(http_parser* p) {
    auto* s = self(p);
    s->in_message_ = false;
    Request r = std::move(s->req_);
    s->req_ = Request{};
    r.keep_alive = http_should_keep_alive(p) && !p->upgrade;
    if (s->on_request_) s->on_request_(std::move(r));
    return 0;
  }
};

namespace {
const http_parser_settings kSettings = [] {
  http_parser_settings st{};
  http_parser_settings_init(&st);
  st.on_message_begin = RequestReader::Cb::on_message_begin;
  st.on_url = RequestReader::Cb::on_url;
  st.on_header_field = RequestReader::Cb::on_header_field;
  st.on_header_value = RequestReader::Cb::on_header_value;
  st.on_headers_complete = RequestReader::Cb::on_headers_complete;
  st.on_body = RequestReader::Cb::on_body;
  st.on_message_complete = RequestReader::Cb::on_message_complete;
  return st;
}();
}  // namespace

RequestReader::RequestReader(Limits limits, Mode mode, OnRequest on_request)
    : parser_(std::make_unique<http_parser>()), limits_(limits), mode_(mode), on_request_(std::move(on_request)) {
  http_parser_init(parser_.get(), HTTP_REQUEST);
  parser_->data = this;
}
RequestReader::~RequestReader() = default;

void RequestReader::finish_header() {
  if (req_.headers.size() >= limits_.max_headers) {
    fail(431, "too many request headers");
    return;
  }
  std::string name = std::move(field_);
  for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  req_.headers.emplace_back(std::move(name), std::move(value_));
  field_.clear();
  value_.clear();
  last_was_value_ = false;
}

int RequestReader::fail(int status, std::string why) {
  if (!err_status_) {
    err_status_ = status;
    err_ = std::move(why);
  }
  return -1;
}

RequestReader::State RequestReader::feed(const char* data, size_t len) {
  consumed_ = 0;
  // No bytes is no news: http_parser would take len 0 as end of stream (and
  // then report 1 byte consumed).
  if (state_ != State::Incomplete || len == 0) return state_;
  consumed_ = http_parser_execute(parser_.get(), &kSettings, data, len);
  auto e = static_cast<http_errno>(HTTP_PARSER_ERRNO(parser_.get()));
  if (state_ == State::Done) {  // HeadOnly: paused at the end of the head (HPE_PAUSED)
    // http_parser pauses on the head's final '\r' + '\n' before counting the
    // '\n': it belongs to the head, not to the upgraded protocol.
    if (consumed_ < len && data[consumed_] == '\n') consumed_++;
    return state_;
  }
  if (e != HPE_OK) {
    if (!err_status_) {
      err_status_ = 400;
      err_ = std::string("malformed HTTP/1.1 request: ") + http_errno_description(e);
    }
    state_ = State::Error;
    return state_;
  }
  // http_parser stops right after an upgrade request (its flag is set from
  // the head on): the rest of the input is another protocol's.
  if (parser_->upgrade) state_ = State::Done;
  return state_;
}

}  // namespace shimlet::proto::http1
