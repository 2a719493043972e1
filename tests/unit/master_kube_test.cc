#include <arpa/inet.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <thread>

#include "common/error.h"
#include "master/kube.h"
#include "master/relay.h"

using namespace shimlet::master;

TEST(MasterKube, ExecQuery) {
  auto p = kube::parse_exec_query(
      "command=sh&command=-c&command=echo+a+b%3B+exit+3&container=app&stdin=true&stdout=1"
      "&tty=True&stderr=true&unknown=x");
  EXPECT_EQ(p.command, (std::vector<std::string>{"sh", "-c", "echo a b; exit 3"}));
  EXPECT_EQ(p.container, "app");
  EXPECT_TRUE(p.stdin_);
  EXPECT_TRUE(p.stdout_);
  EXPECT_TRUE(p.tty);
  EXPECT_FALSE(p.stderr_);  // merged into stdout with a tty
  auto q = kube::parse_exec_query("command=id&stdout=true");
  EXPECT_FALSE(q.stdin_);
  EXPECT_TRUE(q.container.empty());

  auto err = [](const char* query) {
    try {
      kube::parse_exec_query(query);
    } catch (const shimlet::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(err("stdout=true").find("at least one command"), std::string::npos);
  EXPECT_NE(err("command=id").find("at least one of stdin"), std::string::npos);
  EXPECT_NE(err("command=id&stdout=yes").find("invalid value for stdout"), std::string::npos);
  EXPECT_NE(err("command=a%00b&stdout=true").find("NUL"), std::string::npos);
  EXPECT_NE(err("command=id&&stdout=true").find("malformed"), std::string::npos);
  std::string many;
  for (int i = 0; i < 5000; ++i) many += "command=x&";
  EXPECT_NE(err((many + "stdout=1").c_str()).find("too many"), std::string::npos);
  std::string longarg = "command=" + std::string(40000, 'a') + "&stdout=1";
  EXPECT_NE(err(longarg.c_str()).find("too long"), std::string::npos);
}

TEST(MasterKube, VersionAndDiscovery) {
  auto v = kube::version_json("v1.27.16");
  EXPECT_EQ(v["major"], "1");
  EXPECT_EQ(v["minor"], "27");
  EXPECT_EQ(v["gitVersion"], "v1.27.16");
  EXPECT_THROW(kube::version_json("1.27"), shimlet::Error);
  EXPECT_THROW(kube::version_json("v1.2.3\n"), shimlet::Error);
  auto r = kube::api_v1_resources();
  std::vector<std::string> names;
  for (const auto& x : r["resources"]) names.push_back(x["name"]);
  EXPECT_EQ(names, (std::vector<std::string>{"pods", "pods/exec", "pods/portforward"}));
  EXPECT_EQ(kube::api_versions("h:1")["versions"][0], "v1");
}

TEST(MasterKube, RelayHeadReplacesOnlyAuthorization) {
  Request r;
  r.method = "GET";
  r.target = "/api/v1/namespaces/d/pods/p/exec?command=id&stdout=true";
  r.headers = {{"host", "m:6443"}, {"authorization", "Bearer secret"}, {"upgrade", "websocket"}};
  std::string h = kube::relay_request_head(r, "TICKET");
  EXPECT_EQ(h,
            "GET /api/v1/namespaces/d/pods/p/exec?command=id&stdout=true HTTP/1.1\r\nhost: m:6443\r\n"
            "upgrade: websocket\r\nauthorization: Bearer TICKET\r\n\r\n");
  EXPECT_EQ(h.find("secret"), std::string::npos);
}

namespace {
// A plain TCP echo server on 127.0.0.1 (thread), for the relay's TCP mode.
struct EchoServer {
  int lfd = -1;
  uint16_t port = 0;
  std::thread t;
  EchoServer() {
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    listen(lfd, 4);
    socklen_t l = sizeof a;
    getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &l);
    port = ntohs(a.sin_port);
    t = std::thread([this] {
      int c = accept(lfd, nullptr, nullptr);
      char buf[65536];
      ssize_t n;
      while ((n = read(c, buf, sizeof buf)) > 0)
        for (ssize_t off = 0; off < n;) {
          ssize_t w = write(c, buf + off, static_cast<size_t>(n - off));
          if (w <= 0) break;
          off += w;
        }
      close(c);
    });
  }
  ~EchoServer() {
    t.join();
    close(lfd);
  }
};
}  // namespace

TEST(MasterRelay, SplicesTcpWithPreamblesAndReportsBytes) {
  EchoServer echo;
  event_base* base = event_base_new();
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  evutil_make_socket_nonblocking(sv[0]);
  RelayStats got;
  bool ended = false;
  {
    Relayer relayer;
    RelayOptions o;
    o.endpoint = "127.0.0.1:" + std::to_string(echo.port);
    o.shim_preamble = "HEAD\n";
    o.client_preamble = "OK\n";
    o.max_buffer = 64 * 1024;  // forces pauses/resumes with 4 MiB through it
    o.on_end = [&](const RelayStats& s) {
      got = s;
      ended = true;
      event_base_loopbreak(base);
    };
    relayer.start(base, BevPtr(bufferevent_socket_new(base, sv[0], BEV_OPT_CLOSE_ON_FREE)), std::move(o));
    // The client: write 4 MiB, then read everything back (preambles included).
    std::string payload(4 << 20, '\0');
    for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>(i * 7 + (i >> 12));
    std::string back;
    std::thread client([&] {
      std::thread w([&] {
        for (size_t off = 0; off < payload.size();) {
          ssize_t n = write(sv[1], payload.data() + off, std::min<size_t>(65536, payload.size() - off));
          if (n <= 0) break;
          off += static_cast<size_t>(n);
        }
      });
      char buf[65536];
      size_t want = 3 + 5 + payload.size();
      while (back.size() < want) {
        ssize_t n = read(sv[1], buf, sizeof buf);
        if (n <= 0) break;
        back.append(buf, static_cast<size_t>(n));
      }
      w.join();
      shutdown(sv[1], SHUT_RDWR);  // the client closes: the relay ends
    });
    event_base_dispatch(base);
    client.join();
    EXPECT_EQ(back.substr(0, 3), "OK\n");
    EXPECT_EQ(back.substr(3, 5), "HEAD\n");
    EXPECT_TRUE(back.substr(8) == payload);
    EXPECT_EQ(relayer.active(), 0u);
  }
  close(sv[1]);
  ASSERT_TRUE(ended);
  EXPECT_TRUE(got.connected);
  EXPECT_EQ(got.bytes_in, 4u << 20);
  EXPECT_EQ(got.bytes_out, 5u + (4u << 20));
  event_base_free(base);
}

TEST(MasterRelay, UnreachableShimAnswersTheClient) {
  // A port nothing listens on.
  int s = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t l = sizeof a;
  getsockname(s, reinterpret_cast<sockaddr*>(&a), &l);
  close(s);
  event_base* base = event_base_new();
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  evutil_make_socket_nonblocking(sv[0]);
  RelayStats got;
  {
    Relayer relayer;
    RelayOptions o;
    o.endpoint = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
    o.connect_error_response = [](const std::string& why) { return "ERR " + why + "\n"; };
    o.on_end = [&](const RelayStats& st) { got = st; };
    relayer.start(base, BevPtr(bufferevent_socket_new(base, sv[0], BEV_OPT_CLOSE_ON_FREE)), std::move(o));
    event_base_dispatch(base);  // ends when the relay has nothing left
    EXPECT_EQ(relayer.active(), 0u);
  }
  char buf[512];
  ssize_t n = read(sv[1], buf, sizeof buf);
  ASSERT_GT(n, 0);
  std::string msg(buf, static_cast<size_t>(n));
  EXPECT_EQ(msg.rfind("ERR cannot reach the shim at 127.0.0.1:", 0), 0u) << msg;
  EXPECT_FALSE(got.connected);
  EXPECT_NE(got.error.find("cannot reach"), std::string::npos);
  close(sv[1]);
  event_base_free(base);

  // A bad endpoint fails at once, the same way.
  base = event_base_new();
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  {
    Relayer relayer;
    RelayOptions o;
    o.endpoint = "not an endpoint";
    o.on_end = [&](const RelayStats& st) { got = st; };
    relayer.start(base, BevPtr(bufferevent_socket_new(base, sv[0], BEV_OPT_CLOSE_ON_FREE)), std::move(o));
    EXPECT_EQ(relayer.active(), 0u);
  }
  EXPECT_NE(got.error.find("bad shim endpoint"), std::string::npos);
  close(sv[1]);
  event_base_free(base);
}
