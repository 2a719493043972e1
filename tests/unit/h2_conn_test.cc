// proto::H2Conn (proto/h2.h) without TLS over a socketpair: a client and a
// server connection in one libevent loop. Request and response bodies, the
// stream limit (REFUSED_STREAM, the connection goes on), a vanished peer,
// bytes that are not HTTP/2, a missing PING answer, and the outbound
// high-water mark with its drain, and fds passed with the first byte when a
// read is interrupted (EINTR injected into recvmsg: this binary is linked
// with -Wl,--wrap=recvmsg, tests/unit/CMakeLists.txt).
#include <errno.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <string>

#include "h2_loop.h"
#include "proto/h2.h"

using shimlet::EventBasePtr;
using shimlet::Fd;
using shimlet::new_event_base;
using shimlet::proto::H2Conn;
using shimlet::proto::H2Settings;
using shimlet::proto::Headers;
using shimlet::test::Recorder;
using shimlet::test::run_until;
using shimlet::test::stream_pair;

// recvmsg with failures injected: the next g_recvmsg_eintr calls fail with EINTR.
std::atomic<int> g_recvmsg_eintr{0};
extern "C" ssize_t __real_recvmsg(int fd, msghdr* msg, int flags);
extern "C" ssize_t __wrap_recvmsg(int fd, msghdr* msg, int flags) {
  if (g_recvmsg_eintr > 0) {
    g_recvmsg_eintr--;
    errno = EINTR;
    return -1;
  }
  return __real_recvmsg(fd, msg, flags);
}

namespace {

Headers post(const std::string& path) {
  return {{":method", "POST"}, {":scheme", "http"}, {":authority", "shim"}, {":path", path}};
}

struct Pair {
  EventBasePtr base = new_event_base();
  Recorder server_h, client_h;
  std::unique_ptr<H2Conn> server, client;

