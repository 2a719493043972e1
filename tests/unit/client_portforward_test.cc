// shimctl port-forward: argument parsing (port forms, /udp, --address, --stdio)
// and the port-forward ticket minted by --local.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "client/client.h"
#include "proto/tls.h"
#include "ticket/ticket.h"

namespace sc = shimlet::client;
namespace fs = std::filesystem;

namespace {

sc::Invocation parse(std::vector<std::string> a) {
  a.insert(a.begin(), "shimctl");
  return sc::parse_args(a);
}

std::string usage_error(std::vector<std::string> a) {
  try {
    parse(std::move(a));
  } catch (const sc::UsageError& e) {
    return e.what();
  }
  return "";
}

sc::PortSpec spec(uint16_t local, uint16_t remote, bool udp = false) { return sc::PortSpec{local, remote, udp}; }

TEST(PortSpec, KubectlForms) {
  EXPECT_EQ(sc::parse_port_spec("8080"), spec(8080, 8080));
  EXPECT_EQ(sc::parse_port_spec("8080:80"), spec(8080, 80));
  EXPECT_EQ(sc::parse_port_spec(":80"), spec(0, 80));
  EXPECT_EQ(sc::parse_port_spec("0:80"), spec(0, 80));
  EXPECT_EQ(sc::parse_port_spec("65535:1"), spec(65535, 1));
}

TEST(PortSpec, Protocols) {
  EXPECT_EQ(sc::parse_port_spec("53/udp"), spec(53, 53, true));
  EXPECT_EQ(sc::parse_port_spec("5353:53/udp"), spec(5353, 53, true));
  EXPECT_EQ(sc::parse_port_spec(":53/udp"), spec(0, 53, true));
  EXPECT_EQ(sc::parse_port_spec("80/tcp"), spec(80, 80));
}

TEST(PortSpec, Refused) {
  for (const char* bad : {"", "0", ":0", "65536", "8080:", "a:80", "80:b", "1:2:3", "-1", "+80", " 80", "80 ",
                          "80/sctp", "80/", "/udp", "123456", "0x50", "80:80/udp/tcp"}) {
    EXPECT_THROW(sc::parse_port_spec(bad), sc::UsageError) << bad;
  }
  try {
    sc::parse_port_spec("80/sctp");
  } catch (const sc::UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("'80/sctp'"), std::string::npos) << e.what();
  }
}

TEST(PortForwardArgs, Basic) {
  auto inv = parse({"--local", "port-forward", "mypod", "8080:80", ":443", "53/udp"});
  EXPECT_EQ(inv.verb, "port-forward");
  EXPECT_TRUE(inv.local);
  EXPECT_EQ(inv.pf.target, "mypod");
  ASSERT_EQ(inv.pf.ports.size(), 3u);
  EXPECT_EQ(inv.pf.ports[0], spec(8080, 80));
  EXPECT_EQ(inv.pf.ports[1], spec(0, 443));
  EXPECT_EQ(inv.pf.ports[2], spec(53, 53, true));
  EXPECT_EQ(inv.pf.addresses, std::vector<std::string>{"localhost"});
  EXPECT_FALSE(inv.pf.stdio);
}

TEST(PortForwardArgs, GlobalFlagsAnywhereAndNamespace) {
  auto inv = parse({"port-forward", "-n", "prod", "web", "9000:90", "--local", "--state-dir", "/tmp/s"});
  EXPECT_EQ(inv.ns, "prod");
  EXPECT_TRUE(inv.local);
  EXPECT_EQ(inv.state_dir, "/tmp/s");
  EXPECT_EQ(inv.pf.target, "web");
  auto c = parse({"port-forward", "web", "-c", "side", "80"});
  EXPECT_EQ(c.pf.container, "side");
}

TEST(PortForwardArgs, AddressLists) {
  auto inv = parse({"port-forward", "p", "--address", "127.0.0.1,::1", "--address", "localhost", "80"});
  EXPECT_EQ(inv.pf.addresses, (std::vector<std::string>{"127.0.0.1", "::1", "localhost"}));
  auto dup = parse({"port-forward", "p", "--address", "0.0.0.0,0.0.0.0", "80"});
  EXPECT_EQ(dup.pf.addresses, std::vector<std::string>{"0.0.0.0"});
  EXPECT_NE(usage_error({"port-forward", "p", "--address", "example.com", "80"}).find("not 'localhost' or an IP"),
            std::string::npos);
  EXPECT_NE(usage_error({"port-forward", "p", "--address", "127.0.0.1,300.1.1.1", "80"}).find("'300.1.1.1'"),
            std::string::npos);
}

TEST(PortForwardArgs, PortsAfterDoubleDash) {
  auto inv = parse({"port-forward", "p", "--", "8080:80"});
  ASSERT_EQ(inv.pf.ports.size(), 1u);
  EXPECT_EQ(inv.pf.ports[0], spec(8080, 80));
  EXPECT_TRUE(inv.exec.command.empty());
}

