// proto/h2.h: file descriptors passed with a plaintext connection's first
// bytes (the local socket's exec with the client's own stdio).
#include "proto/h2.h"

#include <event2/event.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "common/fd.h"
#include "proto/frames.h"

namespace {

using shimlet::Fd;
using shimlet::proto::H2Conn;
using shimlet::proto::H2Settings;

struct Recorder : H2Conn::Handler {
  void on_headers(int32_t, const shimlet::proto::Headers&, bool) override {}
  void on_data(int32_t, const uint8_t*, size_t) override {}
  void on_remote_end(int32_t) override {}
  void on_stream_close(int32_t, uint32_t) override {}
  void on_closed(const std::string& why) override { closed = why; }
  std::string closed;
};

struct Loop {
  Loop() : base(event_base_new()) {}
  ~Loop() { event_base_free(base); }
  // Runs the loop until pred holds (bounded: a broken path fails, never hangs).
  template <class P>
  bool until(P pred) {
    for (int i = 0; i < 1000 && !pred(); i++) event_base_loop(base, EVLOOP_NONBLOCK | EVLOOP_ONCE);
    return pred();
  }
  event_base* base;
};

ino_t inode(int fd) {
  struct stat st {};
  EXPECT_EQ(fstat(fd, &st), 0);
  return st.st_ino;
}

int32_t request(H2Conn& c) {
  return c.request({{":method", "GET"}, {":scheme", "http"}, {":authority", "x"}, {":path", "/"}}, false);
}

std::pair<Fd, Fd> socket_pair() {
  int sp[2];
  EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp), 0);
  return {Fd(sp[0]), Fd(sp[1])};
}

