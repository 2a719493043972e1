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
