// shimctl: argument parsing, registrations, TARGET resolution, local tickets.
#include "client/client.h"

#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/proc.h"
#include "proto/tls.h"
#include "tests/unit/temp_dir.h"
#include "ticket/ticket.h"

namespace sc = shimlet::client;
namespace fs = std::filesystem;

namespace {

sc::Invocation parse(std::vector<std::string> a) {
  a.insert(a.begin(), "shimctl");
  return sc::parse_args(a);
}

std::string usage_error(std::vector<std::string> a) {
  try {
    parse(std::move(a));
  } catch (const sc::UsageError& e) {
    return e.what();
  }
  return "";
}

sc::Registration reg(std::string id, std::string ns, std::string pod, std::string container, bool sandbox = false) {
  sc::Registration r;
  r.id = std::move(id);
  r.ns = std::move(ns);
  r.pod = std::move(pod);
  r.container = std::move(container);
  r.endpoint = "127.0.0.1:1";
  r.pin = "sha256/x";
  r.sandbox = sandbox;
  return r;
}

std::string resolve_error(const std::vector<sc::Registration>& regs, const std::string& t,
                          const std::string& ns = "default", const std::string& c = "") {
  try {
    sc::resolve_target(regs, t, ns, c);
  } catch (const shimlet::Error& e) {
    return e.what();
  }
  return "";
}

struct TempDir : shimlet::test::TempDir {
  TempDir() : shimlet::test::TempDir("shimctl-test") {}
};

void write_file(const fs::path& p, const std::string& s) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << s;
}

}  // namespace

TEST(ClientArgs, KubectlStyle) {
  auto inv = parse({"--local", "--state-dir", "/x", "exec", "-it", "-n", "ns1", "pod1", "-c", "app", "--", "sh", "-c",
                    "echo -n hi", "--", "-i"});
  EXPECT_TRUE(inv.local);
  EXPECT_EQ(inv.state_dir, "/x");
  EXPECT_EQ(inv.verb, "exec");
  EXPECT_TRUE(inv.exec.stdin_);
  EXPECT_TRUE(inv.exec.tty);
  EXPECT_EQ(inv.ns, "ns1");
  EXPECT_EQ(inv.exec.target, "pod1");
  EXPECT_EQ(inv.exec.container, "app");
  // Everything after the first -- is the command, flags and -- included.
  EXPECT_EQ(inv.exec.command, (std::vector<std::string>{"sh", "-c", "echo -n hi", "--", "-i"}));
}

TEST(ClientArgs, FlagsInAnyPositionAndLongForms) {
  auto inv = parse({"exec", "abc", "--stdin", "--local", "--namespace=kube-system", "--container=x", "-t", "--", "ls"});
  EXPECT_TRUE(inv.local);
  EXPECT_TRUE(inv.exec.stdin_);
  EXPECT_TRUE(inv.exec.tty);
  EXPECT_EQ(inv.ns, "kube-system");
  EXPECT_EQ(inv.exec.container, "x");
  EXPECT_EQ(inv.exec.target, "abc");

  auto inv2 = parse({"-n", "a", "exec", "-ti", "t", "--", "true"});
  EXPECT_EQ(inv2.ns, "a");
  EXPECT_TRUE(inv2.exec.stdin_ && inv2.exec.tty);
  EXPECT_FALSE(inv2.local);
}

TEST(ClientArgs, Defaults) {
  unsetenv("SHIMLET_STATE_DIR");
  auto inv = parse({"exec", "t", "--", "true"});
  EXPECT_EQ(inv.state_dir, "/run/shimlet");
  EXPECT_EQ(inv.ns, "default");
  EXPECT_FALSE(inv.exec.stdin_);
  EXPECT_FALSE(inv.exec.tty);
  EXPECT_TRUE(inv.exec.container.empty());
  setenv("SHIMLET_STATE_DIR", "/env/dir", 1);
  EXPECT_EQ(parse({"exec", "t", "--", "true"}).state_dir, "/env/dir");
  EXPECT_EQ(parse({"--state-dir", "/flag", "exec", "t", "--", "true"}).state_dir, "/flag");
  unsetenv("SHIMLET_STATE_DIR");
}

TEST(ClientArgs, Help) {
  auto inv = parse({"--help"});
  EXPECT_TRUE(inv.help);
  EXPECT_NE(inv.help_text.find("exec"), std::string::npos);
  auto inv2 = parse({"exec", "-h"});
  EXPECT_TRUE(inv2.help);
  EXPECT_NE(inv2.help_text.find("--container"), std::string::npos);
}

