#include <gtest/gtest.h>

#include "common/error.h"
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
