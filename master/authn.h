// Authentication for shimlet-master: bearer tokens from a kube-apiserver
// --token-auth-file (CSV) and client certificates verified against
// --client-ca-file (CN = user, O = groups). Anonymous requests are refused.
#pragma once
#include <openssl/ssl.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace shimlet::master {

struct Identity {
  std::string user, uid;
  std::vector<std::string> groups;  // always includes "system:authenticated"
  std::string method;               // "token" | "x509"
};

// One token-file entry (token,user,uid[,"group1,group2"]).
struct TokenEntry {
  std::string token, user, uid;
  std::vector<std::string> groups;
};

// Parses the kube-apiserver static token file format: CSV lines
// `token,user,uid,"group1,group2,..."`, the groups column optional, fields may
// be double-quoted (with "" escaping). Blank lines and lines starting with '#'
// are skipped. Throws shimlet::Error("token file line N: ...") on bad input;
// duplicate tokens are an error.
std::vector<TokenEntry> parse_token_file(std::string_view text);

// Constant-time equality (length leaks, content does not).
bool constant_time_equal(std::string_view a, std::string_view b);

// Result of authentication: identity, or a refusal reason.
struct AuthResult {
  std::optional<Identity> identity;
  std::string error;  // when refused: one line, never contains the credential
};

class Authenticator {
 public:
  // Either source may be empty ("" = not configured).
  void load_token_file(const std::string& path);
  void set_tokens(std::vector<TokenEntry> tokens);
  void load_client_ca_file(const std::string& path);
  void set_client_ca_pem(std::string_view pem);
  bool has_client_ca() const { return store_ != nullptr; }

  // authorization header value (may be empty) and the TLS connection (may be
  // null). A bearer token takes precedence (as kube-apiserver's union
  // authenticator tries the request header first); a present but invalid
  // token is refused rather than falling back to the certificate.
  AuthResult authenticate(std::string_view authorization, SSL* ssl) const;
  // The certificate part alone (peer chain verified against the client CA).
  AuthResult authenticate_cert(SSL* ssl) const;

 private:
  std::vector<TokenEntry> tokens_;
  std::shared_ptr<X509_STORE> store_;
};

}  // namespace shimlet::master
