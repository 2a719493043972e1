#include "proto/tls.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <string.h>

#include <stdexcept>

#include "common/base64.h"
#include "common/ed25519.h"
#include "common/error.h"

namespace shimlet::proto {
namespace {

X509Ptr cert_from_pem(std::string_view pem) {
  BioPtr b(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  X509Ptr c(PEM_read_bio_X509(b.get(), nullptr, nullptr, nullptr));
  if (!c) throw Error("cannot parse certificate PEM: " + openssl_error());
  return c;
}

std::string spki_der(X509* cert) {
  X509_PUBKEY* pk = X509_get_X509_PUBKEY(cert);
  unsigned char* der = nullptr;
  int n = i2d_X509_PUBKEY(pk, &der);
  if (n <= 0) throw Error("cannot encode certificate public key: " + openssl_error());
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(n));
  OPENSSL_free(der);
  return out;
}

int accept_any_cert(int, X509_STORE_CTX*) { return 1; }

int select_alpn(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in, unsigned int inlen,
                void* arg) {
  bool allow_http1 = arg != nullptr;
  // Prefer h2; http/1.1 only when the server allows it (master, kubectl upgrades).
  for (const char* want : {"h2", "http/1.1"}) {
    if (std::string_view(want) == "http/1.1" && !allow_http1) break;
    size_t wl = strlen(want);
    for (unsigned i = 0; i < inlen;) {
      unsigned l = in[i];
      if (i + 1 + l > inlen) break;
      if (l == wl && memcmp(in + i + 1, want, wl) == 0) {
        *out = in + i + 1;
        *outlen = static_cast<unsigned char>(l);
        return SSL_TLSEXT_ERR_OK;
      }
      i += 1 + l;
    }
  }
  return SSL_TLSEXT_ERR_ALERT_FATAL;
}

void use_identity(SSL_CTX* ctx, const std::string& cert_pem, const std::string& key_pem) {
  X509Ptr cert = cert_from_pem(cert_pem);
  PkeyPtr key(ed25519_private_from_pem(key_pem));
  if (!key) {
    BioPtr kb(BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size())));
    key.reset(PEM_read_bio_PrivateKey(kb.get(), nullptr, nullptr, nullptr));
  }
  if (!key) throw Error("cannot parse private key PEM: " + openssl_error());
  if (SSL_CTX_use_certificate(ctx, cert.get()) != 1 || SSL_CTX_use_PrivateKey(ctx, key.get()) != 1 ||
      SSL_CTX_check_private_key(ctx) != 1)
    throw Error("cannot use TLS identity: " + openssl_error());
}

SslCtx base_ctx(const SSL_METHOD* m) {
  SslCtx ctx(SSL_CTX_new(m));
  if (!ctx) throw Error("SSL_CTX_new: " + openssl_error());
  SSL_CTX_set_min_proto_version(ctx.get(), TLS1_3_VERSION);
  SSL_CTX_set_options(ctx.get(), SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
  // Large writes: let SSL_write take partial buffers and move them.
  SSL_CTX_set_mode(ctx.get(), SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  return ctx;
}

}  // namespace

Identity generate_identity(const std::string& common_name, int days) {
  PkeyPtr key(ed25519_generate());
  std::string spki = ed25519_spki_der(key.get());
  X509Ptr cert(X509_new());
  if (!cert || spki.empty()) throw Error("cannot create a certificate: " + openssl_error());
  X509_set_version(cert.get(), 2);
  std::string serial = random_bytes(16);
  serial[0] &= 0x7f;
  BIGNUM* bn = BN_bin2bn(reinterpret_cast<const unsigned char*>(serial.data()), 16, nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert.get()));
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), static_cast<long>(days) * 86400);
  // The public key goes in as its raw 32 bytes (RFC 8410: no parameters):
  // X509_set_pubkey would run OpenSSL 3.0's encoder and then its decoder on it.
  auto* raw = static_cast<unsigned char*>(OPENSSL_malloc(32));
  if (!raw) throw Error("OPENSSL_malloc failed");
  memcpy(raw, spki.data() + spki.size() - 32, 32);
  if (X509_PUBKEY_set0_param(X509_get_X509_PUBKEY(cert.get()), OBJ_nid2obj(NID_ED25519), V_ASN1_UNDEF, nullptr, raw,
                             32) != 1) {
    OPENSSL_free(raw);
    throw Error("cannot set the certificate's public key: " + openssl_error());
  }
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(common_name.c_str()), -1,
                             -1, 0);
  X509_set_issuer_name(cert.get(), name);
  if (X509_sign(cert.get(), key.get(), nullptr) <= 0) throw Error("X509_sign: " + openssl_error());
  // Read the signed DER back once, so the X509 carries its decoded public key
  // (SSL_CTX_use_certificate needs it) and is exactly what the peer will see.
  unsigned char* der = nullptr;
  int n = i2d_X509(cert.get(), &der);
  if (n <= 0) throw Error("cannot encode certificate: " + openssl_error());
  const unsigned char* p = der;
  X509Ptr parsed(d2i_X509(nullptr, &p, n));
  OPENSSL_free(der);
  if (!parsed || EVP_PKEY_eq(X509_get0_pubkey(parsed.get()), key.get()) != 1)
    throw Error("generated certificate does not carry its key: " + openssl_error());
  BioPtr cb(BIO_new(BIO_s_mem()));
  if (!cb || PEM_write_bio_X509(cb.get(), parsed.get()) != 1) throw Error("PEM encode: " + openssl_error());
  Identity id(ed25519_private_pem(key.get()), bio_string(cb.get()));
  id.key = std::shared_ptr<EVP_PKEY>(key.release(), EVP_PKEY_free);
  id.cert = std::shared_ptr<X509>(parsed.release(), X509_free);
  return id;
}

