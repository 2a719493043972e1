#include "common/yaml.h"

#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include "common/error.h"

using shimlet::Error;
namespace yaml = shimlet::yaml;

TEST(Yaml, MapsSequencesScalarsAndNulls) {
  auto docs = yaml::load_all("a: 1\nb: [x, \"y\"]\nc:\nd: ~\ne: 'null'\n---\n- k: v\n");
  ASSERT_EQ(docs.size(), 2u);
  const auto& d = docs[0];
  ASSERT_TRUE(d.is_map());
  EXPECT_EQ(d.get("a")->scalar, "1");
  ASSERT_TRUE(d.get("b")->is_seq());
  EXPECT_EQ(d.get("b")->items[1].scalar, "y");
  EXPECT_TRUE(d.get("c")->is_null());
  EXPECT_TRUE(d.get("d")->is_null());
  EXPECT_TRUE(d.get("e")->is_scalar());  // quoted "null" is text
  EXPECT_EQ(d.get("missing"), nullptr);
  EXPECT_EQ(docs[1].items[0].get("k")->scalar, "v");
}

TEST(Yaml, EmptyStreamAndEmptyDocument) {
  EXPECT_TRUE(yaml::load_all("").empty());
  auto docs = yaml::load_all("---\n");
  ASSERT_EQ(docs.size(), 1u);
  EXPECT_TRUE(docs[0].is_null());
}

TEST(Yaml, RefusesAnchorsAliasesDuplicatesAndComplexKeys) {
  EXPECT_THROW(yaml::load_all("a: &x 1\nb: *x\n"), Error);
  EXPECT_THROW(yaml::load_all("a: 1\na: 2\n"), Error);
  EXPECT_THROW(yaml::load_all("? [a]\n: 1\n"), Error);
  EXPECT_THROW(yaml::load_all("a: [1, 2\n"), Error);
}

TEST(Yaml, BoundsDepthAndNodes) {
  std::string deep(100, '[');
  deep += std::string(100, ']');
  EXPECT_THROW(yaml::load_all(deep), Error);
  yaml::Limits small;
  small.max_nodes = 10;
  EXPECT_THROW(yaml::load_all("[1,2,3,4,5,6,7,8,9,10,11,12]", small), Error);
}

// Inputs on which yaml-cpp 0.7 never returned (found by master_rbac_fuzz).
TEST(Yaml, FormerYamlCppHangsReturnAtOnce) {
  for (const char* name : {"yamlcpp-hang-comma", "anchor-hang"}) {
    std::ifstream in(std::string(SHIMLET_SOURCE_DIR) + "/tests/fuzz/corpus/master_rbac/" + name, std::ios::binary);
    ASSERT_TRUE(in) << name;
    std::stringstream ss;
    ss << in.rdbuf();
    auto t0 = std::chrono::steady_clock::now();
    try {
      yaml::load_all(ss.str());
    } catch (const Error&) {
    }
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1)) << name;
  }
}
