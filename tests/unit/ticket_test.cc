#include "ticket/ticket.h"

#include <gtest/gtest.h>
#include <openssl/err.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common/base64.h"
#include "common/error.h"
#include "ticket/replay.h"

using namespace shimlet;
using namespace shimlet::ticket;
using nlohmann::json;

namespace {

constexpr int64_t kNow = 1'800'000'000;

Claims base_claims() {
  Claims c;
  c.iss = "local";
  c.sub = "alice";
  c.aud = "abc";
  c.jti = "jti-1";
  c.verb = "exec";
  c.sid = "s1";
  c.iat = kNow;
  c.exp = kNow + 60;
  c.cmd = {"/bin/sh", "-c", "echo hi"};
  c.stdin_ = true;
  c.tty = true;
  return c;
}

Expect base_expect() {
  Expect e;
  e.aud = "abc";
  e.verb = "exec";
  e.now = kNow + 1;
  return e;
}

json base_payload() {
  return {{"iss", "local"},   {"sub", "alice"}, {"aud", "abc"},  {"iat", kNow},
          {"exp", kNow + 60}, {"jti", "jti-1"}, {"verb", "exec"}};
}

json base_header() { return {{"alg", "EdDSA"}, {"typ", "shimlet-ticket+jwt"}, {"kid", "k1"}}; }

// A token with arbitrary header/payload text, properly signed by key.
std::string raw_token(const PrivateKey& key, const std::string& header, const std::string& payload) {
  std::string input = base64url_encode(header) + "." + base64url_encode(payload);
  return input + "." + base64url_encode(key.sign_data(input));
}

class TicketTest : public ::testing::Test {
 protected:
  PrivateKey key = PrivateKey::generate();
  PrivateKey other = PrivateKey::generate();
  std::vector<TrustedKey> trusted{{"k1", PublicKey::from_pem(key.public_pem())}};

