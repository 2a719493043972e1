// shimlet-session's command line (session/session_args.h): what the shim
// passes is read back exactly; a bad command line is refused with a message
// that names what is wrong.
#include "session/session_args.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/error.h"

namespace {

using shimlet::session::Args;

Args parse(std::vector<std::string> args) {
  std::vector<const char*> argv{"shimlet-session"};
  for (const auto& a : args) argv.push_back(a.c_str());
  return shimlet::session::parse_args(static_cast<int>(argv.size()), argv.data());
}

// The message parse() refuses args with ("" if it accepts them).
std::string refusal(std::vector<std::string> args) {
  try {
    parse(std::move(args));
  } catch (const shimlet::Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("usage: shimlet-session --config PATH"), std::string::npos) << m;
    return m;
  }
  return "";
}

TEST(SessionArgs, WhatTheShimPasses) {
  // A cold session, a warm one, the gate (shim/shim.cc builds these).
  Args cold = parse({"--config", "/run/shimlet/c1/shim.json", "--ns", "mnt=6,net=7,pid=8"});
  EXPECT_EQ(cold.config, "/run/shimlet/c1/shim.json");
  EXPECT_EQ(cold.ns, (std::vector<std::pair<std::string, int>>{{"mnt", 6}, {"net", 7}, {"pid", 8}}));
  EXPECT_EQ(cold.warm_idle_s, 0);
  EXPECT_EQ(cold.gate_idle_s, 0);
  EXPECT_TRUE(cold.gate_zygote);
  EXPECT_EQ(cold.gate_cri_fd, -1);

  Args warm = parse({"--config", "c.json", "--ns", "net=6", "--warm", "30"});
  EXPECT_EQ(warm.warm_idle_s, 30);

  Args gate = parse({"--config", "c.json", "--ns", "net=6", "--gate", "300", "--no-zygote", "--cri-listener", "7"});
  EXPECT_EQ(gate.gate_idle_s, 300);
  EXPECT_FALSE(gate.gate_zygote);
  EXPECT_EQ(gate.gate_cri_fd, 7);
  EXPECT_TRUE(parse({"--config", "c.json", "--gate", "1"}).gate_zygote);
}

TEST(SessionArgs, NamespaceLists) {
  // A container that shares every namespace with the shim: an empty list.
  EXPECT_TRUE(parse({"--config", "c", "--ns", ""}).ns.empty());
  EXPECT_TRUE(parse({"--config", "c"}).ns.empty());
  // Repeated: appended in order.
  EXPECT_EQ(parse({"--config", "c", "--ns", "user=6", "--ns", "mnt=7"}).ns,
            (std::vector<std::pair<std::string, int>>{{"user", 6}, {"mnt", 7}}));
  for (const char* bad : {"net", "net=", "=6", "net=x", "net=6x", "net=-1", "net=6,,mnt=7", "net=99999999"})
    EXPECT_NE(refusal({"--config", "c", "--ns", bad}).find("bad --ns item"), std::string::npos) << bad;
}

TEST(SessionArgs, BadCommandLinesAreRefused) {
  EXPECT_NE(refusal({}).find("--config"), std::string::npos);  // required
  EXPECT_NE(refusal({"--ns", "net=6"}).find("--config"), std::string::npos);
  EXPECT_NE(refusal({"--config"}).find("--config"), std::string::npos);  // no value
  EXPECT_NE(refusal({"--config", "c", "--bogus"}).find("--bogus"), std::string::npos);
  EXPECT_NE(refusal({"--config", "c", "extra"}).find("extra"), std::string::npos);
  // Idle times 1..3600 s; the CRI listener is a passed fd (>= 6).
  for (const char* v : {"0", "3601", "-1", "ten", ""}) {
    EXPECT_NE(refusal({"--config", "c", "--warm", v}).find("--warm"), std::string::npos) << v;
    EXPECT_NE(refusal({"--config", "c", "--gate", v}).find("--gate"), std::string::npos) << v;
  }
  EXPECT_NE(refusal({"--config", "c", "--gate", "5", "--cri-listener", "2"}).find("--cri-listener"), std::string::npos);
  // Options of one mode only: warm xor gate; the gate's own options need --gate.
  EXPECT_NE(refusal({"--config", "c", "--warm", "5", "--gate", "5"}).find("excludes"), std::string::npos);
  EXPECT_NE(refusal({"--config", "c", "--no-zygote"}).find("--gate"), std::string::npos);
  EXPECT_NE(refusal({"--config", "c", "--cri-listener", "7"}).find("--gate"), std::string::npos);
  // No help text: the session is started by the shim.
  EXPECT_NE(refusal({"--config", "c", "--help"}).find("--help"), std::string::npos);
}

}  // namespace
