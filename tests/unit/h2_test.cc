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