TEST(ClientArgs, UsageErrors) {
  EXPECT_NE(usage_error({}).find("subcommand is required"), std::string::npos);
  EXPECT_NE(usage_error({"exec", "--", "ls"}).find("missing TARGET"), std::string::npos);
  EXPECT_NE(usage_error({"exec", "pod"}).find("missing command"), std::string::npos);
  EXPECT_NE(usage_error({"exec", "pod", "--"}).find("missing command"), std::string::npos);
  EXPECT_NE(usage_error({"exec", "pod", "ls"}).find("the command goes after --"), std::string::npos);
  EXPECT_NE(usage_error({"exec", "--bogus", "pod", "--", "ls"}).find("--bogus"), std::string::npos);
  EXPECT_NE(usage_error({"exec", "pod", "-c"}).find("-c"), std::string::npos);
  EXPECT_NE(usage_error({"frobnicate"}).find("frobnicate"), std::string::npos);
  EXPECT_NE(usage_error({"exec", "-n", "", "pod", "--", "ls"}).find("namespace"), std::string::npos);
  // Every usage error names the usage.
  EXPECT_NE(usage_error({"exec", "--bogus"}).find("usage: shimctl"), std::string::npos);
}

TEST(ClientTarget, ExactIdPrefixAndAmbiguity) {
  std::vector<sc::Registration> regs = {reg("abc123", "default", "abc123", "abc123"),
                                        reg("abd456", "default", "abd456", "abd456"),
                                        reg("ffff00", "default", "web", "app")};
  EXPECT_EQ(sc::resolve_target(regs, "abc123", "default", "").id, "abc123");
  EXPECT_EQ(sc::resolve_target(regs, "abc", "default", "").id, "abc123");
  EXPECT_EQ(sc::resolve_target(regs, "ff", "default", "").id, "ffff00");
  // Ids are global: a prefix resolves whatever the namespace.
  EXPECT_EQ(sc::resolve_target(regs, "abd", "other", "").id, "abd456");
  std::string e = resolve_error(regs, "ab");
  EXPECT_NE(e.find("ambiguous"), std::string::npos) << e;
  EXPECT_NE(e.find("abc123"), std::string::npos) << e;
  EXPECT_NE(e.find("abd456"), std::string::npos) << e;
  EXPECT_EQ(e.find("ffff00"), std::string::npos) << e;
  // -c narrows an id prefix, and must match an exact id's container.
  EXPECT_EQ(sc::resolve_target(regs, "f", "default", "app").id, "ffff00");
  e = resolve_error(regs, "ffff00", "default", "db");
  EXPECT_NE(e.find("not 'db'"), std::string::npos) << e;
}

TEST(ClientTarget, UnknownListsRegistered) {
  std::vector<sc::Registration> regs = {reg("abc123", "default", "p", "c")};
  std::string e = resolve_error(regs, "zzz");
  EXPECT_NE(e.find("no container matches 'zzz'"), std::string::npos) << e;
  EXPECT_NE(e.find("1 registered:\n  abc123 (default/p, container c)"), std::string::npos) << e;
  e = resolve_error({}, "zzz");
  EXPECT_NE(e.find("no containers are registered"), std::string::npos) << e;
}

TEST(ClientTarget, LongListsShowAFewOnePerLine) {
  // podman ids are 64 hex digits and name nothing else: shown as podman
  // shows them (12 digits), at most five, then how many more.
  std::vector<sc::Registration> regs;
  for (int i = 0; i < 8; i++) {
    std::string id = std::string(63, 'a') + static_cast<char>('0' + i);
    id[0] = static_cast<char>('0' + i);
    regs.push_back(reg(id, "default", id, id));
  }
  std::string e = resolve_error(regs, "zzz");
  EXPECT_NE(e.find("8 registered:\n  0aaaaaaaaaaa\n  1aaaaaaaaaaa\n"), std::string::npos) << e;
  EXPECT_NE(e.find("\n  4aaaaaaaaaaa\n  ... and 3 more"), std::string::npos) << e;
  EXPECT_EQ(e.find("5aaaaaaaaaaa"), std::string::npos) << e;
  EXPECT_EQ(e.find(std::string(40, 'a')), std::string::npos) << e;  // no full 64-digit id
  // A unique prefix of a podman id names it, as with podman itself.
  EXPECT_EQ(sc::resolve_target(regs, "3aaa", "default", "").id, regs[3].id);
  e = resolve_error(regs, "aaa");
  EXPECT_NE(e.find("no container matches"), std::string::npos) << e;
}

