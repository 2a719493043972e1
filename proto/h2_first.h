// The first request of an HTTP/2 connection, read before anyone trusts the
// peer (the shim's pre-authentication gate, docs/design.md "Pre-authentication
// gate"): the client preface, its SETTINGS and whatever else precedes the
// first complete request HEADERS block, parsed by nghttp2 (frames, HPACK,
// header validation) in a server session that sends nothing until asked.
// Sans-IO: the caller feeds plaintext and writes what refuse()/goaway()
// return. Fuzzed by tests/fuzz/h2_first_fuzz.cc.
//
// The bytes fed here are not consumed for good: once the request's ticket is
// accepted the session replays all of them into its own connection
// (H2Conn's preread), so the gate keeps no HTTP/2 state across the handoff.
#pragma once
#include <nghttp2/nghttp2.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "proto/h2.h"

namespace shimlet::proto {

class H2FirstRequest {
 public:
  enum class State {
    Incomplete,  // feed more
    Request,     // stream() / headers() hold the first request
    Error,       // error() says why; goaway() has the server's answer
  };
  // Plaintext the first request may take (preface, SETTINGS, the HEADERS and
  // CONTINUATION frames): a header list of settings.max_header_list plus
  // framing. More without a request is an Error.
  static constexpr size_t kMaxBytes = (128u << 10) + (16u << 10);

  // settings: what the server advertises (the session's H2Settings), sent
  // with any answer.
  explicit H2FirstRequest(const H2Settings& settings = {});
  ~H2FirstRequest();
  H2FirstRequest(const H2FirstRequest&) = delete;
  H2FirstRequest& operator=(const H2FirstRequest&) = delete;

  // The server connection preface (our SETTINGS frame), to send as soon as
  // the TLS handshake is done: a client may wait for it before its first
  // request (RFC 9113 3.4). The session's H2Conn, which submits the same
  // SETTINGS, is told these bytes left already (H2Conn's `sent`).
  std::string server_preface();
  // Feeds client bytes. Once Request or Error, further input is ignored.
  State feed(const uint8_t* data, size_t len);
  State state() const { return state_; }
  int32_t stream() const { return stream_; }
  const Headers& headers() const { return headers_; }
  // Why the connection is refused: "HTTP/2 protocol error: ..." as the
  // session's H2Conn words it.
  const std::string& error() const { return error_; }
  // State::Request: the server's SETTINGS, a complete response to the first
  // request (status, content-type, body, END_STREAM) and GOAWAY(NO_ERROR):
  // the bytes to write before closing.
  std::string refuse(int status, const std::string& content_type, const std::string& body);
  // State::Error: the server's SETTINGS and the GOAWAY nghttp2 prepared (with
  // its error code), or nothing for a bad client preface.
  std::string goaway();

 private:
  static int begin_headers_cb(nghttp2_session*, const nghttp2_frame*, void*);
  static int header_cb(nghttp2_session*, const nghttp2_frame*, const uint8_t*, size_t, const uint8_t*, size_t, uint8_t,
                       void*);
  static int frame_recv_cb(nghttp2_session*, const nghttp2_frame*, void*);
  static int stream_close_cb(nghttp2_session*, int32_t, uint32_t, void*);
  static int frame_send_cb(nghttp2_session*, const nghttp2_frame*, void*);
  std::string drain();  // everything nghttp2 has queued to send (frame_send_cb sees each frame)

  nghttp2_session* h2_ = nullptr;
  State state_ = State::Incomplete;
  size_t fed_ = 0;
  int32_t stream_ = 0;  // the stream whose headers are being collected, then the request's
  Headers headers_;
  size_t header_bytes_ = 0, max_header_list_ = 0;
  std::string error_;
  // What nghttp2 had to say so far (our SETTINGS first, acks), collected
  // after each feed (that is how a connection error's GOAWAY shows) and
  // returned ahead of the answer. At most about what was fed.
  std::string out_;
  std::string body_;  // refuse()'s body, read by the data provider
  size_t body_off_ = 0;
};

}  // namespace shimlet::proto
