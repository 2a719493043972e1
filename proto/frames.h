// The native exec stream framing carried in HTTP/2 DATA (docs/design.md,
// "Native protocol"): type:u8 | length:u24 BE | payload.
#pragma once
#include <cstdint>
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
  const std::string& error() const { return error_; }
  size_t buffered() const { return buf_.size() - pos_; }

 private:
  std::string buf_;
  size_t pos_ = 0;
  std::string error_;
};

// Header names and paths of the native protocol.
inline constexpr const char* kExecPath = "/v1/exec";
inline constexpr const char* kPortForwardPrefix = "/v1/portforward/";
// Port-forward session open: authenticates the connection (no port, no body).
inline constexpr const char* kPortForwardOpenPath = "/v1/portforward";
inline constexpr const char* kExecHeader = "shimlet-exec";
inline constexpr const char* kAlpn = "h2";

}  // namespace shimlet::proto