std::string jkt_of_identity(const Identity& id) {
  if (std::string der = ed25519_spki_der(id.key.get()); !der.empty()) return base64url_encode(sha256(der));
  if (id.cert) return jkt_of_cert(id.cert.get());
  return jkt_of_cert(cert_from_pem(id.cert_pem).get());
}

std::string pin_of_cert(X509* cert) { return "sha256/" + base64_encode(sha256(spki_der(cert))); }
std::string pin_of_cert_pem(std::string_view pem) { return pin_of_cert(cert_from_pem(pem).get()); }
std::string jkt_of_cert(X509* cert) { return base64url_encode(sha256(spki_der(cert))); }

SslCtx make_server_ctx(const std::string& cert_pem, const std::string& key_pem, bool allow_http1) {
  SslCtx ctx = base_ctx(TLS_server_method());
  use_identity(ctx.get(), cert_pem, key_pem);
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, accept_any_cert);
  SSL_CTX_set_alpn_select_cb(ctx.get(), select_alpn, allow_http1 ? ctx.get() : nullptr);
  SSL_CTX_set_session_cache_mode(ctx.get(), SSL_SESS_CACHE_OFF);
  SSL_CTX_set_num_tickets(ctx.get(), 0);  // one connection per session: no resumption
  return ctx;
}

SslCtx make_client_ctx(const Identity& client) {
  SslCtx ctx = make_client_ctx_deferred();
  if (client.key && client.cert) {
    if (SSL_CTX_use_certificate(ctx.get(), client.cert.get()) != 1 ||
        SSL_CTX_use_PrivateKey(ctx.get(), client.key.get()) != 1 || SSL_CTX_check_private_key(ctx.get()) != 1)
      throw Error("cannot use TLS identity: " + openssl_error());
  } else {
    use_identity(ctx.get(), client.cert_pem, client.key_pem);
  }
  return ctx;
}

void use_client_identity(SSL* ssl, const Identity& client) {
  if (!client.key || !client.cert) throw Error("TLS identity was not generated in this process");
  if (SSL_use_certificate(ssl, client.cert.get()) != 1 || SSL_use_PrivateKey(ssl, client.key.get()) != 1 ||
      SSL_check_private_key(ssl) != 1)
    throw Error("cannot use TLS identity: " + openssl_error());
}

SslCtx make_client_ctx_deferred() {
  SslCtx ctx = base_ctx(TLS_client_method());
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, accept_any_cert);  // pin checked after handshake
  // One connection per context: nothing to resume, so keep no sessions.
  SSL_CTX_set_session_cache_mode(ctx.get(), SSL_SESS_CACHE_OFF);
  static const unsigned char alpn[] = {2, 'h', '2'};
  SSL_CTX_set_alpn_protos(ctx.get(), alpn, sizeof alpn);
  return ctx;
}

std::optional<std::string> pin_mismatch(SSL* ssl, const std::string& pin) {
  X509* peer = SSL_get0_peer_certificate(ssl);
  if (!peer) return "shim presented no certificate";
  std::string got = pin_of_cert(peer);
  if (got != pin) return "shim certificate pin mismatch: expected " + pin + ", got " + got;
  return std::nullopt;
}

}  // namespace shimlet::proto
