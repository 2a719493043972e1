// One bounded HTTP/1.1 request reader (Node's http-parser, Debian
// libhttp-parser) for both front doors: the master's HTTPS API (whole
// requests with bodies, pipelined, until an upgrade) and the shim's
// Kubernetes front door (exactly one request head; what follows is an
// upgraded protocol). No sockets: callers feed bytes (fuzzed by
// tests/fuzz/http1_fuzz.cc).
#pragma once
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

struct http_parser;

namespace shimlet::proto::http1 {

struct Request {
  std::string method;
  std::string target;                                        // as sent: path[?query]
  std::string path;                                          // before '?'
  std::string query;                                         // after '?', raw
  std::vector<std::pair<std::string, std::string>> headers;  // in order, names lower-case
  std::string body;                                          // Mode::Messages only (de-chunked)
  bool upgrade = false;                                      // Upgrade with Connection: upgrade, or CONNECT
  bool keep_alive = false;  // another request may follow on the connection (never after an upgrade)

  // First value of a header (lower-case name), or nullopt.
  std::optional<std::string> header(std::string_view name) const;
  // Every value of a header, comma-separated lists split, blanks trimmed.
  std::vector<std::string> header_list(std::string_view name) const;
};

struct Limits {
  size_t max_head_bytes = 32 * 1024;         // request target + all header names and values (414 / 431)
  size_t max_headers = 100;                  // 431
  size_t max_header_line_bytes = 16 * 1024;  // one header's name + value (431)
  size_t max_body_bytes = 1024 * 1024;       // Mode::Messages; Content-Length or chunked (413)
};

enum class Mode {
  // Exactly one request head, then Done: the bytes after it are not HTTP (an
  // upgraded protocol) and stay with the caller; a body is not read.
  HeadOnly,
  // Complete requests (bodies included), pipelined, each handed to the
  // callback. After an upgrade request the reader is Done and the bytes
  // after its head stay with the caller.
  Messages,
};

class RequestReader {
 public:
  enum class State { Incomplete, Done, Error };
  using OnRequest = std::function<void(Request&&)>;

  // on_request: Mode::Messages only (required there).
  explicit RequestReader(Limits limits = {}, Mode mode = Mode::HeadOnly, OnRequest on_request = {});
  ~RequestReader();
  RequestReader(const RequestReader&) = delete;
  RequestReader& operator=(const RequestReader&) = delete;

  // Feeds bytes; consumed() says how many belonged to the request(s). Once
  // Done or Error, further input is refused (consumed() == 0); len 0 changes
  // nothing (it is not taken as end of stream).
  State feed(const char* data, size_t len);
  size_t consumed() const { return consumed_; }
  State state() const { return state_; }
  // Error: the status to answer (400, 413, 414, 431) and why.
  int error_status() const { return err_status_; }
  const std::string& error() const { return err_; }
  // A request has started but not completed (Mode::Messages: arm a deadline).
  bool in_request() const { return in_message_; }
  // Mode::HeadOnly once Done: the request head.
  const Request& request() const { return req_; }

  struct Cb;  // http_parser callbacks (http1.cc)

 private:
  std::unique_ptr<http_parser> parser_;
  Limits limits_;
  Mode mode_;
  OnRequest on_request_;
  Request req_;
  std::string field_, value_;
  bool last_was_value_ = false, in_message_ = false;
  size_t head_bytes_ = 0, consumed_ = 0;
  State state_ = State::Incomplete;
  int err_status_ = 0;
  std::string err_;
  void finish_header();
  int fail(int status, std::string why);
};

}  // namespace shimlet::proto::http1
