// etcd::Client against a real etcd (Debian's etcd-server) started by the
// test on loopback ports: KV and Txn, leases, the prefix watch, endpoint
// failover. TLS and the 3-member cluster are tests/integration's
// (test_master_ha.py); the pure parts are tested here too.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <thread>

#include "common/error.h"
#include "etcd/client.h"

using namespace shimlet;
using namespace std::chrono_literals;

namespace {

constexpr const char* kEtcd = "/usr/bin/etcd";

uint16_t free_port() {
  int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  socklen_t l = sizeof a;
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &l);
  ::close(s);
  return ntohs(a.sin_port);
}

// One etcd member on loopback, plain HTTP, in a temp dir; killed and removed at the end.
class EtcdServer {
 public:
  EtcdServer() {
    if (::access(kEtcd, X_OK) != 0) throw Error(std::string(kEtcd) + " missing: install etcd-server (scripts/deps)");
    char t[] = "/tmp/etcd-client-test.XXXXXX";
    dir_ = mkdtemp(t);
    client_port_ = free_port();
    const uint16_t peer = free_port();
    const std::string c = "http://127.0.0.1:" + std::to_string(client_port_);
    const std::string p = "http://127.0.0.1:" + std::to_string(peer);
    std::vector<std::string> args = {kEtcd,
                                     "--name",
                                     "u1",
                                     "--data-dir",
                                     dir_ + "/data",
                                     "--listen-client-urls",
                                     c,
                                     "--advertise-client-urls",
                                     c,
                                     "--listen-peer-urls",
                                     p,
                                     "--initial-advertise-peer-urls",
                                     p,
                                     "--initial-cluster",
                                     "u1=" + p,
                                     "--logger",
                                     "zap",
                                     "--log-outputs",
                                     dir_ + "/etcd.log"};
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // dies with the test, whatever ends it
      int out = ::open((dir_ + "/etcd.out").c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (out >= 0) {
        ::dup2(out, 1);
        ::dup2(out, 2);
      }
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(kEtcd, argv.data());
      ::_exit(127);
    }
  }
  ~EtcdServer() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    std::filesystem::remove_all(dir_);
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(client_port_); }
  std::string log_tail() const {
    std::ifstream f(dir_ + "/etcd.log");
    std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    return s.size() > 3000 ? s.substr(s.size() - 3000) : s;
  }

 private:
  std::string dir_;
  uint16_t client_port_ = 0;
  pid_t pid_ = -1;
};

// Runs one asynchronous call and waits for its result.
template <typename F>
etcd::Result wait(F call) {
  auto p = std::make_shared<std::promise<etcd::Result>>();
  auto f = p->get_future();
  call([p](etcd::Result r) { p->set_value(std::move(r)); });
  EXPECT_EQ(f.wait_for(30s), std::future_status::ready);
  return f.get();
}

etcd::Config config(std::vector<std::string> urls, int timeout_ms = 5000) {
  etcd::Config c;
  std::string list;
  for (auto& u : urls) list += (list.empty() ? "" : ",") + u;
  c.endpoints = etcd::parse_endpoints(list);
  c.request_timeout_ms = timeout_ms;
  return c;
}

// Waits until the member answers (its start takes a moment).
void wait_ready(etcd::Client& c, const EtcdServer& srv) {
  for (int i = 0; i < 300; i++) {
    etcd::RangeOptions o;
    o.count_only = true;
    if (!wait([&](etcd::Callback cb) { c.range("ready", o, cb); }).error) return;
    std::this_thread::sleep_for(100ms);
  }
  FAIL() << "etcd did not become ready: " << srv.log_tail();
}

etcd::Op put(std::string k, std::string v, int64_t lease = 0) {
  etcd::Op o;
  o.kind = etcd::Op::Kind::Put;
  o.key = std::move(k);
  o.value = std::move(v);
  o.lease = lease;
  return o;
}

etcd::Op get(std::string k) {
  etcd::Op o;
  o.key = std::move(k);
  return o;
}

etcd::Compare absent(std::string k) {
  etcd::Compare c;
  c.key = std::move(k);
  c.target = etcd::Compare::Target::Create;
  return c;
}

}  // namespace

TEST(EtcdEndpoints, Parse) {
  auto eps = etcd::parse_endpoints("https://10.0.0.1:2379, http://h.example,https://[::1]:32379/");
  ASSERT_EQ(eps.size(), 3u);
  EXPECT_EQ(eps[0].host, "10.0.0.1");
  EXPECT_EQ(eps[0].port, 2379);
  EXPECT_TRUE(eps[0].tls);
  EXPECT_EQ(eps[1].host, "h.example");
  EXPECT_EQ(eps[1].port, 2379);
  EXPECT_FALSE(eps[1].tls);
  EXPECT_EQ(eps[2].host, "::1");
  EXPECT_EQ(eps[2].port, 32379);
  for (const char* bad : {"", "127.0.0.1:2379", "https://", "https://h:0", "https://h:99999", "https://h:2379/v3",
                          "https://u@h:1", "https://[::1", "https://::1:2379", "ftp://h:1", "https://h:"})
    EXPECT_THROW(etcd::parse_endpoints(bad), Error) << bad;
  EXPECT_EQ(etcd::prefix_end("/shimlet/"), "/shimlet0");
  EXPECT_EQ(etcd::prefix_end(std::string("a\xff", 2)), "b");
}