TEST(H2PassedFds, ClientFdsReachTheServerInOrder) {
  Loop loop;
  auto [s, c] = socket_pair();
  shimlet::Pipe p1 = shimlet::make_pipe(), p2 = shimlet::make_pipe();
  Recorder hs, hc;
  H2Settings st;
  st.accept_fds = 3;
  H2Conn server(loop.base, s.release(), nullptr, H2Conn::Role::Server, &hs, st);
  H2Conn client(loop.base, c.release(), nullptr, H2Conn::Role::Client, &hc, {},
                H2Conn::Handover{{}, {}, {p1.write.get(), p2.write.get()}});
  std::vector<Fd> got;
  ASSERT_TRUE(loop.until([&] {
    for (Fd& f : server.take_passed_fds()) got.push_back(std::move(f));
    return got.size() == 2;
  }));
  EXPECT_EQ(inode(got[0].get()), inode(p1.write.get()));
  EXPECT_EQ(inode(got[1].get()), inode(p2.write.get()));
  EXPECT_EQ(fcntl(got[0].get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
  // The connection goes on as HTTP/2 after the fds' byte.
  int32_t id = request(client);
  EXPECT_GT(id, 0);
  EXPECT_TRUE(loop.until([&] { return server.is_open(id); }));
  EXPECT_EQ(hs.closed, "");
  EXPECT_TRUE(server.take_passed_fds().empty());  // taken once
}

TEST(H2PassedFds, MoreThanAcceptedClosesTheConnection) {
  Loop loop;
  auto [s, c] = socket_pair();
  shimlet::Pipe p = shimlet::make_pipe();
  Recorder hs;
  H2Settings st;
  st.accept_fds = 3;
  H2Conn server(loop.base, s.release(), nullptr, H2Conn::Role::Server, &hs, st);
  int four[] = {p.read.get(), p.write.get(), p.read.get(), p.write.get()};
  ASSERT_EQ(shimlet::send_fds_nothrow(c.get(), four, "P", 1), 0);
  ASSERT_TRUE(loop.until([&] { return !hs.closed.empty(); }));
  EXPECT_EQ(hs.closed, "connection error: more than 3 file descriptors passed");
  EXPECT_TRUE(server.take_passed_fds().empty());
}

TEST(H2PassedFds, NotTakenWithoutAcceptFds) {
  // The default (every TLS connection, and a plaintext one that did not ask):
  // the fds are dropped by the kernel, the bytes read as usual.
  Loop loop;
  auto [s, c] = socket_pair();
  shimlet::Pipe p = shimlet::make_pipe();
  Recorder hs, hc;
  H2Conn server(loop.base, s.release(), nullptr, H2Conn::Role::Server, &hs);
  H2Conn client(loop.base, c.release(), nullptr, H2Conn::Role::Client, &hc, {},
                H2Conn::Handover{{}, {}, {p.write.get()}});
  int32_t id = -1;  // the client's session exists once its loop ran
  ASSERT_TRUE(loop.until([&] { return (id = id > 0 ? id : request(client)) > 0; }));
  EXPECT_TRUE(loop.until([&] { return server.is_open(id); })) << hs.closed << " / " << hc.closed;
  EXPECT_TRUE(server.take_passed_fds().empty());
  EXPECT_EQ(hs.closed, "");
}

}  // namespace

// shimctl's decoder: output frames cut anywhere come on in pieces (never held
// whole), other frames whole; the bytes are exactly those sent.
TEST(FrameDecoderPieces, OutputInPiecesOtherFramesWhole) {
  using shimlet::proto::FrameType;
  std::string out(65536, '\0'), err = "oops", status = "{\"exit_code\":0}";
  for (size_t i = 0; i < out.size(); i++) out[i] = static_cast<char>(i * 7);
  std::string wire;
  shimlet::proto::append_frame(wire, FrameType::Stdout, out);
  shimlet::proto::append_frame(wire, FrameType::Stderr, err);
  shimlet::proto::append_frame(wire, FrameType::Stdout, "");
  shimlet::proto::append_frame(wire, FrameType::Status, status);
  for (size_t step : {1, 2, 3, 4, 5, 7, 4096, 65535, 65536, 65539, 65540, 65541, 1 << 20}) {
    shimlet::proto::FrameDecoder d;
    d.set_output_pieces(true);
    std::string got_out, got_err;
    std::vector<std::string> whole;
    for (size_t i = 0; i < wire.size(); i += step) {
      ASSERT_TRUE(d.decode(std::string_view(wire).substr(i, step), [&](FrameType t, std::string_view p) {
        if (t == FrameType::Stdout)
          got_out.append(p);
        else if (t == FrameType::Stderr)
          got_err.append(p);
        else
          whole.emplace_back(p);
        return true;
      }));
      EXPECT_LE(d.buffered(), status.size() + shimlet::proto::kFrameHeader) << step;
    }
    EXPECT_EQ(got_out, out) << step;
    EXPECT_EQ(got_err, err) << step;
    ASSERT_EQ(whole.size(), 1u) << step;
    EXPECT_EQ(whole[0], status) << step;
    EXPECT_EQ(d.buffered(), 0u) << step;
  }
}

// on_frame's false on a piece stops there, as on a whole frame: nothing more
// of that call is handed on (the stream is ending).
TEST(FrameDecoderPieces, FalseStops) {
  using shimlet::proto::FrameType;
  std::string wire;
  shimlet::proto::append_frame(wire, FrameType::Stdout, std::string(1000, 'a'));
  shimlet::proto::append_frame(wire, FrameType::Stdout, "b");
  for (size_t first : {size_t{2}, size_t{100}}) {
    shimlet::proto::FrameDecoder d;
    d.set_output_pieces(true);
    size_t calls = 0;
    auto stop = [&](FrameType, std::string_view) { return ++calls == 0; };
    ASSERT_TRUE(d.decode(std::string_view(wire).substr(0, first), stop));
    // The header came whole in the first call: its piece said stop there.
    if (first < shimlet::proto::kFrameHeader) {
      ASSERT_TRUE(d.decode(std::string_view(wire).substr(first), stop));
    }
    EXPECT_EQ(calls, 1u) << first;
    EXPECT_EQ(d.buffered(), 0u) << first;
  }
}
