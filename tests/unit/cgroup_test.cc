// SessionCgroup on REAL cgroups (needs root): a scratch "container" cgroup
// is made under this test process's own cgroups (v2 unified + v1 pids,
// memory, cpu, cpuacct, freezer), host processes are attached to sessions
// under it, and every directory/process is removed even when a test fails.
#include "cgroup/cgroup.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "common/error.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

using namespace shimlet;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

std::string slurp(const std::string& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool alive(pid_t p) { return ::kill(p, 0) == 0; }

// Line of /proc/PID/cgroup for a hierarchy ("" = v2, else a controller).
std::string cgroup_of(pid_t pid, const std::string& ctl) {
  std::istringstream in(slurp("/proc/" + std::to_string(pid) + "/cgroup"));
  std::string line;
  while (std::getline(in, line)) {
    auto a = line.find(':'), b = line.find(':', a + 1);
    std::string c = line.substr(a + 1, b - a - 1);
    std::istringstream cs(c);
    std::string x;
    bool hit = ctl.empty() ? c.empty() : false;
    while (!ctl.empty() && std::getline(cs, x, ','))
      if (x == ctl) hit = true;
    if (hit) return line.substr(b + 1);
  }
  return "?";
}

// Child processes of the test: forked, held on a pipe until released (so
// they can be attached before running), killed and reaped at the end.
struct Child {
  pid_t pid = -1;
  int go = -1;
  ~Child() {
    if (go >= 0) ::close(go);
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
  void release() {
    char c = 'g';
    ASSERT_EQ(::write(go, &c, 1), 1);
    ::close(go);
    go = -1;
  }
  int wait() {
    int st = 0;
    EXPECT_EQ(::waitpid(pid, &st, 0), pid);
    pid = -1;
    return st;
  }
};

template <class F>
std::unique_ptr<Child> spawn(F body) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) throw sys_error("pipe");
  auto c = std::make_unique<Child>();
  c->pid = ::fork();
  if (c->pid == 0) {
    ::close(p[1]);
    char x;
    if (::read(p[0], &x, 1) != 1) _exit(99);
    ::close(p[0]);
    body();
    _exit(0);
  }
  ::close(p[0]);
  c->go = p[1];
  return c;
}

void exec_sh(const char* script) {
  ::execl("/bin/sh", "sh", "-c", script, nullptr);
  _exit(127);
}

// Removes a cgroup directory tree bottom-up after killing what is in it.
void nuke(const fs::path& dir) {
  if (!fs::exists(dir)) return;
  std::error_code ec;
  for (auto& sub : fs::directory_iterator(dir, ec))
    if (sub.is_directory()) nuke(sub.path());
  if (fs::exists(dir / "cgroup.kill")) std::ofstream(dir / "cgroup.kill") << "1";
  for (int i = 0; i < 400 && ::rmdir(dir.c_str()) != 0 && errno == EBUSY; ++i) {
    std::istringstream in(slurp(dir / "cgroup.procs"));
    pid_t p;
    while (in >> p) ::kill(p, SIGKILL);
    std::this_thread::sleep_for(5ms);
  }
}

// Waits (bounded) until the session holds at least n processes: a loaded
// host may take a while to run the shell's forks.
size_t wait_pids(const cgroup::SessionCgroup& s, size_t n) {
  for (int i = 0; i < 400 && s.pids().size() < n; ++i) std::this_thread::sleep_for(5ms);
  return s.pids().size();
}

class CgroupTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(::geteuid(), 0u) << "cgroup tests need root";
    auto self = cgroup::of_pid(::getpid());
    std::string leaf = "cgl-test-" + std::to_string(::getpid()) + "-" +
                       ::testing::UnitTest::GetInstance()->current_test_info()->name();
    for (auto& e : self.entries) {
      bool want = e.v2() || e.has("pids") || e.has("memory") || e.has("cpu") || e.has("cpuacct") || e.has("freezer");
      if (!want) continue;
      cgroup::Entry c = e;
      c.dir = e.dir + "/" + leaf;
      c.path = (e.path == "/" ? "" : e.path) + "/" + leaf;
      ASSERT_EQ(::mkdir(c.dir.c_str(), 0755), 0) << c.dir << ": " << strerror(errno);
      scratch_.push_back(c.dir);
      container_.entries.push_back(c);
    }
    ASSERT_NE(container_.unified(), nullptr) << "this host must have the v2 unified hierarchy";
    // The container's own process.
    init_ = spawn([] { exec_sh("exec sleep 1000"); });
    cgroup::attach(container_, init_->pid);
    init_->release();
  }
  void TearDown() override {
    init_.reset();
    for (auto it = scratch_.rbegin(); it != scratch_.rend(); ++it) nuke(*it);
    for (auto& d : scratch_) EXPECT_FALSE(fs::exists(d)) << "left behind: " << d;
  }
  const cgroup::Entry& entry(const std::string& ctl) {
    for (auto& e : container_.entries)
      if (ctl.empty() ? e.v2() : e.has(ctl)) return e;
    throw Error("no hierarchy " + ctl);
  }
  cgroup::Membership container_;
  std::vector<std::string> scratch_;
  std::unique_ptr<Child> init_;
};

TEST(CgroupName, Validation) {
  for (std::string bad :
       std::vector<std::string>{"", ".", "..", "../x", "a/b", ".hidden", "-x", "a b", "a\nb", std::string(65, 'a')})
    EXPECT_THROW(cgroup::validate_name(bad), Error) << bad;
  for (std::string good : std::vector<std::string>{"a", "s1", "abc-1.2_3", std::string(64, 'z')})
    EXPECT_NO_THROW(cgroup::validate_name(good));
  cgroup::Membership m;
  EXPECT_THROW(cgroup::SessionCgroup::create(m, "../../etc", {}), Error);
}

TEST_F(CgroupTest, LayoutAttachKillRemove) {
  std::vector<std::string> dirs;
  {
    auto s = cgroup::SessionCgroup::create(container_, "s1", {.pids_max = 50, .memory_max = 64 << 20});
    EXPECT_TRUE(s.skipped().empty());
    EXPECT_EQ(s.dir(), entry("").dir + "/shimlet-s1");
    for (auto& e : s.membership().entries)
      if (e.dir.find("shimlet-s1") != std::string::npos) dirs.push_back(e.dir);
    // v2 + pids + memory (no cpu child without a weight; freezer/cpuacct stay the container's with v2 present).
    EXPECT_EQ(dirs.size(), 3u);
    EXPECT_EQ(slurp(entry("pids").dir + "/shimlet-s1/pids.max"), "50\n");
    EXPECT_EQ(std::stoull(slurp(entry("memory").dir + "/shimlet-s1/memory.limit_in_bytes")), 64u << 20);

    auto c = spawn([] { exec_sh("sleep 1000 & sleep 1000 & (sleep 1000 &) ; exec sleep 1000"); });
    s.attach(c->pid);
    c->release();
    wait_pids(s, 4);
    auto base = entry("").path;
    EXPECT_EQ(cgroup_of(c->pid, ""), base + "/shimlet-s1");
    EXPECT_EQ(cgroup_of(c->pid, "pids"), entry("pids").path + "/shimlet-s1");
    EXPECT_EQ(cgroup_of(c->pid, "memory"), entry("memory").path + "/shimlet-s1");
    EXPECT_EQ(cgroup_of(c->pid, "freezer"), entry("freezer").path);  // the container's own
    EXPECT_EQ(cgroup_of(c->pid, "cpu"), entry("cpu").path);
    auto pids = s.pids();
    EXPECT_GE(pids.size(), 4u);  // sh + 3 sleeps (one reparented away from sh)

    auto t0 = std::chrono::steady_clock::now();
    EXPECT_TRUE(s.kill_all());
    auto dt = std::chrono::steady_clock::now() - t0;
    EXPECT_LT(dt, 1s);
    EXPECT_TRUE(s.pids().empty());
    for (pid_t p : pids) {
      // Zombies (not yet reaped by us) are fine: they are no longer in the cgroup.
      std::string st = slurp("/proc/" + std::to_string(p) + "/stat");
      EXPECT_TRUE(st.empty() || st.find(") Z") != std::string::npos) << st;
    }
    EXPECT_TRUE(alive(init_->pid)) << "the container's own process must survive a session kill";
    // c is still unreaped (a zombie) when the directories are removed.
  }
  for (auto& d : dirs) EXPECT_FALSE(fs::exists(d)) << d;
  EXPECT_TRUE(alive(init_->pid));
}

