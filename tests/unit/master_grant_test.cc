#include <gtest/gtest.h>

#include "common/base64.h"
#include "common/error.h"
#include "master/audit.h"
#include "master/grant.h"

using namespace shimlet::master;

namespace {
const std::string kJkt = shimlet::base64url_encode(std::string(32, 'k'));
}

TEST(MasterGrant, ParseExec) {
  auto g = parse_grant_request(
      "exec", R"({"container":"c","command":["sh","-c","x"],"stdin":true,"tty":false,"jkt":")" + kJkt + "\"}");
  EXPECT_EQ(g.verb, "exec");
  EXPECT_EQ(g.container, "c");
  EXPECT_EQ(g.command, (std::vector<std::string>{"sh", "-c", "x"}));
  EXPECT_TRUE(g.stdin_);
  EXPECT_FALSE(g.tty);
  EXPECT_EQ(g.jkt, kJkt);
}

TEST(MasterGrant, ParsePortforward) {
  auto g = parse_grant_request("portforward", R"({"ports":[80,{"port":53,"proto":"udp"}]})");
  ASSERT_EQ(g.ports.size(), 2u);
  EXPECT_EQ(g.ports[0], (shimlet::ticket::Port{80, "tcp"}));
  EXPECT_EQ(g.ports[1], (shimlet::ticket::Port{53, "udp"}));
  EXPECT_TRUE(g.jkt.empty());
}

TEST(MasterGrant, ParseRejects) {
  for (auto [verb, body] : std::initializer_list<std::pair<const char*, const char*>>{
           {"exec", "{"},
           {"exec", "[]"},
           {"exec", R"({"command":[]})"},
           {"exec", R"({"command":"sh"})"},
           {"exec", R"({"command":["a"],"stdin":1})"},
           {"exec", R"({"command":["a"],"jkt":"abc"})"},
           {"exec", R"({"command":["a"],"container":"a/b"})"},
           {"exec", R"({"command":["a"],"ports":[1]})"},
           {"portforward", R"({"ports":[]})"},
           {"portforward", R"({"ports":[0]})"},
           {"portforward", R"({"ports":[65536]})"},
           {"portforward", R"({"ports":[{"port":1,"proto":"sctp"}]})"},
           {"portforward", R"({"ports":["80"]})"},
           {"attach", R"({})"}}) {
    EXPECT_THROW(parse_grant_request(verb, body), shimlet::Error) << verb << " " << body;
  }
}

TEST(MasterGrant, MintsVerifiableBoundTicket) {
  auto key = shimlet::ticket::PrivateKey::generate();
  Registration target;
  target.id = "cid";
  target.node = "n1";
  target.endpoint = "10.0.0.1:4000";
  target.pin = "sha256/x";
  target.container = "app";
  GrantRequest req = parse_grant_request("exec", R"({"command":["id"],"jkt":")" + kJkt + "\"}");
  GrantConfig cfg;
  cfg.lifetime_s = 30;
  int64_t now = time(nullptr);
  Grant g = mint_grant(key, cfg, "alice", req, target, now);
  EXPECT_EQ(g.response["endpoint"], "10.0.0.1:4000");
  EXPECT_EQ(g.response["pin"], "sha256/x");
  EXPECT_EQ(g.response["container_id"], "cid");
  EXPECT_EQ(g.response["session_id"], g.claims.sid);
  std::vector<shimlet::ticket::TrustedKey> keys{{"master", shimlet::ticket::PublicKey::from_pem(key.public_pem())}};
  auto c = shimlet::ticket::verify(g.ticket, keys, {"cid", "exec", now, 5, 300});
  EXPECT_EQ(c.sub, "alice");
  EXPECT_EQ(c.cnf_jkt, kJkt);
  EXPECT_EQ(c.cmd, (std::vector<std::string>{"id"}));
  EXPECT_EQ(c.exp - c.iat, 30);
  EXPECT_EQ(c.node, "n1");
  req.jkt.clear();
  EXPECT_THROW(mint_grant(key, cfg, "alice", req, target, now), shimlet::Error);  // always bound
}

TEST(MasterAudit, RedactsSecretsEverywhere) {
  nlohmann::json j = {{"user", "a"},
                      {"Authorization", "Bearer x"},
                      {"nested", {{"token", "t"}, {"list", {{{"ticket", "a.b.c"}}}}}},
                      {"jti", "keep"}};
  AuditLog::redact(j);
  EXPECT_EQ(j["Authorization"], "[redacted]");
  EXPECT_EQ(j["nested"]["token"], "[redacted]");
  EXPECT_EQ(j["nested"]["list"][0]["ticket"], "[redacted]");
  EXPECT_EQ(j["jti"], "keep");
  EXPECT_EQ(j["user"], "a");
}

TEST(MasterAudit, OneLinePerEventAppended) {
  std::string path = "/tmp/mst-audit-" + std::to_string(getpid()) + ".log";
  {
    AuditLog a(path);
    a.write("request", {{"user", "u"}, {"token", "s3cret"}});
    AuditLog b(path);  // a second writer appends, never truncates
    b.write("session_end", {{"exit_code", 3}});
  }
  FILE* f = fopen(path.c_str(), "r");
  ASSERT_TRUE(f);
  char line[4096];
  std::vector<nlohmann::json> lines;
  while (fgets(line, sizeof line, f)) lines.push_back(nlohmann::json::parse(line));
  fclose(f);
  unlink(path.c_str());
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0]["event"], "request");
  EXPECT_EQ(lines[0]["token"], "[redacted]");
  EXPECT_TRUE(lines[0].contains("ts"));
  EXPECT_EQ(lines[1]["exit_code"], 3);
}