TEST(ClientTarget, DeadRegistrationsAreNeverOffered) {
  std::vector<sc::Registration> regs = {reg("live1", "default", "web", "app"), reg("dead1", "default", "db", "db"),
                                        reg("dead2", "default", "web", "app")};
  regs[1].alive = regs[2].alive = false;
  std::string e = resolve_error(regs, "dead1");
  EXPECT_NE(e.find("container dead1 is not running"), std::string::npos) << e;
  e = resolve_error(regs, "db");  // by pod name: as if it were not there
  EXPECT_NE(e.find("no container matches 'db'"), std::string::npos) << e;
  EXPECT_NE(e.find("1 registered:\n  live1"), std::string::npos) << e;
  EXPECT_EQ(e.find("dead"), std::string::npos) << e;
  EXPECT_EQ(sc::resolve_target(regs, "web", "default", "").id, "live1");  // not ambiguous with the dead one
  EXPECT_NE(resolve_error(regs, "dea").find("no container matches"), std::string::npos);  // no prefix match either
}

TEST(ClientTarget, LivenessNeedsPidAndStartTime) {
  sc::Registration r = reg("c", "default", "c", "c");
  r.shim_pid = getpid();
  auto me = shimlet::proc_stat(getpid());
  ASSERT_TRUE(me);
  r.shim_start_time = me->start_time;
  EXPECT_TRUE(sc::registration_alive(r));
  r.pid = getppid();
  r.pid_start_time = shimlet::proc_stat(getppid())->start_time;
  EXPECT_TRUE(sc::registration_alive(r));
  r.shim_start_time += 1;  // the pid now names another process: a reused pid is not our shim
  EXPECT_FALSE(sc::registration_alive(r));
  r.shim_start_time -= 1;
  r.pid_start_time += 1;
  EXPECT_FALSE(sc::registration_alive(r));
  r.pid = r.shim_pid = 0x3ffffff0;  // no such process
  EXPECT_FALSE(sc::registration_alive(r));
  r.pid = r.shim_pid = 0;  // not recorded (an older hook): cannot tell, offered
  EXPECT_TRUE(sc::registration_alive(r));
}

TEST(CommonProc, ParsesStat) {
  auto ps = shimlet::parse_proc_stat("42 (a b) c)) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 x 77 y\n");
  EXPECT_EQ(ps.state, 'S');
  EXPECT_EQ(ps.start_time, 987654u);
  EXPECT_EQ(ps.utime, 11u);
  EXPECT_EQ(ps.stime, 12u);
  EXPECT_EQ(ps.rss_pages, 77u);
  EXPECT_THROW(shimlet::parse_proc_stat("42 (x) S 1 2"), shimlet::Error);
  EXPECT_THROW(shimlet::parse_proc_stat("no parens"), shimlet::Error);
}

TEST(ClientTarget, PodAndContainerSelection) {
  std::vector<sc::Registration> regs = {
      reg("1111", "default", "web", "app"), reg("2222", "default", "web", "sidecar"),
      reg("3333", "default", "web", "web", true),  // the pod's sandbox: never chosen by pod name
      reg("4444", "prod", "web", "app"), reg("5555", "default", "db", "postgres")};
  EXPECT_EQ(sc::resolve_target(regs, "db", "default", "").id, "5555");
  EXPECT_EQ(sc::resolve_target(regs, "web", "default", "sidecar").id, "2222");
  EXPECT_EQ(sc::resolve_target(regs, "web", "default", "app").id, "1111");
  EXPECT_EQ(sc::resolve_target(regs, "web", "prod", "").id, "4444");
  std::string e = resolve_error(regs, "web");
  EXPECT_NE(e.find("pod default/web has 2 containers, choose one with -c"), std::string::npos) << e;
  EXPECT_NE(e.find("app (1111)"), std::string::npos) << e;
  EXPECT_NE(e.find("sidecar (2222)"), std::string::npos) << e;
  e = resolve_error(regs, "web", "default", "nope");
  EXPECT_NE(e.find("has no container 'nope'"), std::string::npos) << e;
  EXPECT_NE(e.find("sidecar"), std::string::npos) << e;
  // A pod name wins over an id prefix; an unknown namespace falls back to prefixes.
  EXPECT_EQ(resolve_error(regs, "web", "nowhere").find("no container matches"), 0u);
}

