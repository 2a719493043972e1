#include "master/authn.h"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>
#include <strings.h>

#include <set>
#include <sstream>

#include "common/base64.h"
#include "common/error.h"
#include "common/file.h"
#include "common/openssl.h"
#include "proto/tls.h"

namespace shimlet::master {
namespace {

constexpr size_t kMaxTokenFile = 16 << 20;
constexpr size_t kMaxLineFields = 64;

// One CSV record (RFC 4180 quoting) from a single line; kube-apiserver reads
// the file with encoding/csv, whose quoted fields cannot span our lines here
// because tokens/users never contain newlines.
std::vector<std::string> split_csv_line(std::string_view line, size_t lineno) {
  std::vector<std::string> out;
  std::string cur;
  size_t i = 0;
  auto fail = [&](const std::string& why) { throw Error("token file line " + std::to_string(lineno) + ": " + why); };
  while (true) {
    cur.clear();
    if (i < line.size() && line[i] == '"') {
      ++i;
      bool closed = false;
      while (i < line.size()) {
        if (line[i] == '"') {
          if (i + 1 < line.size() && line[i + 1] == '"') {
            cur += '"';
            i += 2;
            continue;
          }
          closed = true;
          ++i;
          break;
        }
        cur += line[i++];
      }
      if (!closed) fail("unterminated quoted field");
      if (i < line.size() && line[i] != ',') fail("unexpected character after quoted field");
    } else {
      while (i < line.size() && line[i] != ',') {
        if (line[i] == '"') fail("bare quote in unquoted field");
        cur += line[i++];
      }
    }
    out.push_back(cur);
    if (out.size() > kMaxLineFields) fail("too many fields");
    if (i >= line.size()) break;
    ++i;  // the comma
  }
  return out;
}

std::string trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\t')) ++b;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t')) --e;
  return std::string(s.substr(b, e - b));
}

void add_authenticated(Identity& id) {
  for (auto& g : id.groups)
    if (g == "system:authenticated") return;
  id.groups.push_back("system:authenticated");
}

}  // namespace

std::vector<TokenEntry> parse_token_file(std::string_view text) {
  if (text.size() > kMaxTokenFile) throw Error("token file too large");
  std::vector<TokenEntry> out;
  std::set<std::string> seen;
  size_t lineno = 0, pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    std::string_view line = text.substr(pos, nl == std::string_view::npos ? std::string_view::npos : nl - pos);
    pos = nl == std::string_view::npos ? text.size() : nl + 1;
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    std::string t = trim(line);
    if (t.empty() || t[0] == '#') continue;
    auto f = split_csv_line(line, lineno);
    auto fail = [&](const std::string& why) { throw Error("token file line " + std::to_string(lineno) + ": " + why); };
    if (f.size() < 3) fail("need at least token,user,uid");
    TokenEntry e{trim(f[0]), trim(f[1]), trim(f[2]), {}};
    if (e.token.empty()) fail("empty token");
    if (e.user.empty()) fail("empty user");
    for (char c : e.token)
      if (static_cast<unsigned char>(c) <= ' ' || c == 0x7f) fail("token contains whitespace or control characters");
    if (f.size() >= 4) {
      // kube-apiserver: the 4th column is a comma-separated group list; further
      // columns are ignored.
      std::string_view g = f[3];
      size_t p = 0;
      while (p <= g.size()) {
        size_t c = g.find(',', p);
        std::string one = trim(g.substr(p, c == std::string_view::npos ? std::string_view::npos : c - p));
        if (!one.empty()) e.groups.push_back(one);
        if (c == std::string_view::npos) break;
        p = c + 1;
      }
    }
    if (!seen.insert(e.token).second) fail("duplicate token");
    out.push_back(std::move(e));
  }
  return out;
}

