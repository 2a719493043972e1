// One HTTP/2 connection over TLS 1.3 (or, on the shim's root-only local
// socket, without TLS), driven by a libevent loop: nghttp2 for
// framing, OpenSSL on the socket for TLS (its own reads and writes, not a
// bufferevent_openssl: see h2.cc). Used by the session (server side) and
// shimctl (client side). Stream bodies are buffered per stream with explicit
// backpressure so memory stays bounded with a slow peer or reader.
#pragma once
#include <event2/event.h>
#include <nghttp2/nghttp2.h>
#include <openssl/ssl.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/event.h"
#include "common/fd.h"

namespace shimlet::proto {

using Headers = std::vector<std::pair<std::string, std::string>>;
const std::string* find_header(const Headers& h, const std::string& name);

struct H2Settings {
  uint32_t stream_window = 4u << 20;       // what we let the peer send per stream
  uint32_t connection_window = 16u << 20;  // ... and on the whole connection
  uint32_t max_frame_size = 1u << 16;      // largest DATA frame we accept
  // Request streams served at once (server). More are refused with
  // RST_STREAM REFUSED_STREAM and the connection goes on. Not advertised in
  // SETTINGS: nghttp2 turns a peer exceeding an advertised (acknowledged)
  // limit into a connection error that kills every stream. Client: how many
  // streams we open at once before queueing.
  uint32_t max_concurrent_streams = 1024;
  uint32_t max_header_list = 128u << 10;
  size_t out_high_water = 1u << 20;   // per-stream outbound buffer limit (handler stops producing)
  size_t out_low_water = 256u << 10;  // on_drain fires below this
  // Whole-connection outbound limit handlers should respect (total_outbound()):
  // once it was exceeded, on_drain(0) fires when the total falls below half.
  // (Per-stream drains alone can miss it: many streams each below
  // out_low_water can together exceed this and never see a per-stream drain.)
  size_t total_high_water = 32u << 20;
  int handshake_timeout_s = 10;
  int ping_interval_s = 0;  // keepalive PINGs when > 0; no ACK by the next tick closes the connection
  // Plaintext (the root-only unix socket) server: keep up to this many file
  // descriptors the peer passes (SCM_RIGHTS) with the connection's first
  // bytes, for take_passed_fds(). 0: none are taken (the kernel closes any
  // sent). More than this many closes the connection.
  size_t accept_fds = 0;
};

// The SETTINGS a server sends first (H2Conn's and H2FirstRequest's: byte
// for byte the same frame, see H2Conn's `sent`).
std::vector<nghttp2_settings_entry> server_settings(const H2Settings& s);

class H2Conn {
 public:
  struct Handler {
    virtual ~Handler() = default;
    // Server: a request's headers are complete. Client: response headers.
    virtual void on_headers(int32_t stream, const Headers& h, bool end_stream) = 0;
    // Body bytes; call consume(stream, len) once they are delivered onward.
    virtual void on_data(int32_t stream, const uint8_t* data, size_t len) = 0;
    // The peer ended its side of the stream (END_STREAM).
    virtual void on_remote_end(int32_t stream) = 0;
    // The stream is fully closed (both ends, or reset). error_code 0 = clean.
    virtual void on_stream_close(int32_t stream, uint32_t error_code) = 0;
    // Our outbound buffer for stream fell below the low-water mark; stream 0:
    // the connection's total fell below total_high_water / 2.
    virtual void on_drain(int32_t /*stream*/) {}
    // Server: a new request stream was refused (RST_STREAM REFUSED_STREAM)
    // because max_concurrent_streams were open. The stream never reaches
    // on_headers. Called from inside nghttp2: only note it.
    virtual void on_stream_refused(int32_t /*stream*/) {}
    // TLS handshake done (check the peer certificate here): nullopt goes on,
    // an error line aborts the connection. ssl is null on a plaintext connection.
    virtual std::optional<std::string> on_connected(SSL* /*ssl*/) { return std::nullopt; }
    // The connection is gone (EOF, error, or GOAWAY after all streams closed).
    virtual void on_closed(const std::string& why) = 0;
  };

  enum class Role { Server, Client };
  // Takes ownership of fd and ssl. Starts the TLS handshake. A null ssl is
  // HTTP/2 with prior knowledge on a plaintext socket: only for a root-only
  // unix socket on the node (docs/design.md "Local socket"), never for TCP.
  // A connection the pre-authentication gate read from first
  // (proto/h2_first.h): preread, the plaintext it read off the connection,
  // is handled before anything read from the socket; sent, what it wrote
  // (the server connection preface), is not written again.
  // pass_fds (plaintext client only): sent with SCM_RIGHTS attached to the
  // first byte written (a one-byte sendmsg, so it is never split); they stay
  // the caller's.
  struct Handover {
    std::string preread, sent;
    std::vector<int> pass_fds;
  };
  H2Conn(event_base* base, int fd, SSL* ssl, Role role, Handler* handler, H2Settings settings = {},
         Handover handover = {});
  ~H2Conn();
  H2Conn(const H2Conn&) = delete;
  H2Conn& operator=(const H2Conn&) = delete;