TEST_F(CgroupTest, DestructorKillsAndRemoves) {
  std::vector<pid_t> pids;
  std::string dir;
  auto c = spawn([] { exec_sh("sleep 1000 & exec sleep 1000"); });
  {
    auto s0 = cgroup::SessionCgroup::create(container_, "s2", {});
    auto s = std::move(s0);  // moved-from s0 must not remove anything
    dir = s.dir();
    s.attach(c->pid);
    c->release();
    wait_pids(s, 2);
    pids = s.pids();
    ASSERT_EQ(pids.size(), 2u);
  }
  EXPECT_FALSE(fs::exists(dir));
  EXPECT_TRUE(WIFSIGNALED(c->wait()));
  std::this_thread::sleep_for(50ms);
  for (pid_t p : pids)
    EXPECT_FALSE(alive(p) && slurp("/proc/" + std::to_string(p) + "/stat").find(") Z") == std::string::npos);
}

TEST_F(CgroupTest, ExistingNameRefusedAndNothingLeft) {
  auto s = cgroup::SessionCgroup::create(container_, "dup", {});
  try {
    cgroup::SessionCgroup::create(container_, "dup", {});
    FAIL() << "second create with the same name must throw";
  } catch (const std::system_error& e) {
    EXPECT_NE(std::string(e.what()).find("shimlet-dup"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(fs::exists(s.dir()));  // the failed create removed only its own directories
}

TEST_F(CgroupTest, ForkBombStoppedByPidsLimit) {
  auto bomb_s = cgroup::SessionCgroup::create(container_, "bomb", {.pids_max = 32});
  auto other_s = cgroup::SessionCgroup::create(container_, "other", {.pids_max = 32});
  auto bomb = spawn([] {
    for (;;) {
      pid_t p = ::fork();
      if (p < 0) ::usleep(1000);
    }
  });
  bomb_s.attach(bomb->pid);
  bomb->release();
  std::this_thread::sleep_for(500ms);
  auto u = bomb_s.usage();
  EXPECT_TRUE(u.pids_limited);
  EXPECT_GT(u.pids_max_hits, 0u);
  EXPECT_LE(bomb_s.pids().size(), 32u);
  // Another session and the container still fork normally.
  auto ok = spawn([] { exec_sh("for i in 1 2 3 4 5 6 7 8; do /bin/true || exit 3; done; sleep 0.1 & wait"); });
  other_s.attach(ok->pid);
  ok->release();
  int st = ok->wait();
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << st;
  EXPECT_FALSE(other_s.usage().pids_limited);
  auto c2 = spawn([] { exec_sh("/bin/true && /bin/true"); });
  cgroup::attach(container_, c2->pid);
  c2->release();
  st = c2->wait();
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << st;
  EXPECT_TRUE(bomb_s.kill_all());
  EXPECT_TRUE(bomb_s.pids().empty());
  EXPECT_TRUE(alive(init_->pid));
}

// A warm session's cgroup: made before its limits are known, a process
// placed in it, the limits written afterwards (docs/design.md "Warm sessions").
TEST_F(CgroupTest, MadeThenLimitedFitsOnlyItsShape) {
  auto s = cgroup::SessionCgroup::make(container_, "warm-x", {.pids_max = 1});
  // Same hierarchies for any pids limit; a memory or cpu limit needs more on v1.
  EXPECT_TRUE(s.fits({.pids_max = 7}));
  EXPECT_TRUE(s.fits({.pids_max = 1}));
  bool v1_memory = false, v1_cpu = false;
  for (auto& e : container_.entries) {
    v1_memory |= !e.v2() && e.has("memory");
    v1_cpu |= !e.v2() && e.has("cpu");
  }
  EXPECT_EQ(s.fits({.pids_max = 1, .memory_max = 64 << 20}), !v1_memory);
  EXPECT_EQ(s.fits({.pids_max = 1, .cpu_weight = 50}), !v1_cpu);
  EXPECT_FALSE(s.fits({.pids_max = 1, .cpu_weight = 20000}));  // out of range never fits
  // Nothing written by make(): a placed process forks freely until apply().
  auto child = spawn([] { exec_sh("for i in 1 2 3 4 5 6; do sleep 5 & done; kill $(jobs -p) 2>/dev/null; exit 0"); });
  s.attach(child->pid);
  s.apply({.pids_max = 3});
  EXPECT_TRUE(s.skipped().empty());
  child->release();
  int st = child->wait();
  (void)st;
  EXPECT_TRUE(s.usage().pids_limited) << "pids.max written by apply() did not hold";
}

TEST_F(CgroupTest, MemoryLimitKillsOnlyTheSession) {
  auto hog_s = cgroup::SessionCgroup::create(container_, "hog", {.memory_max = 32 << 20});
  auto calm_s = cgroup::SessionCgroup::create(container_, "calm", {.memory_max = 32 << 20});
  auto calm = spawn([] { exec_sh("exec sleep 1000"); });
  calm_s.attach(calm->pid);
  calm->release();
  auto hog = spawn([] {
    size_t n = 256 << 20;
    auto* p = static_cast<char*>(::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    for (size_t i = 0; i < n; i += 4096) p[i] = 1;
    _exit(0);  // not reached: OOM-killed
  });
  hog_s.attach(hog->pid);
  hog->release();
  int st = hog->wait();
  ASSERT_TRUE(WIFSIGNALED(st)) << st;
  EXPECT_EQ(WTERMSIG(st), SIGKILL);
  auto u = hog_s.usage();
  EXPECT_TRUE(u.oom_killed);
  EXPECT_GE(u.memory_peak, 16u << 20);
  EXPECT_LE(u.memory_peak, 40u << 20);
  EXPECT_TRUE(alive(calm->pid));
  EXPECT_TRUE(alive(init_->pid));
  EXPECT_FALSE(calm_s.usage().oom_killed);
}

TEST_F(CgroupTest, CpuUsageAndWeight) {
  // A memory limit makes the session own a v1 memory child, which is what reports the peak.
  auto s = cgroup::SessionCgroup::create(container_, "cpu", {.memory_max = 1u << 30, .cpu_weight = 100});
  EXPECT_EQ(slurp(entry("cpu").dir + "/shimlet-cpu/cpu.shares"), "2597\n");  // runc's mapping of weight 100
  auto c = spawn([] {
    // Fresh pages after the attach, so the session's memory cgroup is charged
    // (a spinning child touches none: the peak was 0 now and then).
    std::vector<char> touched(4u << 20, 1);
    volatile char keep = touched[touched.size() / 2];  // not optimised away
    (void)keep;
    // 300 ms of CPU time, however loaded the host is.
    timespec ts{};
    do ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    while (ts.tv_sec * 1000000000L + ts.tv_nsec < 300000000L);
  });
  s.attach(c->pid);
  c->release();
  c->wait();
  auto u = s.usage();
  EXPECT_GE(u.cpu_usec, 290000u);
  EXPECT_LE(u.cpu_usec, 2000000u);
  EXPECT_GT(u.memory_peak, 0u);
  EXPECT_FALSE(u.oom_killed);
  EXPECT_FALSE(u.pids_limited);
}

// Pure v1 (no unified hierarchy): tracking in the pids child, killing by
// freezer + pid-by-pid SIGKILL, CPU from the cpuacct child.
TEST_F(CgroupTest, V1OnlyKill) {
  cgroup::Membership v1;
  for (auto& e : container_.entries)
    if (!e.v2()) v1.entries.push_back(e);
  std::vector<std::string> dirs;
  {
    auto s = cgroup::SessionCgroup::create(v1, "v1only", {.pids_max = 64});
    EXPECT_EQ(s.dir(), entry("pids").dir + "/shimlet-v1only");
    for (auto& e : s.membership().entries)
      if (e.dir.find("shimlet-v1only") != std::string::npos) dirs.push_back(e.dir);
    EXPECT_EQ(dirs.size(), 4u);  // pids, memory, cpuacct, freezer
    auto c = spawn([] { exec_sh("sleep 1000 & sleep 1000 & x=0; while :; do x=$((x+1)); done"); });
    s.attach(c->pid);
    c->release();
    wait_pids(s, 3);
    std::this_thread::sleep_for(100ms);
    EXPECT_EQ(cgroup_of(c->pid, "freezer"), entry("freezer").path + "/shimlet-v1only");
    EXPECT_GE(s.pids().size(), 3u);
    EXPECT_GT(s.usage().cpu_usec, 1000u);  // a loaded host gives the loop little CPU
    EXPECT_TRUE(s.kill_all());
    EXPECT_TRUE(s.pids().empty());
    EXPECT_TRUE(WIFSIGNALED(c->wait()));
  }
  for (auto& d : dirs) EXPECT_FALSE(fs::exists(d)) << d;
  EXPECT_TRUE(alive(init_->pid));
}

// Pure v2 without delegated controllers (this host's unified hierarchy has
// none; a real v2 container cgroup holds processes and so cannot delegate):
// the session is tracked and killable, limits are skipped with a reason.
TEST_F(CgroupTest, V2WithoutControllersSkipsLimits) {
  cgroup::Membership v2;
  v2.entries.push_back(entry(""));
  auto s = cgroup::SessionCgroup::create(v2, "v2only", {.pids_max = 10, .memory_max = 1 << 20, .cpu_weight = 50});
  ASSERT_EQ(s.skipped().size(), 3u);
  EXPECT_NE(s.skipped()[0].find("no-internal-processes"), std::string::npos) << s.skipped()[0];
  auto c = spawn([] { exec_sh("sleep 1000 & exec sleep 1000"); });
  s.attach(c->pid);
  c->release();
  EXPECT_EQ(wait_pids(s, 2), 2u);
  EXPECT_TRUE(s.kill_all());
  EXPECT_TRUE(s.pids().empty());
}

}  // namespace

namespace {

// Cost added per session (docs/isolation.md "Numbers"): median of create + attach of
// one process + destroy (kill_all and rmdir), against fork + exit alone.
TEST_F(CgroupTest, CostMedian) {
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  auto us = [](auto d) { return std::chrono::duration<double, std::micro>(d).count(); };
  std::vector<double> base, with, create_destroy;
  for (int i = 0; i < 31; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    {
      auto c = spawn([] {});
      c->release();
      c->wait();
    }
    base.push_back(us(std::chrono::steady_clock::now() - t0));
    t0 = std::chrono::steady_clock::now();
    {
      auto s = cgroup::SessionCgroup::create(container_, "cost" + std::to_string(i),
                                             {.pids_max = 100, .memory_max = 64 << 20});
      auto c = spawn([] {});
      s.attach(c->pid);
      c->release();
      c->wait();
    }
    with.push_back(us(std::chrono::steady_clock::now() - t0));
    t0 = std::chrono::steady_clock::now();
    { auto s = cgroup::SessionCgroup::create(container_, "cd" + std::to_string(i), {.pids_max = 100}); }
    create_destroy.push_back(us(std::chrono::steady_clock::now() - t0));
  }
  std::printf(
      "median us: fork+exit %.0f, with session cgroup (create+attach+destroy) %.0f, added %.0f; "
      "create+destroy alone %.0f\n",
      median(base), median(with), median(with) - median(base), median(create_destroy));
  EXPECT_LT(median(with) - median(base), 200000.0);
}

}  // namespace

namespace {

// The real layout: a runc container (busybox-static rootfs), its cgroups
// from /proc/<init>/cgroup, a session under them; afterwards runc can still
// delete the container (nothing of ours is left in its cgroups).
struct RuncContainer {
  std::string id = "cgl-cg-" + std::to_string(::getpid());
  std::string root = "/run/cgl-runc-test";
  fs::path dir;
  pid_t pid = 0;
  int sh(const std::string& cmd) { return std::system(cmd.c_str()); }
  RuncContainer() {
    char tmpl[] = "/tmp/cgl-bundle-XXXXXX";
    if (!::mkdtemp(tmpl)) throw sys_error("mkdtemp");
    dir = tmpl;
    fs::create_directories(dir / "rootfs/bin");
    for (auto d : {"proc", "sys", "dev", "tmp", "etc"}) fs::create_directories(dir / "rootfs" / d);
    fs::copy_file("/bin/busybox", dir / "rootfs/bin/busybox");
    for (auto a : {"sh", "sleep"}) fs::create_symlink("busybox", dir / "rootfs/bin" / a);
    if (sh("cd " + dir.string() + " && runc spec") != 0) throw Error("runc spec failed");
    auto cfg = nlohmann::json::parse(slurp(dir / "config.json"));
    cfg["process"]["terminal"] = false;
    cfg["process"]["args"] = {"sleep", "100000"};
    std::ofstream(dir / "config.json") << cfg.dump();
    if (sh("cd " + dir.string() + " && runc --root " + root + " run -d --pid-file " + (dir / "pid").string() + " " +
           id + " </dev/null >/dev/null 2>&1") != 0)
      throw Error("runc run failed");
    pid = std::stoi(slurp(dir / "pid"));
  }
  ~RuncContainer() {
    sh("runc --root " + root + " delete -f " + id + " >/dev/null 2>&1");
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

TEST(CgroupRunc, SessionUnderRealContainer) {
  ASSERT_EQ(::geteuid(), 0u);
  RuncContainer c;
  auto m = cgroup::of_pid(c.pid);
  ASSERT_NE(m.unified(), nullptr);
  std::vector<std::string> dirs;
  {
    auto s = cgroup::SessionCgroup::create(m, "real", {.pids_max = 20, .memory_max = 32 << 20});
    EXPECT_TRUE(s.skipped().empty());
    for (auto& e : s.membership().entries)
      if (e.dir.find("shimlet-real") != std::string::npos) dirs.push_back(e.dir);
    EXPECT_GE(dirs.size(), 3u);
    auto p = spawn([] { exec_sh("sleep 1000 & exec sleep 1000"); });
    s.attach(p->pid);
    p->release();
    wait_pids(s, 2);
    EXPECT_EQ(cgroup_of(p->pid, "pids"), cgroup_of(c.pid, "pids") + "/shimlet-real");
    EXPECT_EQ(cgroup_of(p->pid, "memory"), cgroup_of(c.pid, "memory") + "/shimlet-real");
    EXPECT_EQ(cgroup_of(p->pid, ""), cgroup_of(c.pid, "") + "/shimlet-real");
    EXPECT_EQ(cgroup_of(p->pid, "devices"), cgroup_of(c.pid, "devices"));  // the container's own
    EXPECT_EQ(s.pids().size(), 2u);
    EXPECT_TRUE(s.kill_all());
    EXPECT_TRUE(alive(c.pid)) << "the container's init must survive";
  }
  for (auto& d : dirs) EXPECT_FALSE(fs::exists(d)) << d;
  EXPECT_TRUE(alive(c.pid));
  EXPECT_EQ(c.sh("runc --root " + c.root + " delete -f " + c.id), 0);
}

}  // namespace
