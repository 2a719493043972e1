// TLS 1.3 setup shared by the session (server), shimctl and the master:
// Ed25519 identities, self-signed certificates and SPKI pins.
#pragma once
#include <openssl/ssl.h>

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "common/openssl.h"

namespace shimlet::proto {

using SslCtx = SslCtxPtr;

struct Identity {
  Identity() = default;
  Identity(std::string key, std::string cert) : key_pem(std::move(key)), cert_pem(std::move(cert)) {}
  std::string key_pem;   // PKCS#8 Ed25519 private key
  std::string cert_pem;  // self-signed X.509
  // The same key and certificate already parsed (set by generate_identity;
  // null when the identity came from PEM files): shimctl mints one identity
  // per run and must not pay OpenSSL 3.0's decoder (~1 ms a key) to read back
  // what it just made.
  std::shared_ptr<EVP_PKEY> key;
  std::shared_ptr<X509> cert;
};
// Fresh Ed25519 key and a self-signed certificate (CN = common_name, valid
// from one hour ago for `days`).
Identity generate_identity(const std::string& common_name, int days = 3650);
// base64url(SHA-256(SPKI DER)) of the identity's key: the cnf.jkt a ticket
// binds it with (same value as jkt_of_cert on its certificate).
std::string jkt_of_identity(const Identity& id);

// "sha256/" + base64(SHA-256(SPKI DER)) of a certificate.
std::string pin_of_cert_pem(std::string_view cert_pem);
std::string pin_of_cert(X509* cert);
// base64url(SHA-256(SPKI DER)): the ticket's cnf.jkt of a certificate's key.
std::string jkt_of_cert(X509* cert);

// Server: TLS 1.3 only, ALPN h2 (and optionally http/1.1), requests a client
// certificate but accepts any (tickets bind it through cnf.jkt).
SslCtx make_server_ctx(const std::string& cert_pem, const std::string& key_pem, bool allow_http1 = false);
// Client: TLS 1.3 only, ALPN h2, presents identity; verification is by pin
// (pin_mismatch after the handshake), never by CA.
SslCtx make_client_ctx(const Identity& client);
// The same without an identity yet: the caller installs one per connection
// with use_client_identity before the server's CertificateRequest is
// answered (SSL_CTX_set_cert_cb), so the key can be made during the handshake.
SslCtx make_client_ctx_deferred();
// Installs identity on one client connection; throws Error.
void use_client_identity(SSL* ssl, const Identity& client);
// After the handshake (inside the caller's TLS callback, so a result, not a
// throw): why the peer certificate does not match pin, nullopt when it does.
std::optional<std::string> pin_mismatch(SSL* ssl, const std::string& pin);

}  // namespace shimlet::proto