  // client_handler: another client handler than client_h.
  explicit Pair(H2Settings server_settings = {}, H2Settings client_settings = {}, Recorder* client_handler = nullptr) {
    Recorder* ch = client_handler ? client_handler : &client_h;
    auto [s, c] = stream_pair();
    server =
        std::make_unique<H2Conn>(base.get(), s.release(), nullptr, H2Conn::Role::Server, &server_h, server_settings);
    client = std::make_unique<H2Conn>(base.get(), c.release(), nullptr, H2Conn::Role::Client, ch, client_settings);
    server_h.conn = server.get();
    ch->conn = client.get();
    EXPECT_TRUE(run_until(base.get(), [&] { return server_h.connected && ch->connected; }));
  }
  bool run(const std::function<bool()>& done) { return run_until(base.get(), done); }
};

TEST(H2Conn, RequestAndResponseBodiesBothWays) {
  Pair p;
  int32_t id = p.client->request(post("/echo"), true);
  ASSERT_GT(id, 0);
  p.client->send(id, "hello ", 6);
  p.client->send(id, "server", 6);
  p.client->end(id);
  p.client->flush();
  ASSERT_TRUE(p.run([&] { return p.server_h.streams[id].remote_end; }));
  EXPECT_EQ(p.server_h.streams[id].header(":path"), "/echo");
  EXPECT_EQ(p.server_h.streams[id].body, "hello server");

  std::string big(300 * 1024, 'x');  // several DATA frames, more than the low-water mark
  ASSERT_TRUE(p.server->respond(id, {{":status", "200"}, {"content-type", "text/plain"}}));
  p.server->send(id, big.data(), big.size());
  p.server->end(id);
  p.server->flush();
  ASSERT_TRUE(p.run([&] { return p.client_h.streams[id].closed.has_value(); }));
  EXPECT_EQ(p.client_h.streams[id].header(":status"), "200");
  EXPECT_EQ(p.client_h.streams[id].body, big);
  EXPECT_TRUE(p.client_h.streams[id].remote_end);
  EXPECT_EQ(*p.client_h.streams[id].closed, 0u);
  EXPECT_GT(p.client->bytes_in(), big.size());
  EXPECT_FALSE(p.server_h.closed);
  EXPECT_FALSE(p.client_h.closed);
}

TEST(H2Conn, RespondSimpleCarriesStatusTypeAndBody) {
  Pair p;
  p.server_h.on_request = [&](int32_t s, const Headers&) {
    p.server->respond_simple(s, 404, "application/json", "{\"error\":\"no\"}\n");
  };
  int32_t id = p.client->request(post("/nothing"), false);
  p.client->flush();
  ASSERT_TRUE(p.run([&] { return p.client_h.streams[id].closed.has_value(); }));
  EXPECT_EQ(p.client_h.streams[id].header(":status"), "404");
  EXPECT_EQ(p.client_h.streams[id].header("content-type"), "application/json");
  EXPECT_EQ(p.client_h.streams[id].body, "{\"error\":\"no\"}\n");
}

TEST(H2Conn, StreamsOverTheLimitAreRefusedAndTheConnectionGoesOn) {
  H2Settings server;
  server.max_concurrent_streams = 1;
  Pair p(server);
  int32_t first = p.client->request(post("/a"), true);  // stays open: its body never ends
  p.client->flush();
  ASSERT_TRUE(p.run([&] { return p.server_h.streams.count(first) == 1; }));
  int32_t second = p.client->request(post("/b"), true);
  p.client->flush();
  ASSERT_TRUE(p.run([&] { return p.client_h.streams[second].closed.has_value(); }));
  EXPECT_EQ(*p.client_h.streams[second].closed, static_cast<uint32_t>(NGHTTP2_REFUSED_STREAM));
  EXPECT_EQ(p.server_h.refused, 1);
  EXPECT_TRUE(p.server_h.streams[second].headers.empty()) << "a refused stream never reaches on_headers";

  // The first stream still works.
  p.client->send(first, "ok", 2);
  p.client->end(first);
  p.client->flush();
  ASSERT_TRUE(p.run([&] { return p.server_h.streams[first].remote_end; }));
  EXPECT_EQ(p.server_h.streams[first].body, "ok");
  EXPECT_FALSE(p.server_h.closed);
}

TEST(H2Conn, PeerGoneClosesTheConnection) {
  Pair p;
  int32_t id = p.client->request(post("/a"), true);
  p.client->flush();
  ASSERT_TRUE(p.run([&] { return p.server_h.streams.count(id) == 1; }));
  p.client.reset();  // closes its socket without GOAWAY
  ASSERT_TRUE(p.run([&] { return p.server_h.closed.has_value(); }));
}

TEST(H2Conn, BytesThatAreNotHttp2CloseTheServerConnection) {
  EventBasePtr base = new_event_base();
  auto [s, c] = stream_pair();
  Recorder h;
  H2Conn server(base.get(), s.release(), nullptr, H2Conn::Role::Server, &h);
  h.conn = &server;
  std::string req = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(::write(c.get(), req.data(), req.size()), static_cast<ssize_t>(req.size()));
  ASSERT_TRUE(run_until(base.get(), [&] { return h.closed.has_value(); }));
  EXPECT_TRUE(h.streams.empty());
}

TEST(H2Conn, UnansweredPingClosesTheConnection) {
  EventBasePtr base = new_event_base();
  auto [s, c] = stream_pair();
  Recorder h;
  H2Settings st;
  st.ping_interval_s = 1;
  H2Conn server(base.get(), s.release(), nullptr, H2Conn::Role::Server, &h, st);
  h.conn = &server;
  // A peer that sent the preface and then went silent (never reads, never answers).
  std::string preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
  preface += std::string("\x00\x00\x00\x04\x00\x00\x00\x00\x00", 9);  // empty SETTINGS
  ASSERT_EQ(::write(c.get(), preface.data(), preface.size()), static_cast<ssize_t>(preface.size()));
  ASSERT_TRUE(run_until(
      base.get(), [&] { return h.closed.has_value(); }, 5000));
  EXPECT_NE(h.closed->find("PING"), std::string::npos) << *h.closed;
}

// A client that returns its window only when told to.
struct SlowReader : Recorder {
  bool consume = false;
  size_t pending = 0;
  void on_data(int32_t s, const uint8_t* d, size_t n) override {
    streams[s].body.append(reinterpret_cast<const char*>(d), n);
    if (consume)
      conn->consume(s, n);
    else
      pending += n;
  }
};

TEST(H2Conn, OutboundHighWaterThenDrainWhenThePeerReads) {
  H2Settings server;
  server.out_high_water = 64 * 1024;
  server.out_low_water = 16 * 1024;
  H2Settings client;
  client.stream_window = 32 * 1024;  // the peer lets little through until it consumes
  client.connection_window = 1u << 20;
  SlowReader slow;
  Pair p(server, client, &slow);

  int32_t id = p.client->request(post("/big"), false);
  p.client->flush();
  ASSERT_TRUE(p.run([&] { return p.server_h.streams[id].remote_end; }));
  ASSERT_TRUE(p.server->respond(id, {{":status", "200"}}));
  std::string chunk(16 * 1024, 'y');
  size_t queued = 0;
  for (int i = 0; i < 8; i++) queued = p.server->send(id, chunk.data(), chunk.size());
  EXPECT_GE(queued, server.out_high_water) << "the caller sees it is over the high-water mark";
  p.server->flush();
  ASSERT_TRUE(p.run([&] { return slow.streams[id].body.size() >= client.stream_window; }));
  EXPECT_EQ(slow.streams[id].body.size(), client.stream_window) << "no byte beyond the peer's window";
  EXPECT_GT(p.server->outbound(id), server.out_low_water);
  EXPECT_EQ(p.server_h.drains[id], 0);

  // The peer reads on: the server's buffer empties and on_drain fires.
  slow.consume = true;
  p.client->consume(id, slow.pending);
  p.client->flush();
  ASSERT_TRUE(p.run([&] { return slow.streams[id].body.size() == chunk.size() * 8; }));
  EXPECT_EQ(slow.streams[id].body, std::string(chunk.size() * 8, 'y'));
  EXPECT_GE(p.server_h.drains[id], 1);
}

TEST(H2Conn, PassedFdsSurviveAnInterruptedFirstRead) {
  // The peer's fds ride on its first byte; a read interrupted before that
  // byte came must not make the next read drop them (the local exec would
  // then fall back to copying its stdio).
  EventBasePtr base = new_event_base();
  auto [s, c] = stream_pair();
  shimlet::Pipe p = shimlet::make_pipe();
  int one[] = {p.write.get()};
  ASSERT_EQ(shimlet::send_fds_nothrow(c.get(), one, "P", 1), 0);
  Recorder h;
  H2Settings st;
  st.accept_fds = 1;
  g_recvmsg_eintr = 3;
  H2Conn server(base.get(), s.release(), nullptr, H2Conn::Role::Server, &h, st);
  h.conn = &server;
  std::vector<Fd> got;
  ASSERT_TRUE(run_until(base.get(), [&] {
    for (Fd& f : server.take_passed_fds()) got.push_back(std::move(f));
    return !got.empty() || h.closed.has_value();
  })) << "neither the fds nor a close";
  EXPECT_EQ(g_recvmsg_eintr, 0) << "the injected EINTRs were not reached";
  ASSERT_EQ(got.size(), 1u) << h.closed.value_or("");
  struct stat a {
  }, b{};
  ASSERT_EQ(fstat(got[0].get(), &a), 0);
  ASSERT_EQ(fstat(p.write.get(), &b), 0);
  EXPECT_EQ(a.st_ino, b.st_ino);
}

}  // namespace
