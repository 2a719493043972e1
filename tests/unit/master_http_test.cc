// The master front end's response side (master/http.h); request parsing is
// tests/unit/http1_test.cc (proto/http1.h).
#include <arpa/inet.h>
#include <event2/event.h>
#include <gtest/gtest.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <thread>
#include <vector>

#include "master/http.h"
#include "proto/tls.h"

using namespace shimlet::master;

TEST(MasterHttp, StatusErrorShape) {
  auto r = status_error(403, "nope");
  auto j = nlohmann::json::parse(r.body);
  EXPECT_EQ(r.status, 403);
  EXPECT_EQ(j, (nlohmann::json{{"kind", "Status"},
                               {"apiVersion", "v1"},
                               {"metadata", nlohmann::json::object()},
                               {"status", "Failure"},
                               {"message", "nope"},
                               {"reason", "Forbidden"},
                               {"code", 403}}));
  std::string s = serialize_http1(r, false, false);
  EXPECT_EQ(s.rfind("HTTP/1.1 403 Forbidden\r\n", 0), 0u);
  EXPECT_NE(s.find("Connection: close\r\n"), std::string::npos);
}

TEST(MasterHttp, QueryParams) {
  Request r;
  r.query = "a=1&b=%20c&a=2";
  auto q = r.query_params();
  EXPECT_EQ(q.find("b")->second, " c");
  EXPECT_EQ(q.count("a"), 2u);
  r.headers = {{"x-multi", "a"}, {"x-multi", "b"}};
  EXPECT_EQ(r.header("x-multi"), "a");
  EXPECT_EQ(r.header("none"), "");
}

// Deferred answers (Response::deferred), over a real TLS connection: HTTP/1.1
// answers keep the requests' order even when the first is answered later,
// and a reply whose connection is gone does nothing.
namespace {

struct EventBaseFree {
  void operator()(event_base* b) const { event_base_free(b); }
};

// Sends `out` over TLS, then reads until EOF (or, read = false, closes at once).
std::string tls_exchange(uint16_t port, const std::string& out, bool read = true) {
  int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return "connect failed";
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  static const unsigned char alpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  SSL_CTX_set_alpn_protos(ctx, alpn, sizeof alpn);
  SSL* ssl = SSL_new(ctx);
  SSL_set_fd(ssl, s);
  std::string in;
  if (SSL_connect(ssl) == 1 && SSL_write(ssl, out.data(), static_cast<int>(out.size())) > 0 && read) {
    char buf[4096];
    int n;
    while ((n = SSL_read(ssl, buf, sizeof buf)) > 0) in.append(buf, static_cast<size_t>(n));
  }
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  ::close(s);
  return in;
}

}  // namespace

TEST(MasterHttp, DeferredAnswersKeepHttp1Order) {
  std::unique_ptr<event_base, EventBaseFree> base(event_base_new());
  auto id = shimlet::proto::generate_identity("master-http-test");
  auto ctx = shimlet::proto::make_server_ctx(id.cert_pem, id.key_pem, true);
  std::vector<Reply> later;
  Server srv(base.get(), ctx.get(), [&](const Request& r) {
    Response resp;
    resp.body = r.path;
    if (r.path == "/later") resp.deferred = [&](Reply reply) { later.push_back(std::move(reply)); };
    return resp;
  });
  uint16_t port = srv.listen("127.0.0.1", 0);
  std::string got;
  std::thread client([&] {
    got = tls_exchange(port,
                       "GET /later HTTP/1.1\r\nHost: x\r\n\r\nGET /now HTTP/1.1\r\nHost: x\r\n"
                       "Connection: close\r\n\r\n");
  });
  // Run the loop until the deferred request is waiting, then answer it.
  while (later.empty()) event_base_loop(base.get(), EVLOOP_ONCE);
  Response r;
  r.status = 201;
  r.body = "/later-answered";
  later[0](r);
  later[0](r);  // a second reply is ignored
  while (srv.connections() > 0) event_base_loop(base.get(), EVLOOP_ONCE);
  client.join();
  size_t first = got.find("HTTP/1.1 201"), second = got.find("HTTP/1.1 200");
  ASSERT_NE(first, std::string::npos) << got;
  ASSERT_NE(second, std::string::npos) << got;
  EXPECT_LT(first, second);  // the later answer first: the requests' order
  EXPECT_NE(got.find("/later-answered"), std::string::npos);
  EXPECT_NE(got.find("\r\n\r\n/now"), std::string::npos);

  // The client leaves while its answer is deferred: the late reply fails
  // to write and the connection goes; nothing else happens.
  later.clear();
  std::thread quitter([&] { tls_exchange(port, "GET /later HTTP/1.1\r\nHost: x\r\n\r\n", false); });
  while (later.empty()) event_base_loop(base.get(), EVLOOP_ONCE);
  quitter.join();
  later[0](r);
  while (srv.connections() > 0) event_base_loop(base.get(), EVLOOP_ONCE);
}
