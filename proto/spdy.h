// SPDY/3.1 server-side framing for the Kubernetes streaming protocols
// (kubectl exec / port-forward via spdystream; docs/design.md "Kubernetes
// streaming"). Written here because no Debian library speaks SPDY any more
// (nghttp2 and OpenSSL dropped it) and the subset Kubernetes uses is small:
// SYN_STREAM / SYN_REPLY / DATA / RST_STREAM / PING / GOAWAY / SETTINGS /
// WINDOW_UPDATE / HEADERS. Header blocks are zlib streams (one per direction,
// SPDY/3 dictionary) handled with zlib itself.
//
// The connection is transport neutral: bytes in through feed(), bytes out
// through the Output callback (TLS socket or WebSocket binary messages).
//
// Flow control: spdystream (kubectl, kubelet, the apiserver) never sends
// WINDOW_UPDATE and ignores the windows, so enforcing the 64 KiB initial send
// window toward it would stall every stream. We therefore send without a
// window and never enforce ours on the peer; memory is bounded instead by the
// caller (stop reading the transport / the producer while output is queued).
// We still return window (WINDOW_UPDATE) for consumed bytes so a compliant
// peer never stalls either.
#pragma once
#include <zlib.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace shimlet::proto::spdy {

using Headers = std::vector<std::pair<std::string, std::string>>;
// First value of a header (names are lowercase on the wire), or nullptr.
const std::string* find(const Headers& h, const std::string& name);

// The SPDY/3 header compression dictionary (1423 bytes, adler32 0xE3C6A7C2).
const std::string& dictionary();

enum FrameType : uint16_t {
  kSynStream = 1,
  kSynReply = 2,
  kRstStream = 3,
  kSettings = 4,
  kPing = 6,
  kGoAway = 7,
  kHeaders = 8,
  kWindowUpdate = 9,
};
inline constexpr uint8_t kFlagFin = 0x01;
inline constexpr uint8_t kFlagUnidirectional = 0x02;
inline constexpr uint16_t kVersion = 3;
inline constexpr size_t kFrameHeader = 8;

enum RstStatus : uint32_t {
  kProtocolError = 1,
  kInvalidStream = 2,
  kRefusedStream = 3,
  kUnsupportedVersion = 4,
  kCancel = 5,
  kInternalError = 6,
  kFlowControlError = 7,
  kStreamInUse = 8,
  kStreamAlreadyClosed = 9,
  kFrameTooLarge = 11,
};
enum GoAwayStatus : uint32_t { kGoAwayOk = 0, kGoAwayProtocolError = 1, kGoAwayInternalError = 2 };

// Header block codec state: one deflate stream for everything we send, one
// inflate stream for everything we receive (SPDY/3 keeps both alive for the
// whole connection, so a failed block is fatal to the connection).
class HeaderDeflater {
 public:
  HeaderDeflater();
  ~HeaderDeflater();
  HeaderDeflater(const HeaderDeflater&) = delete;
  HeaderDeflater& operator=(const HeaderDeflater&) = delete;
  // Serializes (u32 count, u32 len + name, u32 len + value ...) and
  // compresses with Z_SYNC_FLUSH.
  std::string compress(const Headers& h);

 private:
  z_stream z_{};
};

class HeaderInflater {
 public:
  // max_out bounds the decompressed size of one block (zlib bombs).
  explicit HeaderInflater(size_t max_out, size_t max_headers);
  ~HeaderInflater();
  HeaderInflater(const HeaderInflater&) = delete;
  HeaderInflater& operator=(const HeaderInflater&) = delete;
  // Throws shimlet::Error with a clear reason. Multiple values joined by NUL
  // come back as separate pairs with the same name.
  Headers decompress(const uint8_t* data, size_t len);

 private:
  z_stream z_{};
  size_t max_out_, max_headers_;
};

// Serializes a header block without compression (tests, fuzz seeds).
std::string serialize_headers(const Headers& h);
// Parses an uncompressed header block; throws shimlet::Error.
Headers parse_headers(const uint8_t* data, size_t len, size_t max_headers);

