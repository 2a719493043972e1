#include "proto/frames.h"

#include <algorithm>

namespace shimlet::proto {

std::array<char, kFrameHeader> frame_header(FrameType t, size_t n) {
  return {static_cast<char>(t), static_cast<char>((n >> 16) & 0xff), static_cast<char>((n >> 8) & 0xff),
          static_cast<char>(n & 0xff)};
}

void append_frame(std::string& out, FrameType t, std::string_view payload) {
  auto h = frame_header(t, payload.size());
  out.append(h.data(), h.size());
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

size_t FrameDecoder::frame_size(std::string_view s) {
  if (s.size() < kFrameHeader) return kFrameHeader;
  auto b = [&](size_t i) { return static_cast<size_t>(static_cast<uint8_t>(s[i])); };
  uint8_t type = static_cast<uint8_t>(b(0));
  size_t len = b(1) << 16 | b(2) << 8 | b(3);
  if (type > static_cast<uint8_t>(FrameType::StdinEof)) {
    error_ = "unknown frame type " + std::to_string(type);
    return 0;
  }
  if (len > kMaxFramePayload) {
    error_ = "frame of " + std::to_string(len) + " bytes exceeds the limit of " + std::to_string(kMaxFramePayload);
    return 0;
  }
  return kFrameHeader + len;
}

std::optional<FrameDecoder::Frame> FrameDecoder::next() {
  if (!error_.empty()) return std::nullopt;
  std::string_view held(buf_.data() + pos_, buf_.size() - pos_);
  size_t need = frame_size(held);
  if (need == 0 || held.size() < need) return std::nullopt;
  Frame f{static_cast<FrameType>(held[0]), std::string(held.substr(kFrameHeader, need - kFrameHeader))};
  pos_ += need;
  // Compact lazily so the buffer stays bounded by one frame plus a read.
  if (pos_ > 65536 && pos_ * 2 > buf_.size()) {
    buf_.erase(0, pos_);
    pos_ = 0;
  }
  return f;
}

bool FrameDecoder::decode(std::string_view bytes, const FrameFn& on_frame) {
  if (!error_.empty()) return false;
  auto pieced = [&](std::string_view s) {
    auto t = static_cast<FrameType>(s[0]);
    return output_pieces_ && (t == FrameType::Stdout || t == FrameType::Stderr);
  };
  // The rest of a frame handed on in pieces.
  if (piece_left_ > 0) {
    std::string_view p = bytes.substr(0, piece_left_);
    bytes.remove_prefix(p.size());
    piece_left_ -= p.size();
    if (!p.empty() && !on_frame(piece_type_, p)) {
      piece_left_ = 0;
      return true;
    }
    if (piece_left_ > 0) return true;
  }
  // What is held (a partial frame), completed from the front of bytes.
  while (pos_ < buf_.size()) {
    size_t held = buf_.size() - pos_;
    size_t need = frame_size(std::string_view(buf_).substr(pos_));
    if (need == 0) return false;
    if (held < need && held >= kFrameHeader && pieced(std::string_view(buf_).substr(pos_))) {
      // Its header is whole: on in pieces from here (held is just the header).
      std::string_view f = std::string_view(buf_).substr(pos_);
      piece_type_ = static_cast<FrameType>(f[0]);
      piece_left_ = need - held;
      buf_.clear();
      pos_ = 0;
      if (held > kFrameHeader && !on_frame(piece_type_, f.substr(kFrameHeader))) {
        piece_left_ = 0;
        return true;
      }
      return decode(bytes, on_frame);
    }
    if (held < need) {
      size_t take = std::min(need - held, bytes.size());
      buf_.append(bytes.substr(0, take));
      bytes.remove_prefix(take);
      if (take == 0) return true;
      continue;  // the header may be whole now: its size again
    }
    std::string_view f = std::string_view(buf_).substr(pos_, need);
    pos_ += need;
    if (!on_frame(static_cast<FrameType>(f[0]), f.substr(kFrameHeader))) {
      buf_.clear();
      pos_ = 0;
      return true;
    }
  }
  buf_.clear();
  pos_ = 0;
  // Whole frames straight from bytes.
  while (!bytes.empty()) {
    size_t need = frame_size(bytes);
    if (need == 0) return false;
    if (bytes.size() < need && bytes.size() >= kFrameHeader && pieced(bytes)) {
      piece_type_ = static_cast<FrameType>(bytes[0]);
      piece_left_ = need - bytes.size();
      if (bytes.size() > kFrameHeader && !on_frame(piece_type_, bytes.substr(kFrameHeader))) piece_left_ = 0;
      return true;
    }
    if (bytes.size() < need) break;
    std::string_view f = bytes.substr(0, need);
    bytes.remove_prefix(need);
    if (!on_frame(static_cast<FrameType>(f[0]), f.substr(kFrameHeader))) return true;
  }
  buf_.assign(bytes);
  return true;
}

}  // namespace shimlet::proto