bool constant_time_equal(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  if (a.empty()) return true;
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

void Authenticator::load_token_file(const std::string& path) {
  try {
    set_tokens(parse_token_file(read_regular_file(path, kMaxTokenFile)));
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
}

void Authenticator::set_tokens(std::vector<TokenEntry> tokens) {
  // Keep only SHA-256 digests in memory: equal-length, constant-time compares.
  for (auto& t : tokens) t.token = sha256(t.token);
  tokens_ = std::move(tokens);
}

void Authenticator::load_client_ca_file(const std::string& path) {
  try {
    set_client_ca_pem(read_regular_file(path, 4 << 20));
  } catch (const Error& e) {
    throw Error(std::string("client CA ") + e.what());
  }
}

void Authenticator::set_client_ca_pem(std::string_view pem) {
  std::shared_ptr<X509_STORE> store(X509_STORE_new(), X509_STORE_free);
  if (!store) throw Error("X509_STORE_new: " + openssl_error());
  BioPtr b(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!b) throw Error("client CA bundle: " + openssl_error());
  int n = 0;
  while (X509Ptr c = X509Ptr(PEM_read_bio_X509(b.get(), nullptr, nullptr, nullptr))) {
    if (X509_STORE_add_cert(store.get(), c.get()) != 1) throw Error("client CA bundle: " + openssl_error());
    ++n;
  }
  ERR_clear_error();  // the loop ends on a "no start line" error
  if (n == 0) throw Error("no certificates in client CA bundle");
  store_ = std::move(store);
}

AuthResult Authenticator::authenticate_cert(SSL* ssl) const {
  X509* leaf = ssl ? SSL_get0_peer_certificate(ssl) : nullptr;
  if (!leaf) return {std::nullopt, "no credentials (anonymous requests are refused)"};
  if (!store_) return {std::nullopt, "client certificate presented but no --client-ca-file is configured"};
  X509StoreCtxPtr ctx(X509_STORE_CTX_new());
  if (!ctx) return {std::nullopt, "certificate verification setup failed"};
  // Intermediates the client sent (the server side chain excludes the leaf).
  STACK_OF(X509)* chain = SSL_get_peer_cert_chain(ssl);
  if (X509_STORE_CTX_init(ctx.get(), store_.get(), leaf, chain) != 1)
    return {std::nullopt, "certificate verification setup failed"};
  X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_CLIENT);
  if (X509_verify_cert(ctx.get()) != 1) {
    int err = X509_STORE_CTX_get_error(ctx.get());
    ERR_clear_error();
    return {std::nullopt, std::string("client certificate rejected: ") + X509_verify_cert_error_string(err)};
  }
  Identity id;
  id.method = "x509";
  X509_NAME* subj = X509_get_subject_name(leaf);
  // One CN only: kube-apiserver takes the last of several, so a first one
  // here would make one certificate name two users.
  int cn = X509_NAME_get_index_by_NID(subj, NID_commonName, -1);
  if (cn >= 0 && X509_NAME_get_index_by_NID(subj, NID_commonName, cn) >= 0)
    return {std::nullopt, "client certificate has more than one common name"};
  if (cn >= 0) {
    ASN1_STRING* s = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subj, cn));
    unsigned char* utf8 = nullptr;
    int n = ASN1_STRING_to_UTF8(&utf8, s);
    if (n >= 0) id.user.assign(reinterpret_cast<char*>(utf8), static_cast<size_t>(n));
    OPENSSL_free(utf8);
  }
  for (int i = -1; (i = X509_NAME_get_index_by_NID(subj, NID_organizationName, i)) >= 0;) {
    ASN1_STRING* s = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subj, i));
    unsigned char* utf8 = nullptr;
    int n = ASN1_STRING_to_UTF8(&utf8, s);
    if (n > 0) id.groups.emplace_back(reinterpret_cast<char*>(utf8), static_cast<size_t>(n));
    OPENSSL_free(utf8);
  }
  if (id.user.empty()) return {std::nullopt, "client certificate has no common name"};
  add_authenticated(id);
  return {std::move(id), ""};
}

AuthResult Authenticator::authenticate(std::string_view authorization, SSL* ssl) const {
  if (!authorization.empty()) {
    constexpr std::string_view kBearer = "Bearer ";
    if (authorization.size() <= kBearer.size() ||
        strncasecmp(authorization.data(), kBearer.data(), kBearer.size()) != 0)
      return {std::nullopt, "unsupported authorization scheme (want Bearer)"};
    std::string_view tok = authorization.substr(kBearer.size());
    while (!tok.empty() && tok.front() == ' ') tok.remove_prefix(1);
    while (!tok.empty() && tok.back() == ' ') tok.remove_suffix(1);
    std::string digest = sha256(tok);
    const TokenEntry* hit = nullptr;
    // Compare with every entry (no early exit) so timing says nothing.
    for (const auto& e : tokens_)
      if (constant_time_equal(e.token, digest) && !hit) hit = &e;
    if (!hit) return {std::nullopt, "invalid bearer token"};
    Identity id{hit->user, hit->uid, hit->groups, "token"};
    add_authenticated(id);
    return {std::move(id), ""};
  }
  return authenticate_cert(ssl);
}

}  // namespace shimlet::master