TEST(PortForwardArgs, Stdio) {
  auto inv = parse({"--local", "port-forward", "box", "--stdio", "22"});
  EXPECT_TRUE(inv.pf.stdio);
  ASSERT_EQ(inv.pf.ports.size(), 1u);
  EXPECT_EQ(inv.pf.ports[0].remote, 22);
  EXPECT_FALSE(inv.pf.ports[0].udp);
  EXPECT_NE(usage_error({"port-forward", "box", "--stdio", "22", "80"}).find("exactly one"), std::string::npos);
  EXPECT_NE(usage_error({"port-forward", "box", "--stdio", "2222:22"}).find("REMOTE only"), std::string::npos);
  EXPECT_NE(usage_error({"port-forward", "box", "--stdio", "53/udp"}).find("not UDP"), std::string::npos);
  EXPECT_NE(usage_error({"port-forward", "box", "--stdio", "--address", "::1", "22"}).find("--address"),
            std::string::npos);
}

TEST(PortForwardArgs, Missing) {
  EXPECT_NE(usage_error({"port-forward"}).find("missing TARGET"), std::string::npos);
  EXPECT_NE(usage_error({"port-forward", "p"}).find("at least one port"), std::string::npos);
  EXPECT_NE(usage_error({"port-forward", "p", "http"}).find("bad port 'http'"), std::string::npos);
  EXPECT_NE(usage_error({"portforward", "p", "80"}).find("port-forward"), std::string::npos);
}

// --local mints a portforward ticket naming exactly the REMOTE ports.
TEST(PortForwardGrant, LocalTicket) {
  fs::path dir = fs::temp_directory_path() / ("pfc-grant-" + std::to_string(getpid()));
  fs::create_directories(dir / "c1");
  auto key = shimlet::ticket::PrivateKey::generate();
  {
    key.save((dir / "local.key").string());
    std::ofstream(dir / "c1" / "registration.json")
        << R"({"id":"c1","endpoint":"127.0.0.1:1234","pin":"sha256/abc","namespace":"default","pod":"web"})";
  }
  auto inv = parse({"--local", "--state-dir", dir.string(), "port-forward", "web", "8080:80", ":80", "53/udp", "443"});
  auto id = shimlet::proto::generate_identity("test");
  sc::Grant g = sc::local_portforward_grant(dir.string(), "default", inv.pf, id, 1000);
  EXPECT_EQ(g.container_id, "c1");
  EXPECT_EQ(g.endpoint, "127.0.0.1:1234");
  shimlet::ticket::Expect e;
  e.aud = "c1";
  e.verb = "portforward";
  e.now = 1001;
  std::vector<shimlet::ticket::TrustedKey> keys = {{"local", shimlet::ticket::PublicKey::from_pem(key.public_pem())}};
  auto c = shimlet::ticket::verify(g.ticket, keys, e);
  ASSERT_EQ(c.ports.size(), 3u);  // 80 once
  EXPECT_EQ(c.ports[0], (shimlet::ticket::Port{80, "tcp"}));
  EXPECT_EQ(c.ports[1], (shimlet::ticket::Port{53, "udp"}));
  EXPECT_EQ(c.ports[2], (shimlet::ticket::Port{443, "tcp"}));
  EXPECT_TRUE(c.cmd.empty());
  EXPECT_FALSE(c.cnf_jkt.empty());
  EXPECT_EQ(c.exp - c.iat, sc::kDefaultLocalTicketLifetimeS);
  // --ticket-lifetime shortens it (the integration tests idle past a short one).
  inv = parse({"--local", "--ticket-lifetime", "2", "--state-dir", dir.string(), "port-forward", "web", "80"});
  EXPECT_EQ(inv.ticket_lifetime_s, 2);
  g = sc::local_portforward_grant(dir.string(), "default", inv.pf, id, 1000, inv.ticket_lifetime_s);
  c = shimlet::ticket::verify(g.ticket, keys, e);
  EXPECT_EQ(c.exp, 1002);
  fs::remove_all(dir);
}

TEST(PortForwardArgs, PingIntervalAndTicketLifetime) {
  EXPECT_EQ(parse({"port-forward", "p", "80"}).pf.ping_interval_s, sc::kDefaultPingIntervalS);
  EXPECT_EQ(parse({"port-forward", "p", "--ping-interval", "2", "80"}).pf.ping_interval_s, 2);
  EXPECT_NE(usage_error({"port-forward", "p", "--ping-interval", "0", "80"}).find("ping-interval"), std::string::npos);
  EXPECT_NE(usage_error({"--local", "--ticket-lifetime", "0", "port-forward", "p", "80"}).find("ticket-lifetime"),
            std::string::npos);
}

}  // namespace