TEST(ClientRegistration, ParseAndFallbacks) {
  auto r = sc::parse_registration(
      R"({"id":"c1","pid":1,"endpoint":"127.0.0.1:5","pin":"sha256/AA","annotations":{"io.kubernetes.cri.container-type":"sandbox"}})",
      "/p");
  EXPECT_EQ(r.id, "c1");
  EXPECT_EQ(r.ns, "default");
  EXPECT_EQ(r.pod, "c1");
  EXPECT_EQ(r.container, "c1");
  EXPECT_TRUE(r.sandbox);
  EXPECT_THROW(sc::parse_registration("[]", "/p"), shimlet::Error);
  EXPECT_THROW(sc::parse_registration("{not json", "/p"), shimlet::Error);
  EXPECT_THROW(sc::parse_registration(R"({"id":"c1","pin":"x"})", "/p"), shimlet::Error);
  EXPECT_THROW(sc::parse_registration(R"({"id":5,"endpoint":"e","pin":"x"})", "/p"), shimlet::Error);
}

TEST(ClientRegistration, LoadSkipsBrokenOnes) {
  TempDir d;
  write_file(fs::path(d.path) / "bbb" / "registration.json",
             R"({"id":"bbb","endpoint":"127.0.0.1:2","pin":"sha256/B","namespace":"n","pod":"p","container":"c"})");
  write_file(fs::path(d.path) / "aaa" / "registration.json",
             R"({"id":"aaa","endpoint":"127.0.0.1:1","pin":"sha256/A"})");
  write_file(fs::path(d.path) / "broken" / "registration.json", "{");
  fs::create_directories(fs::path(d.path) / "starting");  // no registration yet
  write_file(fs::path(d.path) / "local.key", "x");
  auto regs = sc::load_registrations(d.path);
  ASSERT_EQ(regs.size(), 2u);
  EXPECT_EQ(regs[0].id, "aaa");
  EXPECT_EQ(regs[1].id, "bbb");
  EXPECT_EQ(regs[1].pod, "p");
  try {
    sc::load_registrations((fs::path(d.path) / "missing").string());
    FAIL() << "no throw";
  } catch (const shimlet::Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing"), std::string::npos);
  }
}

TEST(ClientGrant, LocalTicketClaims) {
  TempDir d;
  auto node = shimlet::ticket::PrivateKey::generate();
  node.save(fs::path(d.path) / "local.key");
  write_file(
      fs::path(d.path) / "cid42" / "registration.json",
      R"({"id":"cid42","endpoint":"127.0.0.1:7","pin":"sha256/P","namespace":"ns","pod":"pod","container":"c"})");
  auto id = shimlet::proto::generate_identity("test");
  sc::ExecOptions ex;
  ex.target = "pod";
  ex.command = {"sh", "-c", "echo hi"};
  ex.stdin_ = true;
  ex.tty = false;
  int64_t now = time(nullptr);
  setenv("SUDO_USER", "alice", 1);
  sc::Grant g = sc::local_exec_grant(d.path, "ns", ex, id, now);
  unsetenv("SUDO_USER");
  EXPECT_EQ(g.container_id, "cid42");
  EXPECT_EQ(g.endpoint, "127.0.0.1:7");
  EXPECT_EQ(g.pin, "sha256/P");

  std::vector<shimlet::ticket::TrustedKey> keys = {{"local", shimlet::ticket::PublicKey::from_pem(node.public_pem())}};
  auto c = shimlet::ticket::verify(g.ticket, keys, {.aud = "cid42", .verb = "exec", .now = now});
  EXPECT_EQ(c.iss, "local");
  EXPECT_EQ(c.sub, "alice");
  EXPECT_EQ(c.cmd, ex.command);
  EXPECT_TRUE(c.stdin_);
  EXPECT_FALSE(c.tty);
  EXPECT_EQ(c.exp - c.iat, 30);
  EXPECT_FALSE(c.jti.empty());
  EXPECT_FALSE(c.sid.empty());
  // cnf binds the identity's certificate key, as the session computes it.
  BIO* b = BIO_new_mem_buf(id.cert_pem.data(), static_cast<int>(id.cert_pem.size()));
  X509* x = PEM_read_bio_X509(b, nullptr, nullptr, nullptr);
  ASSERT_NE(x, nullptr);
  EXPECT_EQ(c.cnf_jkt, shimlet::proto::jkt_of_cert(x));
  X509_free(x);
  BIO_free(b);

  // Fresh jti every time.
  sc::Grant g2 = sc::local_exec_grant(d.path, "ns", ex, id, now);
  EXPECT_NE(shimlet::ticket::verify(g2.ticket, keys, {.aud = "cid42", .verb = "exec", .now = now}).jti, c.jti);
}

TEST(ClientGrant, MissingKeyIsClear) {
  TempDir d;
  write_file(fs::path(d.path) / "cid" / "registration.json",
             R"({"id":"cid","endpoint":"127.0.0.1:7","pin":"sha256/P"})");
  sc::ExecOptions ex;
  ex.target = "cid";
  ex.command = {"true"};
  try {
    sc::local_exec_grant(d.path, "default", ex, shimlet::proto::generate_identity("t"), time(nullptr));
    FAIL() << "no throw";
  } catch (const shimlet::Error& e) {
    EXPECT_NE(std::string(e.what()).find("node key"), std::string::npos) << e.what();
  }
}