  std::string token(const json& payload, const json& header = base_header()) {
    return raw_token(key, header.dump(), payload.dump());
  }
  // Expects verify() to throw an Error whose message contains `want`.
  void refused(const std::string& tok, const std::string& want, const Expect& e = base_expect()) {
    try {
      verify(tok, trusted, e);
      ADD_FAILURE() << "accepted, expected refusal containing: " << want;
    } catch (const Error& err) {
      EXPECT_NE(std::string(err.what()).find(want), std::string::npos) << "message: " << err.what();
      EXPECT_EQ(std::string(err.what()).find('\n'), std::string::npos) << "one line: " << err.what();
    }
  }
};

TEST_F(TicketTest, SignVerifyRoundTrip) {
  Claims c = base_claims();
  c.cnf_jkt = jkt_of_public_pem(other.public_pem());
  c.node = "n1";
  std::string tok = key.sign(c, "k1");
  EXPECT_EQ(std::count(tok.begin(), tok.end(), '.'), 2);
  Claims got = verify(tok, trusted, base_expect());
  EXPECT_EQ(got.iss, "local");
  EXPECT_EQ(got.sub, "alice");
  EXPECT_EQ(got.aud, "abc");
  EXPECT_EQ(got.jti, "jti-1");
  EXPECT_EQ(got.verb, "exec");
  EXPECT_EQ(got.sid, "s1");
  EXPECT_EQ(got.node, "n1");
  EXPECT_EQ(got.iat, kNow);
  EXPECT_EQ(got.exp, kNow + 60);
  EXPECT_EQ(got.cmd, c.cmd);
  EXPECT_TRUE(got.stdin_);
  EXPECT_TRUE(got.tty);
  EXPECT_EQ(got.cnf_jkt, c.cnf_jkt);
  EXPECT_TRUE(got.ports.empty());
}

// A warm session's throwaway verification leaves the key usable and no
// OpenSSL error behind.
TEST_F(TicketTest, WarmUpThenVerify) {
  trusted[0].key.warm_up();
  EXPECT_EQ(ERR_peek_error(), 0u);
  EXPECT_EQ(verify(key.sign(base_claims(), "k1"), trusted, base_expect()).jti, "jti-1");
}

TEST_F(TicketTest, PortforwardRoundTrip) {
  Claims c = base_claims();
  c.verb = "portforward";
  c.cmd.clear();
  c.stdin_ = c.tty = false;
  c.ports = {{8080, "tcp"}, {53, "udp"}};
  Expect e = base_expect();
  e.verb = "portforward";
  Claims got = verify(key.sign(c, "k1"), trusted, e);
  ASSERT_EQ(got.ports.size(), 2u);
  EXPECT_EQ(got.ports[0], (Port{8080, "tcp"}));
  EXPECT_EQ(got.ports[1], (Port{53, "udp"}));
  EXPECT_TRUE(got.cmd.empty());
}

TEST_F(TicketTest, NoKidTriesEveryTrustedKey) {
  std::vector<TrustedKey> keys{{"x", PublicKey::from_pem(other.public_pem())},
                               {"y", PublicKey::from_pem(key.public_pem())}};
  Claims got = verify(key.sign(base_claims(), ""), keys, base_expect());
  EXPECT_EQ(got.aud, "abc");
  // A kid selects exactly that key: the right signature under the wrong kid fails.
  EXPECT_THROW(verify(key.sign(base_claims(), "x"), keys, base_expect()), Error);
  EXPECT_NO_THROW(verify(key.sign(base_claims(), "y"), keys, base_expect()));
}

TEST_F(TicketTest, LeewayAccepted) {
  Expect e = base_expect();
  e.now = kNow + 60 + 5;  // exp + leeway: still fine
  EXPECT_NO_THROW(verify(key.sign(base_claims(), "k1"), trusted, e));
  e.now = kNow - 5;  // iat in the future within leeway
  EXPECT_NO_THROW(verify(key.sign(base_claims(), "k1"), trusted, e));
}

TEST_F(TicketTest, RefusesExpired) {
  Expect e = base_expect();
  e.now = kNow + 72;
  refused(key.sign(base_claims(), "k1"), "ticket expired 12s ago", e);
}

TEST_F(TicketTest, RefusesNotYetValid) {
  Expect e = base_expect();
  e.now = kNow - 30;
  refused(key.sign(base_claims(), "k1"), "not valid yet (issued 30s in the future)", e);
}

TEST_F(TicketTest, RefusesLifetimeTooLong) {
  Claims c = base_claims();
  c.exp = c.iat + 301;
  refused(key.sign(c, "k1"), "lifetime 301s exceeds the maximum 300s");
  c.exp = c.iat;
  refused(key.sign(c, "k1"), "is not after iat");
}

TEST_F(TicketTest, RefusesWrongAud) {
  Expect e = base_expect();
  e.aud = "def";
  refused(key.sign(base_claims(), "k1"), "ticket is for container abc, not def", e);
}

TEST_F(TicketTest, RefusesWrongVerb) {
  Expect e = base_expect();
  e.verb = "portforward";
  refused(key.sign(base_claims(), "k1"), "ticket is for exec, not portforward", e);
}

TEST_F(TicketTest, RefusesUnknownKid) { refused(key.sign(base_claims(), "x"), "ticket kid \"x\" is not trusted"); }

TEST_F(TicketTest, RefusesWhenNoKeysConfigured) {
  EXPECT_THROW(verify(key.sign(base_claims(), "k1"), {}, base_expect()), Error);
}

TEST_F(TicketTest, RefusesSignatureOfAnotherKey) {
  refused(other.sign(base_claims(), "k1"), "ticket signature invalid");
  refused(other.sign(base_claims(), ""), "ticket signature invalid");
}

TEST_F(TicketTest, RefusesForgedSignature) {
  std::string tok = key.sign(base_claims(), "k1");
  size_t dot = tok.rfind('.');
  // Flip bits of a byte of the signature (keep it canonical base64url).
  std::string sig = *base64url_decode(tok.substr(dot + 1));
  sig[10] ^= 0x5a;
  refused(tok.substr(0, dot + 1) + base64url_encode(sig), "ticket signature invalid");
  refused(tok.substr(0, dot + 1) + base64url_encode(std::string(64, '\0')), "ticket signature invalid");
  // Truncated / extended signatures.
  refused(tok.substr(0, dot + 1) + base64url_encode(sig.substr(0, 63)), "ticket signature invalid");
  refused(tok.substr(0, dot + 1), "ticket signature invalid");
}

TEST_F(TicketTest, RefusesTamperedPayload) {
  std::string tok = key.sign(base_claims(), "k1");
  size_t d1 = tok.find('.'), d2 = tok.rfind('.');
  json p = json::parse(*base64url_decode(tok.substr(d1 + 1, d2 - d1 - 1)));
  p["aud"] = "def";
  std::string forged = tok.substr(0, d1 + 1) + base64url_encode(p.dump()) + tok.substr(d2);
  Expect e = base_expect();
  e.aud = "def";
  refused(forged, "ticket signature invalid", e);
  // Tampered header (kid swapped to a key that is trusted) also breaks the signature.
  std::vector<TrustedKey> two = trusted;
  two.push_back({"k2", PublicKey::from_pem(key.public_pem())});
  json h = base_header();
  h["kid"] = "k2";
  std::string hforged = base64url_encode(h.dump()) + tok.substr(d1);
  EXPECT_THROW(verify(hforged, two, base_expect()), Error);
}

TEST_F(TicketTest, RefusesAlgNoneAndHmac) {
  json h = base_header();
  h["alg"] = "none";
  std::string input = base64url_encode(h.dump()) + "." + base64url_encode(base_payload().dump());
  refused(input + ".", "ticket alg \"none\" is not allowed");
  refused(token(base_payload(), h), "ticket alg \"none\" is not allowed");
  h["alg"] = "HS256";
  refused(token(base_payload(), h), "ticket alg \"HS256\" is not allowed");
  for (const char* a : {"ES256", "RS256", "eddsa", "Ed25519", ""}) {
    h["alg"] = a;
    refused(token(base_payload(), h), "is not allowed");
  }
  h["alg"] = 1;
  refused(token(base_payload(), h), "ticket header has no \"alg\"");
  h.erase("alg");
  refused(token(base_payload(), h), "ticket header has no \"alg\"");
}

TEST_F(TicketTest, RefusesBadHeaderFields) {
  json h = base_header();
  h["typ"] = "JWT";
  refused(token(base_payload(), h), "ticket typ is not");
  h.erase("typ");
  refused(token(base_payload(), h), "ticket typ is not");
  h = base_header();
  h["kid"] = 7;
  refused(token(base_payload(), h), "ticket kid is not a string");
  h = base_header();
  h["crit"] = json::array({"exp"});
  refused(token(base_payload(), h), "crit");
  // Control characters in an untrusted kid do not reach the error line raw.
  h = base_header();
  h["kid"] = "a\nb";
  refused(token(base_payload(), h), "ticket kid \"a?b\" is not trusted");
}

TEST_F(TicketTest, RefusesBadBase64) {
  std::string tok = key.sign(base_claims(), "k1");
  size_t d1 = tok.find('.'), d2 = tok.rfind('.');
  std::string h = tok.substr(0, d1), p = tok.substr(d1 + 1, d2 - d1 - 1), s = tok.substr(d2 + 1);
  refused(h + "=." + p + "." + s, "header is not base64url");
  refused("*" + h + "." + p + "." + s, "header is not base64url");
  // The payload is decoded only after the signature check: unsigned junk is a
  // bad signature; signed junk is bad base64url.
  refused(h + "." + p + "=." + s, "ticket signature invalid");
  for (std::string bad : {p + "=", p + " ", p.substr(0, p.size() - 1) + "+", p + "A", std::string("!")}) {
    SCOPED_TRACE(bad);
    std::string input = h + "." + bad;
    refused(input + "." + base64url_encode(key.sign_data(input)), "payload is not base64url");
  }
  refused(h + "." + p + "." + s.substr(0, 85) + "/", "not base64url");
  refused(h + "." + p + "." + s + "\n", "ticket signature invalid");
  // Non-canonical: last char with non-zero unused bits decodes to the same
  // bytes but is a different token; refused.
  std::string enc = base64url_encode("x");  // "eA"
  ASSERT_EQ(enc, "eA");
  std::string mutable_h = base64url_encode(base_header().dump());
  ASSERT_NE(mutable_h.size() % 4, 0u);
  char& last = mutable_h.back();
  std::string alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  last = alphabet[alphabet.find(last) + 1];
  std::string input = mutable_h + "." + p;
  refused(input + "." + base64url_encode(key.sign_data(input)), "header is not base64url");
}

TEST_F(TicketTest, RefusesWrongSegmentCount) {
  std::string tok = key.sign(base_claims(), "k1");
  size_t d1 = tok.find('.'), d2 = tok.rfind('.');
  refused(tok.substr(0, d2), "exactly 3");
  refused(tok + "." + tok.substr(d2 + 1), "exactly 3");
  refused(tok.substr(0, d1), "exactly 3");
  refused("", "exactly 3");
  refused("..", "not valid JSON");
  refused("...", "exactly 3");
}

TEST_F(TicketTest, RefusesNonObjectJson) {
  refused(token(json::array({1, 2})), "payload is not a JSON object");
  refused(raw_token(key, base_header().dump(), "\"str\""), "payload is not a JSON object");
  refused(raw_token(key, base_header().dump(), "{\"aud\":"), "payload is not valid JSON");
  refused(raw_token(key, base_header().dump(), ""), "payload is not valid JSON");
  refused(raw_token(key, "[]", base_payload().dump()), "header is not a JSON object");
  refused(raw_token(key, "null", base_payload().dump()), "header is not a JSON object");
  refused(raw_token(key, "{", base_payload().dump()), "header is not valid JSON");
  // Trailing garbage after the object.
  refused(raw_token(key, base_header().dump(), base_payload().dump() + "x"), "payload is not valid JSON");
}

TEST_F(TicketTest, RefusesDuplicateKeysAndDeepNesting) {
  std::string p = base_payload().dump();
  p.insert(1, "\"aud\":\"def\",");
  refused(raw_token(key, base_header().dump(), p), "duplicate key \"aud\"");
  std::string h = base_header().dump();
  h.insert(1, "\"alg\":\"none\",");
  refused(raw_token(key, h, base_payload().dump()), "duplicate key \"alg\"");
  json deep = base_payload();
  deep["x"] = json::parse("[[[[[[1]]]]]]");
  refused(token(deep), "nests too deeply");
}

TEST_F(TicketTest, RefusesWrongClaimTypes) {
  struct Case {
    const char* claim;
    json value;
    const char* want;
  };
  std::vector<Case> cases = {
      {"aud", 1, "\"aud\" is not a string"},
      {"iss", true, "\"iss\" is not a string"},
      {"sub", json::array(), "\"sub\" is not a string"},
      {"jti", nullptr, "\"jti\" is not a string"},
      {"jti", "", "\"jti\" is empty"},
      {"verb", json::object(), "\"verb\" is not a string"},
      {"sid", 3, "\"sid\" is not a string"},
      {"node", 3.5, "\"node\" is not a string"},
      {"iat", "1800000000", "\"iat\" is not an integer"},
      {"iat", 1800000000.5, "\"iat\" is not an integer"},
      {"exp", -1, "\"exp\" is out of range"},
      {"exp", json(UINT64_MAX), "\"exp\" is out of range"},
      {"exp", json(INT64_MAX), "\"exp\" is out of range"},
      {"cmd", "sh", "\"cmd\" is not an array"},
      {"cmd", json::array({"sh", 1}), "\"cmd\" has a non-string element"},
      {"stdin", 1, "\"stdin\" is not a boolean"},
      {"tty", "true", "\"tty\" is not a boolean"},
      {"ports", json::object(), "\"ports\" is not an array"},
      {"ports", json::array({80}), "non-object element"},
      {"ports", json::array({{{"port", "80"}, {"proto", "tcp"}}}), "no integer \"port\""},
      {"ports", json::array({{{"port", 0}, {"proto", "udp"}}}), "port 0 (any) is only for tcp"},
      {"ports", json::array({{{"port", 65536}, {"proto", "tcp"}}}), "out of range 0..65535"},
      {"ports", json::array({{{"port", -80}, {"proto", "tcp"}}}), "out of range 0..65535"},
      {"ports", json::array({{{"port", 80}}}), "no string \"proto\""},
      {"ports", json::array({{{"port", 80}, {"proto", "sctp"}}}), "\"sctp\" is not tcp or udp"},
      {"cnf", "abc", "\"cnf\" is not an object"},
      {"cnf", json::object(), "has no \"jkt\""},
      {"cnf", {{"jkt", 5}}, "\"jkt\" is not a string"},
      {"cnf", {{"jkt", "short"}}, "not a base64url SHA-256"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.claim + std::string("=") + c.value.dump());
    json p = base_payload();
    p[c.claim] = c.value;
    refused(token(p), c.want);
  }
  for (const char* required : {"aud", "jti", "verb", "iat", "exp"}) {
    SCOPED_TRACE(required);
    json p = base_payload();
    p.erase(required);
    refused(token(p), std::string("no \"") + required + "\" claim");
  }
}

TEST_F(TicketTest, IgnoresUnknownClaims) {
  json p = base_payload();
  p["future"] = {{"a", 1}};
  p["nbf"] = "whatever";
  EXPECT_EQ(verify(token(p), trusted, base_expect()).aud, "abc");
  json h = base_header();
  h["x5u"] = "http://example.invalid/";  // never fetched
  EXPECT_EQ(verify(token(base_payload(), h), trusted, base_expect()).aud, "abc");
}

TEST_F(TicketTest, RefusesOversized) {
  json p = base_payload();
  p["pad"] = std::string(kMaxTicketSize, 'a');
  refused(token(p), "ticket too large");
  refused(std::string(kMaxTicketSize + 1, 'a'), "ticket too large");
  json h = base_header();
  h["pad"] = std::string(2000, 'a');
  refused(token(base_payload(), h), "ticket header too large");
}

TEST(TicketKeys, PemRoundTripAndSaveIsPrivate) {
  PrivateKey k = PrivateKey::generate();
  std::string pem = k.to_pem();
  EXPECT_NE(pem.find("BEGIN PRIVATE KEY"), std::string::npos);
  PrivateKey k2 = PrivateKey::from_pem(pem);
  EXPECT_EQ(k2.public_pem(), k.public_pem());

  char dir[] = "/tmp/tkt-keytest.XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  std::string path = std::string(dir) + "/local.key";
  k.save(path);
  struct stat st {};
  ASSERT_EQ(stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  PrivateKey k3 = PrivateKey::load(path);
  EXPECT_EQ(k3.public_pem(), k.public_pem());
  // Overwrite keeps the mode and leaves no temp files behind.
  PrivateKey::generate().save(path);
  EXPECT_NE(PrivateKey::load(path).public_pem(), k.public_pem());
  std::string cmd = "test $(ls -A " + std::string(dir) + " | wc -l) -eq 1";
  EXPECT_EQ(system(cmd.c_str()), 0);
  unlink(path.c_str());
  rmdir(dir);

  EXPECT_THROW(PrivateKey::load("/nonexistent/key"), std::system_error);
  EXPECT_THROW(PrivateKey::from_pem("garbage"), Error);
  EXPECT_THROW(PublicKey::from_pem("garbage"), Error);
  EXPECT_THROW(PrivateKey::from_pem(k.public_pem()), Error);
}

TEST(TicketKeys, RefusesNonEd25519Keys) {
  FILE* f = popen("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 2>/dev/null", "r");
  ASSERT_NE(f, nullptr);
  std::string pem;
  char buf[512];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0) pem.append(buf, n);
  ASSERT_EQ(pclose(f), 0);
  ASSERT_NE(pem.find("PRIVATE KEY"), std::string::npos);
  try {
    PrivateKey::from_pem(pem);
    ADD_FAILURE() << "EC key accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not an Ed25519 key"), std::string::npos) << e.what();
  }
}

