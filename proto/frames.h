// The native exec stream framing carried in HTTP/2 DATA (docs/design.md,
// "Native protocol"): type:u8 | length:u24 BE | payload.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

namespace shimlet::proto {

enum class FrameType : uint8_t {
  Stdin = 0,
  Stdout = 1,
  Stderr = 2,
  Status = 3,
  Resize = 4,
  StdinEof = 5,
};
inline constexpr size_t kFrameHeader = 4;
inline constexpr size_t kMaxFramePayload = 65536;

// The header of a frame with len payload bytes (len <= kMaxFramePayload).
std::array<char, kFrameHeader> frame_header(FrameType t, size_t len);
// Appends one frame to out.
void append_frame(std::string& out, FrameType t, std::string_view payload);
std::string resize_payload(uint16_t cols, uint16_t rows);
bool parse_resize(std::string_view payload, uint16_t& cols, uint16_t& rows);

// Incremental decoder: feed bytes, pull whole frames. Errors (unknown type,
// oversized length) are sticky: error() returns the reason.
class FrameDecoder {
 public:
  struct Frame {
    FrameType type;
    std::string payload;
  };
  void feed(std::string_view bytes);
  std::optional<Frame> next();
  // The bulk path (exec output, stdin): hands every whole frame in what is
  // held plus bytes to on_frame in order, without copying the frames that
  // lie whole in bytes; only a partial frame at the end is kept (copied).
  // The payload is valid during the call only. on_frame returns false to
  // stop: the rest is dropped (the stream is ending). Returns false once
  // error() is set. Not to be mixed with feed()/next() on one decoder.
  using FrameFn = std::function<bool(FrameType, std::string_view)>;
  bool decode(std::string_view bytes, const FrameFn& on_frame);
  // decode() hands STDOUT and STDERR payloads on in pieces, as their bytes
  // come (one frame may take several calls, the last one ending it), so no
  // frame cut by the transport is copied to be made whole. For a reader
  // that writes output on (shimctl); other types still come whole.
  void set_output_pieces(bool on) { output_pieces_ = on; }
  const std::string& error() const { return error_; }
  size_t buffered() const { return buf_.size() - pos_; }

 private:
  // Bytes the frame at the front of s takes (kFrameHeader while its header
  // is incomplete); 0 with error_ set when the header is invalid.
  size_t frame_size(std::string_view s);

  std::string buf_;
  size_t pos_ = 0;
  std::string error_;
  bool output_pieces_ = false;
  FrameType piece_type_ = FrameType::Stdout;
  size_t piece_left_ = 0;  // payload bytes still to come of a frame handed on in pieces
};

// Header names and paths of the native protocol.
inline constexpr const char* kExecPath = "/v1/exec";
inline constexpr const char* kPortForwardPrefix = "/v1/portforward/";
// Port-forward session open: authenticates the connection (no port, no body).
inline constexpr const char* kPortForwardOpenPath = "/v1/portforward";
inline constexpr const char* kExecHeader = "shimlet-exec";
// Local socket only: the exec request's "stdio":"client" says the client
// passed its stdio fds (SCM_RIGHTS) with its first bytes; the 200 response
// carries kStdioHeader: client when the command got them (then only STATUS
// follows), else the stream carries stdio frames as usual.
inline constexpr const char* kStdioHeader = "shimlet-stdio";
inline constexpr const char* kStdioClient = "client";
inline constexpr const char* kAlpn = "h2";

}  // namespace shimlet::proto
