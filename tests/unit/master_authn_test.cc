#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "common/error.h"
#include "common/openssl.h"
#include "master/authn.h"

using namespace shimlet::master;

TEST(MasterAuthn, TokenFileKubeFormat) {
  auto t = parse_token_file(
      "# comment\n\n"
      "tok1,alice,uid1,\"dev,ops\"\n"
      "\"tok2\",bob,uid2\r\n"
      "tok3,carol,uid3,\"\"\n"
      "tok4,dave,uid4,single,ignored-extra\n"
      "tok5,\"e \"\"quoted\"\"\",uid5,\" a , b \"\n");
  ASSERT_EQ(t.size(), 5u);
  EXPECT_EQ(t[0].token, "tok1");
  EXPECT_EQ(t[0].user, "alice");
  EXPECT_EQ(t[0].uid, "uid1");
  EXPECT_EQ(t[0].groups, (std::vector<std::string>{"dev", "ops"}));
  EXPECT_EQ(t[1].token, "tok2");
  EXPECT_TRUE(t[1].groups.empty());
  EXPECT_TRUE(t[2].groups.empty());
  EXPECT_EQ(t[3].groups, (std::vector<std::string>{"single"}));
  EXPECT_EQ(t[4].user, "e \"quoted\"");
  EXPECT_EQ(t[4].groups, (std::vector<std::string>{"a", "b"}));
}

TEST(MasterAuthn, TokenFileErrorsNameTheLineNotTheToken) {
  for (const char* bad : {"tok,alice\n", "a,b,c\n\"unterminated,u,1\n", ",alice,1\n", "tok,,1\n", "tok,a,1\ntok,b,2\n",
                          "t\"x,a,1\n", "to k,a,1\n"}) {
    try {
      parse_token_file(bad);
      FAIL() << "accepted: " << bad;
    } catch (const shimlet::Error& e) {
      std::string m = e.what();
      EXPECT_NE(m.find("token file line"), std::string::npos) << m;
      EXPECT_EQ(m.find("tok,"), std::string::npos) << m;
    }
  }
}

TEST(MasterAuthn, ConstantTimeEqual) {
  EXPECT_TRUE(constant_time_equal("abc", "abc"));
  EXPECT_FALSE(constant_time_equal("abc", "abd"));
  EXPECT_FALSE(constant_time_equal("abc", "ab"));
  EXPECT_TRUE(constant_time_equal("", ""));
}

TEST(MasterAuthn, BearerTokens) {
  Authenticator a;
  a.set_tokens(parse_token_file("secret1,alice,u1,\"dev\"\nsecret2,bob,u2\n"));
  auto r = a.authenticate("Bearer secret1", nullptr);
  ASSERT_TRUE(r.identity);
  EXPECT_EQ(r.identity->user, "alice");
  EXPECT_EQ(r.identity->method, "token");
  EXPECT_EQ(r.identity->groups, (std::vector<std::string>{"dev", "system:authenticated"}));
  EXPECT_EQ(a.authenticate("bearer secret2", nullptr).identity->user, "bob");
  for (const char* bad :
       {"Bearer secret3", "Bearer secret", "Bearer secret1x", "Basic secret1", "Bearer ", "secret1"}) {
    auto x = a.authenticate(bad, nullptr);
    EXPECT_FALSE(x.identity) << bad;
    EXPECT_EQ(x.error.find("secret"), std::string::npos) << x.error;
  }
}

TEST(MasterAuthn, AnonymousRefused) {
  Authenticator a;
  auto r = a.authenticate("", nullptr);
  EXPECT_FALSE(r.identity);
  EXPECT_NE(r.error.find("anonymous"), std::string::npos);
}

TEST(MasterAuthn, BadClientCaRefused) {
  Authenticator a;
  EXPECT_THROW(a.set_client_ca_pem("not a pem"), shimlet::Error);
  EXPECT_FALSE(a.has_client_ca());
}

