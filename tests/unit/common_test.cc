#include <fcntl.h>
#include <gtest/gtest.h>

#include "common/base64.h"
#include "common/fd.h"

using namespace shimlet;

TEST(Base64, RoundTripsUrlAlphabetWithoutPadding) {
  for (size_t n = 0; n < 64; n++) {
    std::string in = random_bytes(n);
    std::string enc = base64url_encode(in);
    EXPECT_EQ(enc.find_first_of("+/="), std::string::npos);
    auto dec = base64url_decode(enc);
    ASSERT_TRUE(dec.has_value()) << enc;
    EXPECT_EQ(*dec, in);
  }
}

TEST(Base64, RejectsBadInput) {
  EXPECT_FALSE(base64url_decode("a").has_value());
  EXPECT_FALSE(base64url_decode("ab+c").has_value());
  EXPECT_FALSE(base64_decode("a*==").has_value());
  EXPECT_EQ(*base64_decode("aGk="), "hi");
}

TEST(Fd, ClosesOnDestruction) {
  int raw;
  {
    Pipe p = make_pipe();
    raw = p.read.get();
    EXPECT_GE(raw, 0);
  }
  EXPECT_EQ(fcntl(raw, F_GETFD), -1);
}

#include <openssl/pem.h>

#include "common/ed25519.h"

namespace {
std::string pem_of(EVP_PKEY* k, bool priv) {
  BIO* b = BIO_new(BIO_s_mem());
  if (priv) PEM_write_bio_PrivateKey(b, k, nullptr, nullptr, 0, nullptr, nullptr);
  else PEM_write_bio_PUBKEY(b, k);
  char* d;
  long n = BIO_get_mem_data(b, &d);
  std::string s(d, static_cast<size_t>(n));
  BIO_free(b);
  return s;
}
}  // namespace

TEST(Ed25519Pem, FastPathLoadsTheSameKeysAsOpenSSL) {
  EVP_PKEY* k = EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519");
  ASSERT_NE(k, nullptr);
  EVP_PKEY* pub = ed25519_public_from_pem(pem_of(k, false));
  EVP_PKEY* priv = ed25519_private_from_pem(pem_of(k, true));
  ASSERT_NE(pub, nullptr);
  ASSERT_NE(priv, nullptr);
  EXPECT_EQ(EVP_PKEY_eq(k, pub), 1);
  EXPECT_EQ(EVP_PKEY_eq(k, priv), 1);
  EVP_PKEY_free(pub);
  EVP_PKEY_free(priv);
  EVP_PKEY_free(k);
}

TEST(Ed25519Pem, OtherShapesFallBack) {
  EXPECT_EQ(ed25519_public_from_pem("garbage"), nullptr);
  EXPECT_EQ(ed25519_private_from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), nullptr);
  EVP_PKEY* ec = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
  ASSERT_NE(ec, nullptr);
  EXPECT_EQ(ed25519_public_from_pem(pem_of(ec, false)), nullptr);
  EXPECT_EQ(ed25519_private_from_pem(pem_of(ec, true)), nullptr);
  EVP_PKEY_free(ec);
}

TEST(Ed25519Pem, GeneratedKeysRoundTripThroughOpenSSLReaders) {
  EVP_PKEY* k = ed25519_generate();
  std::string priv = ed25519_private_pem(k), pub = ed25519_public_pem(k);
  BIO* b = BIO_new_mem_buf(priv.data(), static_cast<int>(priv.size()));
  EVP_PKEY* back = PEM_read_bio_PrivateKey(b, nullptr, nullptr, nullptr);
  BIO_free(b);
  ASSERT_NE(back, nullptr) << priv;
  EXPECT_EQ(EVP_PKEY_eq(k, back), 1);
  b = BIO_new_mem_buf(pub.data(), static_cast<int>(pub.size()));
  EVP_PKEY* backpub = PEM_read_bio_PUBKEY(b, nullptr, nullptr, nullptr);
  BIO_free(b);
  ASSERT_NE(backpub, nullptr) << pub;
  EXPECT_EQ(EVP_PKEY_eq(k, backpub), 1);
  EVP_PKEY_free(back);
  EVP_PKEY_free(backpub);
  EVP_PKEY_free(k);
}
