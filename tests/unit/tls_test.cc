// proto/tls: the in-memory client identity (no PEM round trip) and the
// deferred identity used by shimctl --local, through a real TLS 1.3 handshake.
#include "proto/tls.h"

#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <sys/socket.h>

#include <thread>

#include "common/ed25519.h"
#include "common/error.h"
#include "common/fd.h"
#include "ticket/ticket.h"

using namespace shimlet;

namespace {

X509* parse_cert(const std::string& pem) {
  BIO* b = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  X509* x = PEM_read_bio_X509(b, nullptr, nullptr, nullptr);
  BIO_free(b);
  return x;
}

// Runs a blocking handshake between client and server SSL objects over a
// socketpair; returns the server's view of the client certificate's jkt.
std::string handshake(SSL_CTX* client_ctx, const proto::Identity& server_id, std::string* client_error) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) throw sys_error("socketpair");
  Fd cfd(sv[0]), sfd(sv[1]);
  proto::SslCtx sctx = proto::make_server_ctx(server_id.cert_pem, server_id.key_pem);
  SSL* s = SSL_new(sctx.get());
  SSL* c = SSL_new(client_ctx);
  SSL_set_fd(s, sfd.get());
  SSL_set_fd(c, cfd.get());
  int crc = 0;
  std::thread t([&] { crc = SSL_connect(c); });
  int src = SSL_accept(s);
  if (src != 1) SSL_shutdown(s), cfd.reset();  // unblock the client
  t.join();
  std::string jkt;
  if (src == 1 && SSL_get0_peer_certificate(s)) jkt = proto::jkt_of_cert(SSL_get0_peer_certificate(s));
  if (crc != 1 && client_error) *client_error = openssl_error();
  SSL_free(c);
  SSL_free(s);
  return jkt;
}

}  // namespace

TEST(TlsIdentity, GeneratedIdentityIsParsedOnceAndMatchesItsPem) {
  proto::Identity id = proto::generate_identity("unit");
  ASSERT_TRUE(id.key && id.cert);
  EXPECT_EQ(EVP_PKEY_get_base_id(id.key.get()), EVP_PKEY_ED25519);
  EXPECT_EQ(X509_check_private_key(id.cert.get(), id.key.get()), 1);
  X509* from_pem = parse_cert(id.cert_pem);
  ASSERT_NE(from_pem, nullptr);
  EXPECT_EQ(X509_cmp(from_pem, id.cert.get()), 0);
  // Self-signed with its own key, and the key field is plain RFC 8410 Ed25519.
  EXPECT_EQ(X509_verify(from_pem, X509_get0_pubkey(from_pem)), 1);
  // jkt three ways: raw bytes, the certificate, and the old PEM route.
  std::string jkt = proto::jkt_of_identity(id);
  EXPECT_EQ(jkt.size(), 43u);
  EXPECT_EQ(jkt, proto::jkt_of_cert(from_pem));
  EXPECT_EQ(jkt, ticket::jkt_of_public_pem(ticket::PrivateKey::from_pem(id.key_pem).public_pem()));
  // An identity read from PEM files (no parsed forms) has the same jkt.
  EXPECT_EQ(proto::jkt_of_identity(proto::Identity(id.key_pem, id.cert_pem)), jkt);
  X509_free(from_pem);
}

TEST(TlsIdentity, TwoIdentitiesDiffer) {
  proto::Identity a = proto::generate_identity("a"), b = proto::generate_identity("b");
  EXPECT_NE(proto::jkt_of_identity(a), proto::jkt_of_identity(b));
  EXPECT_NE(a.key_pem, b.key_pem);
}

TEST(TlsIdentity, ServerSeesTheClientKeyInMemoryAndFromPem) {
  proto::Identity server = proto::generate_identity("server");
  proto::Identity client = proto::generate_identity("client");
  std::string jkt = proto::jkt_of_identity(client);
  proto::SslCtx mem = proto::make_client_ctx(client);
  EXPECT_EQ(handshake(mem.get(), server, nullptr), jkt);
  proto::SslCtx pem = proto::make_client_ctx(proto::Identity(client.key_pem, client.cert_pem));
  EXPECT_EQ(handshake(pem.get(), server, nullptr), jkt);
}

TEST(TlsIdentity, DeferredIdentityIsInstalledWhenTheServerAsks) {
  proto::Identity server = proto::generate_identity("server");
  struct State {
    proto::Identity id;
    int calls = 0;
  } st;
  proto::SslCtx ctx = proto::make_client_ctx_deferred();
  SSL_CTX_set_cert_cb(
      ctx.get(),
      [](SSL* ssl, void* arg) {
        auto* st = static_cast<State*>(arg);
        st->calls++;
        st->id = proto::generate_identity("late");
        proto::use_client_identity(ssl, st->id);
        return 1;
      },
      &st);
  std::string seen = handshake(ctx.get(), server, nullptr);
  EXPECT_EQ(st.calls, 1);
  EXPECT_EQ(seen, proto::jkt_of_identity(st.id));
}

TEST(TlsIdentity, UseClientIdentityRefusesPemOnlyIdentity) {
  proto::Identity id = proto::generate_identity("x");
  proto::SslCtx ctx = proto::make_client_ctx_deferred();
  SSL* ssl = SSL_new(ctx.get());
  EXPECT_THROW(proto::use_client_identity(ssl, proto::Identity(id.key_pem, id.cert_pem)), Error);
  EXPECT_NO_THROW(proto::use_client_identity(ssl, id));
  SSL_free(ssl);
}