namespace {

using shimlet::PkeyPtr;
using shimlet::SslCtxPtr;
using shimlet::SslPtr;
using shimlet::X509Ptr;

PkeyPtr ec_key() { return PkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256")); }

// subject: (NID, value) entries in order; issued by issuer (self-signed when null).
X509Ptr make_cert(EVP_PKEY* key, const std::vector<std::pair<int, std::string>>& subject, X509* issuer,
                  EVP_PKEY* issuer_key) {
  X509Ptr c(X509_new());
  X509_set_version(c.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(c.get()), 1);
  X509_gmtime_adj(X509_getm_notBefore(c.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(c.get()), 3600);
  X509_NAME* n = X509_get_subject_name(c.get());
  for (const auto& [nid, v] : subject)
    X509_NAME_add_entry_by_NID(n, nid, MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(v.c_str()), -1, -1, 0);
  X509_set_issuer_name(c.get(), issuer ? X509_get_subject_name(issuer) : n);
  X509_set_pubkey(c.get(), key);
  if (!issuer) {
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, nullptr, NID_basic_constraints, "critical,CA:TRUE");
    X509_add_ext(c.get(), ext, -1);
    X509_EXTENSION_free(ext);
  }
  X509_sign(c.get(), issuer_key, EVP_sha256());
  return c;
}

std::string pem_of(X509* c) {
  shimlet::BioPtr b(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509(b.get(), c);
  char* data = nullptr;
  long n = BIO_get_mem_data(b.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

// Authenticates a client presenting a certificate with this subject (signed
// by a fresh CA the authenticator trusts) over an in-memory TLS handshake.
AuthResult authenticate_subject(const std::vector<std::pair<int, std::string>>& subject) {
  PkeyPtr ca_key = ec_key(), key = ec_key();
  X509Ptr ca = make_cert(ca_key.get(), {{NID_commonName, "test-ca"}}, nullptr, ca_key.get());
  X509Ptr leaf = make_cert(key.get(), subject, ca.get(), ca_key.get());
  Authenticator a;
  a.set_client_ca_pem(pem_of(ca.get()));
  SslCtxPtr sctx(SSL_CTX_new(TLS_server_method())), cctx(SSL_CTX_new(TLS_client_method()));
  SSL_CTX_use_certificate(sctx.get(), ca.get());
  SSL_CTX_use_PrivateKey(sctx.get(), ca_key.get());
  SSL_CTX_set_verify(sctx.get(), SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                     [](int, X509_STORE_CTX*) { return 1; });
  SSL_CTX_use_certificate(cctx.get(), leaf.get());
  SSL_CTX_use_PrivateKey(cctx.get(), key.get());
  SslPtr s(SSL_new(sctx.get())), c(SSL_new(cctx.get()));
  BIO *sb = nullptr, *cb = nullptr;
  BIO_new_bio_pair(&sb, 0, &cb, 0);
  SSL_set_bio(s.get(), sb, sb);
  SSL_set_bio(c.get(), cb, cb);
  SSL_set_accept_state(s.get());
  SSL_set_connect_state(c.get());
  for (int i = 0; i < 20; ++i) {
    int cr = SSL_do_handshake(c.get()), sr = SSL_do_handshake(s.get());
    if (cr == 1 && sr == 1) break;
  }
  return a.authenticate("", s.get());
}

}  // namespace

// kube-apiserver (Go's pkix.Name) takes the last CN of a subject; the first
// was taken here, so one certificate named two users: refuse the ambiguity.
TEST(MasterAuthn, ClientCertificateWithTwoCommonNamesRefused) {
  auto r = authenticate_subject({{NID_commonName, "system:node:n2"}, {NID_commonName, "alice"}});
  EXPECT_FALSE(r.identity);
  EXPECT_NE(r.error.find("more than one common name"), std::string::npos) << r.error;
}