TEST(ClientGrant, LocalExecTargetFailsBeforeMintingAndMintBindsTheIdentity) {
  TempDir d;
  write_file(fs::path(d.path) / "cid" / "registration.json",
             R"({"id":"cid","endpoint":"127.0.0.1:7","pin":"sha256/P"})");
  sc::ExecOptions ex;
  ex.target = "cid";
  ex.command = {"true"};
  // No key: the first step already fails (shimctl must not connect then).
  try {
    sc::local_exec_target(d.path, "default", ex);
    FAIL() << "no throw";
  } catch (const shimlet::Error& e) {
    EXPECT_NE(std::string(e.what()).find("node key"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("local.key"), std::string::npos) << e.what();
  }
  // A key that does not parse fails at minting, with the same prefix and the path.
  write_file(fs::path(d.path) / "local.key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
  sc::LocalExec bad = sc::local_exec_target(d.path, "default", ex);
  EXPECT_EQ(bad.grant.endpoint, "127.0.0.1:7");
  EXPECT_TRUE(bad.grant.ticket.empty());
  try {
    sc::mint_local_exec_ticket(bad, ex, shimlet::proto::generate_identity("t"), time(nullptr));
    FAIL() << "no throw";
  } catch (const shimlet::Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot load the node key"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("local.key"), std::string::npos) << e.what();
  }
  auto node = shimlet::ticket::PrivateKey::generate();
  node.save(fs::path(d.path) / "local.key");
  sc::LocalExec le = sc::local_exec_target(d.path, "default", ex);
  auto id = shimlet::proto::generate_identity("t");
  int64_t now = time(nullptr);
  sc::mint_local_exec_ticket(le, ex, id, now);
  std::vector<shimlet::ticket::TrustedKey> keys = {{"local", shimlet::ticket::PublicKey::from_pem(node.public_pem())}};
  auto c = shimlet::ticket::verify(le.grant.ticket, keys, {.aud = "cid", .verb = "exec", .now = now});
  EXPECT_EQ(c.cnf_jkt, shimlet::proto::jkt_of_cert(id.cert.get()));
}

TEST(ClientGrant, LargeRegistrationIsSkippedSmallOneRead) {
  TempDir d;
  write_file(fs::path(d.path) / "big" / "registration.json",
             R"({"id":"big","endpoint":"127.0.0.1:7","pin":"sha256/P","x":")" + std::string(1 << 20, 'a') + "\"}");
  std::string pad(5000, ' ');  // more than one read chunk
  write_file(fs::path(d.path) / "ok" / "registration.json",
             "{" + pad + R"("id":"ok","endpoint":"127.0.0.1:7","pin":"sha256/P"})");
  auto regs = sc::load_registrations(d.path);
  ASSERT_EQ(regs.size(), 1u);
  EXPECT_EQ(regs[0].id, "ok");
}

// The word CLI11 did not know is named, skipping the values of value options
// (found in the CLI definition) but not the word after a flag.
TEST(ClientArgs, UnknownCommandNamed) {
  for (auto args : {std::vector<std::string>{"bogus"},
                    {"--local", "--state-dir", "/tmp/x", "bogus"},
                    {"--local", "bogus"},
                    {"-n", "ns", "--proxy", "bogus"},
                    {"--kubeconfig", "kc", "bogus"}}) {
    std::string e = usage_error(args);
    EXPECT_NE(e.find("unknown command 'bogus' (commands: exec, port-forward, sessions, completion)"), std::string::npos)
        << args.size() << ": " << e;
  }
}

TEST(ClientArgs, VersionAndCompletion) {
  auto v = parse({"--version"});
  EXPECT_TRUE(v.help);
  EXPECT_EQ(v.help_text.rfind("shimctl ", 0), 0u) << v.help_text;
  auto c = parse({"completion", "zsh"});
  EXPECT_EQ(c.verb, "completion");
  EXPECT_EQ(c.completion_shell, "zsh");
  EXPECT_NE(sc::completion_script("bash").find("complete -F _shimctl shimctl"), std::string::npos);
  EXPECT_NE(sc::completion_script("zsh").find("#compdef shimctl"), std::string::npos);
  EXPECT_THROW(sc::completion_script("fish"), sc::UsageError);
  EXPECT_NE(usage_error({"completion", "fish"}), "");
}
