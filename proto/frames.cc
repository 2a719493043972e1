#include "proto/frames.h"

namespace shimlet::proto {

void append_frame(std::string& out, FrameType t, std::string_view payload) {
  size_t n = payload.size();
  char h[kFrameHeader] = {static_cast<char>(t), static_cast<char>((n >> 16) & 0xff), static_cast<char>((n >> 8) & 0xff),
                          static_cast<char>(n & 0xff)};
  out.append(h, kFrameHeader);
  out.append(payload);
}

std::string resize_payload(uint16_t cols, uint16_t rows) {
  return std::string{static_cast<char>(cols >> 8), static_cast<char>(cols & 0xff), static_cast<char>(rows >> 8),
                     static_cast<char>(rows & 0xff)};
}

bool parse_resize(std::string_view p, uint16_t& cols, uint16_t& rows) {
  if (p.size() != 4) return false;
  auto u = [&](size_t i) { return static_cast<uint16_t>(static_cast<uint8_t>(p[i])); };
  cols = static_cast<uint16_t>(u(0) << 8 | u(1));
  rows = static_cast<uint16_t>(u(2) << 8 | u(3));
  return true;
}

void FrameDecoder::feed(std::string_view bytes) {
  if (!error_.empty()) return;
  if (pos_ > 0 && pos_ == buf_.size()) {
    buf_.clear();
    pos_ = 0;
  }
  buf_.append(bytes);
}

std::optional<FrameDecoder::Frame> FrameDecoder::next() {
  if (!error_.empty()) return std::nullopt;
  if (buf_.size() - pos_ < kFrameHeader) return std::nullopt;
  auto b = [&](size_t i) { return static_cast<size_t>(static_cast<uint8_t>(buf_[pos_ + i])); };
  uint8_t type = static_cast<uint8_t>(b(0));
  size_t len = b(1) << 16 | b(2) << 8 | b(3);
  if (type > static_cast<uint8_t>(FrameType::StdinEof)) {
    error_ = "unknown frame type " + std::to_string(type);
    return std::nullopt;
  }
  if (len > kMaxFramePayload) {
    error_ = "frame of " + std::to_string(len) + " bytes exceeds the limit of " + std::to_string(kMaxFramePayload);
    return std::nullopt;
  }
  if (buf_.size() - pos_ < kFrameHeader + len) return std::nullopt;
  Frame f{static_cast<FrameType>(type), buf_.substr(pos_ + kFrameHeader, len)};
  pos_ += kFrameHeader + len;
  // Compact lazily so the buffer stays bounded by one frame plus a read.
  if (pos_ > 65536 && pos_ * 2 > buf_.size()) {
    buf_.erase(0, pos_);
    pos_ = 0;
  }
  return f;
}

}  // namespace shimlet::proto
