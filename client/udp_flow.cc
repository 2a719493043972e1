// UDP (client/forwarder.h): the datagrams of one local peer address are one
// flow, one HTTP/2 stream, framed as u16-big-endian length + payload.
#include <arpa/inet.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "client/forwarder.h"
#include "proto/frames.h"

namespace shimlet::client::pf {
namespace {

// One UDP flow: the datagrams of one local peer address, framed as
// u16-big-endian length + payload in both directions.
class UdpFlow : public StreamUser {
 public:
  UdpFlow(Forwarder& f, Listener& l, const sockaddr_storage& peer, socklen_t plen, std::string key)
      : f_(f), l_(l), peer_(peer), plen_(plen), key_(std::move(key)) {
    idle_ = new_timer(
        f_.base(), [](evutil_socket_t, short, void* self) { static_cast<UdpFlow*>(self)->expire(); }, this);
  }

  bool start() {
    if (f_.open_stream(this, proto::kPortForwardPrefix + std::to_string(l_.remote) + "/udp") < 0) return false;
    touch();
    return true;
  }

  void send_datagram(const char* data, size_t n) {
    if (ending_ || !f_.usable()) return;
    // UDP may drop: a flow whose queue is full loses datagrams, never memory.
    if (f_.conn().outbound(stream) > kUdpFlowHigh || f_.over_budget()) return;
    char h[2] = {static_cast<char>(n >> 8), static_cast<char>(n & 0xff)};
    std::string framed(h, 2);
    framed.append(data, n);
    f_.conn().send(stream, framed.data(), framed.size());
    touch();
  }

  void on_data(const uint8_t* data, size_t len) override {
    if (took_error_body(f_.conn(), data, len)) return;
    in_.append(reinterpret_cast<const char*>(data), len);
    size_t off = 0;
    while (in_.size() - off >= 2) {
      size_t n = static_cast<uint8_t>(in_[off]) << 8 | static_cast<uint8_t>(in_[off + 1]);
      if (in_.size() - off - 2 < n) break;
      // A full local socket buffer drops the datagram, as UDP would.
      (void)::sendto(l_.fd.get(), in_.data() + off + 2, n, MSG_DONTWAIT, reinterpret_cast<sockaddr*>(&peer_), plen_);
      off += 2 + n;
    }
    in_.erase(0, off);  // at most one partial frame (< 64 KiB + 2) stays
    f_.conn().consume(stream, len);
    touch();
  }

  void on_remote_end() override {
    if (status_ != 200) return fail(error_message(err_body_, status_));
    // The shim expired or closed its side: end ours; a new datagram opens a new flow.
    forget();
    if (!ending_) {
      ending_ = true;
      f_.conn().end(stream);
    }
  }

  void on_close(uint32_t code) override {
    if (dead_) return;
    if (status_ != 200) return fail(status_ ? error_message(err_body_, status_) : reset_reason(code));
    if (code != 0 && !ending_)
      say(2, "error: forwarding to port " + std::to_string(l_.remote) + "/udp for " + addr_string(peer_) + ": " +
                 reset_reason(code));
    dead_ = true;
    forget();
    f_.retire(this);
  }

  void abandon() override {
    dead_ = true;
    forget();
    f_.retire(this);
  }

  std::chrono::steady_clock::time_point last_active() const { return last_; }

  // Ends the flow (idle, or giving way to a new peer): a new datagram from
  // its peer opens a new flow.
  void expire() {
    forget();
    if (!ending_ && f_.usable()) {
      ending_ = true;
      f_.conn().end(stream);  // the stream closes when the shim ends its side too
    }
  }

 private:
  void touch() {
    last_ = std::chrono::steady_clock::now();
    timeval tv{kUdpIdleS, 0};
    evtimer_add(idle_.get(), &tv);
  }
  void forget() {
    auto& m = f_.udp_[&l_];
    if (auto it = m.find(key_); it != m.end() && it->second == this) m.erase(it);
  }
  void fail(const std::string& why) {
    if (dead_) return;
    dead_ = true;
    say(2, "error: forwarding to port " + std::to_string(l_.remote) + "/udp: " + why);
    forget();
    f_.retire(this);
  }

  Forwarder& f_;
  Listener& l_;
  sockaddr_storage peer_;
  socklen_t plen_;
  std::string key_, in_;
  EventPtr idle_;
  std::chrono::steady_clock::time_point last_;
  bool ending_ = false, dead_ = false;
};

}  // namespace

void Forwarder::udp_readable(Listener& l) {
  auto& flows = udp_[&l];
  for (int i = 0; i < 64; ++i) {
    sockaddr_storage peer{};
    socklen_t plen = sizeof peer;
    static char buf[65536];
    ssize_t n = recvfrom(l.fd.get(), buf, sizeof buf, MSG_TRUNC, reinterpret_cast<sockaddr*>(&peer), &plen);
    if (n < 0) return;                             // EAGAIN (or an ICMP error for an earlier reply: nothing to do)
    if (static_cast<size_t>(n) > 65535) continue;  // cannot be framed (u16 length); IPv4/6 UDP payloads fit
    if (!usable()) return;
    std::string key(reinterpret_cast<char*>(&peer), plen);
    UdpFlow* flow = nullptr;
    if (auto it = flows.find(key); it != flows.end()) {
      flow = static_cast<UdpFlow*>(it->second);
    } else {
      if (flows.size() >= kMaxUdpFlows) {
        // Bounded state per listener: the longest idle flow gives way (a
        // resolver takes a new source port per query; dropping new peers
        // would silence it until an old flow expires).
        auto oldest = std::min_element(flows.begin(), flows.end(), [](const auto& a, const auto& b) {
          return static_cast<UdpFlow*>(a.second)->last_active() < static_cast<UdpFlow*>(b.second)->last_active();
        });
        static_cast<UdpFlow*>(oldest->second)->expire();  // leaves flows
      }
      if (tunnel_count() >= kMaxTunnels) continue;  // ended flows not yet closed by the shim: drop
      flow = adopt(std::make_unique<UdpFlow>(*this, l, peer, plen, key));
      if (!flow->start()) {
        flow->abandon();
        continue;
      }
      flows[key] = flow;
    }
    flow->send_datagram(buf, static_cast<size_t>(n));
  }
}

}  // namespace shimlet::client::pf