TEST(EtcdClient, TxnLeasesWatchAndFailover) {
  EtcdServer srv;
  // The first endpoint is a closed port: every call fails over to the live one.
  etcd::Client c(config({"http://127.0.0.1:" + std::to_string(free_port()), srv.url()}));
  wait_ready(c, srv);

  // A Txn that only creates: the second one loses and reads the key back.
  etcd::Txn t;
  t.compare.push_back(absent("/t/a"));
  t.success.push_back(put("/t/a", "one"));
  t.failure.push_back(get("/t/a"));
  etcd::Result r = wait([&](etcd::Callback cb) { c.txn(t, cb); });
  ASSERT_FALSE(r.error) << *r.error;
  EXPECT_TRUE(r.succeeded);
  EXPECT_EQ(r.endpoint, srv.url());
  const int64_t created = r.revision;
  t.success[0].value = "two";
  r = wait([&](etcd::Callback cb) { c.txn(t, cb); });
  ASSERT_FALSE(r.error) << *r.error;
  EXPECT_FALSE(r.succeeded);
  ASSERT_EQ(r.op_kvs.size(), 1u);
  ASSERT_EQ(r.op_kvs[0].size(), 1u);
  EXPECT_EQ(r.op_kvs[0][0].value, "one");
  EXPECT_EQ(r.op_kvs[0][0].create_revision, created);

  // The watch lists what exists, then reports changes in order.
  std::mutex mu;
  std::condition_variable cv;
  std::vector<etcd::KeyValue> listed;
  std::vector<etcd::Event> seen;
  etcd::WatchHandler h;
  h.reset = [&](std::vector<etcd::KeyValue> kvs, int64_t) {
    std::lock_guard lk(mu);
    listed = std::move(kvs);
    cv.notify_all();
  };
  h.events = [&](std::vector<etcd::Event> evs) {
    std::lock_guard lk(mu);
    for (auto& e : evs) seen.push_back(std::move(e));
    cv.notify_all();
  };
  auto w = c.watch_prefix("/t/", h);
  {
    std::unique_lock lk(mu);
    ASSERT_TRUE(cv.wait_for(lk, 10s, [&] { return !listed.empty(); }));
    EXPECT_EQ(listed[0].key, "/t/a");
  }

  // A lease: keys attached to it go when it is revoked; a keep-alive of a
  // lease that is gone says so (ttl <= 0).
  r = wait([&](etcd::Callback cb) { c.lease_grant(30, cb); });
  ASSERT_FALSE(r.error) << *r.error;
  const int64_t lease = r.lease_id;
  EXPECT_GT(lease, 0);
  etcd::Txn p;
  p.success.push_back(put("/t/leased", "x", lease));
  ASSERT_FALSE(wait([&](etcd::Callback cb) { c.txn(p, cb); }).error);
  r = wait([&](etcd::Callback cb) { c.lease_keep_alive(lease, cb); });
  ASSERT_FALSE(r.error) << *r.error;
  EXPECT_GT(r.ttl, 0);
  ASSERT_FALSE(wait([&](etcd::Callback cb) { c.lease_revoke(lease, cb); }).error);
  r = wait([&](etcd::Callback cb) { c.lease_keep_alive(lease, cb); });
  ASSERT_FALSE(r.error) << *r.error;
  EXPECT_LE(r.ttl, 0);
  // A put attached to a lease that does not exist: NOT_FOUND.
  r = wait([&](etcd::Callback cb) { c.txn(p, cb); });
  EXPECT_TRUE(r.not_found) << r.error.value_or("");
  {
    std::unique_lock lk(mu);
    ASSERT_TRUE(cv.wait_for(lk, 10s, [&] { return seen.size() >= 2; }));
    EXPECT_EQ(seen[0].kv.key, "/t/leased");
    EXPECT_FALSE(seen[0].deleted);
    EXPECT_EQ(seen[1].kv.key, "/t/leased");
    EXPECT_TRUE(seen[1].deleted);
    EXPECT_GT(seen[1].kv.mod_revision, seen[0].kv.mod_revision);
  }
  // restart() resumes from the last revision seen: nothing lost, nothing twice.
  w->restart("test");
  ASSERT_FALSE(wait([&](etcd::Callback cb) { c.txn(etcd::Txn{{}, {put("/t/b", "after")}, {}}, cb); }).error);
  {
    std::unique_lock lk(mu);
    ASSERT_TRUE(cv.wait_for(lk, 10s, [&] { return seen.size() >= 3; }));
    EXPECT_EQ(seen[2].kv.key, "/t/b");
    EXPECT_EQ(seen.size(), 3u);
  }
  etcd::RangeOptions o;
  o.range_end = etcd::prefix_end("/t/");
  r = wait([&](etcd::Callback cb) { c.range("/t/", o, cb); });
  ASSERT_FALSE(r.error) << *r.error;
  EXPECT_EQ(r.kvs.size(), 2u);
}

TEST(EtcdClient, NoMemberAnswersWithinTheDeadline) {
  etcd::Client c(config(
      {"http://127.0.0.1:" + std::to_string(free_port()), "http://127.0.0.1:" + std::to_string(free_port())}, 1000));
  auto t0 = std::chrono::steady_clock::now();
  etcd::Result r = wait([&](etcd::Callback cb) { c.range("k", {}, cb); });
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
  ASSERT_TRUE(r.error);
  EXPECT_NE(r.error->find("no member answered"), std::string::npos) << *r.error;
  EXPECT_NE(r.error->find("127.0.0.1"), std::string::npos) << *r.error;
}
