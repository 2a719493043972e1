// The session's native front door (session/session_h2.cc, Session) with a
// fake transport: the connection is a socketpair to a proto::H2Conn client in
// the same loop, the shim's replay cache a SOCK_SEQPACKET pair whose answer
// the test writes. No container is touched: every request here ends at the
// ticket checks (session/session_auth.cc) or the port-forward session open.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <string>

#include "common/base64.h"
#include "h2_loop.h"
#include "proto/frames.h"
#include "session/session_internal.h"
#include "ticket/ticket.h"

using shimlet::EventBasePtr;
using shimlet::Fd;
using shimlet::new_event_base;
using shimlet::proto::H2Conn;
using shimlet::proto::Headers;
using shimlet::test::Recorder;
using shimlet::test::run_until;
using shimlet::test::stream_pair;
namespace session = shimlet::session;
namespace ticket = shimlet::ticket;

namespace {

constexpr const char* kContainer = "c0ffee";

struct Door : ::testing::Test {
  ticket::PrivateKey key = ticket::PrivateKey::generate();
  EventBasePtr base = new_event_base();
  Fd shim, shim_peer;  // the session's control socket, and the fake shim's end
  Recorder client_h;
  std::unique_ptr<H2Conn> client;
  std::unique_ptr<session::Session> door;

  void SetUp() override {
    int sp[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp), 0);
    shim = Fd(sp[0]);
    shim_peer = Fd(sp[1]);
    session::Config cfg;
    cfg.id = kContainer;
    cfg.keys.push_back({"k1", ticket::PublicKey::from_pem(key.public_pem())});
    auto [s, c] = stream_pair();
    door = std::make_unique<session::Session>(base.get(), cfg, shimlet::nsenter::Container{}, s.release(), shim.get());
    client = std::make_unique<H2Conn>(base.get(), c.release(), nullptr, H2Conn::Role::Client, &client_h);
    client_h.conn = client.get();
    ASSERT_TRUE(run_until(base.get(), [&] { return client_h.connected; }));
  }
  void TearDown() override {
    client.reset();
    door.reset();
  }

  std::string ticket_for(const std::string& verb, const std::string& jti = "jti-1") {
    ticket::Claims c;
    c.iss = "local";
    c.sub = "alice";
    c.aud = kContainer;
    c.jti = jti;
    c.verb = verb;
    c.iat = time(nullptr);
    c.exp = c.iat + 60;
    if (verb == "exec") c.cmd = {"true"};
    if (verb == "portforward") c.ports = {{8080, "tcp"}};
    return key.sign(c, "k1");
  }

  // One request without a body; the response once its stream closed.
  shimlet::test::Received request(const std::string& path, const std::string& token) {
    Headers h = {{":method", "POST"}, {":scheme", "http"}, {":authority", "shim"}, {":path", path}};
    if (!token.empty()) h.push_back({"authorization", "Bearer " + token});
    int32_t id = client->request(h, false);
    client->flush();
    EXPECT_TRUE(run_until(base.get(), [&] { return client_h.streams[id].closed.has_value(); }));
    return client_h.streams[id];
  }
  std::string error_of(const shimlet::test::Received& r) {
    return nlohmann::json::parse(r.body).at("error").get<std::string>();
  }
  // What the session asked the fake shim (SHA-256(jti) + expiry), if anything.
  std::string asked() {
    char buf[64];
    ssize_t n = ::recv(shim_peer.get(), buf, sizeof buf, MSG_DONTWAIT);
    return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
  }
  void shim_answers(char reply) { ASSERT_EQ(::send(shim_peer.get(), &reply, 1, 0), 1); }
};

TEST_F(Door, NoTicketIs401AndTheShimIsNotAsked) {
  auto r = request(shimlet::proto::kPortForwardOpenPath, "");
  EXPECT_EQ(r.header(":status"), "401");
  EXPECT_NE(error_of(r).find("missing ticket"), std::string::npos) << r.body;
  EXPECT_EQ(asked(), "");
}