struct Limits {
  size_t max_control_frame = 64u << 10;  // compressed SYN_STREAM etc.
  size_t max_data_frame = 1u << 20;      // spdystream writes ≤ 32 KiB chunks
  size_t max_header_block = 64u << 10;   // decompressed header block
  size_t max_headers = 100;              // name/value pairs per block
  size_t max_streams = 512;              // open streams; more get RST REFUSED_STREAM
  size_t send_chunk = 32u << 10;         // our DATA frames are at most this big
  uint32_t window_update_threshold = 32u << 10;
};

// Server side of one SPDY/3.1 connection.
class ServerConn {
 public:
  struct Handler {
    virtual ~Handler() = default;
    // A new client stream (odd id). fin: the client sent no body.
    virtual void on_syn_stream(uint32_t id, const Headers& h, bool fin) = 0;
    virtual void on_data(uint32_t id, const uint8_t* data, size_t len) = 0;
    // The client half-closed the stream (FIN on SYN_STREAM not included: see fin above).
    virtual void on_fin(uint32_t id) = 0;
    // The client reset the stream; it is gone.
    virtual void on_reset(uint32_t id, uint32_t status) = 0;
    // The client sent GOAWAY (it opens no more streams).
    virtual void on_goaway(uint32_t /*last_good*/, uint32_t /*status*/) {}
    // Fatal protocol error: GOAWAY PROTOCOL_ERROR was sent; close the transport.
    virtual void on_error(const std::string& why) = 0;
  };
  using Output = std::function<void(const uint8_t* data, size_t len)>;

  ServerConn(Handler& handler, Output out, Limits limits = {});
  ServerConn(const ServerConn&) = delete;
  ServerConn& operator=(const ServerConn&) = delete;

  // Parses bytes from the client. Returns false once the connection failed
  // (then everything is ignored). The handler must not destroy this object
  // from inside a callback.
  bool feed(const uint8_t* data, size_t len);

  // Replies to a client stream. fin: we send no body.
  void reply(uint32_t id, const Headers& h = {}, bool fin = false);
  // Sends body bytes (split into frames of ≤ send_chunk); fin ends our side.
  // Returns false when the stream is unknown or our side is already closed.
  bool data(uint32_t id, const void* data, size_t len, bool fin = false);
  bool fin(uint32_t id) { return data(id, nullptr, 0, true); }
  // Resets a stream (it is forgotten at once).
  void reset(uint32_t id, uint32_t status);
  void goaway(uint32_t status = kGoAwayOk);
  // The caller delivered len bytes of stream id onward: return window.
  void consumed(uint32_t id, size_t len);

  bool is_open(uint32_t id) const { return streams_.count(id) != 0; }
  bool local_closed(uint32_t id) const;
  size_t open_streams() const { return streams_.size(); }
  bool failed() const { return failed_; }
  bool peer_went_away() const { return peer_goaway_; }
  uint64_t bytes_in() const { return bytes_in_; }
  uint64_t bytes_out() const { return bytes_out_; }

 private:
  struct Stream {
    bool remote_fin = false, local_fin = false;
    uint32_t unacked = 0;  // consumed bytes not yet returned by WINDOW_UPDATE
  };
  void control_frame(uint16_t version, uint16_t type, uint8_t flags, const uint8_t* p, size_t len);
  void data_chunk(const uint8_t* p, size_t len);
  void data_end();
  void fail(const std::string& why);
  void emit(const std::string& frame);
  std::string control_header(uint16_t type, uint8_t flags, size_t len) const;
  void remote_finished(uint32_t id);
  void maybe_forget(uint32_t id);

  Handler& h_;
  Output out_;
  Limits lim_;
  HeaderDeflater deflater_;
  HeaderInflater inflater_;
  std::map<uint32_t, Stream> streams_;
  uint32_t last_client_id_ = 0;
  uint32_t session_unacked_ = 0;
  bool failed_ = false, peer_goaway_ = false, sent_goaway_ = false;
  uint64_t bytes_in_ = 0, bytes_out_ = 0;

  // Parser state: a frame header is collected in hdr_; control payloads are
  // collected whole (bounded by max_control_frame), data payloads are passed
  // on as they arrive.
  std::string hdr_;
  std::string ctrl_;
  bool in_payload_ = false, is_control_ = false;
  uint16_t c_version_ = 0, c_type_ = 0;
  uint8_t flags_ = 0;
  uint32_t data_id_ = 0;
  size_t remaining_ = 0;
  bool data_deliver_ = false;  // the current data frame's stream is open for the handler
};

}  // namespace shimlet::proto::spdy