TEST(TicketKeys, PublicKeyVerifyAndJkt) {
  PrivateKey k = PrivateKey::generate();
  PublicKey pub = PublicKey::from_pem(k.public_pem());
  std::string sig = k.sign_data("hello");
  EXPECT_EQ(sig.size(), 64u);
  EXPECT_TRUE(pub.verify("hello", sig));
  EXPECT_FALSE(pub.verify("hellO", sig));
  EXPECT_FALSE(pub.verify("hello", sig.substr(0, 63)));
  EXPECT_FALSE(pub.verify("hello", ""));
  std::string jkt = jkt_of_public_pem(k.public_pem());
  EXPECT_EQ(jkt.size(), 43u);
  EXPECT_EQ(jkt.find_first_of("+/="), std::string::npos);
  // Same key through a certificate gives the same jkt (SPKI DER of the key).
  char dir[] = "/tmp/tkt-jkt.XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  std::string kp = std::string(dir) + "/k.pem", cp = std::string(dir) + "/c.pem";
  k.save(kp);
  std::string cmd = "openssl req -x509 -key " + kp + " -subj /CN=t -days 1 -out " + cp + " 2>/dev/null";
  ASSERT_EQ(system(cmd.c_str()), 0);
  std::ifstream in(cp);
  std::string cert((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(jkt_of_public_pem(cert), jkt);
  EXPECT_TRUE(PublicKey::from_pem(cert).verify("hello", sig));
  // Independent check with the openssl CLI: sha256 of the DER SPKI, base64url.
  std::string ref = "openssl pkey -in " + kp +
                    " -pubout -outform DER | openssl dgst -sha256 -binary | base64 | tr '+/' '-_' | tr -d '=\\n'";
  FILE* f = popen(ref.c_str(), "r");
  ASSERT_NE(f, nullptr);
  char buf[128] = {};
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  pclose(f);
  EXPECT_EQ(std::string(buf, n), jkt);
  unlink(kp.c_str());
  unlink(cp.c_str());
  rmdir(dir);
}

std::array<uint8_t, 32> digest_of(const std::string& jti) {
  std::string h = sha256(jti);
  std::array<uint8_t, 32> d{};
  std::copy(h.begin(), h.end(), d.begin());
  return d;
}

TEST(ReplayCache, AcceptsOnceRefusesReplay) {
  ReplayCache rc(4);
  EXPECT_EQ(rc.consume(digest_of("a"), 100, 50), ReplayCache::Result::Accepted);
  EXPECT_EQ(rc.consume(digest_of("a"), 100, 51), ReplayCache::Result::Replayed);
  EXPECT_EQ(rc.consume(digest_of("a"), 100, 100), ReplayCache::Result::Replayed);  // exp is inclusive
  EXPECT_EQ(rc.consume(digest_of("b"), 100, 51), ReplayCache::Result::Accepted);
  EXPECT_EQ(rc.size(), 2u);
}

TEST(ReplayCache, EvictsExpiredFirstThenFailsClosedWhenFull) {
  ReplayCache rc(3);
  EXPECT_EQ(rc.consume(digest_of("a"), 60, 0), ReplayCache::Result::Accepted);
  EXPECT_EQ(rc.consume(digest_of("b"), 200, 0), ReplayCache::Result::Accepted);
  EXPECT_EQ(rc.consume(digest_of("c"), 300, 0), ReplayCache::Result::Accepted);
  // Full of unexpired entries: refuse, don't forget one.
  EXPECT_EQ(rc.consume(digest_of("d"), 300, 10), ReplayCache::Result::Full);
  EXPECT_EQ(rc.size(), 3u);
  // A replay is still reported as such when full.
  EXPECT_EQ(rc.consume(digest_of("b"), 200, 10), ReplayCache::Result::Replayed);
  // "a" expires at 60: at 61 it is evicted and makes room for "d".
  EXPECT_EQ(rc.consume(digest_of("d"), 300, 61), ReplayCache::Result::Accepted);
  EXPECT_EQ(rc.size(), 3u);
  // "a" itself past its window is never accepted again.
  EXPECT_EQ(rc.consume(digest_of("a"), 60, 61), ReplayCache::Result::Replayed);
  // Everything expired: all evicted.
  EXPECT_EQ(rc.consume(digest_of("e"), 1000, 500), ReplayCache::Result::Accepted);
  EXPECT_EQ(rc.size(), 1u);
  ReplayCache none(0);
  EXPECT_EQ(none.consume(digest_of("a"), 10, 0), ReplayCache::Result::Full);
}

TEST(ReplayCache, DefaultCapacityIsBounded) {
  ReplayCache rc;
  int accepted = 0;
  for (int i = 0; i < 5000; i++)
    if (rc.consume(digest_of(std::to_string(i)), 1000, 0) == ReplayCache::Result::Accepted) accepted++;
  EXPECT_EQ(accepted, 4096);
  EXPECT_EQ(rc.size(), 4096u);
}

}  // namespace

TEST_F(TicketTest, LimitsRoundTripAndValidation) {
  Claims c = base_claims();
  c.limits = {64, 64u << 20, 100};
  Claims got = verify(key.sign(c, "k1"), trusted, base_expect());
  EXPECT_EQ(got.limits, c.limits);
  EXPECT_EQ(verify(key.sign(base_claims(), "k1"), trusted, base_expect()).limits, Limits{});
  json p = json::parse(R"({"iss":"local","aud":"abc","iat":0,"exp":60,"jti":"j","verb":"exec","cmd":["sh"]})");
  p["iat"] = kNow;
  p["exp"] = kNow + 60;
  for (const char* bad : {R"({"pids":0})", R"({"pids":-1})", R"({"pids":4194305})", R"({"memory":1000})",
                          R"({"cpu_weight":10001})", R"({"cpu_weight":1.5})", R"({"x":1})", R"([1])", R"("64M")"}) {
    p["limits"] = json::parse(bad);
    refused(token(p), "limit");
  }
}

TEST(TicketKeys, KeyParseErrorsAreClear) {
  auto msg = [](auto fn) {
    try {
      fn();
    } catch (const std::exception& e) {  // sys_error is a std::system_error
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(msg([] { PrivateKey::from_pem("garbage"); }).find("cannot parse private key PEM"), std::string::npos);
  EXPECT_NE(msg([] { PublicKey::from_pem("garbage"); }).find("cannot parse public key PEM"), std::string::npos);
  // A well-formed PEM of the wrong length is not taken by the raw loader nor by OpenSSL.
  EXPECT_NE(
      msg([] {
        PrivateKey::from_pem("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n");
      }).find("cannot parse private key PEM"),
      std::string::npos);
  EXPECT_NE(msg([] { PrivateKey::read_pem("/nonexistent/shimlet/local.key"); }).find("/nonexistent/shimlet/local.key"),
            std::string::npos);
  // read_pem + from_pem is load.
  PrivateKey k = PrivateKey::generate();
  char tmpl[] = "/tmp/shimlet-keytest-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string path = std::string(tmpl) + "/k.pem";
  k.save(path);
  EXPECT_EQ(PrivateKey::from_pem(PrivateKey::read_pem(path)).public_pem(), k.public_pem());
  unlink(path.c_str());
  rmdir(tmpl);
}