  // Client: submits a request; returns the stream id (or -1). If has_body,
  // the body comes from send()/end().
  int32_t request(const Headers& h, bool has_body);
  // Server: submits response headers. The body comes from send()/end().
  bool respond(int32_t stream, const Headers& h, bool has_body = true);
  // Convenience: a complete response with a small body.
  void respond_simple(int32_t stream, int status, const std::string& content_type, const std::string& body);
  // Queues body bytes / end of body. Returns the stream's outbound buffer size.
  size_t send(int32_t stream, const void* data, size_t len);
  void end(int32_t stream);
  size_t outbound(int32_t stream) const;
  // Whether the stream exists and is not closed yet.
  bool is_open(int32_t stream) const;
  // Sum of every stream's outbound buffer (a per-connection memory bound).
  size_t total_outbound() const { return total_out_; }
  void reset(int32_t stream, uint32_t error_code);
  // Returns len bytes of the peer's flow-control window for the stream.
  void consume(int32_t stream, size_t len);
  // GOAWAY and close once everything queued is written.
  void shutdown();
  // Pushes pending frames to the socket (call after changing state outside a callback).
  void flush();
  bool closed() const { return closed_; }
  SSL* ssl() const { return ssl_; }
  const H2Settings& settings() const { return settings_; }
  uint64_t bytes_in() const { return bytes_in_; }
  uint64_t bytes_out() const { return bytes_out_; }
  // Server: the fds the peer passed with its first bytes (settings'
  // accept_fds), in the order sent; empty after the first call.
  std::vector<Fd> take_passed_fds() { return std::move(passed_fds_); }

 private:
  struct Out {
    std::string buf;
    size_t off = 0;
    bool eof = false;
    bool deferred = false;
    bool has_provider = false;
    bool below_low = true;
  };
  static void on_io(evutil_socket_t, short, void*);
  static void on_kick(evutil_socket_t, short, void*);
  static void on_pump(evutil_socket_t, short, void*);
  static void on_handshake_timeout(evutil_socket_t, short, void*);
  static void on_ping_timer(evutil_socket_t, short, void*);
  static int frame_recv_cb(nghttp2_session*, const nghttp2_frame*, void*);
  static int header_cb(nghttp2_session*, const nghttp2_frame*, const uint8_t*, size_t, const uint8_t*, size_t, uint8_t,
                       void*);
  static int begin_headers_cb(nghttp2_session*, const nghttp2_frame*, void*);
  static int data_chunk_cb(nghttp2_session*, uint8_t, int32_t, const uint8_t*, size_t, void*);
  static int stream_close_cb(nghttp2_session*, int32_t, uint32_t, void*);
  static int frame_send_cb(nghttp2_session*, const nghttp2_frame*, void*);
  static ssize_t read_length_cb(nghttp2_session*, uint8_t, int32_t, int32_t, int32_t, uint32_t, void*);
  static ssize_t data_read_cb(nghttp2_session*, int32_t, uint8_t*, size_t, uint32_t*, nghttp2_data_source*, void*);
  static int send_data_cb(nghttp2_session*, nghttp2_frame*, const uint8_t*, size_t, nghttp2_data_source*, void*);
  void close(const std::string& why);
  void setup_tls();
  void handshake();
  void connected();
  void read_tls();
  int refill_tls(std::string& why);
  void feed(const uint8_t* data, size_t len);
  void write_tls();
  void send_frame(const uint8_t* framehd, const char* data, size_t len);
  void flush_tls();
  bool output_empty() const;
  static std::string tls_failure(int err);
  void pump();
  void pump_later();
  nghttp2_data_provider provider();

  event_base* base_;
  int fd_;
  SSL* ssl_;
  // All made by the constructor (event_new may fail: it throws there, never
  // in a callback), freed by the destructor before the socket is closed.
  EventPtr rev_;       // readable (persistent)
  EventPtr wev_;       // writable: added while SSL_write or the handshake waits for room
  EventPtr kick_;      // runs the first step from the loop, and reads on when a turn stopped early
  EventPtr hs_timer_;  // the handshake's deadline (deleted once connected)
  EventPtr pump_ev_;   // a pump once the current callback is done (pump_later)
  EventPtr ping_;      // keepalive PING (settings_.ping_interval_s > 0)
  std::string wbuf_;   // encoded frames not yet taken by SSL_write, from woff_
  size_t woff_ = 0;
  size_t retry_len_ = 0;  // length of an SSL_write to repeat (OpenSSL wants the same length again)
  bool read_wants_write_ = false, write_wants_read_ = false;
  bool data_blocked_ = false;        // send_data_cb held a DATA frame back (output at its high-water mark)
  bool flush_pending_ = false;       // the write buffer waits for room in the socket
  std::unique_ptr<uint8_t[]> rbuf_;  // kReadBatch, made on the first read
  // TLS once connected: raw socket bytes, read by us in large reads and lent
  // to OpenSSL through a read-only memory BIO (see refill_tls).
  std::unique_ptr<uint8_t[]> raw_;
  nghttp2_session* h2_ = nullptr;
  Role role_;
  Handler* handler_;
  H2Settings settings_;
  std::map<int32_t, Out> out_;
  std::map<int32_t, Headers> in_headers_;
  bool connected_ = false, closed_ = false, closing_ = false, in_pump_ = false;
  bool total_high_ = false, ping_outstanding_ = false;
  uint64_t bytes_in_ = 0, bytes_out_ = 0;
  size_t total_out_ = 0;
  size_t open_in_ = 0;       // server: request streams counted against max_concurrent_streams
  std::string proto_error_;  // why nghttp2 ended the session (the GOAWAY it sent), for close()
  Handover handover_;        // preread fed once the session exists (connected()); sent skipped in pump()
  bool first_read_ = true;   // plaintext: reads look for passed fds until the first byte came
  std::vector<Fd> passed_fds_;
};

}  // namespace shimlet::proto