TEST_F(Door, UnknownPathIs404) {
  auto r = request("/v1/nothing", ticket_for("portforward"));
  EXPECT_EQ(r.header(":status"), "404");
  EXPECT_EQ(asked(), "");
}

TEST_F(Door, TicketFromAnUntrustedKeyIs403BeforeTheReplayCache) {
  ticket::PrivateKey other = ticket::PrivateKey::generate();
  ticket::Claims c;
  c.iss = "local";
  c.sub = "mallory";
  c.aud = kContainer;
  c.jti = "jti-x";
  c.verb = "portforward";
  c.iat = time(nullptr);
  c.exp = c.iat + 60;
  auto r = request(shimlet::proto::kPortForwardOpenPath, other.sign(c, "k1"));
  EXPECT_EQ(r.header(":status"), "403");
  EXPECT_EQ(asked(), "") << "an invalid ticket never reaches the shim";
}

TEST_F(Door, TicketForAnotherVerbIs403) {
  auto r = request(shimlet::proto::kPortForwardOpenPath, ticket_for("exec"));
  EXPECT_EQ(r.header(":status"), "403");
  EXPECT_EQ(asked(), "");
}

TEST_F(Door, AcceptedTicketOpensPortForwardAndServesTheConnection) {
  shim_answers('A');  // queued before the session asks: its blocking wait returns at once
  std::string token = ticket_for("portforward", "jti-accepted");
  auto r = request(shimlet::proto::kPortForwardOpenPath, token);
  EXPECT_EQ(r.header(":status"), "200") << r.body;
  auto ports = nlohmann::json::parse(r.body).at("ports");
  ASSERT_EQ(ports.size(), 1u);
  EXPECT_EQ(ports[0].at("port"), 8080);
  std::string q = asked();
  ASSERT_EQ(q.size(), 40u);
  EXPECT_EQ(q.substr(0, 32), shimlet::sha256("jti-accepted")) << "the shim is asked by SHA-256(jti)";

  // The connection is the unit of authentication: the same ticket again is
  // served without the shim; another ticket or another verb is refused.
  auto again = request(shimlet::proto::kPortForwardOpenPath, token);
  EXPECT_EQ(again.header(":status"), "200");
  EXPECT_EQ(asked(), "");
  auto other = request(shimlet::proto::kPortForwardOpenPath, ticket_for("portforward", "jti-other"));
  EXPECT_EQ(other.header(":status"), "403");
  EXPECT_NE(error_of(other).find("one ticket"), std::string::npos) << other.body;
  auto exec = request(shimlet::proto::kExecPath, token);
  EXPECT_EQ(exec.header(":status"), "403");
  EXPECT_NE(error_of(exec).find("not exec"), std::string::npos) << exec.body;
}

TEST_F(Door, ReplayedTicketIs403) {
  shim_answers('R');
  auto r = request(shimlet::proto::kPortForwardOpenPath, ticket_for("portforward"));
  EXPECT_EQ(r.header(":status"), "403");
  EXPECT_NE(error_of(r).find("already used"), std::string::npos) << r.body;
}

TEST_F(Door, FullReplayCacheIs503) {
  shim_answers('F');
  auto r = request(shimlet::proto::kPortForwardOpenPath, ticket_for("portforward"));
  EXPECT_EQ(r.header(":status"), "503");
  EXPECT_NE(error_of(r).find("replay cache full"), std::string::npos) << r.body;
}

TEST_F(Door, ShimGoneFailsClosedWith503) {
  shim_peer.reset();
  auto r = request(shimlet::proto::kPortForwardOpenPath, ticket_for("portforward"));
  EXPECT_EQ(r.header(":status"), "503");
  EXPECT_NE(error_of(r).find("replay check unavailable"), std::string::npos) << r.body;
}

TEST_F(Door, ClientGoneEndsTheSession) {
  auto r = request("/v1/nothing", "");
  EXPECT_EQ(r.header(":status"), "404");
  client.reset();
  // The door ends its loop (event_base_loopexit) once the connection is gone.
  EXPECT_TRUE(run_until(base.get(), [&] { return event_base_got_exit(base.get()) != 0; }));
}

}  // namespace
